"""Linking a corpus of JSONL rows: text + image in, spans + ids out.

Input, one object per line (``spans`` optional: without them the pipeline's
own ``ner``/``entity_ruler`` finds the mentions)::

    {"id": "post-1", "text": "Jordan scored 40 points.", "image": "photos/1.jpg",
     "spans": [[0, 6, "PERSON"]]}

Output, one object per input row::

    {"id": "post-1", "text": "...", "ents": [{"start": 0, "end": 6, "text": "Jordan",
     "label": "PERSON", "kb_id": "Q41421", "score": 0.93, "modalities": ["text", "image"],
     "candidates": [{"id": "Q41421", "score": 0.93}, ...]}]}

A row that cannot be used (bad JSON, no text, spans of the wrong shape, an
image file that does not exist) goes to the errors file with its line and
the reason, and the job goes on; so does a row whose image could not be
decoded (it is linked on text alone and also reported). A span that cuts a
token is aligned to the tokens (its ``original`` offsets kept in the output);
a span outside the text is left out and reported.
"""
import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from spacy.language import Language
from spacy.tokens import Doc

from ..extensions import image_source, make_doc
from .alignment import AlignmentReport, align_entities
from .images import is_url

Row = Dict[str, Any]


def parse_line(line: str) -> Tuple[Optional[Row], Optional[str]]:
    """``(row, None)`` for a JSON object, else ``(None, what is wrong)``."""
    try:
        row = json.loads(line)
    except ValueError as err:
        return None, f"not valid JSON ({err})"
    if not isinstance(row, dict):
        return None, "a row must be a JSON object"
    return row, None


def read_rows(path: Union[str, Path]) -> Iterator[Tuple[int, Optional[Row], Optional[str]]]:
    """``(line number, row, None)`` or ``(line number, None, error)`` per non-empty line."""
    with Path(path).open(encoding="utf8") as lines:
        for line_no, line in enumerate(lines, start=1):
            if line.strip():
                yield (line_no, *parse_line(line))


def row_doc(
    nlp: Language, row: Row, *, image_dir: Optional[Path] = None, alignment: Optional[AlignmentReport] = None,
    where: str = "",
) -> Doc:
    """The doc of a row, with its image and, if given, its spans; a
    ``ValueError`` says what is wrong with the row. Spans that cut a token
    are aligned to the tokens, and spans no token holds are left out; both
    are recorded in ``alignment``."""
    text = row.get("text")
    if not isinstance(text, str):
        raise ValueError("'text' must be a string")
    image = row.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise ValueError("'image' must be a path")
        if not is_url(image):  # a URL goes to the linker, which fetches it only where allow_image_urls is set
            path = Path(image) if image_dir is None or Path(image).is_absolute() else image_dir / image
            if not path.is_file():
                raise ValueError(f"image file '{path}' not found")
            image = str(path)
    doc = make_doc(nlp, text, image)
    if row.get("spans") is not None:
        spans = row["spans"]
        if not isinstance(spans, list):
            raise ValueError(f"'spans' must be a list of [start, end] or [start, end, label], got {spans!r}")
        report = alignment if alignment is not None else AlignmentReport()
        doc.ents = align_entities(doc, [_span(span) for span in spans], report, where=where or "row")
    return doc


def _span(span: Any) -> Tuple[int, int, str, str]:
    if not (isinstance(span, (list, tuple)) and len(span) in (2, 3)
            and all(isinstance(x, int) and not isinstance(x, bool) for x in span[:2])):
        raise ValueError(f"a span must be [start, end] or [start, end, label], got {span!r}")
    return span[0], span[1], str(span[2]) if len(span) == 3 else "ENTITY", ""


def doc_row(doc: Doc, row_id: Any, *, top_k: int = 5) -> Row:
    """The output row of a linked doc."""
    ents = []
    for ent in doc.ents:
        candidates = ent._.m3el_candidates or []
        ents.append({
            "start": ent.start_char, "end": ent.end_char, "text": ent.text, "label": ent.label_,
            "kb_id": ent.kb_id_, "score": ent._.m3el_score, "nil_prob": ent._.m3el_nil_prob,
            "modalities": ent._.m3el_modalities,
            **({"original": ent._.m3el_original_chars} if ent._.m3el_original_chars else {}),
            "candidates": [{"id": c["id"], "prob": c.get("prob"), "score": c["score"]} for c in candidates[:top_k]],
        })
    return {"id": row_id, "text": doc.text, "ents": ents}


