"""The package's exceptions and its warning category.

Every warning spacy-m3el gives is an :class:`M3ELWarning`, so users can
silence or escalate them alone::

    warnings.filterwarnings("ignore", category=spacy_m3el.M3ELWarning)
"""
import warnings
from pathlib import Path
from typing import Any


class M3ELWarning(UserWarning):
    """A problem spacy-m3el worked around (a bad image, a skipped mention...)."""


class KBError(ValueError):
    """A knowledge base is inconsistent or its directory is damaged."""


class MIMICFormatError(ValueError):
    """A MIMIC-format file is missing or malformed."""


class ImageLoadError(ValueError):
    """An image source could not be turned into an RGB picture."""

    def __init__(self, source: Any, reason: str) -> None:
        self.source_description = describe_source(source)
        self.reason = reason
        super().__init__(f"Cannot load image from {self.source_description}: {reason}")


def describe_source(source: Any) -> str:
    """A short, human-readable name for an image source (never its pixels)."""
    if isinstance(source, (str, Path)):
        return f"path '{source}'"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"{len(source)} bytes"
    size = getattr(source, "size", None)
    if hasattr(source, "mode") and isinstance(size, tuple):
        return f"PIL image ({source.mode}, {size[0]}x{size[1]})"
    if hasattr(source, "shape") and hasattr(source, "dtype"):
        return f"array of shape {source.shape} and dtype {source.dtype}"
    return f"object of type {type(source).__name__}"


def warn(message: str, *, stacklevel: int = 2) -> None:
    """Issue an :class:`M3ELWarning` attributed to the caller's caller."""
    warnings.warn(message, M3ELWarning, stacklevel=stacklevel + 1)
