"""Linking metrics: spaCy's nel_micro_p/r/f plus Hits@k and MRR."""
from typing import Any, Dict, Iterable, List, Optional, Sequence

from spacy.scorer import Scorer
from spacy.training import Example

from .kb import NIL

HITS_AT = (1, 3, 5, 10, 20)


def ranking_scores(ranks: Sequence[Optional[int]], prefix: str = "m3el_") -> Dict[str, float]:
    """Hits@k and MRR from 1-based ranks (None = the gold entity was not ranked)."""
    total = len(ranks)
    scores: Dict[str, float] = {}
    for k in HITS_AT:
        scores[f"{prefix}hits{k}"] = sum(1 for r in ranks if r is not None and r <= k) / total if total else 0.0
    scores[f"{prefix}mrr"] = sum(1.0 / r for r in ranks if r is not None) / total if total else 0.0
    scores[f"{prefix}n_mentions"] = float(total)
    return scores


def gold_ranks(examples: Iterable[Example], *, nil: str = NIL) -> List[Optional[int]]:
    """Rank of each gold entity among the predicted candidates of its mention.

    Mentions with a NIL gold are not ranked (as in the MEL literature); a gold
    mention that was not predicted at all counts as unranked.
    """
    ranks: List[Optional[int]] = []
    for eg in examples:
        predicted = {(e.start_char, e.end_char): e for e in eg.predicted.ents}
        for gold in eg.reference.ents:
            if not gold.kb_id_ or gold.kb_id_ == nil:
                continue
            span = predicted.get((gold.start_char, gold.end_char))
            candidates = span._.m3el_candidates if span is not None else None
            rank = None
            for position, candidate in enumerate(candidates or [], start=1):
                if candidate["id"] == gold.kb_id_:
                    rank = position
                    break
            ranks.append(rank)
    return ranks


def score_linking(examples: Iterable[Example], **kwargs: Any) -> Dict[str, Any]:
    examples = list(examples)
    nil = kwargs.get("nil", NIL)
    scores = dict(Scorer.score_links(examples, negative_labels=[nil]))
    scores.update(ranking_scores(gold_ranks(examples, nil=nil)))
    return scores


def make_linking_scorer():
    """Registered as ``spacy-m3el.linking_scorer.v1``."""
    return score_linking
