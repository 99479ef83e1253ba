"""Shrinking the G2L part of the entity index.

An entity's G2L score only needs the *mean* over its query tokens of each
token's attention context. Queries that lie close together give nearly the
same context, so a cluster of them can be replaced by its centroid, weighted
by the number of tokens it stands for. An entity with no more tokens than
clusters keeps every query unchanged (exact).
"""
import torch
import torch.nn.functional as F


@torch.no_grad()
def pool_queries(
    queries: torch.Tensor, weights: torch.Tensor, size: int, *, iterations: int = 10
) -> "tuple[torch.Tensor, torch.Tensor]":
    """Cluster each row's weighted query vectors into at most ``size`` centroids.

    ``queries`` is [N, L, h], ``weights`` [N, L] (0 on padding). Returns
    centroids [N, min(L, size), h] and their weights (the summed weight of
    their members; 0 for an unused slot). Plain k-means, batched over rows,
    seeded by farthest-point traversal from each row's first real token, so
    the result is deterministic and rows with at most ``size`` distinct
    queries are pooled without loss; a row with at most ``size`` real tokens is
    returned unchanged (compacted), which keeps its G2L score exact.
    """
    if size < 1:
        raise ValueError(f"pool_queries needs size >= 1, got {size}")
    length = queries.shape[1]
    if length <= size:
        return queries, weights
    dtype = queries.dtype
    queries, weights = queries.float(), weights.float()
    real = weights > 0
    n_real = real.sum(dim=1)  # [N]
    # Positions of the real tokens first, in their original order.
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
    centroids = _take(queries, _farthest_point_seeds(queries, real, size))
    for _ in range(iterations + 1):
        assignment = torch.cdist(queries, centroids).argmin(dim=2)  # [N, L]
        members = F.one_hot(assignment, size).to(queries.dtype) * weights[:, :, None]
        mass = members.sum(dim=1)  # [N, size]
        summed = members.transpose(1, 2) @ queries  # [N, size, h]
        # A cluster left empty (duplicate seeds) keeps weight 0 and drops out.
        centroids = torch.where(mass[:, :, None] > 0, summed / mass.clamp(min=1e-12)[:, :, None], centroids)
    # Rows with few real tokens keep them as they are: exact, whatever the
    # rounding of the distances above.
    few = (n_real <= size)[:, None]
    kept = order[:, :size]
    centroids = torch.where(few[:, :, None], _take(queries, kept), centroids)
    mass = torch.where(few, weights.gather(1, kept), mass)
    return centroids.to(dtype), mass.to(dtype)


def _farthest_point_seeds(queries: torch.Tensor, real: torch.Tensor, size: int) -> torch.Tensor:
    """[N, size] token positions: the first real token, then repeatedly the
    real token farthest from every seed so far (a duplicate once none is left)."""
    seeds = [real.to(torch.int8).argmax(dim=1)]
    nearest = torch.full(real.shape, float("inf"), device=queries.device)
    for _ in range(size - 1):
        newest = _take(queries, seeds[-1][:, None])  # [N, 1, h]
        nearest = torch.minimum(nearest, (queries - newest).norm(dim=2))
        seeds.append(nearest.masked_fill(~real, -1.0).argmax(dim=1))
    return torch.stack(seeds, dim=1)


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [N, L, h] at positions index [N, k] -> [N, k, h]."""
    return values.gather(1, index[:, :, None].expand(-1, -1, values.shape[2]))
