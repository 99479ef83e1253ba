"""Command line: ``python -m spacy_m3el COMMAND`` (or the ``spacy-m3el`` script)."""
import contextlib
import json
from pathlib import Path
from typing import Any, List, Optional

import spacy
import typer
from spacy.tokens import DocBin
from wasabi import msg

from ..progress import progress_bar

#: Escaped: Typer's help is Rich markup, where "[ray]" would be read as a style and dropped.
RAY_EXTRA = "pip install 'spacy-m3el\\[ray]'"
app = typer.Typer(help="spacy-m3el: multimodal entity linking for spaCy", no_args_is_help=True)


@app.command("convert-mimic")
def convert_mimic(
    data_dir: Path = typer.Argument(..., help="MIMIC-format dataset directory", exists=True, file_okay=False),
    output_dir: Path = typer.Argument(..., help="Where to write <split>.spacy and kb/"),
    lang: str = typer.Option("en", help="Language of the blank tokenizer"),
) -> None:
    """Convert a MIMIC-format dataset (WikiMEL, RichpediaMEL, WikiDiverse,
    Clipart-MEL) to DocBins (image paths, not pixels) plus a MultimodalKB."""
    from ..data.mimic import SPLITS, ConversionReport, MIMICFormatError, load_mimic_kb, read_mimic_docs
    from ..errors import KBError

    nlp = spacy.blank(lang)
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        with msg.loading("Building the KB..."):
            kb = load_mimic_kb(nlp.vocab, data_dir)
    except (MIMICFormatError, KBError) as err:
        msg.fail(str(err), exits=1)
    msg.good(f"KB: {len(kb)} entities, {kb.get_size_aliases()} aliases")
    summary = {"entities": len(kb), "aliases": kb.get_size_aliases(), "splits": {}}
    for split in SPLITS:
        report = ConversionReport()
        bin_ = DocBin(store_user_data=True)
        try:
            docs = read_mimic_docs(nlp, data_dir, split, known_entities=kb.entity_ids, report=report)
            for doc in progress_bar(docs, desc=f"{split}", unit="mention"):
                bin_.add(doc)
            for line in report.problems():
                msg.warn(f"{split}: {line}")
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
            "aligned_to_tokens": len(report.alignment.moved),
            "unaligned_skipped": len(report.alignment.unaligned),
            "malformed_skipped": len(report.malformed),
            "alignment_examples": report.alignment.to_dict()["moved_examples"],
        }
        msg.good(f"{split}: {report.mentions} mentions -> {output_dir / f'{split}.spacy'}")
    kb.to_disk(output_dir / "kb")
    (output_dir / "conversion.json").write_text(json.dumps(summary, indent=2) + "\n")
    msg.good(f"KB saved to {output_dir / 'kb'}")


