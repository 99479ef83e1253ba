"""Command line: ``python -m spacy_m3el COMMAND`` (or the ``spacy-m3el`` script)."""
import json
from pathlib import Path
from typing import Optional

import spacy
import typer
from spacy.tokens import DocBin
from tqdm import tqdm
from wasabi import msg

app = typer.Typer(help="spacy-m3el: multimodal entity linking for spaCy", no_args_is_help=True)


@app.command("convert-mimic")
def convert_mimic(
    data_dir: Path = typer.Argument(..., help="MIMIC-format dataset directory", exists=True, file_okay=False),
    output_dir: Path = typer.Argument(..., help="Where to write <split>.spacy and kb/"),
    lang: str = typer.Option("en", help="Language of the blank tokenizer"),
) -> None:
    """Convert a MIMIC-format dataset (WikiMEL, RichpediaMEL, WikiDiverse,
    Clipart-MEL) to DocBins (image paths, not pixels) plus a MultimodalKB."""
    from .mimic import SPLITS, ConversionReport, MIMICFormatError, load_mimic_kb, read_mimic_docs

    nlp = spacy.blank(lang)
    output_dir.mkdir(parents=True, exist_ok=True)
    with msg.loading("Building the KB..."):
        kb = load_mimic_kb(nlp.vocab, data_dir)
    msg.good(f"KB: {len(kb)} entities, {kb.get_size_aliases()} aliases")
    summary = {"entities": len(kb), "aliases": kb.get_size_aliases(), "splits": {}}
    for split in SPLITS:
        report = ConversionReport()
        docs = read_mimic_docs(nlp, data_dir, split, known_entities=kb.entity_ids, report=report)
        bin_ = DocBin(store_user_data=True)
        for doc in tqdm(docs, desc=f"{split}", unit="mention"):
            bin_.add(doc)
        for line in report.problems():
            msg.warn(f"{split}: {line}")
        try:
            report.check(f"{data_dir} ({split})")
        except MIMICFormatError as err:
            msg.fail(str(err), exits=1)
        bin_.to_disk(output_dir / f"{split}.spacy")
        summary["splits"][split] = {
            "mentions": report.mentions,
            "nil": report.nil,
            "unlocated": len(report.unlocated),
            "unknown_answers": len(report.unknown_answers),
            "missing_mention_images": len(report.missing_mention_images),
        }
        msg.good(f"{split}: {report.mentions} mentions -> {output_dir / f'{split}.spacy'}")
    kb.to_disk(output_dir / "kb")
    (output_dir / "conversion.json").write_text(json.dumps(summary, indent=2) + "\n")
    msg.good(f"KB saved to {output_dir / 'kb'}")


PROTOCOLS = ("two-stage", "exhaustive", "both")


@app.command("evaluate")
def evaluate(
    pipeline: str = typer.Argument(..., help="Trained pipeline: a directory or an installed package name"),
    data: Path = typer.Argument(..., help="A .spacy file (or a folder of them)", exists=True),
    image_dir: Optional[Path] = typer.Option(None, help="Base of relative image paths"),
    output: Optional[Path] = typer.Option(None, help="Write the metrics as JSON here"),
    protocol: str = typer.Option("two-stage", help="two-stage (the linker's candidates), exhaustive (the "
                                 "paper's: every KB entity, exact score) or both (with their top-1 agreement)"),
    gpu_id: int = typer.Option(-1, help="GPU to use (-1: CPU)"),
) -> None:
    """Hits@1/3/5/10/20, MRR and nel_micro_p/r/f of a pipeline on a corpus,
    given the gold mentions, by the two-stage and/or the exhaustive protocol."""
    from spacy.scorer import Scorer

    from .evaluation import evaluate_exhaustive
    from .readers import MultimodalCorpus
    from .scoring import HITS_AT

    if protocol not in PROTOCOLS:
        raise typer.BadParameter(f"--protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if gpu_id >= 0:
        spacy.require_gpu(gpu_id)
    nlp = spacy.load(pipeline)
    linker = next((pipe for _, pipe in nlp.pipeline if hasattr(pipe, "exact_entity_cache")), None)
    if linker is None:
        raise typer.BadParameter(f"{pipeline} has no m3el_linker component")
    examples = list(MultimodalCorpus(data, image_dir=image_dir)(nlp))
    keys = [f"m3el_hits{k}" for k in HITS_AT] + ["m3el_mrr", "m3el_n_mentions"]
    # As nlp.evaluate does, but the linked docs stay on the examples for the exhaustive comparison.
    for eg, doc in zip(examples, nlp.pipe(eg.predicted for eg in examples)):
        eg.predicted = doc
    scores = Scorer(nlp=nlp).score(examples)
    result = {key: scores.get(key) for key in keys + ["nel_micro_p", "nel_micro_r", "nel_micro_f"]}
    if protocol != "two-stage":
        exhaustive = evaluate_exhaustive(linker, examples, progress=True)
        result = result if protocol == "both" else {}
        result["exhaustive"] = {key: exhaustive[key] for key in keys}
        result["top1_agreement"] = exhaustive["top1_agreement"]
    unreadable = linker.kb.entity_cache.meta.get("unreadable_kb_images") if linker.kb.entity_cache else None
    result["unreadable_kb_images"] = unreadable["count"] if unreadable else 0
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in result.items() if not isinstance(v, dict)]
    rows += [(f"exhaustive {k}", f"{v:.4f}") for k, v in result.get("exhaustive", {}).items()]
    msg.table(rows, header=("metric", "value"))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
        msg.good(f"Metrics written to {output}")


def main() -> None:
    app()
