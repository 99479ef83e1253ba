"""Top-K search over the entity index's retrieval matrix.

Two searchers over the same fp16 matrix [E, D] (memory-mapped when loaded):

- :func:`exact_top_k` scans it in chunks, each cast to float32 only while it
  is scored, so no float32 copy of the matrix is ever held (RAM: one chunk).
- :class:`AnnIndex` is a faiss index (IVF with 8-bit scalar codes by
  default: one byte per dimension) whose shortlist is rescored exactly
  against the fp16 rows, so the returned order is the exact score's. Its
  recall@K against :func:`exact_top_k` is measured when it is built and kept
  in its meta.

Free of spaCy; faiss is imported only when an index is built or loaded.
"""
import math
import warnings
import zlib
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy
import torch

from ..errors import KBError
from ..fileio import read_json, write_json

#: Rows scored per step of the exact scan (float32 chunk: 4096 x D x 4 bytes).
EXACT_CHUNK_ROWS = 4096
ANN_FILE = "ann.faiss"
ANN_META = "ann.json"
#: Rows sampled (at least) to train the index's quantisers, and queries that measure its recall.
TRAIN_SAMPLE = 65536
RECALL_QUERIES = 256


def fp16_rows(rows: numpy.ndarray) -> torch.Tensor:
    """A tensor over rows read from a (read-only) memory map, without a copy;
    callers only read it (and cast it, which copies)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(numpy.asarray(rows))


def exact_top_k(matrix: numpy.ndarray, query: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scores, rows) [B, k] of the best rows of ``matrix`` for each query
    by inner product, scanning ``matrix`` in chunks of
    :data:`EXACT_CHUNK_ROWS` rows."""
    query = query.float()
    k = min(k, matrix.shape[0])
    best_scores = query.new_full((query.shape[0], 0), float("-inf"))
    best_rows = torch.zeros((query.shape[0], 0), dtype=torch.long)
    # One float32 buffer for every chunk: a fresh one per chunk cost page
    # faults that made a one-mention scan of 100k rows 6x slower.
    buffer = torch.empty((min(EXACT_CHUNK_ROWS, matrix.shape[0]), matrix.shape[1]), dtype=torch.float32)
    for start in range(0, matrix.shape[0], EXACT_CHUNK_ROWS):
        rows16 = fp16_rows(matrix[start : start + EXACT_CHUNK_ROWS])
        block = buffer[: rows16.shape[0]]
        block.copy_(rows16)
        scores, rows = (query @ block.T).topk(min(k, block.shape[0]), dim=1)
        best_scores = torch.cat([best_scores, scores], dim=1)
        best_rows = torch.cat([best_rows, rows + start], dim=1)
        if best_scores.shape[1] > k:
            best_scores, keep = best_scores.topk(k, dim=1)
            best_rows = best_rows.gather(1, keep)
    return best_scores, best_rows


def rescore(matrix: numpy.ndarray, query: torch.Tensor, rows: numpy.ndarray, k: int) -> torch.Tensor:
    """The best ``k`` of each query's candidate ``rows`` [B, S] (-1 = none)
    by the exact inner product with the fp16 rows (read from the memory map)."""
    flat = numpy.unique(rows[rows >= 0])
    if len(flat) == 0:
        return torch.zeros((rows.shape[0], 0), dtype=torch.long)
    vectors = fp16_rows(matrix[flat]).float()  # sorted reads: one pass over the map
    position = torch.from_numpy(numpy.searchsorted(flat, numpy.where(rows >= 0, rows, flat[0])))
    scores = (query.float() @ vectors.T).gather(1, position)
    scores = scores.masked_fill(torch.from_numpy(rows < 0), float("-inf"))
    best, keep = scores.topk(min(k, rows.shape[1]), dim=1)
    found = torch.from_numpy(rows).gather(1, keep)
    return found.masked_fill(best == float("-inf"), -1)


