"""Linking metrics: spaCy's nel_micro_p/r/f plus Hits@k and MRR."""
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from spacy.scorer import Scorer
from spacy.tokens import Span
from spacy.training import Example

from ..kb.base import NIL
from ..pipeline.calibration import expected_calibration_error

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


def aligned_mentions(examples: Iterable[Example]) -> Iterator[Tuple[Span, Optional[Span]]]:
    """Each gold entity span with the predicted entity at the same offsets
    (None when the predicted doc has none there)."""
    for eg in examples:
        predicted = {(e.start_char, e.end_char): e for e in eg.predicted.ents}
        for gold in eg.reference.ents:
            yield gold, predicted.get((gold.start_char, gold.end_char))


def gold_ranks(examples: Iterable[Example], *, nil: str = NIL) -> List[Optional[int]]:
    """Rank of each gold entity among the predicted candidates of its mention.

    Mentions with a NIL gold are not ranked (as in the MEL literature); a gold
    mention that was not predicted at all counts as unranked.
    """
    ranks: List[Optional[int]] = []
    for gold, span in aligned_mentions(examples):
        if not gold.kb_id_ or gold.kb_id_ == nil:
            continue
        candidates = span._.m3el_candidates if span is not None else None
        rank = None
        for position, candidate in enumerate(candidates or [], start=1):
            if candidate["id"] == gold.kb_id_:
                rank = position
                break
        ranks.append(rank)
    return ranks


EVALUATE_HINT = (
    "Evaluate with `python -m spacy_m3el evaluate PIPELINE DATA.spacy --image-dir DIR` (it keeps the "
    "images and gives the gold mentions), or train/evaluate with the spacy-m3el.Corpus.v1 reader."
)


def _has_image(doc) -> bool:
    return doc._.image is not None or any(ent._.image is not None for ent in doc.ents)


def check_evaluation_inputs(examples: Sequence[Example], *, nil: str = NIL) -> None:
    """Refuse examples whose predicted docs lost what the linker needs, so
    no silently wrong figure is reported: spaCy's own ``Corpus`` reader (used
    by ``spacy evaluate``) drops ``doc._.image`` and gives no entity spans."""
    linkable = [eg for eg in examples if any(e.kb_id_ not in ("", nil) for e in eg.reference.ents)]
    if linkable and not any(eg.predicted.ents for eg in linkable):
        raise ValueError(
            f"None of the {len(linkable)} predicted docs with gold links has entity spans: nothing was "
            "linked, so every score would be 0. The pipeline has no component that sets doc.ents (add "
            f"an ner or entity_ruler), or the reader gave none. {EVALUATE_HINT}"
        )
    lost = sum(1 for eg in examples if _has_image(eg.reference) and not _has_image(eg.predicted))
    if lost:
        raise ValueError(
            f"{lost} of {len(examples)} predicted docs lost the image of their reference doc (spaCy's "
            "Corpus reader builds them with nlp.make_doc, which drops doc._.image): the scores would be "
            f"those of text-only linking. {EVALUATE_HINT}"
        )


def answer_scores(examples: Iterable[Example], *, nil: str = NIL, prefix: str = "m3el_") -> Dict[str, float]:
    """Of the answers (KB id or NIL) given to gold mentions, NIL included:
    accuracy, expected calibration error of ``ent._.m3el_score`` (the
    probability of the answer given), NIL precision/recall/F and the share
    of mentions with a KB entity that were answered NIL."""
    confidences, correct, nil_gold, nil_predicted = [], [], [], []
    for gold, span in aligned_mentions(examples):
        if not gold.kb_id_ or span is None or span._.m3el_score is None:
            continue
        answer = span.kb_id_ or nil
        confidences.append(float(span._.m3el_score))
        correct.append(answer == gold.kb_id_)
        nil_gold.append(gold.kb_id_ == nil)
        nil_predicted.append(answer == nil)
    both = sum(g and p for g, p in zip(nil_gold, nil_predicted))
    precision = both / sum(nil_predicted) if any(nil_predicted) else 0.0
    recall = both / sum(nil_gold) if any(nil_gold) else 0.0
    f_score = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    nil_on_linkable = [p for g, p in zip(nil_gold, nil_predicted) if not g]
    return {
        f"{prefix}accuracy": sum(correct) / len(correct) if correct else 0.0,
        f"{prefix}ece": expected_calibration_error(confidences, correct),
        f"{prefix}nil_p": precision, f"{prefix}nil_r": recall, f"{prefix}nil_f": f_score,
        f"{prefix}n_nil": float(sum(nil_gold)),
        f"{prefix}nil_on_linkable": sum(nil_on_linkable) / len(nil_on_linkable) if nil_on_linkable else 0.0,
    }


def score_linking(examples: Iterable[Example], **kwargs: Any) -> Dict[str, Any]:
    """nel_micro_p/r/f, Hits@k/MRR of the candidates, and accuracy, ECE and
    NIL precision/recall of the answers; refuses inputs that would give a
    wrong figure (see :func:`check_evaluation_inputs`)."""
    examples = list(examples)
    nil = kwargs.get("nil", NIL)
    check_evaluation_inputs(examples, nil=nil)
    scores = dict(Scorer.score_links(examples, negative_labels=[nil]))
    scores.update(ranking_scores(gold_ranks(examples, nil=nil)))
    scores.update(answer_scores(examples, nil=nil))
    return scores


def make_linking_scorer():
    """Registered as ``spacy-m3el.linking_scorer.v1``."""
    return score_linking
