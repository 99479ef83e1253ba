"""Picture conditions: the same mentions with their pictures, without them,
with half of them removed, or with another mention's picture.

Real mentions often come without a picture, or share one that shows only
some of them. Evaluation scores every condition on the same gold mentions,
and calibration fits the NIL option and the probabilities on a mix of them,
so that a mention without (or with the wrong) picture is answered as well as
its text allows instead of by dev data's habits.
"""
import random
from typing import Any, List, Optional, Sequence

from spacy.tokens import Doc
from spacy.training import Example

from ..extensions import image_source, register_extensions

CONDITIONS = ("given", "none", "half", "shuffled")
#: Whether a mention's picture under each condition is its own (None: it has none).
PICTURE_IS_OWN = {"given": True, "none": None, "half": True, "shuffled": False}


def check_condition(condition: str, *, allow_all: bool = False) -> None:
    choices = CONDITIONS + (("all",) if allow_all else ())
    if condition not in choices:
        raise ValueError(f"pictures must be one of {choices}, got {condition!r}")


def _picture(doc: Doc) -> Optional[Any]:
    """The doc's picture, else its first mention's own picture."""
    if doc._.image is not None:
        return doc._.image
    return next((image_source(ent) for ent in doc.ents if image_source(ent) is not None), None)


def _set_picture(doc: Doc, picture: Optional[Any]) -> None:
    doc._.image = picture
    for ent in doc.ents:
        ent._.image = None


def _derangement(count: int, rng: random.Random) -> List[int]:
    """A permutation of range(count) that moves every element (count >= 2)."""
    order = list(range(count))
    rng.shuffle(order)
    for i in range(count):
        if order[i] == i:
            j = (i + 1) % count
            order[i], order[j] = order[j], order[i]
    return order


def with_pictures(docs: Sequence[Doc], condition: str, *, seed: int = 0) -> List[Doc]:
    """Copies of ``docs`` under ``condition`` (the docs themselves are left
    alone): "given" keeps the pictures, "none" removes them, "half" removes
    those of a seeded half of the docs that have one, "shuffled" gives each
    doc with a picture the picture of another such doc (a seeded
    derangement; span pictures are replaced by the doc's)."""
    register_extensions()
    check_condition(condition)
    copies = [doc.copy() for doc in docs]
    if condition == "given":
        return copies
    rng = random.Random(seed)
    pictured = [i for i, doc in enumerate(copies) if _picture(doc) is not None]
    if condition == "none":
        for doc in copies:
            _set_picture(doc, None)
    elif condition == "half":
        for i in rng.sample(pictured, len(pictured) // 2):
            _set_picture(copies[i], None)
    elif len(pictured) >= 2:  # shuffled
        pictures = [_picture(copies[i]) for i in pictured]
        for i, j in zip(pictured, _derangement(len(pictured), rng)):
            _set_picture(copies[i], pictures[j])
    return copies


def examples_with_pictures(examples: Sequence[Example], condition: str, *, seed: int = 0) -> List[Example]:
    """New examples whose predicted and reference docs are both under
    ``condition`` (the same picture on both sides, so nothing copies the
    original back)."""
    predicted = with_pictures([eg.predicted for eg in examples], condition, seed=seed)
    reference = with_pictures([eg.reference for eg in examples], condition, seed=seed)
    return [Example(p, r) for p, r in zip(predicted, reference)]
