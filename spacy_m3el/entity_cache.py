"""The entity cache of the two-stage linker (DESIGN 3.5).

For every KB entity the cache holds the mention-independent part of M3EL:

- ``retrieval`` [E, D]: the decomposable scores' vectors (text and image
  globals, T2V and V2T contexts) concatenated; one inner product with a
  mention's retrieval vector gives their weighted sum, so top-K retrieval is
  a single matrix product. The reranker reads the same parts back as column
  slices, so they are stored once.
- the G2L parts: ``*_cls`` [E, h], ``*_query`` [E, Q, h] and
  ``*_query_weight`` [E, Q], with queries optionally pooled to at most
  ``max_queries`` weighted centroids per modality, and ``has_image`` [E].

Arrays are fp16 (``has_image`` bool) and are memory-mapped when loaded from
disk. On CPU only the retrieval matrix is copied into RAM (float32, for a
fast exact scan); the reranker reads the K candidates' rows from the memory
map. On a GPU everything is moved to the device once.
"""
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy
import torch

from .model import M3ELMatcher
from .model.matching import Side

CACHE_FORMAT = 2
RETRIEVAL = "retrieval"


def cache_settings(max_queries: Optional[int]) -> Dict[str, Any]:
    """What, besides the model's weights, decides the cache's content."""
    return {"format": CACHE_FORMAT, "max_queries": max_queries}


@torch.no_grad()
def build_cache_arrays(
    matcher: M3ELMatcher, entity_sides: Iterable[Side], *, max_queries: Optional[int]
) -> Tuple[Dict[str, numpy.ndarray], Dict[str, Any]]:
    """Turn entity sides (batches, in KB row order) into cache arrays + meta."""
    parts = matcher.retrieval_parts()
    collected: Dict[str, List[numpy.ndarray]] = {}
    widths: List[Tuple[str, int]] = []
    for side in entity_sides:
        if max_queries is not None:
            side = matcher.compress_entity_side(side, max_queries)
        side = dict(side)
        if not widths:
            widths = [(key, int(side[key].shape[-1])) for key in parts]
        side[RETRIEVAL] = matcher.entity_retrieval_vectors(side)
        for key in parts:
            del side[key]  # read back from the retrieval columns
        for name, value in side.items():
            array = value.detach().cpu().numpy()
            if numpy.issubdtype(array.dtype, numpy.floating):
                array = array.astype(numpy.float16)
            collected.setdefault(name, []).append(array)
    arrays = {name: _concatenate_padded(chunks) for name, chunks in collected.items()}
    meta = {**cache_settings(max_queries), "retrieval_parts": [list(w) for w in widths]}
    return arrays, meta


def _concatenate_padded(chunks: List[numpy.ndarray]) -> numpy.ndarray:
    """Concatenate batches whose second axis (tokens) may differ; pad with 0,
    which is weight 0 for queries."""
    if chunks[0].ndim >= 2 and len({c.shape[1] for c in chunks}) > 1:
        width = max(c.shape[1] for c in chunks)
        chunks = [
            numpy.pad(c, [(0, 0), (0, width - c.shape[1])] + [(0, 0)] * (c.ndim - 2)) for c in chunks
        ]
    return numpy.concatenate(chunks, axis=0)


class EntityCache:
    """Cache arrays ready for retrieval and rerank on one device."""

    def __init__(self, arrays: Dict[str, numpy.ndarray], meta: Dict[str, Any], *, device) -> None:
        if meta.get("format") != CACHE_FORMAT or RETRIEVAL not in arrays:
            raise ValueError(
                f"Entity cache format {meta.get('format')!r} is not {CACHE_FORMAT}: rebuild the cache"
            )
        self.device = torch.device(device)
        self.meta = meta
        self.parts: List[Tuple[str, int]] = [(key, int(width)) for key, width in meta["retrieval_parts"]]
        self.arrays = arrays
        # numpy.array copies out of the read-only memory map (torch needs a writable buffer).
        self.retrieval = torch.from_numpy(numpy.array(arrays[RETRIEVAL], dtype=numpy.float32)).to(self.device)
        self._on_device: Optional[Dict[str, torch.Tensor]] = None
        if self.device.type != "cpu":
            self._on_device = {
                name: torch.from_numpy(numpy.array(array)).to(self.device)
                for name, array in arrays.items()
                if name != RETRIEVAL
            }

    def __len__(self) -> int:
        return self.retrieval.shape[0]

    @property
    def bytes_per_entity(self) -> int:
        """Size of one entity's cache rows as stored (fp16 / bool)."""
        return sum(array.itemsize * int(numpy.prod(array.shape[1:])) for array in self.arrays.values())

    def retrieve(self, query: torch.Tensor, k: int) -> torch.Tensor:
        """Row indices [B, k] of the best entities by the decomposable score."""
        return (query @ self.retrieval.T).topk(min(k, len(self)), dim=1).indices

    def gather(self, rows: torch.Tensor) -> Side:
        """The entity side of the rows [B, K] (any index shape) as float32 tensors."""
        side = self._split_retrieval(self.retrieval[rows])
        if self._on_device is not None:
            for name, value in self._on_device.items():
                side[name] = value[rows].float() if value.is_floating_point() else value[rows]
            return side
        flat = rows.reshape(-1).cpu().numpy()
        for name, array in self.arrays.items():
            if name == RETRIEVAL:
                continue
            # Fancy indexing reads only these rows from a memory map.
            taken = numpy.asarray(array[flat])
            value = torch.from_numpy(taken.reshape(tuple(rows.shape) + taken.shape[1:]))
            side[name] = value.float() if value.is_floating_point() else value
        return side

    def full_side(self) -> Side:
        """The whole entity side [E, ...] (float32): for exhaustive scoring."""
        return self.gather(torch.arange(len(self), device=self.device))

    def _split_retrieval(self, vectors: torch.Tensor) -> Side:
        side, start = {}, 0
        for key, width in self.parts:
            side[key] = vectors[..., start : start + width]
            start += width
        return side
