"""From spaCy objects to model inputs: mention and entity texts and images,
and the training batch (gold mentions, in-batch candidates, labels)."""
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from spacy.tokens import Span
from spacy.training import Example

from ..data.images import ImageLoader, ImageRef, RecordBadImages
from ..encoders import MultimodalEncoder
from ..errors import warn
from ..extensions import copy_images, image_source
from ..kb.base import NIL, MultimodalKB

Inputs = Tuple[List[str], List[Optional[ImageRef]]]


def mention_context(span: Span, context_chars: int) -> str:
    """The sentence of the mention when the doc has sentences, else a window
    of about ``context_chars`` characters around it."""
    doc = span.doc
    if doc.has_annotation("SENT_START"):
        return span.sent.text
    text = doc.text  # joined from the tokens at every access
    if len(text) <= context_chars:
        return text
    half = context_chars // 2
    start = max(0, span.start_char - half)
    return text[start : start + context_chars]


class InputBuilder:
    """Texts and lazily decoded images of mentions and KB entities, in the
    encoder's text format. Mention images follow ``settings.on_bad_image``;
    a bad KB image never stops the work: the entity goes without it and the
    failure is recorded in ``kb_images.failures``.

    ``settings`` is read at each call, so a change to the linker's settings
    applies at once.
    """

    def __init__(self, encoder: MultimodalEncoder, images: ImageLoader, settings: Any) -> None:
        self.encoder = encoder
        self.images = images
        self.kb_images = ImageLoader(RecordBadImages(settings), decoded=images.decoded)
        self.settings = settings

    def mentions(self, spans: Sequence[Span], *, where: Optional[Sequence[str]] = None) -> Inputs:
        """``mention [SEP] context`` and the span's (else the doc's) image;
        ``where[i]`` names span i's doc in image errors."""
        chars = self.settings.context_chars
        texts = [self.encoder.text_for_mention(s.text, mention_context(s, chars)) for s in spans]
        where = where if where is not None else [f"mention '{s.text}'" for s in spans]
        refs = [self.images.ref(image_source(s), context=w) for s, w in zip(spans, where)]
        return texts, refs

    def entities(self, kb: MultimodalKB, rows: Sequence[int], *, training: bool) -> Inputs:
        """``name [SEP] description`` and one image per entity: a random one
        while training, the first one otherwise."""
        texts = [self.encoder.text_for_entity(kb.name(r), kb.description(r)) for r in rows]
        refs: List[Optional[ImageRef]] = []
        for row in rows:
            images = kb.images(row)
            path = (random.choice(images) if training else images[0]) if images else None
            refs.append(self.kb_images.ref(path, context=f"image of KB entity '{kb.entity_id(row)}'"))
        return texts, refs


@dataclass
class TrainingBatch:
    """Gold mentions and the in-batch candidate entities of one update.

    ``entity_rows`` are the KB rows every mention is scored against (the
    batch's gold entities, then any extra negatives); ``labels[i]`` is the
    position of mention i's gold entity in ``entity_rows``.
    """

    spans: List[Span]
    gold_rows: List[int]
    entity_rows: List[int]

    @property
    def labels(self) -> torch.Tensor:
        position = {row: i for i, row in enumerate(self.entity_rows)}
        return torch.tensor([position[row] for row in self.gold_rows])

    def model_inputs(
        self, inputs: InputBuilder, kb: MultimodalKB, *, picture_dropout: float = 0.0, picture_mismatch: float = 0.0
    ) -> Dict[str, object]:
        """The keyword arguments of the network's training forward pass; with
        a ``picture_dropout`` or ``picture_mismatch`` share, also the mention
        pictures varied as :func:`vary_pictures` does (for the candidate scorer)."""
        mention_texts, mention_images = inputs.mentions(self.spans)
        entity_texts, entity_images = inputs.entities(kb, self.entity_rows, training=True)
        out = {"mention_texts": mention_texts, "mention_images": mention_images,
               "entity_texts": entity_texts, "entity_images": entity_images, "labels": self.labels}
        if picture_dropout or picture_mismatch:
            out["varied_mention_images"] = vary_pictures(mention_images, self.gold_rows, dropout=picture_dropout,
                                                         mismatch=picture_mismatch)
        return out


