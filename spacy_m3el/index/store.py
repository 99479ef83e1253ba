"""The entity index's files: their one writer and their one reader.

::

    index/
      meta.json        identity (weights fingerprint, KB digest, settings),
                       the retrieval layout, a CRC-32 per array, reports
      <name>.npy       one array per entity-side part, fp16 (``has_image`` bool)
      ann.faiss        the ANN index, when one was built (see :mod:`.ann`)
      ann.json

Arrays are written chunk by chunk (rows in KB order, the token axis padded
with 0 to the widest chunk), so a streamed build never holds the whole
index in memory, and read memory-mapped, checked against meta.json.
"""
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Sequence

import numpy

from ..errors import KBError
from ..fileio import inside, read_json, write_json

META = "meta.json"
#: Rows written per block: bounded memory when the array is memory-mapped.
WRITE_ROWS = 16_384


def checksum(array: numpy.ndarray, previous: int = 0) -> int:
    """CRC-32 of an array's bytes (continuing ``previous``)."""
    return zlib.crc32(numpy.ascontiguousarray(array).view(numpy.uint8).reshape(-1), previous)


def padded(part: numpy.ndarray, width: int) -> numpy.ndarray:
    """``part`` with its axis 1 (tokens or queries) padded with 0 to ``width``: weight 0 for queries."""
    if part.ndim < 2 or part.shape[1] >= width:
        return part
    return numpy.pad(part, [(0, 0), (0, width - part.shape[1])] + [(0, 0)] * (part.ndim - 2))


def joined_shape(shapes: Sequence[Sequence[int]]) -> List[int]:
    """The shape of chunks stacked on axis 0, the other axes as wide as the widest chunk."""
    out = [0] + list(shapes[0][1:])
    for shape in shapes:
        out[0] += int(shape[0])
        for axis in range(1, len(shape)):
            out[axis] = max(out[axis], int(shape[axis]))
    return out


def concatenate(chunks: Sequence[numpy.ndarray]) -> numpy.ndarray:
    """Chunks stacked on axis 0 in memory (padded as :func:`write_arrays` does on disk)."""
    shape = joined_shape([chunk.shape for chunk in chunks])
    return numpy.concatenate([padded(chunk, shape[1]) if len(shape) > 1 else chunk for chunk in chunks], axis=0)


def write_arrays(folder: Path, shapes: Dict[str, Sequence[int]],
                 chunks: Callable[[str], Iterable[numpy.ndarray]]) -> Dict[str, int]:
    """Write ``<name>.npy`` of the given final shape from ``chunks(name)``
    (in row order) with plain file writes; returns each array's CRC-32."""
    folder.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for name, shape in shapes.items():
        total, written, header = 0, 0, False
        with open(folder / f"{name}.npy", "wb") as out:
            for part in chunks(name):
                if not header:
                    header = True
                    numpy.lib.format.write_array_header_2_0(out, {
                        "descr": numpy.lib.format.dtype_to_descr(part.dtype), "fortran_order": False,
                        "shape": tuple(int(s) for s in shape)})
                width = int(shape[1]) if len(shape) > 1 else 0
                for start in range(0, part.shape[0], WRITE_ROWS):  # a memory-mapped part is read a block at a time
                    block = numpy.ascontiguousarray(padded(numpy.asarray(part[start : start + WRITE_ROWS]), width))
                    total = checksum(block, total)
                    out.write(block.tobytes())
                    written += block.shape[0]
        if written != shape[0]:
            raise KBError(f"{folder / (name + '.npy')}: {written} rows written, {shape[0]} expected")
        checksums[name] = total
    return checksums


def write_meta(folder: Path, meta: Dict[str, Any]) -> None:
    write_json(folder / META, meta)


def read_meta(folder: Path) -> Dict[str, Any]:
    """meta.json, with every field the loader relies on of the right type."""
    path = folder / META
    if not path.is_file():
        raise KBError(f"{folder}: the entity index has no {META}")
    meta = read_json(path)
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


def read_arrays(folder: Path, meta: Dict[str, Any], n_entities: int) -> Dict[str, numpy.ndarray]:
    """The arrays meta.json names, memory-mapped, refusing (with a
    :class:`KBError` naming the file) one missing, truncated, of another
    number of rows or whose content does not match its checksum."""
    arrays = {name: _load_array(folder, name, n_entities) for name in meta["arrays"]}
    for name, expected in meta.get("checksums", {}).items():
        if name in arrays and checksum(arrays[name]) != expected:
            raise KBError(f"{folder / (name + '.npy')}: its content does not match the checksum in "
                          f"{META} (corrupt or edited): delete the index folder to rebuild it")
    return arrays


def _load_array(folder: Path, name: str, n_entities: int) -> numpy.ndarray:
    file = inside(folder.parent, f"{folder.name}/{name}.npy", "Index file")
    if not file.is_file():
        raise KBError(f"{folder}: index file '{name}.npy' is missing")
    try:
        array = numpy.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise KBError(f"{file}: index file is truncated or corrupt ({err})") from None
    if array.ndim == 0 or array.shape[0] != n_entities:
        raise KBError(f"{file}: shape {array.shape}, expected {n_entities} rows")
    return array
