"""Candidate generators: the alias table as is, and matched loosely."""
import pytest
import spacy
from spacy.training import Example

from spacy_m3el import MultimodalKB
from spacy_m3el.pipeline.candidates import FuzzyAliasCandidates, alias_candidates, fuzzy_tokens


def make_kb(vocab):
    kb = MultimodalKB(vocab)
    for entity_id, name in [("ML", "Machine Learning"), ("DML", "Deep Machine Learning"), ("CLK", "Clock"),
                            ("CITY", "City"), ("ORSAY", "Musée d'Orsay"), ("SPIDER", "Spider-Man")]:
        kb.add_entity(entity_id, name=name, description=f"About {name}.")
        kb.add_alias(name, [entity_id], [0.8])
    return kb


def test_fuzzy_form_ignores_case_accents_punctuation_and_plurals():
    assert fuzzy_tokens("Musée d'Orsay") == fuzzy_tokens("MUSEE DORSAY") == ("musee", "dorsay")
    assert fuzzy_tokens("Spider-Man") == ("spider", "man")
    assert fuzzy_tokens("Cities") == ("city",) and fuzzy_tokens("boxes") == ("box",) and fuzzy_tokens("clocks") == ("clock",)
    assert fuzzy_tokens("bus") == ("bus",) and fuzzy_tokens("glass") == ("glass",) and fuzzy_tokens("!!") == ()


def test_fuzzy_candidates_find_what_the_alias_table_misses():
    kb = make_kb(spacy.blank("en").vocab)
    texts = ["learning", "clocks", "musee dorsay", "spider man", "Clock", "deep", "nothing here"]
    exact = alias_candidates(kb, texts)
    assert [sorted(kb.entity_id(r) for r in found) for found in exact] == [[], [], [], [], ["CLK"], [], []]
    fuzzy = FuzzyAliasCandidates(min_similarity=0.5)(kb, texts)
    named = [{kb.entity_id(row): round(prior, 3) for row, prior in found.items()} for found in fuzzy]
    # "learning" covers half of "Machine Learning" (prior 0.8 x 0.5) and a third of "Deep Machine Learning" (left out).
    assert named[0] == {"ML": 0.4}
    assert named[1] == {"CLK": 0.8} and named[2] == {"ORSAY": 0.8} and named[3] == {"SPIDER": 0.8}
    assert named[4] == {"CLK": 0.8} and named[5] == {} and named[6] == {}
    assert FuzzyAliasCandidates(min_similarity=0.3)(kb, ["deep"])[0] == {kb.row("DML"): pytest.approx(0.8 / 3)}
    assert len(FuzzyAliasCandidates(min_similarity=0.3, max_candidates=1)(kb, ["learning"])[0]) == 1


def test_the_fuzzy_index_follows_the_kb():
    kb = make_kb(spacy.blank("en").vocab)
    generator = FuzzyAliasCandidates()
    assert generator(kb, ["teapots"]) == [{}]
    kb.add_entity("TEA", name="Teapot", description="A pot for tea.")
    kb.add_alias("Teapot", ["TEA"], [0.9])
    assert generator(kb, ["teapots"]) == [{kb.row("TEA"): 0.9}]


@pytest.mark.parametrize("bad", [{"min_similarity": 0.0}, {"min_similarity": 1.5}, {"max_candidates": 0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        FuzzyAliasCandidates(**bad)


def test_the_linker_takes_its_generator_from_the_config_and_saves_it(tmp_path):
    nlp = spacy.blank("en")
    linker = nlp.add_pipe("m3el_linker", config={
        "candidate_generator": {"@misc": "spacy-m3el.FuzzyAliasCandidates.v1", "min_similarity": 0.5},
        "n_candidates": 0, "model": {"@architectures": "spacy-m3el.M3EL.v1", "use_image": False, "use_t2v": False,
                                     "use_v2t": False, "encoder": {"@misc": "spacy-m3el.MiniLMEfficientNetEncoder.v1",
                                                                   "frozen": True}}})
    kb = make_kb(nlp.vocab)
    linker.set_kb(lambda vocab: kb)
    doc = nlp.make_doc("She studies learning theory.")
    doc.ents = [doc.char_span(12, 20, label="TOPIC", kb_id="ML")]
    nlp.initialize(lambda: [Example(nlp.make_doc(doc.text), doc)])
    nlp.to_disk(tmp_path / "pipeline")
    loaded = spacy.load(tmp_path / "pipeline")
    assert isinstance(loaded.get_pipe("m3el_linker").candidate_generator, FuzzyAliasCandidates)
    query = loaded.make_doc(doc.text)
    query.ents = [query.char_span(12, 20, label="TOPIC")]
    ent = loaded(query).ents[0]
    assert [c["id"] for c in ent._.m3el_candidates] == ["ML"] and ent._.m3el_candidates[0]["prior"] == 0.4
    # The default generator (the alias table alone) has no candidate for it: NIL.
    plain = spacy.load(tmp_path / "pipeline", config={"components.m3el_linker.candidate_generator":
                                                      {"@misc": "spacy-m3el.AliasCandidates.v1"}})
    query = plain.make_doc(doc.text)
    query.ents = [query.char_span(12, 20, label="TOPIC")]
    assert plain(query).ents[0]._.m3el_candidates == []
