"""Linking results: from a :class:`~spacy_m3el.pipeline.linking.Ranking` to the dicts
users read in ``ent._.m3el_candidates``, and onto the docs."""
from typing import Any, Dict, List, Sequence

from spacy.tokens import Doc, Span

from ..kb.base import NIL, MultimodalKB
from .features import lexical_features
from .linking import SCORE, Ranking

BRANCH_NAMES = ("text", "image", "t2v", "v2t")
Result = Dict[str, Any]


def link_result(candidates: List[Dict[str, Any]], modalities: List[str]) -> Result:
    """``{"id", "score", "candidates", "modalities"}`` before the candidate
    scorer decides (:func:`spacy_m3el.pipeline.calibration.apply_scorer`): NIL with
    no score when there is no candidate."""
    if not candidates:
        return {"id": NIL, "score": None, "nil_prob": None, "candidates": [], "modalities": modalities}
    return {"id": candidates[0]["id"], "score": None, "nil_prob": None, "candidates": candidates,
            "modalities": modalities}


def ranking_results(
    ranking: Ranking,
    kb: MultimodalKB,
    priors: Sequence[Dict[int, float]],
    mention_texts: Sequence[str],
    modalities: Sequence[List[str]],
) -> List[Result]:
    """One result per mention: every candidate with its KB id, raw M3EL
    score, alias prior, per-branch scores and lexical features."""
    rows = ranking.rows.tolist()
    scores = {name: value.tolist() for name, value in ranking.scores.items()}
    branches = [b for b in BRANCH_NAMES if b in scores]
    results = []
    for i, count in enumerate(ranking.counts):
        candidates = []
        for j in range(count):
            row = rows[i][j]
            candidates.append({
                "id": kb.entity_id(row), "score": scores[SCORE][i][j], "prior": priors[i].get(row, 0.0),
                "branches": {b: scores[b][i][j] for b in branches},
                "features": lexical_features(mention_texts[i], kb.name(row), priors[i].get(row)),
            })
        results.append(link_result(candidates, modalities[i]))
    return results


def annotate(doc: Doc, spans: Sequence[Span], results: Sequence[Result], *, overwrite: bool) -> None:
    """KB ids onto the spans' tokens (unless set and not ``overwrite``);
    probability, candidates and modalities onto ``ent._``."""
    ents = {(e.start_char, e.end_char): e for e in doc.ents}
    for span, result in zip(spans, results):
        if overwrite or not span.kb_id_:
            for token in span:
                token.ent_kb_id_ = result["id"]
        ent = ents[(span.start_char, span.end_char)]
        ent._.m3el_score = result["score"]
        ent._.m3el_nil_prob = result["nil_prob"]
        ent._.m3el_candidates = result["candidates"]
        ent._.m3el_modalities = result["modalities"]