def vary_pictures(
    images: Sequence[Optional[ImageRef]], gold_rows: Sequence[int], *, dropout: float, mismatch: float
) -> List[Optional[ImageRef]]:
    """Mention pictures as real documents give them: each picture is removed
    with probability ``dropout``, or with probability ``mismatch`` replaced
    by the picture of a batch mention of another entity (kept when there is
    none). Draws from ``random``, which spaCy seeds."""
    out = list(images)
    for i, image in enumerate(images):
        if image is None:
            continue
        draw = random.random()
        if draw < dropout:
            out[i] = None
        elif draw < dropout + mismatch:
            # Another picture: one picture often serves several mentions of a doc.
            others = [j for j, other in enumerate(images)
                      if other is not None and gold_rows[j] != gold_rows[i] and other.key != image.key]
            if others:
                out[i] = images[random.choice(others)]
    return out


def gold_mentions(
    examples: Iterable[Example], kb: MultimodalKB, *, labels_discard: Sequence[str], use_gold_ents: bool
) -> Tuple[List[Span], List[int], Counter]:
    """Predicted spans aligned with linkable gold mentions, their gold rows,
    and a count of gold ids missing from the KB. Images missing from the
    predicted docs are copied from the reference docs."""
    spans, rows, unknown = [], [], Counter()
    for eg in examples:
        copy_images(eg.reference, eg.predicted)
        predicted_ents = set(eg.predicted.ents)
        for gold in eg.reference.ents:
            if gold.label_ in labels_discard or gold.kb_id_ in ("", NIL):
                continue
            if gold.kb_id_ not in kb:
                unknown[gold.kb_id_] += 1
                continue
            span = eg.predicted.char_span(gold.start_char, gold.end_char, label=gold.label_)
            if span is not None and (use_gold_ents or span in predicted_ents):
                spans.append(span)
                rows.append(kb.row(gold.kb_id_))
    return spans, rows, unknown


def add_negatives(kb: MultimodalKB, spans: Sequence[Span], entity_rows: List[int], count: int) -> List[int]:
    """``entity_rows`` plus up to ``count`` extra candidates: alias-table
    confusables of the mentions first, then random entities."""
    rows = list(entity_rows)
    seen = set(rows)
    wanted = min(len(rows) + count, len(kb))
    for span in spans:
        for row, _ in kb.alias_rows(span.text):
            if len(rows) >= wanted:
                break
            if row not in seen:
                rows.append(row)
                seen.add(row)
    for _ in range(10 * count):
        if len(rows) >= wanted:
            break
        row = random.randrange(len(kb))
        if row not in seen:
            rows.append(row)
            seen.add(row)
    return rows


def training_batch(
    examples: Iterable[Example],
    kb: MultimodalKB,
    *,
    labels_discard: Sequence[str],
    use_gold_ents: bool,
    hard_negatives: int,
) -> Optional[TrainingBatch]:
    """The batch of one update, or None when it has nothing to contrast.
    Gold ids missing from the KB are skipped with one warning."""
    spans, gold_rows, unknown = gold_mentions(
        examples, kb, labels_discard=labels_discard, use_gold_ents=use_gold_ents
    )
    if unknown:
        warn(
            f"m3el_linker: skipped {sum(unknown.values())} gold mention(s) whose entity is "
            f"not in the KB ({len(unknown)} ids, e.g. {sorted(unknown)[:3]})",
            stacklevel=3,
        )
    entity_rows = list(dict.fromkeys(gold_rows))
    if hard_negatives > 0:
        entity_rows = add_negatives(kb, spans, entity_rows, hard_negatives)
    if not spans or len(entity_rows) < 2:
        return None
    return TrainingBatch(spans, gold_rows, entity_rows)
