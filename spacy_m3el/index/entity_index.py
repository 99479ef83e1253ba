"""The entity index: the KB's entities as the linker's weights see them.

For every KB entity the index holds the mention-independent part of M3EL:

- ``retrieval`` [E, D]: the decomposable scores' vectors (text and image
  globals, T2V and V2T contexts) concatenated; one inner product with a
  mention's retrieval vector gives their weighted sum, so top-K retrieval is
  a single matrix product. The reranker reads the same parts back as column
  slices, so they are stored once.
- the G2L parts: ``*_cls`` [E, h], ``*_query`` [E, Q, h] and
  ``*_query_weight`` [E, Q], with queries optionally pooled to at most
  ``max_queries`` weighted centroids per modality, and ``has_image`` [E].

Arrays are fp16 (``has_image`` bool) and are memory-mapped when loaded from
disk. On CPU nothing is copied: top-K search scans the fp16 retrieval matrix
in chunks (or asks an ANN index, see :mod:`.ann`) and the reranker reads the
K candidates' rows from the memory map. On a GPU everything is moved to the
device once, at first use (exact search there).

:class:`EntityIndex` owns the arrays and their meta, whose identity part
(format, pooling, the weights' fingerprint, the KB's entities) is what
:meth:`EntityIndex.mismatch` checks; entities are added, removed and
replaced without touching the others; files are written and read by
:mod:`.store`. It is free of spaCy.
"""
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy
import torch

from ..errors import KBError
from ..model.matching import Side
from .ann import ANN_FILE, ANN_META, AnnIndex, exact_top_k
from .store import META, joined_shape, read_arrays, read_meta, write_arrays, write_meta

INDEX_FORMAT = 2
RETRIEVAL = "retrieval"
#: The meta keys that say what an index was built from (see :meth:`EntityIndex.mismatch`).
IDENTITY = ("format", "max_queries", "fingerprint", "kb", "n_entities")
#: Meta that describes the whole KB the index was built for, dropped when entities change.
WHOLE_KB_REPORTS = ("unreadable_kb_images", "pooling_agreement", "checksums")


