import pytest
import spacy
from spacy.training import Example

from spacy_m3el import MultimodalKB
from spacy_m3el.pipeline.inputs import add_negatives, gold_mentions, mention_context, training_batch


@pytest.fixture
def nlp():
    return spacy.blank("en")


def kb_of(nlp, n):
    kb = MultimodalKB(nlp.vocab)
    for k in range(n):
        kb.add_entity(f"E{k}", name=f"thing {k}")
    kb.add_alias("thing", ["E1", "E2", "E3"], [0.5, 0.3, 0.2])
    return kb


def example(nlp, text, start, end, kb_id, image=None):
    reference = nlp.make_doc(text)
    reference.ents = [reference.char_span(start, end, label="X", kb_id=kb_id)]
    reference._.image = image
    reference.ents[0]._.image = None if image is None else image + ".span"
    return Example(nlp.make_doc(text), reference)


def test_gold_mentions_copy_images_and_count_unknown_ids(nlp):
    kb = kb_of(nlp, 4)
    examples = [example(nlp, "A thing here.", 2, 7, "E1", image="a.png"),
                example(nlp, "A thing there.", 2, 7, "Q404"), example(nlp, "No thing.", 3, 8, "NIL")]
    spans, rows, unknown = gold_mentions(examples, kb, labels_discard=[], use_gold_ents=True)
    assert [s.text for s in spans] == ["thing"] and rows == [1] and unknown == {"Q404": 1}
    assert examples[0].predicted._.image == "a.png" and spans[0]._.image == "a.png.span"
    # Without gold entities, only spans the predicted doc has are trained on.
    assert gold_mentions(examples, kb, labels_discard=[], use_gold_ents=False)[0] == []
    assert gold_mentions(examples, kb, labels_discard=["X"], use_gold_ents=True)[0] == []


def test_training_batch_labels_and_negatives(nlp):
    kb = kb_of(nlp, 30)
    examples = [example(nlp, "A thing here.", 2, 7, "E1"), example(nlp, "The thing now.", 4, 9, "E1"),
                example(nlp, "Thing 5 again.", 0, 5, "E5")]
    batch = training_batch(examples, kb, labels_discard=[], use_gold_ents=True, hard_negatives=6)
    assert batch.entity_rows[:2] == [1, 5]
    assert batch.labels.tolist() == [0, 0, 1]
    # Alias confusables of "thing" first, then random rows; no duplicates.
    assert batch.entity_rows[2:4] == [2, 3] and len(batch.entity_rows) == 8 == len(set(batch.entity_rows))
    # Never more candidates than the KB has entities.
    assert sorted(add_negatives(kb_of(nlp, 4), [], [0, 1], 10)) == [0, 1, 2, 3]
    with pytest.warns(UserWarning, match=r"skipped 1 gold mention\(s\).*Q404"):
        lonely = training_batch([example(nlp, "A thing.", 2, 7, "E1"), example(nlp, "A thing.", 2, 7, "Q404")],
                                kb, labels_discard=[], use_gold_ents=True, hard_negatives=0)
    assert lonely is None  # one entity: nothing to contrast


def test_mention_context_uses_sentences_or_a_window(nlp):
    doc = nlp.make_doc("x" * 500 + " thing " + "y" * 500)
    span = doc.char_span(501, 506)
    window = mention_context(span, 100)
    assert len(window) == 100 and "thing" in window
    short = nlp.make_doc("A short thing.")
    assert mention_context(short[2:3], 100) == "A short thing."
