import spacy
from spacy.tokens import DocBin

from spacy_m3el.data.readers import MultimodalCorpus


def test_relative_image_paths_are_resolved_once_on_both_sides(tmp_path):
    nlp = spacy.blank("en")
    doc = nlp.make_doc("Robertson scored.")
    doc.ents = [doc.char_span(0, 9, label="PERSON", kb_id="Q1")]
    doc._.image = "mention_image/m1.jpg"
    doc.ents[0]._.image = "mention_image/span.jpg"
    DocBin(docs=[doc], store_user_data=True).to_disk(tmp_path / "train.spacy")
    (eg,) = MultimodalCorpus(tmp_path / "train.spacy", image_dir="data")(nlp)
    assert eg.predicted._.image == eg.reference._.image == "data/mention_image/m1.jpg"
    assert eg.predicted.ents[0]._.image == "data/mention_image/span.jpg"
    assert eg.predicted.ents[0].kb_id_ == ""  # gold spans are given, their ids are not
