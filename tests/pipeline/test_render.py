import re

import spacy

from spacy_m3el import MultimodalKB
from spacy_m3el.pipeline.render import render


def test_render_shows_links_nil_pictures_and_bars(picture_dir):
    nlp = spacy.blank("en")
    kb = MultimodalKB(nlp.vocab)
    kb.add_entity("E1", name="Red <disc>", description="A red disc & more", images=[str(picture_dir / "item1.png")])
    kb.add_entity("E2", name="No picture", description="")
    doc = nlp.make_doc("The item and the thing.")
    doc._.image = str(picture_dir / "item1_alt.png")
    doc.ents = [doc.char_span(4, 8, label="THING", kb_id="E1"), doc.char_span(17, 22, label="THING", kb_id="NIL")]
    doc.ents[0]._.m3el_candidates = [
        {"id": "E1", "score": 2.0, "branches": {"text": 1.0, "image": 3.0}},
        {"id": "E2", "score": 1.0, "branches": {"text": 0.5, "image": 1.5}}]
    doc.ents[0]._.m3el_modalities = ["text", "image"]
    doc.ents[1]._.m3el_candidates = []
    doc.ents[0]._.m3el_score, doc.ents[1]._.m3el_score = 0.81, 0.93  # a NIL answer's score is NIL's probability
    html = render([doc], kb, jupyter=False)
    assert "THING · E1 p 0.81</span>" in html and "THING · NIL p 0.93</span>" in html
    assert html.startswith("<!DOCTYPE html>")
    assert "Red &lt;disc&gt;" in html and "A red disc &amp; more" in html  # escaped
    assert 'class="m3el-ent nil"' in html and "NIL (no entity)" in html and "<i>no candidates</i>" in html
    assert html.count('class="m3el-cand best"') == 1 and "no image" in html
    # Mention picture x 2 mentions + E1's KB picture, all inlined and small.
    pictures = re.findall(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", html)
    assert len(pictures) == 3 and all(len(p) < 20_000 for p in pictures)
    widths = [float(w) for w in re.findall(r"width:(\d+)px;background", html)]
    assert max(widths) == 150 and min(widths) > 0  # bars scaled to the largest branch score
    fragment = render([doc], kb, page=False, jupyter=False)
    assert not fragment.startswith("<!DOCTYPE") and "<style>" in fragment
