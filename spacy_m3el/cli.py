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
    from .mimic import SPLITS, ConversionReport, load_mimic_kb, read_mimic_docs

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
        bin_.to_disk(output_dir / f"{split}.spacy")
        report.warn(f"{data_dir} ({split})")
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


@app.command("evaluate")
def evaluate(
    pipeline: Path = typer.Argument(..., help="Trained pipeline directory", exists=True),
    data: Path = typer.Argument(..., help="A .spacy file"),
    image_dir: Optional[Path] = typer.Option(None, help="Base of relative image paths"),
    output: Optional[Path] = typer.Option(None, help="Write the metrics as JSON here"),
) -> None:
    """Hits@1/3/5/10/20, MRR and nel_micro_p/r/f of a pipeline on a corpus."""
    from .readers import MultimodalCorpus
    from .scoring import HITS_AT

    nlp = spacy.load(pipeline)
    examples = list(MultimodalCorpus(data, image_dir=image_dir)(nlp))
    scores = nlp.evaluate(examples)
    keys = [f"m3el_hits{k}" for k in HITS_AT] + [
        "m3el_mrr", "nel_micro_p", "nel_micro_r", "nel_micro_f", "m3el_n_mentions"]
    result = {key: scores.get(key) for key in keys}
    msg.table([(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in result.items()], header=("metric", "value"))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
        msg.good(f"Metrics written to {output}")


def main() -> None:
    app()
