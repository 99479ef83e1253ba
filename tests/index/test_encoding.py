"""What identifies the KB an index was built for."""
import spacy

from spacy_m3el import MultimodalKB
from spacy_m3el.index.encoding import kb_digest


def kb_of(nlp, picture_dir, description="A round clock", picture="item1.png"):
    kb = MultimodalKB(nlp.vocab)
    kb.add_entity("clock", name="wall clock", description=description, images=[str(picture_dir / picture)])
    kb.add_entity("poster", name="film poster", images=[str(picture_dir / "item2.png")])
    return kb


def test_the_digest_follows_ids_order_and_texts_not_picture_files(picture_dir, tmp_path):
    nlp = spacy.blank("en")
    kb = kb_of(nlp, picture_dir)
    assert kb_digest(kb) == kb_digest(kb_of(nlp, picture_dir))
    assert kb_digest(kb) != kb_digest(kb_of(nlp, picture_dir, description="A square clock"))  # same id, new text
    kb.to_disk(tmp_path / "kb")  # its pictures are copied in under content-addressed names
    assert kb_digest(MultimodalKB(nlp.vocab).from_disk(tmp_path / "kb")) == kb_digest(kb)
    reordered = MultimodalKB(nlp.vocab)
    reordered.add_entity("poster", name="film poster", images=[str(picture_dir / "item2.png")])
    reordered.add_entity("clock", name="wall clock", description="A round clock",
                         images=[str(picture_dir / "item1.png")])
    assert kb_digest(reordered) != kb_digest(kb)