@app.command("evaluate")
def evaluate(
    pipeline: str = typer.Argument(..., help="Trained pipeline: a directory or an installed package name"),
    data: Path = typer.Argument(..., help="A .spacy file (or a folder of them)", exists=True),
    image_dir: Optional[Path] = typer.Option(None, help="Base of relative image paths"),
    output: Optional[Path] = typer.Option(None, help="Write the metrics as JSON here"),
    protocol: str = typer.Option("two-stage", help="two-stage (the linker's candidates), exhaustive (the "
                                 "paper's: every KB entity, exact score) or both (with their top-1 agreement)"),
    gpu_id: int = typer.Option(-1, help="GPU to use (-1: CPU)"),
    pictures: str = typer.Option("given", help="given (as the data has them), none, half (a seeded half "
                                 "removed), shuffled (each mention gets another mention's picture, seeded) or "
                                 "all (every condition; the exhaustive protocol runs on 'given')"),
    seed: int = typer.Option(0, help="Seed of the half and shuffled conditions"),
) -> None:
    """Hits@1/3/5/10/20, MRR and nel_micro_p/r/f of a pipeline on a corpus,
    given the gold mentions, by the two-stage and/or the exhaustive protocol;
    accuracy, calibration error (ECE) and NIL precision/recall/F of its
    answers; under one or every picture condition."""
    from ..data.pictures import check_condition
    from ..data.readers import MultimodalCorpus
    from ..evaluation.end_to_end import PROTOCOLS, evaluate_pipeline

    if protocol not in PROTOCOLS:
        raise typer.BadParameter(f"--protocol must be one of {PROTOCOLS}, got {protocol!r}")
    try:
        check_condition(pictures, allow_all=True)
    except ValueError as err:
        raise typer.BadParameter(f"--{err}") from None
    nlp = _load(pipeline, gpu_id)
    corpus = MultimodalCorpus(data, image_dir=image_dir)
    examples = list(corpus(nlp))
    _check_pictures(examples, data, image_dir)
    result = evaluate_pipeline(nlp, examples, protocol=protocol, progress=True, pictures=pictures, seed=seed)
    result["alignment"] = corpus.alignment.to_dict()
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in result.items() if not isinstance(v, dict)]
    rows += [(f"exhaustive {k}", f"{v:.4f}") for k, v in result.get("exhaustive", {}).items()]
    rows += [(f"end to end {k}", f"{v:.4f}" if isinstance(v, float) else v)
             for k, v in result.get("end_to_end", {}).items()]
    msg.table(rows, header=("metric", "value"))
    if "pictures" in result:
        shown = ["m3el_hits1", "m3el_mrr", "m3el_accuracy", "m3el_ece", "m3el_nil_f", "m3el_nil_on_linkable"]
        msg.table([(condition, *(f"{figures[k]:.4f}" for k in shown))
                   for condition, figures in result["pictures"].items()], header=("pictures", *shown))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
        msg.good(f"Metrics written to {output}")