class EntityIndex:
    """Index arrays (one row per KB entity, in KB order) and the meta that says what built them."""

    def __init__(self, arrays: Dict[str, numpy.ndarray], meta: Dict[str, Any]) -> None:
        rows = {name: int(array.shape[0]) for name, array in arrays.items()}
        if len(set(rows.values())) > 1:
            raise KBError(f"Entity index arrays disagree on the number of entities: {rows}")
        self.arrays = dict(arrays)
        self.meta = {**meta, "n_entities": next(iter(rows.values()), 0), "arrays": sorted(arrays)}
        self._retrieval: Dict[str, torch.Tensor] = {}
        self._on_device: Dict[str, Dict[str, torch.Tensor]] = {}
        self._checked_finite = False
        #: The approximate searcher, used by :meth:`retrieve` when ``use_ann``.
        self.ann: Optional[AnnIndex] = None
        self.use_ann = False
        self._ann_folder: Optional[Path] = None

    def __len__(self) -> int:
        return int(self.meta["n_entities"])

    # ------------------------------------------------------------ validity
    def mismatch(self, identity: Dict[str, Any]) -> List[str]:
        """The identity keys (format, max_queries, fingerprint, kb,
        n_entities) on which this index differs from ``identity``; [] when
        it is valid for it. An index saved before the KB digest was recorded
        is checked without it."""
        return [key for key in IDENTITY if key in identity and not (key == "kb" and key not in self.meta)
                and self.meta.get(key) != identity[key]]

    # ------------------------------------------------------------ changes
    def select(self, rows: Sequence[Optional[int]], encoded: Optional["EntityIndex"] = None, *,
               identity: Dict[str, Any]) -> "EntityIndex":
        """A new index whose row i is this index's row ``rows[i]``, or, where
        that is None, the next row of ``encoded`` (in order); token axes
        padded to the wider of the two. ``identity`` is the new KB's.
        :meth:`add`, :meth:`remove` and :meth:`replace` are built on it."""
        fresh = [i for i, row in enumerate(rows) if row is None]
        if len(fresh) != (0 if encoded is None else len(encoded)):
            raise ValueError(f"{len(fresh)} rows to encode, but {0 if encoded is None else len(encoded)} encoded")
        if encoded is not None and encoded.meta.get("retrieval_parts") != self.meta.get("retrieval_parts"):
            raise KBError("The encoded entities' retrieval layout differs from the index's: another model")
        keep_new = [i for i, row in enumerate(rows) if row is not None]
        keep_old = numpy.asarray([rows[i] for i in keep_new], dtype=numpy.int64)
        arrays = {}
        for name, array in self.arrays.items():
            sources = [(keep_new, array[keep_old])] + ([(fresh, encoded.arrays[name])] if fresh else [])
            shape = joined_shape([values.shape for _, values in sources if len(values)] or [array.shape])
            out = numpy.zeros([len(rows)] + shape[1:], dtype=array.dtype)
            for positions, values in sources:
                if positions:
                    out[(positions, *([slice(0, values.shape[1])] if values.ndim >= 2 else []))] = values
            arrays[name] = out
        meta = {key: value for key, value in self.meta.items() if key not in WHOLE_KB_REPORTS}
        return EntityIndex(arrays, {**meta, **identity})

    def add(self, encoded: "EntityIndex", *, identity: Dict[str, Any]) -> "EntityIndex":
        """This index with ``encoded``'s rows appended."""
        return self.select([*range(len(self)), *[None] * len(encoded)], encoded, identity=identity)

    def remove(self, rows: Sequence[int], *, identity: Dict[str, Any]) -> "EntityIndex":
        """This index without ``rows``."""
        gone = set(rows)
        return self.select([row for row in range(len(self)) if row not in gone], identity=identity)

    def replace(self, rows: Sequence[int], encoded: "EntityIndex", *, identity: Dict[str, Any]) -> "EntityIndex":
        """This index with ``rows`` (in order) re-encoded as ``encoded``'s rows."""
        changed = set(rows)
        if len(changed) != len(rows) or list(rows) != sorted(rows):
            raise ValueError("replace() takes distinct rows in increasing order")
        return self.select([None if row in changed else row for row in range(len(self))], encoded,
                           identity=identity)

    # ------------------------------------------------------------ storage
    def save(self, folder: Path) -> None:
        """Write ``<name>.npy`` per array and ``meta.json`` (with a CRC-32 of
        every array, checked at load) into ``folder``, and the ANN index."""
        shapes = {name: list(array.shape) for name, array in self.arrays.items()}
        checksums = write_arrays(folder, shapes, lambda name: [self.arrays[name]])
        self.meta["checksums"] = checksums
        write_meta(folder, self.meta)
        if self.ann is not None:
            self.ann.save(folder)
        elif self._ann_folder is not None:  # saved before and never read: copied as it is (no faiss needed)
            for name in (ANN_FILE, ANN_META):
                shutil.copyfile(self._ann_folder / name, folder / name)

    @classmethod
    def load(cls, folder: Path, *, n_entities: int) -> "EntityIndex":
        """Memory-map a saved index, refusing (with a :class:`KBError` naming
        the file) one that is damaged or built for another number of entities."""
        meta = read_meta(folder)
        if meta["n_entities"] != n_entities:
            raise KBError(
                f"{folder}: the entity index was built for {meta['n_entities']} entities, the KB has {n_entities}"
            )
        index = cls(read_arrays(folder, meta, n_entities), meta)
        index.check_shapes(str(folder))
        if (folder / ANN_FILE).is_file():
            index._ann_folder = folder  # read at first use: faiss is only needed by who searches with it
        return index

    def ann_index(self) -> Optional[AnnIndex]:
        """The ANN index built for this index (read from disk at first call), if any."""
        if self.ann is None and self._ann_folder is not None:
            self.ann = AnnIndex.load(self._ann_folder, n_entities=len(self))
        return self.ann

    def require(self, names: Sequence[str], where: str) -> None:
        """Raise a :class:`KBError` naming the arrays this index lacks."""
        missing = sorted(set(names) - set(self.arrays))
        if missing:
            raise KBError(f"{where}: the entity index lacks the array(s) {missing}: delete the index "
                          "folder to rebuild it")

    def check_shapes(self, where: str) -> None:
        """Raise a :class:`KBError` naming an array of the wrong shape or dtype."""
        parts = self.meta.get("retrieval_parts", [])
        for name, array in self.arrays.items():
            problem = _shape_problem(name, array, self.arrays, sum(int(w) for _, w in parts))
            if problem:
                raise KBError(f"{where}: index array '{name}' {problem} (shape {array.shape}, {array.dtype})")

    @property
    def bytes_per_entity(self) -> int:
        """Size of one entity's index rows as stored (fp16 / bool)."""
        return sum(array.itemsize * int(numpy.prod(array.shape[1:])) for array in self.arrays.values())

    # ------------------------------------------------------------ search
    def _check_format(self) -> None:
        if self.meta.get("format") != INDEX_FORMAT or RETRIEVAL not in self.arrays:
            raise KBError(
                f"Entity index format {self.meta.get('format')!r} is not {INDEX_FORMAT}: rebuild the index"
            )

    def retrieval_matrix(self, device: torch.device) -> torch.Tensor:
        """[E, D] float32 retrieval vectors on a GPU ``device`` (copied
        once). On CPU, search reads the fp16 array itself."""
        key = str(device)
        if key not in self._retrieval:
            self._check_format()
            self._check_finite()
            self._retrieval[key] = torch.from_numpy(numpy.array(self.arrays[RETRIEVAL])).to(device).float()
        return self._retrieval[key]

    def _check_finite(self) -> None:
        if self._checked_finite:
            return
        matrix = self.arrays[RETRIEVAL]
        for start in range(0, len(self), 65536):
            if not numpy.isfinite(matrix[start : start + 65536]).all():
                raise KBError("The entity index's retrieval matrix holds NaN or infinite values: rebuild it")
        self._checked_finite = True

    def retrieve(self, query: torch.Tensor, k: int) -> torch.Tensor:
        """Row indices [B, k] of the best entities by the decomposable score:
        exact, or from the ANN index when ``use_ann`` (its shortlist rescored
        exactly; -1 pads a mention whose visited lists held fewer than k)."""
        if query.device.type != "cpu":
            matrix = self.retrieval_matrix(query.device)
            return (query @ matrix.T).topk(min(k, len(self)), dim=1).indices
        self._check_format()
        self._check_finite()
        ann = self.ann_index() if self.use_ann else None
        if ann is not None:
            return ann.search(self.arrays[RETRIEVAL], query, k)
        return exact_top_k(self.arrays[RETRIEVAL], query, k)[1]

    def gather(self, rows: torch.Tensor) -> Side:
        """The entity side of the rows [B, K] (any index shape) as float32 tensors."""
        if rows.device.type != "cpu":
            side = self._split_retrieval(self.retrieval_matrix(rows.device)[rows])
            for name, value in self._device_arrays(rows.device).items():
                side[name] = value[rows].float() if value.is_floating_point() else value[rows]
            return side
        flat = rows.reshape(-1).numpy()
        side: Side = {}
        for name, array in self.arrays.items():
            # Fancy indexing reads only these rows from a memory map.
            taken = numpy.asarray(array[flat])
            value = torch.from_numpy(taken.reshape(tuple(rows.shape) + taken.shape[1:]))
            side[name] = value.float() if value.is_floating_point() else value
        side.update(self._split_retrieval(side.pop(RETRIEVAL)))
        return side

    def full_side(self, device: Optional[torch.device] = None) -> Side:
        """The whole entity side [E, ...] (float32): for exhaustive scoring."""
        return self.gather(torch.arange(len(self), device=device))

    def _device_arrays(self, device: torch.device) -> Dict[str, torch.Tensor]:
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = {
                name: torch.from_numpy(numpy.array(array)).to(device)
                for name, array in self.arrays.items()
                if name != RETRIEVAL
            }
        return self._on_device[key]

    def _split_retrieval(self, vectors: torch.Tensor) -> Side:
        side, start = {}, 0
        for key, width in self.meta["retrieval_parts"]:
            side[key] = vectors[..., start : start + int(width)]
            start += int(width)
        return side


