"""Peak memory of `spacy train` on WikiMEL-sized data, and where it goes.

    python benchmarks/training_memory.py [--entities 17000] [--mentions 20000] [--steps 300]
    # -> results/training_memory.json

Inputs (synthetic, written once under benchmarks/work/training_memory_<sizes>/):
``--entities`` KB entities, each with a name, a 30-word description and a
picture of its own (a distinct 160 x 160 JPEG), named in groups of 5 that
share a surface form (so the alias table gives 5 candidates); ``--mentions``
training mentions (a 25-word sentence each, a picture of its own) and
``--dev`` dev mentions, answers spread over the KB. WikiMEL has 17,391
entities and 18,092 training mentions; the defaults are that size.

Each variant runs ``python -m spacy train configs/demo_cpu.cfg`` (frozen
default backbone, batch 32) for ``--steps`` steps with a dev evaluation
before the first step (spaCy's loop evaluates at step 0) and at the last
(each: the entity index of all entities, the calibration on the dev
mentions), in a child process whose /proc status is sampled every
0.5 s: peak resident memory (VmHWM), and at the moment of the largest
VmRSS its anonymous part (RssAnon: Python objects, tensors, caches), its
mapped-file part (RssFile: shared libraries, memory-mapped files, which the
kernel can drop) and the child's last log line (what it was doing), plus a
timeline every 5 s. Variants: ``default`` (the config as shipped) and
``cache1024`` (``feature_cache_mb = 1024``: each of the frozen backbone's
two feature stores, texts and images, capped at 1 GB, the default before
256 MB), which says what the cap saves. ``--reference COMMIT`` adds
the default variant as that commit ran it (a git worktree of it under
benchmarks/work/, its code first on PYTHONPATH): before and now in one run.
"""
import argparse
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import random_picture, run_info  # noqa: E402
from kb_scale import WORK, write  # noqa: E402

WORDS = ("river old city museum painting bridge famous northern station music player football club novel author "
         "island mountain church school science history village company market garden king queen war film actor "
         "season league album singer tower castle harbour railway valley lake festival university").split()
