"""Hits@1 of each branch alone, next to the linker's, for the full model and
an ablation: where an ablation's gain or loss comes from.

    python benchmarks/branch_hits.py [--variant no_contrastive] [--seeds 0 1 2]
    # -> results/branch_hits.json

Trains ``configs/demo_cpu.cfg`` on Clipart-MEL (as ``accuracy.py`` does,
with the torch threads the process has: two here, the default) for the
full model and ``--variant``, one pipeline per seed under
``benchmarks/work/branch_hits`` (kept, so a second run only scores), then
links the test split's gold mentions with their pictures and without, and
ranks each mention's candidates by the linker's answer, the raw M3EL score
and each branch score alone (text, image, t2v, v2t). Figures: % of the
linkable test mentions whose gold entity comes first.
"""
import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

import spacy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from accuracy import VARIANTS, convert, train_m3el  # noqa: E402
from calibration_mix import linked_results  # noqa: E402
from common import run_info  # noqa: E402

from spacy_m3el.kb.base import NIL  # noqa: E402

WORK = ROOT / "benchmarks" / "work" / "branch_hits"
RANKINGS = {"m3el score": lambda c: c["score"],
            **{branch: (lambda c, b=branch: c["branches"].get(b, float("-inf")))
               for branch in ("text", "image", "t2v", "v2t")}}


def branch_figures(linked: dict) -> dict:
    """Per picture condition: the linker's answer and each ranking's Hits@1 (%)."""
    figures = {}
    for condition in ("given", "none"):
        rows = [(gold, result) for gold, result in linked[condition] if gold and gold != NIL]
        figures[condition] = {"linker (answer)": round(100 * sum(r["id"] == g for g, r in rows) / len(rows), 2)}
        for name, key in RANKINGS.items():
            right = sum(max(r["candidates"], key=key)["id"] == g for g, r in rows if r["candidates"])
            figures[condition][name] = round(100 * right / len(rows), 2)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="no_contrastive", choices=[v for v in VARIANTS if v != "full"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "branch_hits.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    data = ROOT / "assets" / "clipart_mel"
    corpus = WORK / "corpus"
    if not (corpus / "test.spacy").exists():
        corpus.mkdir(parents=True, exist_ok=True)
        convert(data, corpus)
    runs = {}
    for seed in args.seeds:
        for variant in ("full", args.variant):
            model = WORK / f"{variant}_{seed}"
            if not (model / "model-best").exists():
                train_m3el(ROOT / "configs" / "demo_cpu.cfg", corpus, data, model, seed, VARIANTS[variant])
            nlp = spacy.load(model / "model-best")
            runs[f"{variant} seed {seed}"] = branch_figures(linked_results(nlp, corpus / "test.spacy", data))
            print(variant, seed, json.dumps(runs[f"{variant} seed {seed}"]), flush=True)
    means = {variant: {condition: {name: round(statistics.mean(runs[f"{variant} seed {s}"][condition][name]
                                                               for s in args.seeds), 2)
                                   for name in runs[f"{variant} seed {args.seeds[0]}"][condition]}
                       for condition in ("given", "none")}
             for variant in ("full", args.variant)}
    args.out.write_text(json.dumps({
        **run_info(), "config": "configs/demo_cpu.cfg", "split": "test", "seeds": args.seeds,
        "inputs": "Clipart-MEL test, the gold mentions with their pictures ('given') and without ('none'); "
                  "Hits@1 (%) over the linkable mentions",
        "runs": runs, "means": means}, indent=2) + "\n")
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
