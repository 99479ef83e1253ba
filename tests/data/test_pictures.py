import pytest
import spacy
from spacy.training import Example

from spacy_m3el.data.pictures import examples_with_pictures, with_pictures
from spacy_m3el.pipeline.inputs import vary_pictures


@pytest.fixture
def docs():
    nlp = spacy.blank("en")
    out = []
    for k in range(10):
        doc = nlp.make_doc(f"The item {k} was shown.")
        doc.ents = [doc.char_span(4, 8, label="THING", kb_id=f"E{k}")]
        doc._.image = f"pic{k}.png"
        out.append(doc)
    out[9]._.image = None  # a mention without a picture stays without one
    return out


def test_given_and_none(docs):
    assert [d._.image for d in with_pictures(docs, "given")] == [d._.image for d in docs]
    none = with_pictures(docs, "none")
    assert all(d._.image is None for d in none)
    assert docs[0]._.image == "pic0.png"  # the originals are left alone


def test_half_removes_a_seeded_half_of_the_pictures(docs):
    half = with_pictures(docs, "half", seed=3)
    removed = [i for i, d in enumerate(half) if d._.image is None and docs[i]._.image is not None]
    assert len(removed) == 4  # half of the 9 pictured docs, rounded down
    assert [d._.image for d in with_pictures(docs, "half", seed=3)] == [d._.image for d in half]
    assert [d._.image for d in with_pictures(docs, "half", seed=4)] != [d._.image for d in half]


def test_shuffled_gives_every_pictured_mention_another_mentions_picture(docs):
    shuffled = with_pictures(docs, "shuffled", seed=0)
    for original, varied in zip(docs[:9], shuffled[:9]):
        assert varied._.image != original._.image and varied._.image.startswith("pic")
    assert sorted(d._.image for d in shuffled[:9]) == sorted(d._.image for d in docs[:9])
    assert shuffled[9]._.image is None


def test_span_pictures_are_replaced_too(docs):
    docs[0].ents[0]._.image = "own.png"
    none = with_pictures(docs, "none")
    assert none[0].ents[0]._.image is None and none[0]._.image is None


def test_examples_get_the_same_condition_on_both_sides(docs):
    examples = [Example(d.copy(), d) for d in docs]
    varied = examples_with_pictures(examples, "shuffled", seed=1)
    assert [eg.predicted._.image for eg in varied] == [eg.reference._.image for eg in varied]
    assert varied[0].reference.ents[0].kb_id_ == "E0"


def test_unknown_condition_is_named(docs):
    with pytest.raises(ValueError, match="pictures must be one of"):
        with_pictures(docs, "blurred")


def test_training_pictures_are_dropped_and_mismatched_at_the_asked_rates():
    import random

    from spacy_m3el.data.images import ImageRef

    random.seed(0)
    images = [ImageRef(f"p{i}", None) for i in range(1000)]
    gold = list(range(1000))
    varied = vary_pictures(images, gold, dropout=0.2, mismatch=0.3)
    dropped = sum(v is None for v in varied)
    swapped = sum(v is not None and v.key != i.key for v, i in zip(varied, images))
    assert 150 < dropped < 250 and 250 < swapped < 350
    # Only mentions of another entity lend their picture: one entity's batch keeps its pictures.
    assert vary_pictures(images[:3], [7, 7, 7], dropout=0.0, mismatch=1.0) == images[:3]
    assert vary_pictures([None, images[0]], [1, 2], dropout=0.0, mismatch=1.0)[0] is None
    # One picture shared by two mentions (two refs, one key) is no mismatch for either.
    shared = [ImageRef("doc.jpg", None), ImageRef("doc.jpg", None)]
    assert [v.key for v in vary_pictures(shared, [1, 2], dropout=0.0, mismatch=1.0)] == ["doc.jpg", "doc.jpg"]
