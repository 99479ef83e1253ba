"""The frozen backbone's features of every KB entity, kept on disk, so that
the entity index is rebuilt after training by the trained layers alone.

A frozen backbone gives an entity the same features before and after a
training update; only the matcher changes. The feature cache of the network
holds mention and entity features together in 1 GB of RAM, so on a large KB
(17,000 entities and 20,000 training mentions do not fit) every rebuild of
the index ran the backbone again. :class:`EntityFeatureStore` keeps the
entity side apart: fp16 rows in files of a temporary folder, one row per KB
row, filled the first time a row is encoded and read at every later
rebuild (on POSIX systems the files are unlinked as soon as they are open,
so nothing outlives the process). They are read and written with
positioned reads and writes, not memory-mapped: their pages stay in the
kernel's page cache instead of counting in the process's resident memory,
and no file offset is shared with a forked process.
"""
import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy
import torch

from ..model import EncodedItems

#: Arrays of the store: name -> (shape after the row axis, dtype).
Layout = Dict[str, Tuple[Tuple[int, ...], type]]


def _runs(rows: numpy.ndarray) -> Iterator[Tuple[int, int, int]]:
    """(first row, row count, position in ``rows``) of each run of consecutive rows."""
    if not len(rows):
        return
    breaks = (numpy.flatnonzero(numpy.diff(rows) != 1) + 1).tolist()
    for begin, end in zip([0, *breaks], [*breaks, len(rows)]):
        yield int(rows[begin]), end - begin, begin


class _RowFile:
    """Fixed-size rows of one array in a sparse file (rows never written read as zeros)."""

    def __init__(self, path: Path, n_rows: int, shape: Tuple[int, ...], dtype: type) -> None:
        self.shape, self.dtype = shape, numpy.dtype(dtype)
        self.row_bytes = int(numpy.prod(shape, dtype=numpy.int64)) * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o600)
        os.ftruncate(self.fd, n_rows * self.row_bytes)
        self._lock = threading.Lock()  # for the seek-based fallback only

    def write(self, rows: numpy.ndarray, values: numpy.ndarray) -> None:
        values = numpy.ascontiguousarray(values, dtype=self.dtype)
        for first, count, at in _runs(rows):
            self._pwrite(values[at : at + count].tobytes(), first * self.row_bytes)

    def read(self, rows: numpy.ndarray) -> numpy.ndarray:
        out = numpy.empty((len(rows), *self.shape), dtype=self.dtype)
        raw = out.reshape(len(rows), self.row_bytes // self.dtype.itemsize).view(numpy.uint8)
        for first, count, at in _runs(rows):
            data = self._pread(count * self.row_bytes, first * self.row_bytes)
            raw[at : at + count] = numpy.frombuffer(data, dtype=numpy.uint8).reshape(count, self.row_bytes)
        return out

    def _pwrite(self, data: bytes, offset: int) -> None:
        if not hasattr(os, "pwrite"):  # pragma: no cover - Windows: no positioned I/O
            with self._lock:
                os.lseek(self.fd, offset, os.SEEK_SET)
                os.write(self.fd, data)
            return
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def _pread(self, size: int, offset: int) -> bytes:
        if not hasattr(os, "pread"):  # pragma: no cover
            with self._lock:
                os.lseek(self.fd, offset, os.SEEK_SET)
                return os.read(self.fd, size)
        parts: List[bytes] = []
        while size:
            part = os.pread(self.fd, size, offset)
            if not part:
                raise OSError(f"entity feature store: {size} bytes missing at offset {offset}")
            parts.append(part)
            size, offset = size - len(part), offset + len(part)
        return b"".join(parts)  # one part: returned as it is, not copied


def _remove(files: List[_RowFile], folder: str) -> None:
    for row_file in files:
        try:
            os.close(row_file.fd)
        except OSError:
            pass
    shutil.rmtree(folder, ignore_errors=True)


class EntityFeatureStore:
    """Backbone features (an :class:`EncodedItems` row) of ``n_rows`` KB rows."""

    def __init__(self, n_rows: int, *, text_dim: int, text_length: int, image_global: Tuple[int, ...],
                 image_tokens: Tuple[int, ...], key: str) -> None:
        self.key = key
        self.folder = Path(tempfile.mkdtemp(prefix="m3el-entity-features-"))
        layout: Layout = {
            "text_global": ((text_dim,), numpy.float16), "text_tokens": ((text_length, text_dim), numpy.float16),
            "text_mask": ((text_length,), numpy.bool_), "image_global": (tuple(image_global), numpy.float16),
            "image_tokens": (tuple(image_tokens), numpy.float16), "image_mask": ((), numpy.bool_),
        }
        self.files = {name: _RowFile(self.folder / f"{name}.bin", n_rows, shape, dtype)
                      for name, (shape, dtype) in layout.items()}
        if os.name == "posix":
            # Unlinked while open: the kernel frees the files with their last descriptor, so a run that is
            # killed (or exits without finalizers) leaves nothing behind in the temporary folder.
            shutil.rmtree(self.folder, ignore_errors=True)
        weakref.finalize(self, _remove, list(self.files.values()), str(self.folder))
        self.filled = numpy.zeros(n_rows, dtype=bool)

    def __len__(self) -> int:
        return len(self.filled)

    def has(self, rows: Sequence[int]) -> bool:
        return bool(self.filled[list(rows)].all())

    def put(self, rows: Sequence[int], items: EncodedItems) -> None:
        """Keep the features of ``rows`` (the text tokens padded to the store's
        length). Picture features are written only for rows with a picture,
        or written before: the files are sparse, and a KB without pictures
        then costs no disk for them."""
        index = numpy.asarray(rows, dtype=numpy.int64)
        again = self.filled[index]
        has_image = items.image_mask.detach().cpu().numpy().astype(bool)
        for name, row_file in self.files.items():
            value = getattr(items, name).detach().to("cpu")
            value = value.numpy() if value.dtype == torch.bool else value.float().numpy().astype(numpy.float16)
            if name in ("text_tokens", "text_mask") and value.shape[1] < row_file.shape[0]:
                padded = numpy.zeros((len(index), *row_file.shape), dtype=row_file.dtype)
                padded[:, : value.shape[1]] = value
                value = padded
            if name in ("image_global", "image_tokens"):
                write = has_image | again
                if write.any():
                    row_file.write(index[write], value[write])
            else:
                row_file.write(index, value)
        self.filled[index] = True

    def get(self, rows: Sequence[int], device: torch.device) -> EncodedItems:
        """The features of ``rows`` as float32 (text tokens cut to the longest of these rows)."""
        index = numpy.asarray(rows, dtype=numpy.int64)
        mask = torch.from_numpy(self.files["text_mask"].read(index))
        width = max(int(mask.any(dim=0).nonzero().max()) + 1, 1) if mask.any() else 1
        has_image = self.files["image_mask"].read(index)

        def read(name: str) -> torch.Tensor:
            row_file = self.files[name]
            if name in ("image_global", "image_tokens") and not has_image.all():
                # Rows without a picture are zeros: read only the others.
                value = torch.zeros((len(index), *row_file.shape), dtype=torch.float16)
                if has_image.any():
                    value[torch.from_numpy(has_image)] = torch.from_numpy(row_file.read(index[has_image]))
            else:
                value = torch.from_numpy(row_file.read(index))
            if name in ("text_tokens", "text_mask"):
                value = value[:, :width]
            return (value if value.dtype == torch.bool else value.float()).to(device)

        return EncodedItems(**{name: read(name) for name in self.files})
