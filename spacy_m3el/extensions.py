"""Doc/Span extension attributes for images and linking results."""
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Union

from spacy.tokens import Doc, Span

from .images import ImageRef, image_key, load_image

# Recently decoded images by source key: a doc's image is decoded once even
# when several of its mentions, or several passes, need it.
_DECODED: "OrderedDict[str, Any]" = OrderedDict()
_DECODED_MAX = 256


def register_extensions() -> None:
    """Register ``Doc._.image``, ``Span._.image``, ``Span._.m3el_score`` and
    ``Span._.m3el_candidates`` (idempotent)."""
    for cls in (Doc, Span):
        if not cls.has_extension("image"):
            cls.set_extension("image", default=None)
    for name in ("m3el_score", "m3el_candidates"):
        if not Span.has_extension(name):
            Span.set_extension(name, default=None)


def image_source(item: Union[Doc, Span]) -> Optional[Any]:
    """The image for a mention: the span's own image wins over the doc's."""
    if isinstance(item, Span):
        own = item._.image
        return own if own is not None else item.doc._.image
    return item._.image


def resolve_path(source: Any, image_dir: Optional[Union[str, Path]]) -> Any:
    """Relative paths (as stored in DocBins) are resolved against ``image_dir``."""
    if image_dir is not None and isinstance(source, (str, Path)) and not Path(source).is_absolute():
        return str(Path(image_dir) / source)
    return source


def image_ref(item: Union[Doc, Span], *, allow_urls: bool = False, on_error=None) -> Optional[ImageRef]:
    """A lazily decoded image for ``item`` (decoded once, then remembered).

    ``on_error(exception)`` decides what a bad image does: re-raise, or return
    None to treat the image as absent.
    """
    source = image_source(item)
    if source is None:
        return None
    key = image_key(source) or f"id:{id(source)}"

    def load():
        if key in _DECODED:
            _DECODED.move_to_end(key)
            return _DECODED[key]
        try:
            image = load_image(source, allow_urls=allow_urls)
        except Exception as err:  # noqa: BLE001 - the caller's policy decides
            if on_error is None:
                raise
            return on_error(err)
        _DECODED[key] = image
        while len(_DECODED) > _DECODED_MAX:
            _DECODED.popitem(last=False)
        return image

    return ImageRef(key, load)