def default_factory(n_entities: int, dim: int) -> str:
    """An IVF layout for ``n_entities`` rows of width ``dim``: about
    4 sqrt(E) lists (a power of two) holding 8-bit scalar codes, one byte per
    dimension (672 bytes per entity for the default backbone). Product codes
    (``IVF...,PQ<m>``, m bytes) take less memory but rank the shortlist too
    coarsely: recall@64 stayed near 0.97 at 1M entities with 84-byte codes,
    against 0.99 with 8-bit scalars (``benchmarks/kb_scale.py retrieval``)."""
    lists = 2 ** max(4, round(math.log2(4 * math.sqrt(max(n_entities, 1)))))
    lists = min(lists, max(16, n_entities // 39))  # faiss wants >= 39 training points per list
    return f"IVF{lists},SQ8"


def _faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError("Approximate retrieval needs faiss: pip install 'spacy-m3el[ann]' (faiss-cpu)") from err
    return faiss


class AnnIndex:
    """A faiss inner-product index over the retrieval matrix, searched for a
    shortlist that is rescored exactly. ``nprobe`` (IVF lists visited) and
    ``shortlist`` (candidates rescored) trade speed for recall at search time."""

    def __init__(self, index: Any, meta: Dict[str, Any]) -> None:
        self.index = index
        self.meta = dict(meta)
        self.nprobe = int(meta.get("nprobe", 32))
        self.shortlist = int(meta.get("shortlist", 256))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def factory(self) -> str:
        return str(self.meta["factory"])

    @classmethod
    def build(
        cls,
        matrix: numpy.ndarray,
        *,
        factory: Optional[str] = None,
        nprobe: Optional[int] = 32,
        shortlist: int = 256,
        queries: Optional[torch.Tensor] = None,
        recall_k: int = 64,
        target_recall: float = 0.99,
        seed: int = 0,
        progress: bool = False,
    ) -> "AnnIndex":
        """Train and fill an index on ``matrix`` (fp16 [E, D], read in
        chunks) and measure its recall@``recall_k`` on ``queries`` (default:
        rows of the matrix itself). ``nprobe=None``: chosen by
        :meth:`choose_nprobe` to reach ``target_recall``."""
        faiss = _faiss()
        size, dim = matrix.shape
        factory = factory or default_factory(size, dim)
        rng = numpy.random.default_rng(seed)
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            raise ValueError(f"faiss cannot build the index {factory!r}: {str(err).splitlines()[-1]}") from None
        ivf = _ivf_part(index)
        wanted = max(TRAIN_SAMPLE, 40 * ivf.nlist) if ivf is not None else TRAIN_SAMPLE  # k-means: >= 39 per list
        sample = numpy.sort(rng.choice(size, min(size, wanted), replace=False))
        index.train(numpy.asarray(matrix[sample], dtype=numpy.float32))
        starts = range(0, size, EXACT_CHUNK_ROWS * 4)
        if progress:
            from ..progress import progress_bar

            starts = progress_bar(starts, desc=f"Filling the {factory} index", unit="chunk")
        for start in starts:
            index.add(numpy.asarray(matrix[start : start + EXACT_CHUNK_ROWS * 4], dtype=numpy.float32))
        ann = cls(index, {"factory": factory, "n_entities": size, "dim": dim, "nprobe": nprobe or 1,
                          "shortlist": shortlist})
        if queries is None:
            rows = numpy.sort(rng.choice(size, min(size, RECALL_QUERIES), replace=False))
            queries = torch.from_numpy(numpy.asarray(matrix[rows], dtype=numpy.float32))
        if nprobe is None and ivf is not None:
            ann.meta["nprobe_choice"] = ann.choose_nprobe(matrix, queries, recall_k, target_recall)
        ann.meta["recall"] = ann.recall(matrix, queries, recall_k)
        return ann

    def choose_nprobe(self, matrix: numpy.ndarray, queries: torch.Tensor, k: int, target: float) -> Dict[str, Any]:
        """Set ``nprobe`` to twice the fewest lists (1, 2, 4, ...) whose
        recall@``k`` on ``queries`` reaches ``target``: the queries are KB
        entities standing in for mentions, and real mentions lie further from
        their entities (on an 8.7k-entity KB, real mentions found 0.90 of the
        exact top 64 where the stand-ins found more), hence the margin.
        Returns what was measured, kept in the meta."""
        nlist = int(_ivf_part(self.index).nlist)
        measured: Dict[str, float] = {}
        nprobe = 1
        while True:
            self.nprobe = nprobe
            measured[str(nprobe)] = self.recall(matrix, queries, k)["recall"]
            if measured[str(nprobe)] >= target or nprobe >= nlist:
                break
            nprobe = min(2 * nprobe, nlist)
        self.nprobe = min(2 * nprobe, nlist)
        self.meta["nprobe"] = self.nprobe
        return {"target": target, "k": k, "stand_in_recall_by_nprobe": measured, "margin": 2,
                "chosen": self.nprobe, "lists": nlist}

    def search(self, matrix: numpy.ndarray, query: torch.Tensor, k: int) -> torch.Tensor:
        """Rows [B, k] of the best entities, best first (-1 pads when the
        visited lists hold fewer than ``k``)."""
        ivf = _ivf_part(self.index)
        if ivf is not None:
            ivf.nprobe = self.nprobe
        wide = min(max(k, self.shortlist), len(self))
        _, rows = self.index.search(numpy.ascontiguousarray(query.detach().float().cpu().numpy()), wide)
        return rescore(matrix, query.detach().cpu(), rows, k)

    def recall(self, matrix: numpy.ndarray, queries: torch.Tensor, k: int) -> Dict[str, Any]:
        """Share of the exact top-``k`` that :meth:`search` returns, averaged
        over ``queries``."""
        k = min(k, matrix.shape[0])
        _, exact = exact_top_k(matrix, queries, k)
        found = self.search(matrix, queries, k)
        hits = [len(set(e) & set(f)) / k for e, f in zip(exact.tolist(), found.tolist())]
        return {"k": k, "recall": float(numpy.mean(hits)), "queries": len(hits),
                "nprobe": self.nprobe, "shortlist": self.shortlist}

    def bytes_in_ram(self) -> int:
        """Size of the serialised index: what it holds in memory."""
        return int(_faiss().serialize_index(self.index).nbytes)

    # ------------------------------------------------------------ storage
    def save(self, folder: Path) -> None:
        """Write ``ann.faiss`` (faiss's own format) and ``ann.json`` (meta + CRC-32)."""
        path = folder / ANN_FILE
        _faiss().write_index(self.index, str(path))
        write_json(folder / ANN_META, {**self.meta, "nprobe": self.nprobe, "shortlist": self.shortlist,
                                       "checksum": zlib.crc32(path.read_bytes())})

    @classmethod
    def load(cls, folder: Path, *, n_entities: int) -> "AnnIndex":
        """Read a saved index, refusing one that is damaged or for another KB size."""
        path, meta_path = folder / ANN_FILE, folder / ANN_META
        if not path.is_file() or not meta_path.is_file():
            raise KBError(f"{folder}: the ANN index needs both {ANN_FILE} and {ANN_META}")
        meta = read_json(meta_path)
        if not isinstance(meta, dict) or not isinstance(meta.get("factory"), str):
            raise KBError(f"{meta_path}: not the meta of an ANN index (no 'factory')")
        if zlib.crc32(path.read_bytes()) != meta.get("checksum"):
            raise KBError(f"{path}: its content does not match the checksum in {ANN_META}: delete both "
                          "files to rebuild the index")
        index = _faiss().read_index(str(path))
        if index.ntotal != n_entities:
            raise KBError(f"{path}: the index holds {index.ntotal} entities, the KB has {n_entities}")
        return cls(index, meta)


def _ivf_part(index: Any) -> Any:
    """The inverted-file part of an index (None for a flat or graph index)."""
    try:
        return _faiss().extract_index_ivf(index)
    except RuntimeError:
        return None
