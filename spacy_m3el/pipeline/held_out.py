"""Calibrating an ``m3el_linker`` on held-out examples: link them under each
picture condition, fit the candidate scorer cross-validated
(:func:`.calibration.calibrate_scorer`), and annotate the docs with the
out-of-fold answers."""
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List

from spacy.tokens import Doc, Span
from spacy.training import Example, validate_examples

from ..data.pictures import PICTURE_IS_OWN, with_pictures
from ..errors import warn
from ..evaluation.exhaustive import evaluate_exhaustive
from ..evaluation.scoring import aligned_mentions
from ..index.memory import release_freed_memory
from ..kb.base import NIL
from ..progress import pictures_removed_on_purpose, progress_bar
from .calibration import answer_figures, apply_scorer, calibrate_scorer
from .results import annotate

if TYPE_CHECKING:  # pragma: no cover
    from .linker import M3ELLinker


def calibrate_linker(linker: "M3ELLinker", examples: Iterable[Example], *,
                     progress: bool = False) -> Dict[str, Any]:
    """Fit the candidate scorer (temperatures, feature and branch weights,
    picture gate, NIL options) and the NIL threshold on held-out examples
    with gold links (NIL included), each mention with its picture,
    without one and with another mention's picture (seeded), so that
    none of these gets answers fitted to the other. The picture gate is
    fitted first, to tell the mentions' own pictures from the others';
    then the picture expert on the mentions with their own picture and
    the text expert on those without one. Each condition weighs as much
    as the share of mentions the linker expects under it
    (``calibration_pictures``) in the NIL threshold and the confidence
    map. The fit is
    cross-validated: the threshold is chosen, and the report's
    ``out_of_fold`` figures computed, on probabilities from fits that
    did not see the mention; the predicted docs are annotated with those
    out-of-fold answers, so scores computed on them are out of sample.
    ``progress``: progress lines for the linking and the fits."""
    examples = list(examples)
    validate_examples(examples, "M3ELLinker.calibrate")
    docs = [eg.predicted for eg in examples]
    if any(ent._.m3el_candidates is None for doc in docs for ent in linker.linkable(doc)):
        annotate_all(linker, docs)
    pairs = []  # (gold, span) of every gold-linked mention the linker linked
    for reference, span in aligned_mentions(examples):
        if reference.kb_id_ and span is not None and span.label_ not in linker.settings.labels_discard \
                and span._.m3el_candidates is not None:
            pairs.append((reference.kb_id_, span))
    if not pairs:
        raise ValueError("M3ELLinker.calibrate: none of the examples has a gold-linked mention (a KB id or "
                         f"'{NIL}') among the predicted entities: pass held-out examples whose reference "
                         "entities carry kb_id and whose predicted docs have the same entity spans (the "
                         "spacy-m3el.Corpus.v1 reader with gold_ents = true gives both)")
    results, gold, groups, conditions, weights = [], [], [], [], []
    mix = linker.settings.calibration_mix() if linker.network.matcher.uses_image else {"given": 1.0}
    for condition in progress_bar(list(mix), unit="condition", disable=not progress,
                                  desc=f"Calibration: linking {len(docs)} docs under each picture condition"):
        linked = _linked_under(linker, docs, condition)
        for group, (kb_id, span) in enumerate(pairs):
            doc = linked[id(span.doc)]
            ent = doc.char_span(span.start_char, span.end_char)
            results.append(result_of(ent))
            gold.append(kb_id)
            groups.append(group)
            conditions.append(condition)
            weights.append(mix[condition])
    report, held_out = calibrate_scorer(linker.network.scorer, results, gold, groups, weights=weights,
                                        picture_fits=[PICTURE_IS_OWN[c] for c in conditions],
                                        options=linker.scorer_options, progress=progress)
    # Mentions, not (mention, picture condition) pairs; fitted_on counts the pairs.
    report["mentions"] = len(pairs)
    report["nil_mentions"] = sum(kb_id == NIL for kb_id, _ in pairs)
    report["picture_shares"] = mix
    report["conditions"] = {
        condition: answer_figures([r for r, c in zip(held_out, conditions) if c == condition],
                                  [g for g, c in zip(gold, conditions) if c == condition])
        for condition in dict.fromkeys(conditions)
    }
    everything = [result_of(ent) for doc in docs for ent in linker.linkable(doc)]
    apply_scorer(linker.network.scorer, everything, options=linker.scorer_options,
                 threshold=linker.settings.threshold)
    position = 0
    for doc in docs:
        spans = linker.linkable(doc)
        annotate(doc, spans, everything[position : position + len(spans)], overwrite=True)
        position += len(spans)
    for (_, span), result in zip(pairs, held_out):  # the given condition comes first
        annotate(span.doc, [span], [result], overwrite=True)
    linker.state.calibration_stale = False
    return report


def _linked_under(linker: "M3ELLinker", docs: List[Doc], condition: str) -> Dict[int, Doc]:
    """The docs (by id) linked with their pictures under ``condition``."""
    if condition == "given":
        return {id(doc): doc for doc in docs}
    copies = with_pictures(docs, condition, seed=0)
    with pictures_removed_on_purpose():
        annotate_all(linker, copies)
    return {id(doc): copy for doc, copy in zip(docs, copies)}


def annotate_all(linker: "M3ELLinker", docs: List[Doc]) -> None:
    # One call for all docs: its figures do not depend on how the docs would be batched.
    with linker.mentions.linking_run():
        linker.set_annotations(docs, linker.predict(docs))


def result_of(ent: Span) -> Dict[str, Any]:
    return {"id": ent.kb_id_, "score": ent._.m3el_score, "nil_prob": ent._.m3el_nil_prob,
            "candidates": [dict(c) for c in ent._.m3el_candidates or []],
            "modalities": list(ent._.m3el_modalities or [])}


def score_linker(linker: "M3ELLinker", examples: Iterable[Example],
                 scores_of: Callable[[List[Example]], Dict[str, Any]]) -> Dict[str, Any]:
    """The linker's scores on ``examples`` (``scores_of``: its configured
    scorer): after training updates (``calibrate_on_score``) the examples
    first serve to calibrate it; with ``score_protocol = "exhaustive"``
    Hits@k and MRR are the paper's (every KB entity ranked by the exact
    score), plus ``m3el_top1_agreement``."""
    examples = list(examples)
    validate_examples(examples, "M3ELLinker.score")
    if linker.state.calibration_stale and linker.settings.calibrate_on_score and len(linker.kb):
        try:
            calibrate_linker(linker, examples, progress=True)
        except ValueError as error:  # e.g. no gold entity among any candidates yet
            warn(f"m3el_linker: not calibrated on these examples: {error}", stacklevel=4)
    scores = scores_of(examples)
    if linker.settings.score_protocol == "exhaustive" and len(linker.kb):
        exhaustive = evaluate_exhaustive(linker, examples, progress=True)
        scores.update({key: value for key, value in exhaustive.items() if key.startswith("m3el_")})
        scores["m3el_top1_agreement"] = exhaustive["top1_agreement"]
    release_freed_memory()  # an evaluation's copies, links and rankings, before training goes on
    return scores