@app.command("calibrate")
def calibrate(
    pipeline: str = typer.Argument(..., help="Trained pipeline: a directory or an installed package name"),
    data: Path = typer.Argument(..., help="Held-out .spacy file (or folder) with gold links, NIL included",
                                exists=True),
    output: Path = typer.Argument(..., help="Where to save the calibrated pipeline"),
    image_dir: Optional[Path] = typer.Option(None, help="Base of relative image paths"),
    gpu_id: int = typer.Option(-1, help="GPU to use (-1: CPU)"),
) -> None:
    """Fit the linker's temperature, feature weights, NIL option, NIL
    threshold and confidence map on held-out data and save the pipeline (spacy train already
    does this on the dev set unless calibrate_on_score is off)."""
    from ..data.readers import MultimodalCorpus
    from ..evaluation.end_to_end import link_gold_mentions
    from ..fileio import save_pipeline
    from ..pipeline.calibration import MIN_MAP_ANSWERS
    from ..pipeline.linker import find_linker

    nlp = _load(pipeline, gpu_id)
    linker = find_linker(nlp)
    examples = list(MultimodalCorpus(data, image_dir=image_dir)(nlp))
    _check_pictures(examples, data, image_dir)
    link_gold_mentions(nlp, linker, examples, progress=True)
    report = linker.calibrate(examples, progress=True)
    msg.table([(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in report.items()
               if not isinstance(v, (dict, list)) and v is not None], header=("calibration", "value"))
    tried = report["threshold_tried"]
    msg.info(f"NIL threshold tried: {tried['threshold']:.4f} (out of fold it turned {tried['right']} answers right "
             f"and {tried['wrong']} wrong; kept only when that is more than chance)")
    if report["confidence_map"]:
        knots = ", ".join(f"{x:.2f}->{y:.2f}" for x, y in report["confidence_map"])
        msg.info(f"Confidence map (answer probability -> share right out of fold): {knots}")
    else:
        msg.info(f"No confidence map: fewer than {MIN_MAP_ANSWERS} held-out answers; answers keep their probability")
    shown = ["accuracy", "ece", "nll", "nil_on_linkable"]
    fits = {"before": "before (as it came)",
            "out_of_fold": f"after (held out: {report['folds']}-fold, each mention by a fit without it)",
            "in_sample": "in sample (the final fit, on what it fitted)"}
    msg.table([(label, *(f"{report[what][k]:.4f}" for k in shown)) for what, label in fits.items()],
              header=(f"{report['mentions']} mentions x pictures {list(report['conditions'])}", *shown))
    shares = ", ".join(f"{condition} {share:.2f}" for condition, share in report["picture_shares"].items())
    msg.info(f"The fits weigh the picture conditions {shares} (calibration_pictures); the rows above "
             "count every mention once per condition, the rows below per condition")
    msg.table([(condition, *(f"{figures[k]:.4f}" for k in shown))
               for condition, figures in report["conditions"].items()], header=("out of fold, pictures", *shown))
    save_pipeline(nlp, output)
    msg.good(f"Calibrated pipeline saved to {output}")


def _check_pictures(examples: List[Any], data: Path, image_dir: Optional[Path]) -> None:
    """Stop before linking when the corpus' pictures are not on disk, which
    is a wrong or missing --image-dir, not a few bad files."""
    from ..data.images import is_url
    from ..extensions import image_source

    paths = {str(source) for example in examples for item in (example.reference, *example.reference.ents)
             if isinstance(source := image_source(item), (str, Path)) and not is_url(source)}
    missing = sorted(path for path in paths if not Path(path).is_file())
    if missing:
        hint = (f"check --image-dir ({image_dir})" if image_dir is not None
                else "give --image-dir, the folder their relative paths start from")
        msg.fail(f"{len(missing)} of {len(paths)} pictures of {data} are not on disk, e.g. {missing[:3]}: {hint}",
                 exits=1)


def _load(pipeline: str, gpu_id: int):
    """A pipeline from a directory or an installed package, on the GPU asked for."""
    if gpu_id >= 0:
        spacy.require_gpu(gpu_id)
    return spacy.load(pipeline)


@app.command("link")
def link(
    pipeline: str = typer.Argument(..., help="Trained pipeline: a directory or an installed package name"),
    input_path: Path = typer.Argument(..., help='JSONL rows {"id", "text", "image", "spans"?} (with --ray also '
                                      "Parquet with those columns)", exists=True),
    output: Path = typer.Argument(..., help="JSONL output: one row per input row, with its linked entities "
                                  "(with --ray, Parquet when it ends with .parquet)"),
    errors: Optional[Path] = typer.Option(None, help="Where unusable rows are reported (default: OUTPUT.errors.jsonl)"),
    image_dir: Optional[Path] = typer.Option(None, help="Base of relative image paths (default: INPUT's folder)"),
    n_process: int = typer.Option(1, help="Worker processes (nlp.pipe n_process)"),
    batch_size: int = typer.Option(32, help="Docs per batch"),
    top_k: int = typer.Option(5, help="Candidates kept per entity in the output"),
    gpu_id: int = typer.Option(-1, help="GPU to use (-1: CPU)"),
    use_ray: bool = typer.Option(False, "--ray", help=f"Link on Ray Data workers ({RAY_EXTRA})"),
    address: Optional[str] = typer.Option(None, help="With --ray: the cluster to join ('auto', 'ray://host:port'); "
                                          "default: a local Ray on this machine"),
    num_workers: int = typer.Option(2, help="With --ray: worker actors, each holding one loaded pipeline"),
    gpus_per_worker: float = typer.Option(0.0, help="With --ray: GPUs per worker"),
    max_retries: int = typer.Option(3, help="With --ray: restarts of a lost worker (and tries of its batch) "
                                    "before the job fails naming the batch"),
    resume: bool = typer.Option(False, "--resume", help="Go on from where a killed run on the same output stopped "
                                "(each input row ends up exactly once in the output or the errors file)"),
) -> None:
    """Link a JSONL file of texts with images. Bad rows go to the errors
    file and the job goes on; an undecodable image is linked on text alone
    and reported. Output rows carry their input line, and are written (and
    flushed) one by one: a killed run goes on with --resume. With --ray the
    rows are linked by Ray Data workers (rows written as they come back, not
    in input order)."""
    from ..data.alignment import AlignmentReport
    from ..data.rows import link_rows, read_rows
    from ..pipeline.linker import find_linker
    from .link_output import LinkOutput, OutputBusyError, ResumeError

    if use_ray:
        if resume:
            raise typer.BadParameter("--resume works without --ray (Ray's output rows come in completion order)")
        from ..distributed import link as link_on_ray

        counts = link_on_ray(input_path, pipeline, output, errors=errors, image_dir=image_dir or input_path.parent,
                             address=address, num_workers=num_workers, batch_size=batch_size,
                             gpus_per_worker=gpus_per_worker, top_k=top_k, max_retries=max_retries)
        msg.good(f"{counts['linked']} rows linked on Ray -> {output}")
        if counts["errors"]:
            msg.warn(f"{counts['errors']} problem row(s) -> {errors or output.with_name(output.name + '.errors.jsonl')}")
        return
    if input_path.is_dir():
        raise typer.BadParameter(f"{input_path} is a directory: without --ray the input is one JSONL file")
    nlp = _load(pipeline, gpu_id)
    linker = find_linker(nlp)
    linker.configure(on_bad_image="warn")  # one bad image must not stop the job
    if len(linker.kb) and n_process > 1:
        linker.entity_index  # built once here if missing, not once per worker process
    errors = errors or output.with_name(output.name + ".errors.jsonl")
    total = sum(1 for line in input_path.open(encoding="utf8") if line.strip())
    counts = {"linked": 0, "errors": 0, "skipped": 0, "unreadable_images": 0}
    with contextlib.ExitStack() as stack:
        try:
            job = stack.enter_context(LinkOutput(output, errors, resume=resume))
        except (OutputBusyError, ResumeError) as err:
            msg.fail(str(err), exits=1)
        if resume:
            msg.info(f"Resuming: {len(job.done)} of {total} rows done ({job.resumed_rows} linked) in {output}")
        with progress_bar(total=total, initial=len(job.done), desc="Linking", unit="row") as bar:

            def on_error(record) -> None:
                job.write_error(record)
                counts["errors"] += 1
                counts["skipped"] += bool(record.get("skipped"))
                counts["unreadable_images"] += bool(record.get("unreadable_image"))
                if record.get("skipped"):  # a row left out counts as done; a linked row counts when written
                    bar.update(1)

            alignment = AlignmentReport()
            todo = (row for row in read_rows(input_path) if row[0] not in job.done)
            rows = link_rows(nlp, todo, on_error, image_dir=image_dir or input_path.parent, n_process=n_process,
                             batch_size=batch_size, top_k=top_k, alignment=alignment, with_line=True)
            for row in rows:
                job.write_row(row)
                counts["linked"] += 1
                bar.update(1)
    msg.good(f"{counts['linked']} rows linked -> {output}" + (" (this run)" if resume else ""))
    for line in alignment.lines():
        msg.warn(line)
    if counts["errors"]:
        msg.warn(f"{counts['errors']} problem row(s) -> {errors}: {counts['skipped']} left out, "
                 f"{counts['unreadable_images']} linked on text alone (image unreadable)")


@app.command("build-kb")
def build_kb(
    entities: Path = typer.Argument(..., help="Entities: .jsonl or .csv (id, name, description, images, freq, "
                                    "aliases), or a MIMIC-format dataset directory (kb_entity.json, kb_image/)",
                                    exists=True),
    output: Path = typer.Argument(..., help="KB directory to write"),
    image_dir: Optional[Path] = typer.Option(None, help="Base of relative image paths (default: the file's folder)"),
    lang: str = typer.Option("en", help="Language of the vocab"),
    name_as_alias: bool = typer.Option(True, help="Use every entity's name as one of its aliases"),
    pipeline: Optional[str] = typer.Option(None, help="Also encode the entity index for this pipeline's "
                                           "m3el_linker (streamed to disk, resumable: run the same command again "
                                           "after a kill)"),
    ann_index: Optional[str] = typer.Option(None, help="With --pipeline: also build this ANN index ('auto' or "
                                            "a faiss index_factory string; default: the pipeline's ann_index)"),
    processes: Optional[int] = typer.Option(None, help="With --pipeline: encoding processes, one torch thread "
                                            "each (default: the pipeline's build_processes; on CPU one per core "
                                            "is the fastest)"),
) -> None:
    """Build a MultimodalKB directory (images copied in) from an entity file,
    and with --pipeline the entity index for that pipeline (in its index/)."""
    from ..kb.base import MultimodalKB
    from ..kb.files import csv_records, jsonl_records, read_kb_records

    nlp = _load(pipeline, -1) if pipeline else spacy.blank(lang)
    vocab = nlp.vocab
    if entities.is_dir():
        from ..data.mimic import load_mimic_kb

        with msg.loading(f"Reading the MIMIC-format KB in {entities}..."):
            kb = load_mimic_kb(vocab, entities)
    else:
        records = csv_records(entities) if entities.suffix.lower() == ".csv" else jsonl_records(entities)
        kb = read_kb_records(MultimodalKB(vocab), progress_bar(records, desc="Entities", unit="entity"),
                             image_dir=image_dir or entities.parent, name_as_alias=name_as_alias)
    msg.good(f"KB: {len(kb)} entities, {kb.get_size_aliases()} aliases")
    if pipeline:
        from ..pipeline.linker import find_linker

        linker = find_linker(nlp)
        linker.set_kb(lambda _: kb)
        _build_index(linker, _work_dir(output), ann_index, processes)
    kb.to_disk(output)
    if pipeline:
        linker.index_keeper.index.save(output / "index")  # beside the KB, for swap-kb
    missing = sum(len(v) for v in kb.missing_images.values())
    msg.good(f"KB written -> {output}" + (" (with its entity index in index/)" if pipeline else ""))
    if missing:
        msg.warn(f"{missing} image file(s) of {len(kb.missing_images)} entities not found (in kb.json: missing_images)")
    if pipeline:
        import shutil

        shutil.rmtree(_work_dir(output), ignore_errors=True)


def _work_dir(output: Path) -> Path:
    """Where a streamed index build keeps its shards until it is done."""
    return output.parent / f".{output.name}.cache-build"


def _build_index(linker, work_dir: Path, ann_index: Optional[str], processes: Optional[int]) -> None:
    """Stream the linker's entity index into ``work_dir`` (resuming what a
    killed run left there), with the ANN index its settings (or
    ``ann_index``) ask for."""
    if ann_index is not None:
        linker.configure(ann_index=ann_index)
    if processes is not None:
        if processes < 1:
            raise typer.BadParameter(f"--processes must be >= 1, got {processes}")
        linker.configure(build_processes=processes)
    index = linker.build_entity_index(progress=True, folder=work_dir)
    built = f"{len(index)} entities encoded ({index.bytes_per_entity:,} bytes each on disk)"
    if index.use_ann:
        recall = index.ann.meta["recall"]
        built += f"; ANN index {index.ann.factory}: recall@{recall['k']} {recall['recall']:.3f}"
    msg.good(built)


@app.command("build-cache")
def build_cache(
    pipeline: str = typer.Argument(..., help="Trained pipeline with an m3el_linker: a directory or a package name"),
    output: Path = typer.Argument(..., help="Where to save the pipeline with its entity index"),
    use_ray: bool = typer.Option(False, "--ray", help=f"Encode the KB on Ray Data workers ({RAY_EXTRA})"),
    address: Optional[str] = typer.Option(None, help="With --ray: the cluster to join (default: a local Ray)"),
    num_workers: int = typer.Option(2, help="With --ray: worker actors, each holding one loaded pipeline"),
    ann_index: Optional[str] = typer.Option(None, help="Also build this ANN index ('auto' or a faiss "
                                            "index_factory string; default: the pipeline's ann_index)"),
    processes: Optional[int] = typer.Option(None, help="Encoding processes, one torch thread each (default: "
                                            "the pipeline's build_processes; on CPU one per core is the fastest)"),
) -> None:
    """Encode every KB entity for the linker's current weights (the entity
    index the two-stage linker searches) and save the pipeline with it. The
    build streams to disk in shards (next to OUTPUT) and resumes after a
    kill when the same command is run again. With --ray the KB is split into
    row ranges encoded by Ray workers and merged into the same index a
    single-machine build gives."""
    if use_ray:
        from ..distributed import build_kb_cache

        counts = build_kb_cache(pipeline, output, address=address, num_workers=num_workers)
        msg.good(f"{counts['entities']} entities encoded in {counts['shards']} shards on Ray -> {output}")
        return
    import shutil

    from ..pipeline.linker import find_linker

    nlp = _load(pipeline, -1)
    _build_index(find_linker(nlp), _work_dir(output), ann_index, processes)
    nlp.to_disk(output)
    shutil.rmtree(_work_dir(output), ignore_errors=True)
    msg.good(f"Pipeline with its entity index -> {output}")


@app.command("update-kb")
def update_kb(
    pipeline: str = typer.Argument(..., help="Pipeline with an m3el_linker: a directory or a package name"),
    changes: Path = typer.Argument(..., help="JSONL: one entity a line in the build-kb format (a new id adds, a "
                                   'known id replaces) or {"id": ..., "remove": true}', exists=True, dir_okay=False),
    output: Path = typer.Argument(..., help="Where to save the updated pipeline (may be PIPELINE itself: the "
                                  "save is atomic)"),
    image_dir: Optional[Path] = typer.Option(None, help="Base of the changes' relative image paths (default: "
                                             "the file's folder)"),
    name_as_alias: bool = typer.Option(True, help="Use every changed entity's name as one of its aliases"),
    ruler: Optional[str] = typer.Option(None, help="The alias ruler whose patterns follow the KB (default: the "
                                        "entity_ruler made of KB aliases, if any)"),
) -> None:
    """Add, replace and remove entities (and their aliases) in a pipeline's
    KB: only the changed entities are encoded, the entity index and its ANN
    index are updated, the alias ruler's patterns follow, and the pipeline
    is saved atomically. The result is the KB a rebuild (build-kb on the
    KB's own entity file with the changes applied, then swap-kb) gives."""
    import time

    from ..errors import KBError
    from ..kb.changes import apply_changes, read_changes
    from ..pipeline.linker import find_linker
    from ..pipeline.ruler import find_alias_ruler

    started = time.perf_counter()
    nlp = _load(pipeline, -1)
    linker = find_linker(nlp)
    try:
        ruler_name = find_alias_ruler(nlp, ruler)
        update = apply_changes(linker.kb, read_changes(changes), image_dir=image_dir or changes.parent,
                               name_as_alias=name_as_alias)
    except (KBError, ValueError) as err:
        msg.fail(str(err), exits=1)
    keeper, kb = linker.index_keeper, update.kb
    old_index = keeper.index if keeper.is_current(linker.kb) else None
    msg.info(f"{len(update.added)} added, {len(update.replaced)} replaced, {len(update.removed)} removed: "
             f"{len(kb)} entities")
    new_index = None
    if old_index is None:
        msg.warn("The pipeline has no entity index for its weights: the whole KB is encoded")
    else:
        todo = update.to_encode
        encoded = (keeper.encoding.encode(kb, todo, max_queries=linker.settings.max_cached_queries, progress=True)
                   if todo else None)
        new_index = old_index.select(update.kept_rows, encoded, identity=keeper.identity(kb))
        msg.good(f"{len(todo)} entities encoded, {len(kb) - len(todo)} carried over from the entity index")
    _use_kb(linker, kb, new_index, output, ann_index=None, processes=None)
    _save_with_kb(nlp, linker, kb, ruler_name, output)
    msg.good(f"Updated pipeline -> {output} ({time.perf_counter() - started:.1f} s)")


def _use_kb(linker, kb, index, output: Path, *, ann_index: Optional[str], processes: Optional[int]) -> bool:
    """The linker on ``kb`` with ``index`` when that is valid for the
    linker's weights and settings (True), else with one built (streamed
    next to ``output``); searched as the settings (or ``ann_index``) ask."""
    linker.set_kb(lambda _: kb)
    if ann_index is not None:
        linker.configure(ann_index=ann_index)
    keeper = linker.index_keeper
    if index is not None and not index.mismatch(keeper.identity(kb)):
        keeper.adopt(kb, index)
        keeper.configure_search(kb, index, progress=True)
        return True
    keeper.drop()
    _build_index(linker, _work_dir(output), None, processes)
    return False


def _save_with_kb(nlp, linker, kb, ruler_name: Optional[str], output: Path) -> None:
    """The alias ruler's patterns following the linker's new KB, and the
    pipeline saved atomically (the streamed build's shards then removed)."""
    import shutil

    from ..fileio import save_pipeline
    from ..pipeline.ruler import set_alias_patterns

    if ruler_name is not None:
        count = set_alias_patterns(nlp.get_pipe(ruler_name), kb)
        msg.good(f"{ruler_name}: {count} alias patterns from the KB")
    else:
        msg.warn("No alias ruler in the pipeline: its mentions come from "
                 f"{[n for n in nlp.pipe_names if n != linker.name] or 'the docs you give it'}")
    save_pipeline(nlp, output)
    shutil.rmtree(_work_dir(output), ignore_errors=True)


@app.command("add-alias-ruler")
def add_alias_ruler_command(
    pipeline: str = typer.Argument(..., help="Pipeline with an m3el_linker: a directory or a package name"),
    output: Path = typer.Argument(..., help="Where to save the pipeline with the ruler"),
    label: str = typer.Option("ENTITY", help="Label of the spans the ruler marks"),
    name: str = typer.Option("alias_ruler", help="Name of the ruler component"),
    replace: bool = typer.Option(False, "--replace", help="The pipeline has a ruler of that name already: "
                                 "replace its patterns with the KB's aliases"),
) -> None:
    """Put an entity_ruler built from the KB's aliases in front of the
    linker, so the pipeline links raw text."""
    from ..fileio import save_pipeline
    from ..pipeline.ruler import add_alias_ruler

    try:
        nlp = add_alias_ruler(spacy.load(pipeline), label=label, name=name, replace=replace)
    except ValueError as err:
        msg.fail(str(err), exits=1)
    save_pipeline(nlp, output)
    msg.good(f"{nlp.pipe_names} -> {output}")


@app.command("swap-kb")
def swap_kb(
    pipeline: str = typer.Argument(..., help="Pipeline with an m3el_linker: a directory or a package name"),
    kb_dir: Path = typer.Argument(..., help="A MultimodalKB directory (build-kb's output)", exists=True,
                                  file_okay=False),
    output: Path = typer.Argument(..., help="Where to save the pipeline with the new KB"),
    ann_index: Optional[str] = typer.Option(None, help="Also build this ANN index ('auto' or a faiss "
                                            "index_factory string; default: the pipeline's ann_index)"),
    processes: Optional[int] = typer.Option(None, help="Encoding processes, one torch thread each (default: "
                                            "the pipeline's build_processes)"),
    ruler: Optional[str] = typer.Option(None, help="The alias ruler whose patterns become the new KB's aliases "
                                        "(default: the entity_ruler made of KB aliases, if any)"),
) -> None:
    """Link against another KB: the pipeline's linker gets the KB in KB_DIR,
    with its entity index for the linker's weights (reused when build-kb
    --pipeline made it for these weights, else encoded, streamed and
    resumable), the ANN index the pipeline (or --ann-index) asks for, and
    the alias ruler's patterns replaced by the new KB's aliases; saved to
    OUTPUT in one step."""
    from ..index.entity_index import saved_index
    from ..kb.base import MultimodalKB
    from ..pipeline.linker import find_linker
    from ..pipeline.ruler import find_alias_ruler

    nlp = _load(pipeline, -1)
    linker = find_linker(nlp)
    try:
        ruler_name = find_alias_ruler(nlp, ruler)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    kb = MultimodalKB(nlp.vocab).from_disk(kb_dir)
    saved = saved_index([kb_dir / "index", kb_dir / "cache"], n_entities=len(kb))
    if _use_kb(linker, kb, saved, output, ann_index=ann_index, processes=processes):
        msg.good(f"Entity index in {kb_dir} reused: built for these weights")
    elif saved is not None:
        msg.info(f"The entity index in {kb_dir} was built for other weights or settings: the KB was encoded again")
    _save_with_kb(nlp, linker, kb, ruler_name, output)
    msg.good(f"{linker.name} links against {len(kb)} entities ({kb.get_size_aliases()} aliases) -> {output}")


@app.command("visualize")
def visualize(
    pipeline: str = typer.Argument(..., help="Trained pipeline: a directory or an installed package name"),
    input_path: Path = typer.Argument(..., help="JSONL rows, as for `link`", exists=True, dir_okay=False),
    output: Path = typer.Option(Path("m3el.html"), help="HTML page to write"),
    image_dir: Optional[Path] = typer.Option(None, help="Base of relative image paths (default: INPUT's folder)"),
    limit: int = typer.Option(20, help="Rows to show"),
    max_candidates: int = typer.Option(5, help="Candidates per mention"),
) -> None:
    """A self-contained HTML page of linked rows: mentions, their pictures,
    the top candidates with their KB pictures and per-branch scores."""
    from itertools import islice

    from ..data.rows import doc_or_error, read_rows
    from ..pipeline.linker import find_linker
    from ..pipeline.render import render

    nlp = spacy.load(pipeline)
    docs = []
    for line, row, error in islice(read_rows(input_path), limit):
        doc, error = (None, error) if error is not None else doc_or_error(nlp, line, row, image_dir or input_path.parent)
        if doc is None:
            msg.warn(f"line {line}: {error} (row left out)")
        else:
            docs.append(doc)
    page = render(nlp.pipe(docs), find_linker(nlp).kb, max_candidates=max_candidates, jupyter=False)
    output.write_text(page, encoding="utf8")
    msg.good(f"{len(docs)} docs -> {output} ({len(page.encode()) // 1024} KB)")


@app.command("serve")
def serve(
    pipeline: str = typer.Argument(..., help="Trained pipeline: a directory or an installed package name"),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, help="Port to listen on"),
    allowed_image_dir: Optional[List[Path]] = typer.Option(
        None, "--allowed-image-dir", help="A folder whose pictures requests may name by path (repeatable; "
        "without one, no path is read: send pictures as image_base64)", exists=True, file_okay=False),
    max_batch: int = typer.Option(32, help="Rows linked in one model call, across requests"),
    max_wait_ms: float = typer.Option(10.0, help="How long a batch waits for more rows after its first"),
    top_k: int = typer.Option(5, help="Candidates kept per entity in the answer"),
    max_body_mb: float = typer.Option(32.0, help="Largest request body"),
    max_picture_mb: float = typer.Option(16.0, help="Largest picture (file or decoded base64)"),
    max_text_chars: int = typer.Option(100_000, help="Longest text of a row"),
    max_rows: int = typer.Option(256, help="Most rows in one request"),
    gpu_id: int = typer.Option(-1, help="GPU to use (-1: CPU)"),
) -> None:
    """Serve the pipeline over HTTP (needs the serve extra of spacy-m3el):
    POST /link with one row or a list of rows in the `link` format, answered
    with the rows `link` writes; requests are micro-batched across clients.
    GET /health, GET /ready; OpenAPI page at /docs."""
    try:
        import uvicorn

        from .serve import ServerLimits, create_app
    except ImportError as err:
        msg.fail(str(err), exits=1)
    nlp = _load(pipeline, gpu_id)
    limits = ServerLimits(max_body_bytes=int(max_body_mb * 2**20), max_picture_bytes=int(max_picture_mb * 2**20),
                          max_text_chars=max_text_chars, max_rows=max_rows)
    server = create_app(nlp, allowed_image_dirs=allowed_image_dir or [], max_batch=max_batch,
                        max_wait_ms=max_wait_ms, top_k=top_k, limits=limits)
    msg.info(f"Serving {nlp.pipe_names} on http://{host}:{port} (POST /link, GET /ready, /docs); pictures by path "
             f"from {[str(d) for d in allowed_image_dir] if allowed_image_dir else 'nowhere (image_base64 only)'}")
    uvicorn.run(server, host=host, port=port, log_level="info")


def main() -> None:
    app()
