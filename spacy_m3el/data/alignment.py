"""Mentions whose character offsets do not fall on token boundaries.

Real data writes mentions as found: ``Washington D.C`` inside "Washington
D.C." (spaCy keeps "D.C." one token), ``King Jr`` inside "Jr.", a leading
space. Such a span is aligned to the tokens the pipeline itself produces
(``nlp.make_doc``), never re-tokenised: expanded to the tokens it touches, or
contracted to the tokens it covers where expanding would swallow another
mention. What moved is counted and reported once, with examples; the
original character offsets stay on the span (``span._.m3el_original_chars``).
"""
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from spacy.tokens import Doc, Span

from ..errors import warn
from ..extensions import register_extensions

#: Examples named per kind of problem in a report.
EXAMPLES = 5


@dataclass
class AlignmentReport:
    """How many mentions were aligned, which moved, and which could not be used."""

    mentions: int = 0
    moved: List[Tuple[str, str, str]] = field(default_factory=list)  # (where, original text, aligned text)
    unaligned: List[Tuple[str, str]] = field(default_factory=list)  # (where, reason)

    def lines(self) -> List[str]:
        """One line per kind of problem, with its count and examples."""
        out = []
        if self.moved:
            shown = "; ".join(f"{where}: {original!r} -> {aligned!r}" for where, original, aligned in
                              self.moved[:EXAMPLES])
            out.append(f"{len(self.moved)} of {self.mentions} mention(s) did not fall on token boundaries and "
                       f"were aligned to the tokens (original offsets kept in span._.m3el_original_chars), "
                       f"e.g. {shown}")
        if self.unaligned:
            shown = "; ".join(f"{where}: {reason}" for where, reason in self.unaligned[:EXAMPLES])
            out.append(f"{len(self.unaligned)} of {self.mentions} mention(s) could not be aligned to any token "
                       f"and were skipped, e.g. {shown}")
        return out

    def warn(self, where: str) -> None:
        """One warning per kind of problem (nothing when every mention fit)."""
        for line in self.lines():
            warn(f"{where}: {line}", stacklevel=3)

    def to_dict(self) -> Dict[str, object]:
        return {"mentions": self.mentions, "moved": len(self.moved), "unaligned": len(self.unaligned),
                "moved_examples": [list(item) for item in self.moved[:EXAMPLES]],
                "unaligned_examples": [list(item) for item in self.unaligned[:EXAMPLES]]}

    def merge(self, other: "AlignmentReport") -> None:
        self.mentions += other.mentions
        self.moved.extend(other.moved)
        self.unaligned.extend(other.unaligned)


def _overlaps(span: Span, others: Iterable[Span]) -> bool:
    return any(span.start < other.end and other.start < span.end for other in others)


def align_span(
    doc: Doc,
    start: int,
    end: int,
    *,
    label: str,
    kb_id: str = "",
    taken: Sequence[Span] = (),
) -> Tuple[Optional[Span], str]:
    """The span of ``doc`` for the characters ``start:end``, and ``""`` (it
    fit), ``"moved"`` or why it cannot be aligned (then the span is None).

    Surrounding whitespace is dropped; a span that cuts a token is expanded
    to the whole token, or contracted to the tokens it covers when expanding
    would overlap a span of ``taken``.
    """
    text = doc.text
    if not (0 <= start < end <= len(text)):
        return None, f"offsets {start}-{end} are outside the text (length {len(text)})"
    stripped_start = start + len(text[start:end]) - len(text[start:end].lstrip())
    stripped_end = end - (len(text[start:end]) - len(text[start:end].rstrip()))
    if stripped_start >= stripped_end:
        return None, f"offsets {start}-{end} hold only whitespace"
    exact = doc.char_span(stripped_start, stripped_end, label=label, kb_id=kb_id)
    if exact is not None and not _overlaps(exact, taken):
        return exact, "" if (stripped_start, stripped_end) == (start, end) else "moved"
    for mode in ("expand", "contract"):
        span = doc.char_span(stripped_start, stripped_end, label=label, kb_id=kb_id, alignment_mode=mode)
        if span is not None and len(span) and not _overlaps(span, taken):
            return span, "moved"
    return None, f"{text[start:end]!r} ({start}-{end}) overlaps another mention on the same tokens"


def set_original_chars(span: Span, start: int, end: int) -> None:
    """Keep the mention's original offsets on its aligned span."""
    register_extensions()
    span._.m3el_original_chars = [start, end]


def align_entities(
    doc: Doc,
    spans: Iterable[Tuple[int, int, str, str]],
    report: AlignmentReport,
    *,
    where: str,
) -> List[Span]:
    """Entity spans of ``doc`` for ``(start, end, label, kb_id)``, aligned to
    its tokens (see :func:`align_span`); what moved and what was skipped goes
    into ``report``."""
    aligned: List[Span] = []
    for start, end, label, kb_id in spans:
        report.mentions += 1
        span, outcome = align_span(doc, start, end, label=label, kb_id=kb_id, taken=aligned)
        if span is None:
            report.unaligned.append((where, outcome))
            continue
        if outcome == "moved":
            report.moved.append((where, doc.text[start:end], span.text))
            set_original_chars(span, start, end)
        aligned.append(span)
    return aligned


def _same_tokens(a: Doc, b: Doc) -> bool:
    return len(a) == len(b) and all(x.idx == y.idx and x.text == y.text for x, y in zip(a, b))


def retokenized_reference(made: Doc, reference: Doc, report: AlignmentReport, *, where: str) -> Doc:
    """``reference`` itself when ``made`` (``nlp.make_doc`` of its text, left
    untouched) has its tokens, else the same text, entities, KB ids, images
    and original offsets on ``made``'s tokens (the entities aligned to them),
    so the gold spans are spans of the docs the pipeline will see."""
    if _same_tokens(made, reference):
        report.mentions += len(reference.ents)
        return reference
    made = made.copy()
    made.user_data.update({k: v for k, v in reference.user_data.items()
                           if not (isinstance(k, tuple) and k[:1] == ("._.",) and k[2] is not None)})
    entities = list(reference.ents)
    aligned = align_entities(made, [(e.start_char, e.end_char, e.label_, e.kb_id_) for e in entities], report,
                             where=where)
    made.ents = aligned
    for ent in entities:
        span = next((s for s in made.ents if s.start_char <= ent.start_char < s.end_char), None)
        if span is None:
            continue
        original = ent._.m3el_original_chars or [ent.start_char, ent.end_char]
        if [span.start_char, span.end_char] != list(original):
            set_original_chars(span, *original)
        if ent._.image is not None:
            span._.image = ent._.image
    return made