def saved_index(folders: Sequence[Path], *, n_entities: int) -> Optional[EntityIndex]:
    """The index saved in the first of ``folders`` that holds one (a
    pipeline's ``index/``, or ``kb/cache/`` where pipelines saved before
    kept it), or None."""
    for folder in folders:
        if (folder / META).is_file():
            return EntityIndex.load(folder, n_entities=n_entities)
        if folder.is_dir() and any(folder.iterdir()):
            raise KBError(f"{folder}: the entity index folder has no {META} (an interrupted save?): delete the "
                          "folder, and the index is built again at first use (or with build-cache)")
    return None


def _shape_problem(name: str, array: numpy.ndarray, arrays: Dict[str, numpy.ndarray], width: int) -> str:
    """What is wrong with one index array's shape or dtype ("" if nothing)."""
    if name == "has_image":
        return "" if array.ndim == 1 and array.dtype == numpy.bool_ else "must be a 1-D bool array"
    if array.dtype != numpy.float16:
        return "must be float16"
    expected_ndim = {RETRIEVAL: 2, "cls": 2, "query": 3, "query_weight": 2}.get(
        RETRIEVAL if name == RETRIEVAL else name.split("_", 1)[-1])
    if expected_ndim is not None and array.ndim != expected_ndim:
        return f"must have {expected_ndim} dimensions"
    if name == RETRIEVAL and array.shape[1] != width:
        return f"must be {width} wide (the retrieval parts in meta.json)"
    if name.endswith("_query_weight"):
        query = arrays.get(name[: -len("_weight")])
        if query is not None and query.shape[:2] != array.shape:
            return f"must match the queries' first two dimensions {query.shape[:2]}"
    if name.endswith("_query"):
        cls = arrays.get(name[: -len("_query")] + "_cls")
        if cls is not None and cls.shape[-1] != array.shape[-1]:
            return f"must be as wide as its '_cls' array ({cls.shape[-1]})"
    return ""
