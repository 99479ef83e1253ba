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


#: Scores this close to a decision are computed exactly rather than decided by a bound.
BOUND_SLACK = 1e-3


@torch.no_grad()
def exhaustive_ranks(
    linker, spans: Sequence[Span], gold_ids: Sequence[str], *, batch_size: int = 32, progress: bool = False
) -> Tuple[List[Optional[int]], List[str]]:
    """1-based rank of each gold entity among all KB entities by the exact
    score (None: not in the KB), and each mention's top entity id.

    Exact, without scoring every pair in full: the decomposable part of
    every (mention, entity) score is one matrix product, and the late
    interaction (G2L) of an entity is bounded
    (:func:`~spacy_m3el.pipeline.linking.late_interaction_bounds`), so only
    the entities whose bound leaves the comparison with the gold entity (for
    the rank) or with the best score (for the top) open are scored in full.
    :func:`exhaustive_ranks_in_full` scores every pair: the reference."""
    index = linker.exact_entity_index()
    matcher = linker.network.matcher
    bounds = linking.late_interaction_bounds(matcher, index)
    batches = range(0, len(spans), batch_size)
    if progress:
        batches = progress_bar(batches, desc=f"Exhaustive ranking of {len(spans)} mentions against "
                               f"{len(linker.kb)} entities", unit="batch")
    ranks: List[Optional[int]] = []
    top: List[str] = []
    with linker.mentions.linking_run():  # one warning for the mentions without a picture, not one per batch
        for start in batches:
            mention = linker.mentions.encode(spans[start : start + batch_size])
            dense = linking.decomposable_scores(matcher, mention, index)
            golds = [linker.kb.row(gold) if gold in linker.kb else None
                     for gold in gold_ids[start : start + batch_size]]
            for b, gold in enumerate(golds):
                one = {name: value[b : b + 1] for name, value in mention.items()}
                rank, best = _bounded_rank(matcher, one, index, dense[b], bounds, gold)
                ranks.append(rank)
                top.append(linker.kb.entity_id(best))
    return ranks, top


def _bounded_rank(matcher, mention, index, dense: torch.Tensor, bounds: torch.Tensor,
                  gold: Optional[int]) -> Tuple[Optional[int], int]:
    """(rank of ``gold`` or None, the best row) for one mention."""
    low, high = dense - bounds, dense + bounds
    first = int(low.argmax())
    known = {first: _full_scores(matcher, mention, index, [first])[0]}
    if gold is not None and gold not in known:
        known[gold] = _full_scores(matcher, mention, index, [gold])[0]
    floor = max(known.values())  # the best score is at least this
    open_top = (high >= floor - BOUND_SLACK).nonzero().flatten().tolist()
    open_rank: List[int] = []
    above = 0
    if gold is not None:
        target = known[gold]
        open_rank = ((high >= target - BOUND_SLACK) & (low <= target + BOUND_SLACK)).nonzero().flatten().tolist()
        above = int((low > target + BOUND_SLACK).sum())
    todo = sorted(set(open_top) | set(open_rank) - set(known))
    if todo:
        known.update(zip(todo, _full_scores(matcher, mention, index, todo)))
    best = max(open_top, key=lambda row: (known[row], -row))
    if gold is None:
        return None, best
    return above + sum(1 for row in open_rank if row != gold and known[row] > known[gold]) + 1, best


def _full_scores(matcher, mention, index, rows: Sequence[int]) -> List[float]:
    scores = []
    for start in range(0, len(rows), 4096):
        chunk = torch.tensor(list(rows[start : start + 4096]))[None]
        scores.extend(matcher.candidate_scores(mention, index.gather(chunk))[linking.SCORE][0].tolist())
    return scores


@torch.no_grad()
def exhaustive_ranks_in_full(linker, spans: Sequence[Span], gold_ids: Sequence[str], *,
                             batch_size: int = 32) -> Tuple[List[Optional[int]], List[str]]:
    """What :func:`exhaustive_ranks` gives, from the full score of every
    (mention, entity) pair (the paper's protocol as written; the reference)."""
    index = linker.exact_entity_index()
    matcher = linker.network.matcher
    ranks: List[Optional[int]] = []
    top: List[str] = []
    with linker.mentions.linking_run():
        for start in range(0, len(spans), batch_size):
            mention = linker.mentions.encode(spans[start : start + batch_size])
            scores = linking.exhaustive_scores(matcher, mention, index)
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
