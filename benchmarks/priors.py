"""Where priors matter: Hits@1 of the alias prior alone, M3EL alone (the
paper's score) and M3EL + the candidate scorer's features, on Skewed-Clipart-MEL
(answers follow a skewed popularity per surface form; one generated data set
per seed) and on Clipart-MEL; plus calibration (ECE) and NIL
precision/recall/F of the calibrated linker on Clipart-MEL, which has NIL
mentions.

    python benchmarks/priors.py [--seeds 1 2 3] [--max-epochs 25]

Writes benchmarks/results/priors.json. Every run trains configs/demo_cpu.cfg
(frozen default backbone, features computed once per process) with the
seed as the training seed; the NIL threshold and temperature are chosen on
the dev split (calibrate_on_score), the figures are on the test split.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import spacy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy import convert  # noqa: E402
from common import run_info  # noqa: E402
from spacy_m3el import MultimodalKB  # noqa: E402
from spacy_m3el.kb.base import NIL  # noqa: E402
from spacy_m3el.data.readers import MultimodalCorpus  # noqa: E402

LINKER = "components.m3el_linker."
VARIANTS = {
    "m3el_features": {},
    "m3el_alone": {LINKER + "incl_prior": False, LINKER + "incl_name_match": False,
                   LINKER + "reweight_branches": False, LINKER + "picture_gate": False},
}
METRICS = ("m3el_hits1", "m3el_mrr", "m3el_accuracy", "m3el_ece", "m3el_nil_p", "m3el_nil_r", "m3el_nil_f",
           "m3el_n_nil", "m3el_n_mentions")


def alias_prior_hits1(corpus: Path, data: Path) -> float:
    """Hits@1 of the most probable alias-table entity for the mention text
    (no candidate: a miss), over the test mentions that have a KB id."""
    nlp = spacy.blank("en")
    kb = MultimodalKB(nlp.vocab).from_disk(corpus / "kb")
    correct = total = 0
    for eg in MultimodalCorpus(corpus / "test.spacy", image_dir=data)(nlp):
        for gold in eg.reference.ents:
            if gold.kb_id_ in ("", NIL):
                continue
            total += 1
            rows = kb.alias_rows(gold.text)
            if rows:
                best = max(rows, key=lambda pair: pair[1])[0]
                correct += kb.entity_id(best) == gold.kb_id_
    return correct / total if total else 0.0


def train_and_score(config: Path, corpus: Path, data: Path, output: Path, seed: int, overrides: dict,
                    max_epochs: int) -> dict:
    from spacy.cli.train import train

    train(config, output, overrides={
        "paths.train": str(corpus / "train.spacy"), "paths.dev": str(corpus / "dev.spacy"),
        "paths.kb": str(corpus / "kb"), "paths.image_dir": str(data), "system.seed": seed,
        "training.max_epochs": max_epochs, **overrides,
    })
    nlp = spacy.load(output / "model-best")
    scores = nlp.evaluate(list(MultimodalCorpus(corpus / "test.spacy", image_dir=data)(nlp)))
    return {key: scores[key] for key in METRICS if key in scores}


def summarise(runs: list) -> dict:
    out = {}
    for key in sorted({k for run in runs for k in run if k not in ("seed", "seconds")}):
        values = [run[key] for run in runs if key in run]
        out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo_cpu.cfg")
    parser.add_argument("--demo", type=Path, default=ROOT / "assets" / "clipart_mel")
    parser.add_argument("--max-epochs", type=int, default=25)
    parser.add_argument("--datasets", nargs="+", default=["skewed", "clipart_mel"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "priors.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for dataset in args.datasets:
            runs = {name: [] for name in ["alias_prior", *VARIANTS]}
            for seed in args.seeds:
                if dataset == "skewed":
                    data = tmp / f"skewed-{seed}"
                    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_skewed_mel.py"), str(args.demo),
                                    str(data), "--seed", str(seed)], check=True, stdout=subprocess.DEVNULL)
                else:
                    data = args.demo
                corpus = tmp / f"corpus-{dataset}-{seed}"
                if dataset == "skewed" or seed == args.seeds[0]:
                    corpus.mkdir()
                    convert(data, corpus)
                    fixed_corpus = corpus
                corpus = corpus if dataset == "skewed" else fixed_corpus
                runs["alias_prior"].append({"seed": seed, "m3el_hits1": alias_prior_hits1(corpus, data)})
                for variant, overrides in VARIANTS.items():
                    start = time.perf_counter()
                    run = train_and_score(args.config, corpus, data, tmp / f"{dataset}-{variant}-{seed}", seed,
                                          overrides, args.max_epochs)
                    run.update(seed=seed, seconds=round(time.perf_counter() - start, 1))
                    runs[variant].append(run)
                    print(f"{dataset} {variant} seed {seed}: Hits@1 {100 * run['m3el_hits1']:.2f} "
                          f"ECE {run['m3el_ece']:.3f} NIL F {run['m3el_nil_f']:.3f} ({run['seconds']} s)", flush=True)
            results[dataset] = {name: {"runs": r, "summary": summarise(r)} for name, r in runs.items()}
    payload = {
        **run_info(),
        "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "seeds": args.seeds, "max_epochs": args.max_epochs, "split": "test",
        "datasets": {"skewed": "scripts/build_skewed_mel.py assets/clipart_mel OUT --seed SEED (defaults: Zipf "
                               "exponent 1.5, half the mentions with a picture, no NIL mentions)",
                     "clipart_mel": "assets/clipart_mel (one data set; the seed is the training seed)"},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
