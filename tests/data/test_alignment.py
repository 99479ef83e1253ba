import pytest
import spacy
from spacy.tokens import Doc, DocBin

from spacy_m3el.data.alignment import AlignmentReport, align_entities, align_span
from spacy_m3el.data.readers import MultimodalCorpus


@pytest.fixture
def nlp():
    return spacy.blank("en")


@pytest.mark.parametrize(
    "text, mention, aligned",
    [
        ("He moved to Washington D.C. in 1990.", "Washington D.C", "Washington D.C."),  # "D.C." is one token
        ("A speech by Martin Luther King Jr. in 1963.", "King Jr", "King Jr."),
        ("Visit U.S.A.today please", "U.S.", "U.S.A.today"),
    ],
)
def test_a_mention_that_cuts_a_token_is_expanded_to_it(nlp, text, mention, aligned):
    doc = nlp.make_doc(text)
    start = text.index(mention)
    span, outcome = align_span(doc, start, start + len(mention), label="MENTION", kb_id="Q1")
    assert outcome == "moved" and span.text == aligned and span.kb_id_ == "Q1" and span.label_ == "MENTION"


def test_surrounding_whitespace_is_dropped(nlp):
    text = "Then George Washington spoke."
    doc = nlp.make_doc(text)
    span, outcome = align_span(doc, 4, 22, label="M")  # " George Washington"
    assert span.text == "George Washington" and outcome == "moved"
    span, outcome = align_span(doc, 5, 22, label="M")
    assert span.text == "George Washington" and outcome == ""


def test_expanding_into_another_mention_contracts_instead(nlp):
    doc = nlp.make_doc("The U.S.A.today paper")
    report = AlignmentReport()
    # "U.S.A.today" is one token: the first mention takes it whole, the second cannot have it.
    spans = align_entities(doc, [(4, 8, "A", ""), (10, 15, "B", "")], report, where="doc 1")
    assert [s.text for s in spans] == ["U.S.A.today"]
    assert len(report.moved) == 1 and len(report.unaligned) == 1 and "overlaps" in report.unaligned[0][1]
    # Contraction: a span covering one whole token and part of the next keeps the whole one.
    doc = nlp.make_doc("New York-based firms")
    taken = [doc.char_span(4, 14, label="X")]  # "York-based"
    span, outcome = align_span(doc, 0, 6, label="Y", taken=taken)  # "New Yo" expands into "York"
    assert span.text == "New" and outcome == "moved"


@pytest.mark.parametrize("start, end, reason", [(3, 3, "outside"), (40, 50, "outside"), (3, 4, "whitespace"),
                                                (-1, 2, "outside")])
def test_what_no_token_holds_is_reported_not_raised(nlp, start, end, reason):
    doc = nlp.make_doc("The cat sat.")
    report = AlignmentReport()
    assert align_entities(doc, [(start, end, "M", "")], report, where="line 7") == []
    assert report.unaligned[0][0] == "line 7" and reason in report.unaligned[0][1]
    assert "could not be aligned" in report.lines()[0] and "line 7" in report.lines()[0]


def test_moved_mentions_keep_their_original_offsets_and_are_reported_once(nlp):
    doc = nlp.make_doc("He moved to Washington D.C. in 1990.")
    report = AlignmentReport()
    spans = align_entities(doc, [(12, 26, "M", "Q61")], report, where="id w1")
    doc.ents = spans
    assert doc.ents[0]._.m3el_original_chars == [12, 26] and doc.ents[0].text == "Washington D.C."
    (line,) = report.lines()
    assert "1 of 1 mention(s)" in line and "'Washington D.C' -> 'Washington D.C.'" in line and "id w1" in line
    with pytest.warns(UserWarning, match="did not fall on token boundaries"):
        report.warn("test.json")


def test_reader_aligns_docs_tokenised_differently_from_the_pipeline(nlp, tmp_path, picture_dir):
    # A DocBin made by an older converter that re-cut the tokens around the mention.
    text = "He moved to Washington D.C. in 1990."
    words = ["He", "moved", "to", "Washington", "D.C", ".", "in", "1990", "."]
    spaces = [True, True, True, True, False, True, True, False, False]
    doc = Doc(nlp.vocab, words=words, spaces=spaces)
    doc.ents = [doc.char_span(12, 26, label="MENTION", kb_id="Q61")]
    doc._.image = "pic.png"
    DocBin(docs=[doc], store_user_data=True).to_disk(tmp_path / "old.spacy")
    corpus = MultimodalCorpus(tmp_path / "old.spacy", image_dir=picture_dir)
    with pytest.warns(UserWarning, match="1 of 1 mention"):
        (eg,) = list(corpus(nlp))
    assert [t.text for t in eg.reference] == [t.text for t in nlp.make_doc(text)]
    gold, pred = eg.reference.ents[0], eg.predicted.ents[0]
    assert (gold.text, gold.kb_id_, pred.text) == ("Washington D.C.", "Q61", "Washington D.C.")
    assert gold._.m3el_original_chars == [12, 26] and eg.predicted._.image == str(picture_dir / "pic.png")
    assert corpus.alignment.to_dict()["moved"] == 1
    # The warning comes once per corpus, not once per epoch.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(corpus(nlp))
