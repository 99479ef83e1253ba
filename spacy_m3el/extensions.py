"""Doc/Span extension attributes for images and linking results."""
from pathlib import Path
from typing import Any, Optional, Union

from spacy.tokens import Doc, Span


def register_extensions() -> None:
    """Register ``Doc._.image``, ``Span._.image``, ``Span._.m3el_score``,
    ``Span._.m3el_nil_prob``, ``Span._.m3el_candidates``,
    ``Span._.m3el_modalities`` and ``Span._.m3el_original_chars`` (a
    mention's offsets as written in its source, where they had to be aligned
    to the tokens); idempotent."""
    for cls in (Doc, Span):
        if not cls.has_extension("image"):
            cls.set_extension("image", default=None)
    for name in ("m3el_score", "m3el_nil_prob", "m3el_candidates", "m3el_modalities",
                 "m3el_original_chars"):
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


def resolve_images(doc: Doc, image_dir: Optional[Union[str, Path]]) -> None:
    """Resolve the relative image paths of ``doc`` and its entities against
    ``image_dir``, in place."""
    doc._.image = resolve_path(doc._.image, image_dir)
    for ent in doc.ents:
        if ent._.image is not None:
            ent._.image = resolve_path(ent._.image, image_dir)


def copy_images(reference: Doc, predicted: Doc) -> None:
    """Give ``predicted`` the images of ``reference`` it lacks: the doc's, and
    those of entity spans at the same character offsets.

    ``spacy.Corpus`` and hand-made Examples build the predicted doc from the
    text alone, which drops every ``._.image``.
    """
    if predicted._.image is None and reference._.image is not None:
        predicted._.image = reference._.image
    for ent in reference.ents:
        if ent._.image is None:
            continue
        span = predicted.char_span(ent.start_char, ent.end_char)
        if span is not None and span._.image is None:
            span._.image = ent._.image


def make_doc(nlp, text: str, image: Any = None) -> Doc:
    """``nlp.make_doc(text)`` with ``doc._.image = image`` (a path, bytes, a
    PIL image or an array): ``nlp(make_doc(nlp, text, image))`` links with
    the picture."""
    doc = nlp.make_doc(text)
    doc._.image = image
    return doc
