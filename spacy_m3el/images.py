"""Decoding images from the sources users hand us, with errors that name them.

Kept free of spaCy so the encoders can use it alone.
"""
import hashlib
import io
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import numpy
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image, numpy.ndarray]

#: Refuse images with more pixels than this (decompression bombs).
MAX_IMAGE_PIXELS = 64_000_000
_URL_PREFIXES = ("http://", "https://", "ftp://", "s3://", "gs://")


class ImageLoadError(ValueError):
    """An image source could not be turned into an RGB picture."""

    def __init__(self, source: Any, reason: str) -> None:
        self.source_description = describe_source(source)
        self.reason = reason
        super().__init__(f"Cannot load image from {self.source_description}: {reason}")


def describe_source(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return f"path '{source}'"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"{len(source)} bytes"
    if isinstance(source, Image.Image):
        return f"PIL image ({source.mode}, {source.size[0]}x{source.size[1]})"
    if isinstance(source, numpy.ndarray):
        return f"array of shape {source.shape} and dtype {source.dtype}"
    return f"object of type {type(source).__name__}"


def is_url(source: Any) -> bool:
    return isinstance(source, str) and source.strip().lower().startswith(_URL_PREFIXES)


def _to_rgb(image: Image.Image, source: Any) -> Image.Image:
    """Flatten any PIL mode to 8-bit RGB; transparency is composited on white."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # animated: the first frame
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = numpy.asarray(image, dtype=numpy.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else numpy.zeros_like(array)
        image = Image.fromarray(scaled.astype(numpy.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.width == 0 or image.height == 0:
        raise ImageLoadError(source, "the image has zero width or height")
    return image


def _from_array(array: numpy.ndarray, source: Any) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageLoadError(source, "expected an array of shape HxW, HxWx3 or HxWx4")
    if array.size == 0:
        raise ImageLoadError(source, "the array is empty")
    if array.dtype != numpy.uint8:
        if numpy.issubdtype(array.dtype, numpy.floating) and array.max(initial=0.0) <= 1.0:
            array = array * 255.0
        array = numpy.clip(array, 0, 255).astype(numpy.uint8)
    return Image.fromarray(numpy.ascontiguousarray(array))


def load_image(source: ImageSource, *, allow_urls: bool = False) -> Image.Image:
    """Decode ``source`` (a path, encoded bytes, a PIL image or an array) to RGB.

    Raises :class:`ImageLoadError` naming the source on any failure. URLs are
    refused: this package never fetches from the network at run time.
    """
    if is_url(source):
        hint = "" if allow_urls else " (URLs are refused: download the image and pass its path)"
        raise ImageLoadError(source, "fetching images over the network is not supported" + hint)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            previous = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
            try:
                if isinstance(source, Image.Image):
                    image = source
                elif isinstance(source, numpy.ndarray):
                    image = _from_array(source, source)
                elif isinstance(source, (bytes, bytearray, memoryview)):
                    if len(source) == 0:
                        raise ImageLoadError(source, "the data is empty")
                    image = Image.open(io.BytesIO(bytes(source)))
                    image.load()
                elif isinstance(source, (str, Path)):
                    path = Path(source)
                    if not path.exists():
                        raise ImageLoadError(source, "no such file")
                    if path.is_dir():
                        raise ImageLoadError(source, "it is a directory, not an image file")
                    if path.stat().st_size == 0:
                        raise ImageLoadError(source, "the file is empty")
                    with Image.open(path) as opened:
                        opened.load()
                        image = _to_rgb(opened, source)
                        image.load()
                    return image
                else:
                    raise ImageLoadError(
                        source, "expected a path, bytes, a PIL.Image.Image or a numpy array"
                    )
                return _to_rgb(image, source)
            finally:
                Image.MAX_IMAGE_PIXELS = previous
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(source, f"the image is too large ({err})") from err
    except UnidentifiedImageError as err:
        raise ImageLoadError(source, "the data is not an image format Pillow can read") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(source, f"the image data is truncated or corrupt ({err})") from err


def image_key(source: Optional[ImageSource]) -> Optional[str]:
    """A stable key identifying an image source, for feature caches.

    Paths are keyed by their resolved name, size and modification time, so an
    edited file is re-encoded; in-memory images by a hash of their pixels.
    """
    if source is None:
        return None
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            stat = path.stat()
            return f"path:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            return f"path:{path}"
    digest = hashlib.sha1()
    if isinstance(source, (bytes, bytearray, memoryview)):
        digest.update(bytes(source))
    elif isinstance(source, Image.Image):
        digest.update(f"{source.mode}{source.size}".encode())
        digest.update(source.tobytes())
    elif isinstance(source, numpy.ndarray):
        digest.update(f"{source.dtype}{source.shape}".encode())
        digest.update(numpy.ascontiguousarray(source).tobytes())
    else:
        return None
    return "sha1:" + digest.hexdigest()


class ImageRef:
    """A not-yet-decoded image: a cache key plus a way to decode it.

    ``load`` returns an RGB image, or None when the image is to be treated as
    absent (for example after a bad image under ``on_bad_image="warn"``).
    """

    __slots__ = ("key", "load")

    def __init__(self, key: str, load) -> None:
        self.key = key
        self.load = load

    @classmethod
    def from_source(cls, source: ImageSource, *, allow_urls: bool = False) -> "ImageRef":
        key = image_key(source) or f"id:{id(source)}"
        return cls(key, lambda: load_image(source, allow_urls=allow_urls))
