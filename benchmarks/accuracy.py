"""Accuracy of M3EL and its ablations on a MIMIC-format dataset (default:
Clipart-MEL), plus spaCy's built-in ``entity_linker`` as the text-only
baseline users would otherwise pick. Several seeds; mean and spread. Every
M3EL variant is scored on the test split under the four picture conditions
(given, none, half, shuffled; seeded), keys ``<condition>/<metric>``.

    python benchmarks/accuracy.py [--data assets/clipart_mel] [--seeds 0 1 2]

Writes benchmarks/results/accuracy.json. All M3EL variants train with the
same config (default: configs/demo_cpu.cfg, frozen default backbone) in one
process, so the backbone's features are computed once and shared.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import spacy
import torch
from spacy.tokens import DocBin
from spacy.training import Example

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import run_info  # noqa: E402
from spacy_m3el.evaluation.end_to_end import evaluate_pipeline  # noqa: E402
from spacy_m3el.data.mimic import ConversionReport, load_mimic_kb, read_mimic_docs  # noqa: E402
from spacy_m3el.data.pictures import CONDITIONS  # noqa: E402
from spacy_m3el.data.readers import MultimodalCorpus  # noqa: E402
from spacy_m3el.evaluation.scoring import HITS_AT  # noqa: E402

MODEL = "components.m3el_linker.model."
LINKER = "components.m3el_linker."
VARIANTS = {
    "full": {},
    "no_contrastive": {MODEL + "use_contrastive": False},
    "no_g2g": {MODEL + "use_g2g": False},
    "no_g2l": {MODEL + "use_g2l": False},
    "no_t2v": {MODEL + "use_t2v": False},
    "no_v2t": {MODEL + "use_v2t": False},
    "text_only": {MODEL + "use_image": False, MODEL + "use_t2v": False, MODEL + "use_v2t": False},
    "image_only": {MODEL + "use_text": False, MODEL + "use_t2v": False, MODEL + "use_v2t": False},
    "no_picture_gate": {LINKER + "picture_gate": False},
    "no_picture_variation": {LINKER + "picture_dropout": 0.0, LINKER + "picture_mismatch": 0.0},
}
BASE_METRICS = [f"m3el_hits{k}" for k in HITS_AT] + ["m3el_mrr", "nel_micro_f"]
ANSWER_METRICS = ["m3el_accuracy", "m3el_ece", "m3el_nil_f", "m3el_nil_on_linkable"]
METRICS = BASE_METRICS + [f"{c}/{m}" for c in CONDITIONS for m in ("m3el_hits1", "m3el_mrr", *ANSWER_METRICS)]


def convert(data: Path, out: Path) -> None:
    nlp = spacy.blank("en")
    kb = load_mimic_kb(nlp.vocab, data)
    for split in ("train", "dev", "test"):
        report = ConversionReport()
        docs = read_mimic_docs(nlp, data, split, known_entities=kb.entity_ids, report=report)
        DocBin(docs=list(docs), store_user_data=True).to_disk(out / f"{split}.spacy")
        report.warn(f"{data} ({split})")
    kb.to_disk(out / "kb")


def train_m3el(config: Path, corpus: Path, data: Path, output: Path, seed: int, overrides: dict) -> dict:
    from spacy.cli.train import train

    train(
        config,
        output,
        overrides={
            "paths.train": str(corpus / "train.spacy"),
            "paths.dev": str(corpus / "dev.spacy"),
            "paths.kb": str(corpus / "kb"),
            "paths.image_dir": str(data),
            "system.seed": seed,
            **overrides,
        },
    )
    nlp = spacy.load(output / "model-best")
    examples = list(MultimodalCorpus(corpus / "test.spacy", image_dir=data)(nlp))
    scores = evaluate_pipeline(nlp, examples, pictures="all")
    out = {key: scores[key] for key in BASE_METRICS}
    for condition, figures in scores["pictures"].items():
        out.update({f"{condition}/{key}": figures[key] for key in ("m3el_hits1", "m3el_mrr", *ANSWER_METRICS)})
    return out


def train_spacy_entity_linker(corpus: Path, data: Path, seed: int, epochs: int) -> dict:
    """spaCy's EntityLinker: alias-table candidates + a trained context encoder
    compared with entity vectors (MiniLM embeddings of name + description)."""
    from spacy.kb import InMemoryLookupKB

    from spacy_m3el import MultimodalKB
    from spacy_m3el.encoders import MiniLMEfficientNetEncoder

    spacy.util.fix_random_seed(seed)
    nlp = spacy.blank("en")
    source = MultimodalKB(nlp.vocab).from_disk(corpus / "kb")
    encoder = MiniLMEfficientNetEncoder(frozen=True)
    texts = [encoder.text_for_entity(source.name(r), source.description(r)) for r in range(len(source))]
    vectors = []
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            tokens = encoder.tokenize(texts[start : start + 64])
            vectors.extend(encoder.encode_text(tokens["input_ids"], tokens["attention_mask"])[0].tolist())
    kb = InMemoryLookupKB(nlp.vocab, entity_vector_length=len(vectors[0]))
    for row, vector in enumerate(vectors):
        kb.add_entity(source.entity_id(row), freq=1.0, entity_vector=vector)
    for alias in source.get_alias_strings():
        rows = source.alias_rows(alias)
        # spaCy's KB matches aliases exactly; ours case-insensitively: add both forms.
        for form in dict.fromkeys([alias, alias.lower()]):
            if not kb.contains_alias(form):
                kb.add_alias(form, [source.entity_id(r) for r, _ in rows], [p for _, p in rows])
    nlp.add_pipe("sentencizer")
    linker = nlp.add_pipe("entity_linker", config={"incl_prior": True, "use_gold_ents": True})
    linker.set_kb(lambda vocab: kb)

    def examples(split):
        out = []
        for eg in MultimodalCorpus(corpus / f"{split}.spacy", image_dir=data)(nlp):
            predicted = nlp.get_pipe("sentencizer")(eg.predicted)
            out.append(Example(predicted, eg.reference))
        return out

    train_examples = examples("train")
    optimizer = nlp.initialize(lambda: train_examples)
    for _ in range(epochs):
        for batch in spacy.util.minibatch(train_examples, size=32):
            nlp.update(batch, sgd=optimizer)
    test = examples("test")
    scores = nlp.evaluate(test)
    # spaCy's linker returns one id, no ranking: only Hits@1 is defined. It is
    # the share of gold mentions linked to their entity; nel_micro_p is not,
    # since it leaves out the mentions the linker gave no id (NIL).
    return {"m3el_hits1": hits_at_1(nlp, test), "nel_micro_f": scores["nel_micro_f"]}


def hits_at_1(nlp, examples) -> float:
    """Share of gold mentions (with a KB id) whose predicted span has that id."""
    correct = total = 0
    for eg, doc in zip(examples, nlp.pipe(eg.predicted.copy() for eg in examples)):
        predicted = {(e.start_char, e.end_char): e.kb_id_ for e in doc.ents}
        for gold in eg.reference.ents:
            if gold.kb_id_ in ("", "NIL"):
                continue
            total += 1
            correct += predicted.get((gold.start_char, gold.end_char)) == gold.kb_id_
    return correct / total if total else 0.0


def summarise(runs: list) -> dict:
    out = {}
    for key in METRICS:
        values = [run[key] for run in runs if key in run]
        if values:
            out[key] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "assets" / "clipart_mel")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo_cpu.cfg")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS) + ["spacy_entity_linker"])
    parser.add_argument("--el-epochs", type=int, default=25)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "accuracy.json")
    parser.add_argument("--merge", action="store_true", help="update the variants in an existing --out file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    results = {}

    def save() -> None:
        """Written after every variant, so a long run that is stopped keeps what it measured."""
        payload = {
            **run_info(),
            "data": str(args.data.relative_to(ROOT) if args.data.is_relative_to(ROOT) else args.data),
            "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
            "seeds": args.seeds,
            "split": "test",
            "results": dict(results),
        }
        if args.merge and args.out.exists():
            previous = json.loads(args.out.read_text())
            previous["results"].update(results)
            updates = [u for u in previous.get("updated", []) if u.get("started") != started]
            previous["updated"] = updates + [{"date": payload["date"], "started": started, "variants": list(results)}]
            previous["date"] = payload["date"]  # of the newest rows; "updated" says which rows are how old
            payload = previous
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"Wrote {args.out}", flush=True)

    started = run_info()["date"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus"
        corpus.mkdir()
        convert(args.data, corpus)
        for variant in args.variants:
            runs = []
            for seed in args.seeds:
                start = time.perf_counter()
                if variant == "spacy_entity_linker":
                    run = train_spacy_entity_linker(corpus, args.data, seed, args.el_epochs)
                else:
                    output = tmp / f"{variant}-{seed}"
                    run = train_m3el(args.config, corpus, args.data, output, seed, VARIANTS[variant])
                run["seed"] = seed
                run["seconds"] = round(time.perf_counter() - start, 1)
                runs.append(run)
                print(f"{variant} seed {seed}: Hits@1 {100 * run['m3el_hits1']:.2f} ({run['seconds']} s)", flush=True)
            results[variant] = {"runs": runs, "summary": summarise(runs)}
            save()


if __name__ == "__main__":
    main()
