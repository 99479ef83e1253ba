"""Decoding images from the sources users hand us, with errors that name them.

Kept free of spaCy so the encoders can use it alone.
"""
import hashlib
import io
import os
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageLoadError, warn
from .lru import LRUCache

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image, numpy.ndarray]

#: Refuse images with more pixels than this (decompression bombs).
MAX_IMAGE_PIXELS = 64_000_000
_URL_PREFIXES = ("http://", "https://", "ftp://", "s3://", "gs://")
_FETCHABLE = ("http://", "https://")
#: Largest download accepted when image URLs are allowed.
MAX_DOWNLOAD_BYTES = 50_000_000
URL_TIMEOUT_S = 10.0


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
    if array.shape[0] * array.shape[1] > MAX_IMAGE_PIXELS:
        raise ImageLoadError(source, f"the image is too large (over {MAX_IMAGE_PIXELS:,} pixels)")
    if array.dtype.kind not in "uif":
        raise ImageLoadError(source, "expected unsigned/signed integer or float pixel values "
                                     f"(uint8 0-255, or float 0-1), not dtype {array.dtype}")
    if array.dtype.kind == "f" and not numpy.isfinite(array).all():
        raise ImageLoadError(source, "the array holds NaN or infinite values")
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
        if not allow_urls:
            raise ImageLoadError(
                source,
                "fetching images over the network is off (download the image and pass its "
                "path, or set allow_image_urls = true)",
            )
        source = fetch_url(source)
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
                    if "\x00" in str(source):
                        raise ImageLoadError(source, "the path contains a NUL character")
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


# Content hashes of files by their stat signature: a file is read and hashed
# once, not at every reference. Rewriting a file changes its ctime (which no
# tool can set back) and replacing it changes the inode, so a changed file is
# hashed again even when its size and mtime are kept.
_FILE_KEYS: LRUCache = LRUCache(100_000)


def _file_key(source: Union[str, Path]) -> str:
    try:
        stat = os.stat(source)
        signature = (os.fspath(source), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        key = _FILE_KEYS.get(signature)
        if key is None:
            digest = hashlib.sha1()
            with open(source, "rb") as file:
                for block in iter(lambda: file.read(1 << 20), b""):
                    digest.update(block)
            key = "file-sha1:" + digest.hexdigest()
            _FILE_KEYS.put(signature, key)
        return key
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return f"path:{source}"


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and centre-crop a square. A very
    elongated image is cropped to its central square first, so a 1 x 100000
    strip never becomes a 224 x 22,400,000 intermediate."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    if width * height > 16 * size * size:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))
    # Only the centre square is resampled (the crop's box in source pixels):
    # within a level or two of resizing it all and cropping, for a fifth less work.
    left, top = (width - size) // 2, (height - size) // 2
    x_scale, y_scale = image.width / width, image.height / height
    box = (left * x_scale, top * y_scale, (left + size) * x_scale, (top + size) * y_scale)
    return image.resize((size, size), Image.BICUBIC, box=box)


def fetch_url(url: str) -> bytes:
    """Download an http(s) image (opt-in only), bounded in time and size."""
    if not url.strip().lower().startswith(_FETCHABLE):
        raise ImageLoadError(url, "only http:// and https:// image URLs can be fetched")
    try:
        with urllib.request.urlopen(url.strip(), timeout=URL_TIMEOUT_S) as response:  # noqa: S310 - opt-in
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except (OSError, ValueError) as err:
        raise ImageLoadError(url, f"download failed ({err})") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ImageLoadError(url, f"the download is larger than {MAX_DOWNLOAD_BYTES} bytes")
    return data


def image_key(source: Optional[ImageSource]) -> Optional[str]:
    """A stable key identifying an image source, for feature caches.

    Files are keyed by a hash of their content (an edited or replaced file is
    re-encoded, whatever its size and time stamps), in-memory images by a hash
    of their pixels. An unreadable path is keyed by its name: it fails to load.
    """
    if source is None:
        return None
    digest = hashlib.sha1()
    if isinstance(source, (str, Path)):
        return _file_key(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        digest.update(bytes(source))
    elif isinstance(source, Image.Image):
        digest.update(f"{source.mode}{source.size}".encode())
        digest.update(source.tobytes())
    elif isinstance(source, numpy.ndarray):
        if source.dtype.kind not in "biuf" or source.size > 4 * MAX_IMAGE_PIXELS:
            return None  # refused when loaded; do not copy it to hash it
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
        """A ref that decodes ``source`` when asked, raising on bad images."""
        key = image_key(source) or f"id:{id(source)}"
        return cls(key, lambda: load_image(source, allow_urls=allow_urls))


def _decoded_size(image: Optional[Image.Image]) -> int:
    return 0 if image is None else image.width * image.height * 3


# Recently decoded images by source key, shared by every loader: a doc's image
# is decoded once even when several of its mentions, or several passes, need it.
DECODED_IMAGES: LRUCache = LRUCache(256, max_bytes=512 * 2**20, sizeof=_decoded_size)


@dataclass
class ImagePolicy:
    """What a bad image does: "raise" an ImageLoadError, "warn" and link the
    item without it, or "record" it in the loader's ``failures`` silently and
    go on without it; and whether http(s) URLs may be fetched."""

    on_bad_image: str = "raise"
    allow_image_urls: bool = False


class RecordBadImages:
    """A policy that never stops on a bad image (KB entity images: one
    broken file must not abort hours of training), with another policy's
    URL setting."""

    on_bad_image = "record"

    def __init__(self, policy: Any) -> None:
        self._policy = policy

    @property
    def allow_image_urls(self) -> bool:
        return bool(self._policy.allow_image_urls)


class ImageLoader:
    """The one route from an image source (a mention's or a KB entity's) to
    a lazily decoded :class:`ImageRef`, with one error policy.

    ``policy`` is any object with ``on_bad_image`` ("raise" or "warn") and
    ``allow_image_urls`` attributes, read at each use so a change applies at
    once. Under "warn" a bad image becomes an absent one: a warning naming
    it, and a link without it.
    """

    def __init__(self, policy: Optional[Any] = None, *, decoded: LRUCache = DECODED_IMAGES) -> None:
        self.policy = policy if policy is not None else ImagePolicy()
        self.decoded = decoded
        #: Source key -> error, of the images that failed under "record".
        self.failures: Dict[str, str] = {}

    def ref(self, source: Optional[ImageSource], *, context: str = "") -> Optional[ImageRef]:
        """An ImageRef for ``source`` (None stays None). ``context`` is added
        to error messages (for example "KB entity 'Q42'")."""
        if source is None:
            return None
        key = image_key(source) or f"id:{id(source)}"
        return ImageRef(key, lambda: self._load(key, source, context))

    def _load(self, key: str, source: ImageSource, context: str) -> Optional[Image.Image]:
        image = self.decoded.get(key)
        if image is not None:
            return image
        try:
            image = load_image(source, allow_urls=bool(self.policy.allow_image_urls))
        except ImageLoadError as err:
            return self._bad_image(key, source, err, context)
        self.decoded.put(key, image)
        return image

    def _bad_image(self, key: str, source: ImageSource, err: ImageLoadError, context: str) -> None:
        if context:
            err = ImageLoadError(source, f"{err.reason} ({context})")
        if self.policy.on_bad_image == "record":
            self.failures[key] = str(err)
            return None
        if self.policy.on_bad_image != "warn":
            raise err
        warn(f"{err} - linking this item with text only", stacklevel=4)
        return None
