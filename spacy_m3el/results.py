"""Linking results: from a :class:`~spacy_m3el.linking.Ranking` to the dicts
users read in ``ent._.m3el_candidates``, and onto the docs."""
from typing import Any, Dict, List, Optional, Sequence

from spacy.tokens import Doc, Span

from .kb import NIL, MultimodalKB
from .linking import SCORE, Ranking

BRANCH_NAMES = ("text", "image", "t2v", "v2t")
Result = Dict[str, Any]


def link_result(candidates: List[Dict[str, Any]], threshold: Optional[float], modalities: List[str]) -> Result:
    """``{"id", "score", "candidates", "modalities"}``: the best candidate, or
    NIL when there is none or its score is below ``threshold``; the
    modalities the mention was linked with."""
    if not candidates:
        return {"id": NIL, "score": None, "candidates": [], "modalities": modalities}
    best = candidates[0]
    linked = best["id"] if threshold is None or best["score"] >= threshold else NIL
    return {"id": linked, "score": best["score"], "candidates": candidates, "modalities": modalities}


def ranking_results(
    ranking: Ranking,
    kb: MultimodalKB,
    priors: Sequence[Dict[int, float]],
    threshold: Optional[float],
    modalities: Sequence[List[str]],
) -> List[Result]:
    """One result per mention: every candidate best first, with its KB id,
    final score, alias prior and per-branch scores."""
    rows = ranking.rows.tolist()
    scores = {name: value.tolist() for name, value in ranking.scores.items()}
    branches = [b for b in BRANCH_NAMES if b in scores]
    return [
        link_result([
            {"id": kb.entity_id(rows[i][j]), "score": scores[SCORE][i][j], "prior": priors[i].get(rows[i][j], 0.0),
             "branches": {b: scores[b][i][j] for b in branches}}
            for j in range(count)
        ], threshold, modalities[i])
        for i, count in enumerate(ranking.counts)
    ]


def annotate(doc: Doc, spans: Sequence[Span], results: Sequence[Result], *, overwrite: bool) -> None:
    """KB ids onto the spans' tokens (unless set and not ``overwrite``);
    score, candidates and modalities onto ``ent._``."""
    ents = {(e.start_char, e.end_char): e for e in doc.ents}
    for span, result in zip(spans, results):
        if overwrite or not span.kb_id_:
            for token in span:
                token.ent_kb_id_ = result["id"]
        ent = ents[(span.start_char, span.end_char)]
        ent._.m3el_score = result["score"]
        ent._.m3el_candidates = result["candidates"]
        ent._.m3el_modalities = result["modalities"]