VARIANTS = {"default": [], "cache1024": ["--components.m3el_linker.model.feature_cache_mb", "1024"]}


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def make_data(folder: Path, entities: int, mentions: int, dev: int) -> Dict[str, Path]:
    """The KB directory, train/dev .spacy files and the picture folder (reused when present)."""
    import spacy
    from spacy.tokens import DocBin

    from spacy_m3el.extensions import register_extensions
    from spacy_m3el.kb.base import MultimodalKB

    paths = {"kb": folder / "kb", "train": folder / "train.spacy", "dev": folder / "dev.spacy",
             "images": folder / "images"}
    if all(path.exists() for path in paths.values()):
        return paths
    register_extensions()
    paths["images"].mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    nlp = spacy.blank("en")
    kb = MultimodalKB(nlp.vocab)
    forms = [f"{rng.choice(WORDS)} {rng.choice(WORDS)} {i}" for i in range((entities + 4) // 5)]
    started = time.time()
    for i in range(entities):
        picture = random_picture(paths["images"] / f"e{i}.jpg", i)
        kb.add_entity(f"Q{i}", name=f"{forms[i // 5]} {rng.choice(WORDS)}", description=sentence(rng, 30),
                      images=[picture], freq=1 + i % 7)
        if i % 2000 == 0:
            print(f"  entities {i}/{entities} ({time.time() - started:.0f} s)", flush=True)
    for f, form in enumerate(forms):
        members = [f"Q{i}" for i in range(5 * f, min(5 * f + 5, entities))]
        kb.add_alias(form, members, [1.0 / len(members)] * len(members))
    kb.to_disk(paths["kb"])
    for split, count, offset in (("train", mentions, 0), ("dev", dev, mentions)):
        docs = []
        for j in range(count):
            answer = rng.randrange(entities)
            form = forms[answer // 5]
            before = sentence(rng, 10)
            text = f"{before} {form} {sentence(rng, 14)}"
            doc = nlp.make_doc(text)
            start = len(before) + 1
            doc.ents = [doc.char_span(start, start + len(form), label="ENTITY", kb_id=f"Q{answer}")]
            doc._.image = random_picture(paths["images"] / f"m{offset + j}.jpg", 10**6 + offset + j)
            docs.append(doc)
        DocBin(docs=docs, store_user_data=True).to_disk(paths[split])
        print(f"  {split}: {count} mentions", flush=True)
    return paths


def status(pid: int) -> Dict[str, float]:
    """VmRSS, VmHWM, RssAnon and RssFile of a process, in MB."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return values


def reference_tree(commit: str) -> Path:
    """A git worktree of ``commit`` under benchmarks/work/ (made once)."""
    tree = WORK / f"reference_{commit}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True)
    return tree


def train(paths: Dict[str, Path], out: Path, steps: int, extra: List[str], code: Path = ROOT) -> Dict[str, Any]:
    """Peak memory of one `spacy train` run of the code in ``code``."""
    command = [sys.executable, "-m", "spacy", "train", str(code / "configs" / "demo_cpu.cfg"),
               "--output", str(out), "--paths.train", str(paths["train"]), "--paths.dev", str(paths["dev"]),
               "--paths.kb", str(paths["kb"]), "--paths.image_dir", str(paths["images"]),
               "--training.max_steps", str(steps), "--training.eval_frequency", str(steps),
               "--training.logger.progress_bar", "false", *extra]
    print(" ".join(command), flush=True)
    started = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")])))
    child = subprocess.Popen(command, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, errors="replace")
    peak: Dict[str, Any] = {}
    timeline: List[Dict[str, Any]] = []
    last_line = [""]  # the child's latest log line: what it was doing at a sample
    done = threading.Event()

    def echo() -> None:
        for line in child.stdout:
            sys.stdout.write(line)
            if line.strip():
                last_line[0] = line.strip()[:160]
        sys.stdout.flush()

    def sample() -> None:
        next_point = 0.0
        while not done.is_set():
            now, elapsed = status(child.pid), time.time() - started
            if now.get("VmHWM"):
                peak["VmHWM"] = now["VmHWM"]
            if now.get("VmRSS", 0) > peak.get("VmRSS", 0):
                peak.update({"VmRSS": now["VmRSS"], "RssAnon": now.get("RssAnon", 0.0),
                             "RssFile": now.get("RssFile", 0.0), "at_s": elapsed, "doing": last_line[0]})
            if now and elapsed >= next_point:
                timeline.append({"t_s": round(elapsed), **{k: round(v) for k, v in now.items()},
                                 "doing": last_line[0]})
                next_point = elapsed + 5.0
            time.sleep(0.5)

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=echo, daemon=True)]
    for thread in threads:
        thread.start()
    code = child.wait()
    done.set()
    for thread in threads:
        thread.join()
    if code != 0:
        raise SystemExit(f"spacy train exited with {code}")
    return {"peak_rss_mb": peak.get("VmHWM"), "largest_sampled_rss_mb": peak.get("VmRSS"),
            "anon_mb_then": peak.get("RssAnon"), "file_mb_then": peak.get("RssFile"),
            "largest_at_s": peak.get("at_s"), "doing_then": peak.get("doing"), "wall_s": time.time() - started,
            "timeline_mb": timeline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=17000)
    parser.add_argument("--mentions", type=int, default=20000)
    parser.add_argument("--dev", type=int, default=300)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS))
    parser.add_argument("--reference", default=None, help="A commit whose default variant runs too")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    folder = WORK / f"training_memory_{args.entities}_{args.mentions}_{args.dev}"
    paths = make_data(folder, args.entities, args.mentions, args.dev)
    rows = {}
    runs = [(variant, VARIANTS[variant], ROOT) for variant in args.variants]
    if args.reference:
        runs.insert(0, (f"default at {args.reference}", [], reference_tree(args.reference)))
    for name, extra, code in runs:
        rows[name] = train(paths, folder / f"out_{name.replace(' ', '_')}", args.steps, extra, code)
        print(f"{name}: {dict((k, v) for k, v in rows[name].items() if k != 'timeline_mb')}", flush=True)
    name = args.out or ("training_memory.json" if (args.entities, args.mentions) == (17000, 20000)
                        else f"training_memory_{args.entities}_{args.mentions}.json")
    write(str(name), {**run_info(), "inputs": {"entities": args.entities, "train_mentions": args.mentions,
                                               "dev_mentions": args.dev, "steps": args.steps, "batch_size": 32,
                                               "pictures": "one distinct 160 x 160 JPEG per entity and mention",
                                               "config": "configs/demo_cpu.cfg",
                                               "code": {"now": subprocess.run(
                                                   ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                   capture_output=True, text=True).stdout.strip(),
                                                   "reference": args.reference}},
                      "variants": rows})


if __name__ == "__main__":
    main()
