"""The paper's protocol: every mention ranked against every KB entity with
the exact M3EL score, next to the two-stage ranking the component uses
(:mod:`spacy_m3el.evaluation.end_to_end` runs whole pipelines)."""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from spacy.tokens import Span
from spacy.training import Example

from ..kb.base import NIL
from ..pipeline import linking
from ..progress import progress_bar
from .scoring import aligned_mentions, ranking_scores


def gold_mentions(examples: Sequence[Example]) -> Tuple[List[Span], List[str]]:
    """Predicted spans at the offsets of gold mentions that have a KB id,
    and those ids (mentions the predicted doc lacks are left out)."""
    spans, ids = [], []
    for gold, span in aligned_mentions(examples):
        if gold.kb_id_ not in ("", NIL) and span is not None:
            spans.append(span)
            ids.append(gold.kb_id_)
    return spans, ids


@torch.no_grad()
def exhaustive_ranks(
    linker, spans: Sequence[Span], gold_ids: Sequence[str], *, batch_size: int = 32, progress: bool = False
) -> Tuple[List[Optional[int]], List[str]]:
    """1-based rank of each gold entity among all KB entities by the exact
    score (None: not in the KB), and each mention's top entity id.

    Uses an exact entity index (every G2L query) and scores mentions in
    batches against entity chunks, so memory stays bounded."""
    cache = linker.exact_entity_index()
    matcher = linker.network.matcher
    batches = range(0, len(spans), batch_size)
    if progress:
        batches = progress_bar(batches, desc=f"Exhaustive ranking of {len(spans)} mentions against "
                               f"{len(linker.kb)} entities", unit="batch")
    ranks: List[Optional[int]] = []
    top: List[str] = []
    with linker.mentions.linking_run():  # one warning for the mentions without a picture, not one per batch
        for start in batches:
            mention = linker.mentions.encode(spans[start : start + batch_size])
            scores = linking.exhaustive_scores(matcher, mention, cache)
            for row_scores, gold in zip(scores, gold_ids[start : start + batch_size]):
                top.append(linker.kb.entity_id(int(row_scores.argmax())))
                if gold not in linker.kb:
                    ranks.append(None)
                    continue
                gold_score = row_scores[linker.kb.row(gold)]
                ranks.append(int((row_scores > gold_score).sum()) + 1)
    return ranks, top


def evaluate_exhaustive(linker, examples: Sequence[Example], *, progress: bool = False) -> Dict[str, float]:
    """Hits@k and MRR of the exhaustive protocol, plus the top-1 agreement
    with the two-stage links already on the predicted docs."""
    spans, ids = gold_mentions(examples)
    ranks, top = exhaustive_ranks(linker, spans, ids, progress=progress)
    scores = ranking_scores(ranks)
    # The two-stage top candidate by the M3EL score (as ranked exhaustively),
    # whatever the candidate scorer and the threshold made of it.
    two_stage = [max(span._.m3el_candidates, key=lambda c: c["score"])["id"] if span._.m3el_candidates else NIL
                 for span in spans]
    scores["top1_agreement"] = (
        sum(a == b for a, b in zip(top, two_stage)) / len(spans) if spans else 0.0
    )
    return scores