def link_rows(
    nlp: Language,
    rows: Iterable[Tuple[Any, Optional[Row], Optional[str]]],
    on_error: Callable[[Row], None],
    *,
    image_dir: Optional[Path] = None,
    n_process: int = 1,
    batch_size: int = 32,
    top_k: int = 5,
    alignment: Optional[AlignmentReport] = None,
    with_line: bool = False,
) -> Iterator[Row]:
    """Output rows, streaming, in input order (but for rows whose batch
    failed in the pipeline: they are linked again one at a time, at the
    end); ``on_error({"line", "id", "error", "skipped"})`` for every
    unusable row (skipped), for a span no token holds (the row is linked
    without it) and for a row whose image could not be decoded (that row is
    still linked, on text alone). Spans aligned to the tokens keep their
    ``original`` offsets in the output and are counted in ``alignment``.
    ``with_line``: output rows carry their input ``line``."""
    alignment = alignment if alignment is not None else AlignmentReport()
    pending: Dict[Any, Row] = {}  # rows handed to the pipeline and not back yet, by line

    def docs() -> Iterator[Doc]:
        for line, row, error in rows:
            if error is None:
                doc, error = doc_or_error(nlp, line, row, image_dir, alignment=alignment, on_error=on_error)
                if doc is not None:
                    pending[line] = row
                    yield doc
                    continue
            on_error({"line": line, "id": row.get("id") if isinstance(row, dict) else None, "error": error,
                      "skipped": True})

    def go_on(name: Optional[str], proc: Any, batch: Optional[List[Doc]], error: Exception) -> None:
        """A failed batch's docs are left out: their rows are found pending below (so in a worker process too)."""

    with _error_handler(nlp, go_on):
        for doc in nlp.pipe(docs(), n_process=n_process, batch_size=batch_size):
            line = doc.user_data.get(LINE_KEY)
            row = pending.pop(line)
            yield _output_row(doc, line, row, on_error, top_k=top_k, with_line=with_line)
    # Rows of a batch that failed (a good row may share its batch with a bad one): one at a time.
    for line, row in list(pending.items()):
        try:
            doc, error = doc_or_error(nlp, line, row, image_dir)
            if doc is None:
                raise ValueError(error)
            doc = nlp(doc)
        except Exception as err:  # alone, the row itself is what fails
            on_error({"line": line, "id": row.get("id", line), "error": f"linking failed: {type(err).__name__}: {err}",
                      "skipped": True})
        else:
            yield _output_row(doc, line, row, on_error, top_k=top_k, with_line=with_line)


#: Where a row's doc keeps its input line (user_data travels with the doc to worker processes).
LINE_KEY = "m3el_line"


def doc_or_error(nlp: Language, line: Any, row: Row, image_dir: Optional[Path], *,
                 alignment: Optional[AlignmentReport] = None,
                 on_error: Callable[[Row], None] = lambda _: None) -> Tuple[Optional[Doc], Optional[str]]:
    """The doc of a row, or None and what is wrong with the row (as the
    errors file of ``link`` says it); ``on_error`` hears of spans left out."""
    alignment = alignment if alignment is not None else AlignmentReport()
    row_report = AlignmentReport()
    try:
        doc = row_doc(nlp, row, image_dir=image_dir, alignment=row_report, where=f"line {line}")
    except ValueError as err:
        return None, str(err)
    except Exception as err:  # a field of a type nothing expected: still this row's problem only
        return None, f"{type(err).__name__}: {err}"
    alignment.merge(row_report)
    for _, reason in row_report.unaligned:
        on_error({"line": line, "id": row.get("id", line), "error": f"span left out: {reason}", "skipped": False})
    doc.user_data[LINE_KEY] = line
    return doc, None


def _output_row(doc: Doc, line: Any, row: Row, on_error: Callable[[Row], None], *, top_k: int,
                with_line: bool) -> Row:
    row_id = row.get("id", line)
    unread = [e.text for e in doc.ents if image_source(e) is not None and e._.m3el_modalities == ["text"]]
    if unread:
        why = " (a URL: fetched only where the linker's allow_image_urls is set)" if is_url(row.get("image")) else ""
        on_error({"line": line, "id": row_id, "skipped": False, "unreadable_image": True,
                  "error": f"the image could not be read{why}: {unread} linked on text alone"})
    out = doc_row(doc, row_id, top_k=top_k)
    return {"line": line, **out} if with_line else out


@contextlib.contextmanager
def _error_handler(nlp: Language, handler: Callable) -> Iterator[None]:
    """Every component's error handler set to ``handler`` inside the block
    (nlp.pipe's worker processes report to the parent's), restored after."""
    saved = [(proc, proc.get_error_handler()) for _, proc in nlp.pipeline if hasattr(proc, "get_error_handler")]
    saved_default = nlp.default_error_handler
    nlp.set_error_handler(handler)
    try:
        yield
    finally:
        nlp.default_error_handler = saved_default
        for proc, previous in saved:
            proc.set_error_handler(previous)
