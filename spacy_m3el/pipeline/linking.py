"""The two-stage search: retrieve candidates, rerank them with the full score.

M3EL's G2G, T2V and V2T scores are inner products of a mention vector and an
entity vector, so their weighted sum is one inner product against the index's
retrieval matrix: exact top-K by a matrix product. The alias table adds its
candidates, and the full score (G2L included) reranks the union. The same
functions serve the component and the benchmarks; ``exhaustive_scores`` is
the paper's protocol (the full score against every entity) for comparison.
Free of spaCy: rows are KB row numbers, not ids.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy
import torch

from ..index.entity_index import EntityIndex
from ..model import M3ELMatcher
from ..model.matching import Side

SCORE = "score"
#: Mentions reranked per pass on CPU.
CPU_RERANK_MENTIONS = 8


@dataclass
class Ranking:
    """Candidates of B mentions, best first.

    ``rows`` [B, W] holds KB rows (-1 pads a mention with fewer than W
    candidates); ``scores`` maps "score" (the final score) and each branch
    name to [B, W] tensors aligned with ``rows``.
    """

    rows: torch.Tensor
    scores: Dict[str, torch.Tensor]

    def __len__(self) -> int:
        return self.rows.shape[0]

    @property
    def counts(self) -> List[int]:
        """Number of real candidates per mention."""
        return (self.rows >= 0).sum(dim=1).tolist()

    def best_rows(self) -> torch.Tensor:
        """[B] the top candidate's row per mention (-1: no candidate)."""
        if self.rows.shape[1] == 0:
            return self.rows.new_full((len(self),), -1)
        return self.rows[:, 0]


def candidate_rows(
    index: EntityIndex,
    query: torch.Tensor,
    *,
    k: int,
    alias_rows: Optional[Sequence[Sequence[int]]] = None,
) -> List[List[int]]:
    """Per mention: its alias-table rows, then the dense top-``k`` by the
    decomposable score, without duplicates."""
    batch = query.shape[0]
    dense = index.retrieve(query, k).tolist() if k > 0 and len(index) else [[] for _ in range(batch)]
    alias_rows = alias_rows if alias_rows is not None else [[] for _ in range(batch)]
    # An ANN index pads with -1 when the lists it visited held fewer than k rows.
    return [list(dict.fromkeys(list(alias) + [row for row in top if row >= 0]))
            for alias, top in zip(alias_rows, dense)]


@torch.no_grad()
def rerank(
    matcher: M3ELMatcher, mention: Side, index: EntityIndex, candidates: Sequence[Sequence[int]]
) -> Ranking:
    """Full M3EL scores of each mention's candidates, sorted best first."""
    device = next(iter(mention.values())).device
    width = max((len(rows) for rows in candidates), default=0)
    padded = torch.tensor([list(rows) + [-1] * (width - len(rows)) for rows in candidates],
                          dtype=torch.long, device=device).reshape(len(candidates), width)
    if width == 0:
        return Ranking(padded, {SCORE: padded.new_zeros(padded.shape, dtype=torch.float32)})
    # On CPU a few mentions at a time: their gathered candidates and attention
    # maps stay in cache (1.6x less CPU time per mention than 32 at once).
    step = CPU_RERANK_MENTIONS if device.type == "cpu" else len(padded)
    parts = [matcher.candidate_scores({name: value[start : start + step] for name, value in mention.items()},
                                      index.gather(padded[start : start + step].clamp(min=0)))
             for start in range(0, len(padded), step)]
    scores = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
    final = scores[SCORE].masked_fill(padded < 0, float("-inf"))
    order = final.argsort(dim=1, descending=True, stable=True)
    ranked = {name: value.gather(1, order) for name, value in scores.items() if value.dim() == 2}
    return Ranking(padded.gather(1, order), ranked)


def two_stage(
    matcher: M3ELMatcher,
    mention: Side,
    index: EntityIndex,
    *,
    k: int,
    alias_rows: Optional[Sequence[Sequence[int]]] = None,
) -> Ranking:
    """Retrieve (alias rows + dense top-``k``), then rerank with the full score."""
    query = matcher.mention_retrieval_vectors(mention)
    return rerank(matcher, mention, index, candidate_rows(index, query, k=k, alias_rows=alias_rows))


@torch.no_grad()
def exhaustive_scores(
    matcher: M3ELMatcher,
    mention: Side,
    index: EntityIndex,
    *,
    entity_chunk: int = 1024,
    mention_chunk: int = 16,
) -> torch.Tensor:
    """[B, E] full scores of every mention against every indexed entity,
    computed in blocks of mentions x entities so memory stays bounded."""
    device = next(iter(mention.values())).device
    batch = next(iter(mention.values())).shape[0]
    blocks = []
    for start in range(0, len(index), entity_chunk):
        entity = index.gather(torch.arange(start, min(start + entity_chunk, len(index)), device=device))
        blocks.append(torch.cat([
            matcher.scores({k: v[m : m + mention_chunk] for k, v in mention.items()}, entity)[SCORE]
            for m in range(0, batch, mention_chunk)
        ]))
    return torch.cat(blocks, dim=1)


@torch.no_grad()
def late_interaction_bounds(matcher: M3ELMatcher, index: EntityIndex) -> torch.Tensor:
    """[E] a bound on each entity's late-interaction (G2L) part of the score,
    whatever the mention: ``|score - decomposable| <= bound``. G2L is
    ``cls . LayerNorm(context)``; a layer-normalised vector z has
    ``||z|| <= sqrt(h)``, so ``|cls . (gamma * z + beta)| <= sqrt(h) ||cls * gamma|| + |cls . beta|``."""
    bound = torch.zeros(len(index))
    for name, weight in matcher.branch_weights().items():
        if not name.endswith("_g2l"):
            continue
        modality = name[: -len("_g2l")]
        norm = (matcher.text_matching if modality == "text" else matcher.image_matching).layer_norm
        gamma, beta = norm.weight.detach().float().cpu(), norm.bias.detach().float().cpu()
        for start in range(0, len(index), 65536):
            cls = torch.from_numpy(numpy.asarray(index.arrays[f"{modality}_cls"][start : start + 65536],
                                                 dtype=numpy.float32))
            part = math.sqrt(cls.shape[1]) * (cls * gamma).norm(dim=1) + (cls @ beta).abs()
            bound[start : start + len(part)] += weight * part
    return bound


@torch.no_grad()
def decomposable_scores(matcher: M3ELMatcher, mention: Side, index: EntityIndex) -> torch.Tensor:
    """[B, E] the decomposable part of the score (G2G, T2V, V2T) of every
    mention against every entity: one product with the retrieval matrix."""
    query = matcher.mention_retrieval_vectors(mention).float().cpu()
    matrix = index.arrays["retrieval"]
    return torch.cat([query @ torch.from_numpy(numpy.asarray(matrix[start : start + 65536], dtype=numpy.float32)).T
                      for start in range(0, len(index), 65536)], dim=1)
