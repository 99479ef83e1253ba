"""``update-kb`` against a rebuild: 1 % of a KB's entities changed (0.4 %
added, 0.4 % replaced, 0.2 % removed), at 10,000 and 100,000 entities.

    python benchmarks/kb_update.py   # -> results/kb_update.json

Needs `spacy project run all` (the trained demo pipeline,
training/clipart_mel/model-best). Inputs: entities with a synthetic 160 x 160
JPEG each (coloured discs, one picture per distinct entity), a short name
and description and one alias of their own; the KB of N entities repeats
1,000 distinct entities (entity i is entity i mod 1,000 under its own id and
alias), so its entity cache is the encoding of those 1,000, repeated, which
is what encoding all N would give. Changed and added entities have pictures
of their own. Timed, each as the command a user runs (a child process,
pipeline loading and saving included; CPU time is the child's):
- update: ``update-kb PIPELINE changes.jsonl OUT``;
- rebuild: ``build-kb`` on the KB's entity file with the same changes
  applied (``--pipeline``, 2 processes), then ``swap-kb``; at 10,000
  entities only: at 100,000 the rebuild's time is the 10,000 one's per
  entity times 100,000 (extrapolated, marked so).
"""
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy
import spacy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import random_picture, run_info  # noqa: E402
from kb_scale import WORK, write  # noqa: E402
from spacy_m3el import MultimodalKB  # noqa: E402
from spacy_m3el.index.entity_index import EntityIndex  # noqa: E402
from spacy_m3el.kb.files import kb_records  # noqa: E402
from spacy_m3el.pipeline.linker import find_linker  # noqa: E402

PIPELINE = ROOT / "training" / "clipart_mel" / "model-best"
DISTINCT = 1000
FOLDER = WORK / "kb_update"


def picture(k: int) -> str:
    path = FOLDER / "pictures" / f"p{k}.jpg"
    return str(path) if path.exists() else random_picture(path, seed=50_000 + k)


def entity(i: int, content: int) -> Dict[str, Any]:
    return {"id": f"E{i}", "name": f"Thing {content}", "description": f"Drawing number {content} of the set.",
            "images": [picture(content)], "freq": 1, "aliases": [f"thing {i}"]}


def child(command: List[str]) -> Dict[str, float]:
    """Run a command; its wall and CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": time.perf_counter() - start, "cpu_s": cpu}


def base_pipeline(size: int, distinct_cache: EntityIndex) -> Path:
    """The demo pipeline linking against ``size`` entities, with their cache."""
    nlp = spacy.load(PIPELINE)
    kb = MultimodalKB(nlp.vocab)
    for i in range(size):
        record = entity(i, i % DISTINCT)
        kb.add_entity(record["id"], name=record["name"], description=record["description"],
                      images=record["images"], freq=1, check_images=False)
        kb.add_alias(record["aliases"][0], [record["id"]], [1.0])
    rows = numpy.arange(size) % DISTINCT
    arrays = {name: numpy.ascontiguousarray(array[rows]) for name, array in distinct_cache.arrays.items()}
    linker = find_linker(nlp)
    linker.set_kb(lambda vocab: kb)
    # The distinct entities' rows, tiled: an index of the right size and identity for timing.
    linker.index_keeper.adopt(kb, EntityIndex(arrays, {**distinct_cache.meta, **linker.index_keeper.identity(kb)}))
    path = FOLDER / f"base{size}"
    shutil.rmtree(path, ignore_errors=True)
    nlp.to_disk(path)
    return path


def change_lines(size: int) -> List[Dict[str, Any]]:
    added, replaced, removed = int(size * 0.004), int(size * 0.004), int(size * 0.002)
    lines = [entity(size + j, DISTINCT + j) for j in range(added)]
    step = size // (replaced + removed)
    targets = list(range(0, size, step))[: replaced + removed]
    for j, i in enumerate(targets[:replaced]):
        lines.append({**entity(i, DISTINCT + added + j), "id": f"E{i}"})
    lines += [{"id": f"E{i}", "remove": True} for i in targets[replaced:]]
    return lines


def main() -> None:
    (FOLDER / "pictures").mkdir(parents=True, exist_ok=True)
    nlp = spacy.load(PIPELINE)
    linker = find_linker(nlp)
    distinct = MultimodalKB(nlp.vocab)
    for k in range(DISTINCT):
        record = entity(k, k)
        distinct.add_entity(record["id"], name=record["name"], description=record["description"],
                            images=record["images"], freq=1)
    start = time.perf_counter()
    distinct_cache = linker.index_keeper.encoding.encode(distinct, max_queries=linker.settings.max_cached_queries)
    encode_s = time.perf_counter() - start
    rows = []
    rebuild_per_entity = None
    for size in (10_000, 100_000):
        base = base_pipeline(size, distinct_cache)
        lines = change_lines(size)
        changes = FOLDER / f"changes{size}.jsonl"
        changes.write_text("".join(json.dumps(line) + "\n" for line in lines))
        update = child([sys.executable, "-m", "spacy_m3el", "update-kb", str(base), str(changes),
                        str(FOLDER / f"updated{size}")])
        row = {"entities": size, "changed": len(lines), "update": update}
        if size == 10_000:
            records = {r["id"]: r for r in kb_records(find_linker(spacy.load(base)).kb)}
            for line in lines:
                if line.get("remove"):
                    del records[line["id"]]
                else:
                    records[line["id"]] = line
            full = FOLDER / f"rebuild{size}.jsonl"
            full.write_text("".join(json.dumps(r) + "\n" for r in records.values()))
            build = child([sys.executable, "-m", "spacy_m3el", "build-kb", str(full), str(FOLDER / f"kb{size}"),
                           "--pipeline", str(base), "--processes", "2"])
            swap = child([sys.executable, "-m", "spacy_m3el", "swap-kb", str(base), str(FOLDER / f"kb{size}"),
                          str(FOLDER / f"rebuilt{size}")])
            row["rebuild"] = {"wall_s": build["wall_s"] + swap["wall_s"], "cpu_s": build["cpu_s"] + swap["cpu_s"],
                              "build_kb": build, "swap_kb": swap}
            rebuild_per_entity = {k: row["rebuild"][k] / len(records) for k in ("wall_s", "cpu_s")}
        else:
            row["rebuild"] = {"extrapolated": True, **{k: v * size for k, v in rebuild_per_entity.items()}}
        row["update_vs_rebuild_wall"] = row["update"]["wall_s"] / row["rebuild"]["wall_s"]
        row["update_vs_rebuild_cpu"] = row["update"]["cpu_s"] / row["rebuild"]["cpu_s"]
        rows.append(row)
        print(json.dumps(row))
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(FOLDER / f"updated{size}", ignore_errors=True)
        shutil.rmtree(FOLDER / f"rebuilt{size}", ignore_errors=True)
        shutil.rmtree(FOLDER / f"kb{size}", ignore_errors=True)
    write("kb_update.json", {
        "run": run_info(),
        "inputs": {"pipeline": "training/clipart_mel/model-best", "distinct_entities": DISTINCT,
                   "changes": "1 %: 0.4 % added, 0.4 % replaced, 0.2 % removed",
                   "distinct_encode_s": encode_s, "what": __doc__.split("\n\n")[1].replace("\n", " ")},
        "rows": rows,
    })


if __name__ == "__main__":
    main()
