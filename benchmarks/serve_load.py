"""Load test of ``python -m spacy_m3el serve``: 16 concurrent clients for
60 s against the demo pipeline on 127.0.0.1, next to ``nlp.pipe`` on the
same rows in the same run.

    python benchmarks/serve_load.py   # -> results/serve_load.json

Needs `spacy project run all` (the assembled demo pipeline,
training/clipart_mel/model-linker: alias ruler + linker) and
``pip install -e .[bench]`` (FastAPI, uvicorn, httpx). Inputs: the demo's
test sentences as raw text (the ruler finds the mentions), each with its
mention picture by path (the server allows the demo's mention_image
folder), one row per request, cycled; the pipeline copied with its
backbone feature cache off (``feature_cache_mb = 0``), so that every
request's text and picture are encoded as a new post's would be (the 264
pictures cycle through the 256-picture decode cache: no hit either). The
server runs in a child process
with the default micro-batching (max 32 rows, 10 ms); the clients are
threads of this process, so they share the machine's cores with the
server: the figures are the whole system's on this machine. Then, in this
process, ``nlp.pipe`` (batch 32) links the same rows (docs made from them
as ``link`` makes them) for at least 20 s. All traffic goes to 127.0.0.1,
bounded in count and time; the server is stopped at the end.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import httpx
import spacy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import run_info  # noqa: E402
from kb_scale import WORK, cpu_seconds, write  # noqa: E402
from spacy_m3el.data.readers import MultimodalCorpus  # noqa: E402
from spacy_m3el.data.rows import row_doc  # noqa: E402

DEMO = ROOT / "assets" / "clipart_mel"


def demo_rows(nlp) -> List[Dict[str, Any]]:
    """The demo's test sentences with their mention pictures (relative paths)."""
    rows = []
    for i, eg in enumerate(MultimodalCorpus(ROOT / "corpus" / "clipart_mel" / "test.spacy", image_dir=DEMO)(nlp)):
        picture = Path(eg.reference._.image)
        rows.append({"id": i, "text": eg.reference.text, "image": picture.name})
    return rows


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 180.0) -> Dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            answer = httpx.get(f"{url}/ready", timeout=2)
            if answer.status_code == 200:
                return answer.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server was not ready within {timeout:.0f} s")


def load(url: str, rows: List[Dict[str, Any]], *, clients: int, seconds: float) -> Dict[str, Any]:
    """``clients`` threads, each posting one row at a time until ``seconds`` pass."""
    latencies: List[float] = []
    statuses: Dict[str, int] = {}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(index: int) -> None:
        position = index
        with httpx.Client(timeout=30) as session:
            while time.monotonic() < stop_at:
                row = rows[position % len(rows)]
                position += clients
                started = time.perf_counter()
                try:
                    status = str(session.post(f"{url}/link", json=row).status_code)
                except httpx.HTTPError as err:
                    status = type(err).__name__
                took = time.perf_counter() - started
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == "200":
                        latencies.append(took)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 60)
    wall = time.perf_counter() - started
    latencies.sort()

    def percentile(p: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))]

    ok = statuses.get("200", 0)
    return {"clients": clients, "seconds": wall, "requests": sum(statuses.values()), "ok": ok,
            "errors": sum(statuses.values()) - ok, "statuses": statuses, "requests_per_s": ok / wall,
            "latency_ms": {"p50": percentile(50), "p95": percentile(95), "p99": percentile(99),
                           "mean": 1000 * statistics.fmean(latencies), "max": 1000 * latencies[-1]}}


def pipe_rate(pipeline: str, rows: List[Dict[str, Any]], *, seconds: float, batch_size: int) -> Dict[str, Any]:
    """``nlp.pipe`` over the same rows, repeated for at least ``seconds``."""
    nlp = spacy.load(pipeline)
    list(nlp.pipe([row_doc(nlp, row, image_dir=DEMO / "mention_image") for row in rows[:32]], batch_size=batch_size))
    done, start, start_cpu = 0, time.perf_counter(), cpu_seconds()
    while time.perf_counter() - start < seconds:
        docs = [row_doc(nlp, row, image_dir=DEMO / "mention_image") for row in rows]
        done += len(list(nlp.pipe(docs, batch_size=batch_size)))
    wall, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    return {"docs": done, "seconds": wall, "docs_per_s": done / wall, "cpu_ms_per_doc": 1000 * cpu / done,
            "batch_size": batch_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=str(ROOT / "training" / "clipart_mel" / "model-linker"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    source, pipeline = Path(args.pipeline), WORK / "serve_pipeline"
    shutil.rmtree(pipeline, ignore_errors=True)
    shutil.copytree(source, pipeline)
    config = pipeline / "config.cfg"
    config.write_text(re.sub(r"feature_cache_mb = \d+", "feature_cache_mb = 0", config.read_text()))
    args.pipeline = str(pipeline)
    rows = demo_rows(spacy.blank("en"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "spacy_m3el", "serve", args.pipeline, "--host", "127.0.0.1", "--port", str(port),
         "--allowed-image-dir", str(DEMO / "mention_image")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(url, server)
        server_cpu = process_cpu_seconds(server.pid)
        result = load(url, rows, clients=args.clients, seconds=args.seconds)
        result["server_cpu_ms_per_request"] = 1000 * (process_cpu_seconds(server.pid) - server_cpu) / result["ok"]
        result["batching"] = httpx.get(f"{url}/ready", timeout=10).json()["batching"]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    pipe = pipe_rate(args.pipeline, rows, seconds=20.0, batch_size=32)
    write("serve_load.json", {
        "run": run_info(),
        "inputs": {"pipeline": os.path.relpath(source.resolve(), ROOT), "feature_cache_mb": 0, "rows": len(rows),
                   "what": "demo test sentences as raw text (alias ruler finds mentions), mention picture by path, "
                           "one row per request, cycled",
                   "server": "python -m spacy_m3el serve, max_batch 32, max_wait_ms 10, on 127.0.0.1"},
        "server": result,
        "nlp_pipe": pipe,
        "server_vs_pipe": result["requests_per_s"] / pipe["docs_per_s"],
    })
    print(json.dumps({"requests_per_s": result["requests_per_s"], "latency_ms": result["latency_ms"],
                      "errors": result["errors"], "pipe_docs_per_s": pipe["docs_per_s"]}, indent=2))


if __name__ == "__main__":
    main()
