"""The frozen backbone's features of every KB entity, kept on disk, so that
the entity index is rebuilt after training by the trained layers alone.

A frozen backbone gives an entity the same features before and after a
training update; only the matcher changes. The feature cache of the network
holds mention and entity features together in 1 GB of RAM, so on a large KB
(17,000 entities and 20,000 training mentions do not fit) every rebuild of
the index ran the backbone again. :class:`EntityFeatureStore` keeps the
entity side apart: fp16 arrays memory-mapped from a temporary folder (the
page cache, not the process, holds them), one row per KB row, filled the
first time a row is encoded and read at every later rebuild.
"""
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy
import torch

from ..model import EncodedItems

#: Arrays of the store: name -> (shape after the row axis, dtype).
Layout = Dict[str, Tuple[Tuple[int, ...], type]]


class EntityFeatureStore:
    """Backbone features (an :class:`EncodedItems` row) of ``n_rows`` KB rows."""

    def __init__(self, n_rows: int, *, text_dim: int, text_length: int, image_global: Tuple[int, ...],
                 image_tokens: Tuple[int, ...], key: str) -> None:
        self.key = key
        self.folder = Path(tempfile.mkdtemp(prefix="m3el-entity-features-"))
        weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        layout: Layout = {
            "text_global": ((text_dim,), numpy.float16), "text_tokens": ((text_length, text_dim), numpy.float16),
            "text_mask": ((text_length,), numpy.bool_), "image_global": (tuple(image_global), numpy.float16),
            "image_tokens": (tuple(image_tokens), numpy.float16), "image_mask": ((), numpy.bool_),
        }
        # Files stay sparse until written: a KB without pictures costs no disk for image features.
        self.arrays = {name: numpy.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+", dtype=dtype,
                                                          shape=(n_rows, *shape))
                       for name, (shape, dtype) in layout.items()}
        self.filled = numpy.zeros(n_rows, dtype=bool)

    def __len__(self) -> int:
        return len(self.filled)

    def has(self, rows: Sequence[int]) -> bool:
        return bool(self.filled[list(rows)].all())

    def put(self, rows: Sequence[int], items: EncodedItems) -> None:
        """Keep the features of ``rows`` (the text tokens padded to the store's
        length). Zeros are written only over rows written before: the files
        start as zeros, and a KB without pictures then costs no disk."""
        index = numpy.asarray(rows)
        again = self.filled[index]
        has_image = items.image_mask.detach().cpu().numpy().astype(bool)
        for name, array in self.arrays.items():
            value = getattr(items, name).detach().to("cpu")
            value = value.numpy() if value.dtype == torch.bool else value.float().numpy().astype(numpy.float16)
            if name in ("text_tokens", "text_mask"):
                array[index, : value.shape[1]] = value
                if again.any():
                    array[index[again], value.shape[1]:] = 0
            elif name in ("image_global", "image_tokens"):
                write = has_image | again
                if write.any():
                    array[index[write]] = value[write]
            else:
                array[index] = value
        self.filled[index] = True

    def get(self, rows: Sequence[int], device: torch.device) -> EncodedItems:
        """The features of ``rows`` as float32 (text tokens cut to the longest of these rows)."""
        index = numpy.asarray(rows)
        mask = torch.from_numpy(numpy.asarray(self.arrays["text_mask"][index]))
        width = max(int(mask.any(dim=0).nonzero().max()) + 1, 1) if mask.any() else 1

        has_image = numpy.asarray(self.arrays["image_mask"][index])

        def read(name: str) -> torch.Tensor:
            array = self.arrays[name]
            if name in ("image_global", "image_tokens") and not has_image.all():
                # Rows without a picture are zeros: read only the others.
                value = torch.zeros((len(index), *array.shape[1:]), dtype=torch.float16)
                if has_image.any():
                    value[torch.from_numpy(has_image)] = torch.from_numpy(numpy.asarray(array[index[has_image]]))
            else:
                value = torch.from_numpy(numpy.asarray(array[index]))
            if name in ("text_tokens", "text_mask"):
                value = value[:, :width]
            return (value if value.dtype == torch.bool else value.float()).to(device)

        return EncodedItems(**{name: read(name) for name in self.arrays})
