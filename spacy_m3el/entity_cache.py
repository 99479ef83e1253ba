"""The entity cache of the two-stage linker: its one owner.

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
disk. On CPU nothing is copied: top-K search scans the fp16 retrieval matrix
in chunks (or asks an ANN index, see :mod:`spacy_m3el.retrieval`) and the
reranker reads the K candidates' rows from the memory map. On a GPU
everything is moved to the device once, at first use.

:class:`EntityCache` owns the arrays, their meta (format, settings, the
fingerprint of the weights that built them), saving and loading them as
``.npy`` files, and deciding whether they are still valid.
"""
import shutil
import zlib
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy
import torch

from .errors import KBError
from .fileio import inside, read_json, write_json
from .model import M3ELMatcher
from .model.matching import Side
from .retrieval import ANN_FILE, ANN_META, AnnIndex, exact_top_k

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
            if value.dtype == torch.bfloat16:  # numpy has no bfloat16 (encoders under bf16 autocast)
                value = value.float()
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
    """Cache arrays (one row per KB entity) and the meta that says what built them."""

    def __init__(self, arrays: Dict[str, numpy.ndarray], meta: Dict[str, Any]) -> None:
        rows = {name: int(array.shape[0]) for name, array in arrays.items()}
        if len(set(rows.values())) > 1:
            raise KBError(f"Entity cache arrays disagree on the number of entities: {rows}")
        self.arrays = dict(arrays)
        self.meta = {**meta, "n_entities": next(iter(rows.values()), 0), "arrays": sorted(arrays)}
        self._retrieval: Dict[str, torch.Tensor] = {}
        self._on_device: Dict[str, Dict[str, torch.Tensor]] = {}
        self._checked_finite = False
        #: The approximate searcher, used by :meth:`retrieve` when ``use_ann``.
        self.ann: Optional[AnnIndex] = None
        self.use_ann = False
        self._ann_folder: Optional[Path] = None

    @classmethod
    def build(
        cls, matcher: M3ELMatcher, entity_sides: Iterable[Side], *, max_queries: Optional[int], fingerprint: str
    ) -> "EntityCache":
        """Encode-side batches (in KB row order) -> a cache stamped with ``fingerprint``."""
        arrays, meta = build_cache_arrays(matcher, entity_sides, max_queries=max_queries)
        return cls(arrays, {**meta, "fingerprint": fingerprint})

    def __len__(self) -> int:
        return int(self.meta["n_entities"])

    # ------------------------------------------------------------ validity
    def settings_match(self, max_queries: Optional[int]) -> bool:
        """Built with these settings (and this format)?"""
        return all(self.meta.get(key) == value for key, value in cache_settings(max_queries).items())

    def is_valid_for(self, *, n_entities: int, max_queries: Optional[int], fingerprint: str) -> bool:
        """Does this cache describe ``n_entities`` entities encoded by the
        weights with ``fingerprint`` under these settings?"""
        return (
            len(self) == n_entities
            and self.settings_match(max_queries)
            and self.meta.get("fingerprint") == fingerprint
        )

    # ------------------------------------------------------------ storage
    def save(self, folder: Path) -> None:
        """Write ``<name>.npy`` per array and ``meta.json`` (with a CRC-32 of
        every array, checked at load) into ``folder``."""
        folder.mkdir()
        self.meta["checksums"] = {name: _checksum(array) for name, array in self.arrays.items()}
        for name, array in self.arrays.items():
            numpy.save(folder / f"{name}.npy", numpy.asarray(array), allow_pickle=False)
        write_json(folder / "meta.json", self.meta)
        if self.ann is not None:
            self.ann.save(folder)
        elif self._ann_folder is not None:  # saved before and never read: copied as it is (no faiss needed)
            for name in (ANN_FILE, ANN_META):
                shutil.copyfile(self._ann_folder / name, folder / name)

    @classmethod
    def load(cls, folder: Path, *, n_entities: int) -> "EntityCache":
        """Memory-map a saved cache, refusing (with a :class:`KBError` naming
        the file) one that is damaged or built for another number of entities."""
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise KBError(f"{folder}: the entity cache has no meta.json")
        meta = _checked_meta(read_json(meta_path), meta_path)
        if meta["n_entities"] != n_entities:
            raise KBError(
                f"{folder}: the entity cache was built for {meta['n_entities']} entities, the KB has {n_entities}"
            )
        arrays = {name: _load_array(folder, name, n_entities) for name in meta["arrays"]}
        for name, expected in meta.get("checksums", {}).items():
            if name in arrays and _checksum(arrays[name]) != expected:
                raise KBError(f"{folder / (name + '.npy')}: its content does not match the checksum in "
                              "meta.json (corrupt or edited): delete the cache folder to rebuild it")
        cache = cls(arrays, meta)
        cache.check_shapes(str(folder))
        if (folder / ANN_FILE).is_file():
            cache._ann_folder = folder  # read at first use: faiss is only needed by who searches with it
        return cache

    def ann_index(self) -> Optional[AnnIndex]:
        """The ANN index built for this cache (read from disk at first call), if any."""
        if self.ann is None and self._ann_folder is not None:
            self.ann = AnnIndex.load(self._ann_folder, n_entities=len(self))
        return self.ann

    def require(self, names: Sequence[str], where: str) -> None:
        """Raise a :class:`KBError` naming the arrays this cache lacks."""
        missing = sorted(set(names) - set(self.arrays))
        if missing:
            raise KBError(f"{where}: the entity cache lacks the array(s) {missing}: delete the cache "
                          "folder to rebuild it")

    def check_shapes(self, where: str) -> None:
        """Raise a :class:`KBError` naming an array of the wrong shape or dtype."""
        parts = self.meta.get("retrieval_parts", [])
        for name, array in self.arrays.items():
            problem = _shape_problem(name, array, self.arrays, sum(int(w) for _, w in parts))
            if problem:
                raise KBError(f"{where}: cache array '{name}' {problem} (shape {array.shape}, {array.dtype})")

    @property
    def bytes_per_entity(self) -> int:
        """Size of one entity's cache rows as stored (fp16 / bool)."""
        return sum(array.itemsize * int(numpy.prod(array.shape[1:])) for array in self.arrays.values())

    # ------------------------------------------------------------ search
    def _check_format(self) -> None:
        if self.meta.get("format") != CACHE_FORMAT or RETRIEVAL not in self.arrays:
            raise KBError(
                f"Entity cache format {self.meta.get('format')!r} is not {CACHE_FORMAT}: rebuild the cache"
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
                raise KBError("The entity cache's retrieval matrix holds NaN or infinite values: rebuild it")
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


def _checksum(array: numpy.ndarray) -> int:
    return zlib.crc32(numpy.ascontiguousarray(array).view(numpy.uint8).reshape(-1))


def _checked_meta(meta: Any, path: Path) -> Dict[str, Any]:
    """meta.json, with every field the loader relies on of the right type."""
    if not isinstance(meta, dict):
        raise KBError(f"{path}: expected an object, got {type(meta).__name__}")
    checks = {
        "n_entities": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "arrays": lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
        "retrieval_parts": lambda v: isinstance(v, list) and all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], int) for p in v),
        "checksums": lambda v: isinstance(v, dict) and all(isinstance(c, int) for c in v.values()),
    }
    for field, valid in checks.items():
        if field in meta and not valid(meta[field]):
            raise KBError(f"{path}: field '{field}' is malformed: {str(meta[field])[:80]}")
    for field in ("n_entities", "arrays"):
        if field not in meta:
            raise KBError(f"{path}: field '{field}' is missing")
    return meta


def _load_array(folder: Path, name: str, n_entities: int) -> numpy.ndarray:
    file = inside(folder.parent, f"{folder.name}/{name}.npy", "Cache file")
    if not file.is_file():
        raise KBError(f"{folder}: cache file '{name}.npy' is missing")
    try:
        array = numpy.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise KBError(f"{file}: cache file is truncated or corrupt ({err})") from None
    if array.ndim == 0 or array.shape[0] != n_entities:
        raise KBError(f"{file}: shape {array.shape}, expected {n_entities} rows")
    return array


def _shape_problem(name: str, array: numpy.ndarray, arrays: Dict[str, numpy.ndarray], width: int) -> str:
    """What is wrong with one cache array's shape or dtype ("" if nothing)."""
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
