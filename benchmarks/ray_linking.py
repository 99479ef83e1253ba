"""Ray Data linking vs nlp.pipe(n_process=2) on the same rows, one machine.

Inputs: every Clipart-MEL sentence (train, dev and test: 1,320 rows, raw
text + its mention picture, no spans: the pipeline's alias entity_ruler
finds the mentions), linked by the assembled demo pipeline
(`training/clipart_mel/model-linker`, from `spacy project run all`). Both
sides write the same JSONL rows; both timings include loading the pipeline
(once in the parent for nlp.pipe, whose 2 forked workers share it; once per
Ray worker), and exclude starting Ray (reported apart). Writes
benchmarks/results/ray_linking.json.

    python benchmarks/ray_linking.py [--workers 2]
"""
import argparse
import json
import time
from pathlib import Path

from common import run_info

RESULTS = Path(__file__).parent / "results" / "ray_linking.json"


def write_rows(data: Path, out: Path) -> int:
    count = 0
    with out.open("w", encoding="utf8") as rows:
        for split in ("train", "dev", "test"):
            for item in json.loads(next(data.glob(f"*_{split}.json")).read_text()):
                image = data / "mention_image" / item["imgPath"]
                rows.write(json.dumps({"id": item["id"], "text": item["sentence"], "image": str(image)}) + "\n")
                count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, default=Path("training/clipart_mel/model-linker"))
    parser.add_argument("--data", type=Path, default=Path("assets/clipart_mel"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/spacy_m3el_ray_bench"))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    import spacy

    from spacy_m3el import distributed
    from spacy_m3el.data.rows import link_rows, read_rows

    if not args.pipeline.is_dir():
        raise SystemExit(f"{args.pipeline} not found: run `python -m spacy project run all` first")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rows = args.work_dir / "rows.jsonl"
    n_rows = write_rows(args.data, rows)

    wall = time.perf_counter()
    nlp = spacy.load(args.pipeline)
    errors = []
    with (args.work_dir / "pipe.jsonl").open("w", encoding="utf8") as out:
        for row in link_rows(nlp, read_rows(rows), errors.append, n_process=args.workers,
                             batch_size=args.batch_size):
            out.write(json.dumps(row) + "\n")
    pipe_s = time.perf_counter() - wall

    started = time.perf_counter()
    distributed.start_ray(num_cpus=args.workers + 1)
    ray_start_s = time.perf_counter() - started
    wall = time.perf_counter()
    counts = distributed.link(rows, str(args.pipeline), args.work_dir / "ray.jsonl", num_workers=args.workers,
                              batch_size=args.batch_size)
    ray_s = time.perf_counter() - wall

    pipe_rows = {r["id"]: r for r in map(json.loads, (args.work_dir / "pipe.jsonl").read_text().splitlines())}
    ray_rows = {r["id"]: r for r in map(json.loads, (args.work_dir / "ray.jsonl").read_text().splitlines())}
    same = sum(i in ray_rows and [e["kb_id"] for e in row["ents"]] == [e["kb_id"] for e in ray_rows[i]["ents"]]
               for i, row in pipe_rows.items())
    results = {
        "benchmark": "ray_linking",
        "inputs": f"{n_rows} Clipart-MEL rows (raw text + mention picture, mentions found by the alias ruler), "
                  f"pipeline {args.pipeline}, batch {args.batch_size}",
        "run": run_info(),
        "workers": args.workers,
        "nlp_pipe": {"n_process": args.workers, "wall_s": round(pipe_s, 2), "rows_per_s": round(n_rows / pipe_s, 2),
                     "errors": len(errors)},
        "ray": {"num_workers": args.workers, "wall_s": round(ray_s, 2), "rows_per_s": round(n_rows / ray_s, 2),
                "ray_start_s": round(ray_start_s, 2), **counts},
        "ratio_ray_over_pipe": round(pipe_s / ray_s, 3),
        "same_links": f"{same} of {len(pipe_rows)} rows",
        "per_worker_rows_per_s": round(n_rows / ray_s / args.workers, 2),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("nlp_pipe", "ray", "ratio_ray_over_pipe", "same_links")}, indent=2))


if __name__ == "__main__":
    main()
