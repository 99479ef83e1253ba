import spacy

from spacy_m3el import MultimodalKB, alias_patterns


def test_alias_patterns_from_a_kb_and_from_a_config(tmp_path):
    nlp = spacy.blank("en")
    kb = MultimodalKB(nlp.vocab)
    kb.add_entity("Q1", name="Oscar Robertson")
    kb.add_alias("Big O", ["Q1"], [1.0])
    kb.to_disk(tmp_path / "kb")
    assert alias_patterns(kb, label="PERSON") == [{"label": "PERSON", "pattern": "Big O", "id": "Big O"}]
    registered = spacy.registry.misc.get("spacy-m3el.AliasPatterns.v1")
    assert registered(str(tmp_path / "kb")) == alias_patterns(kb)
    ruler = nlp.add_pipe("entity_ruler", config={"phrase_matcher_attr": "LOWER"})
    ruler.initialize(lambda: [], nlp=nlp, patterns=registered(str(tmp_path / "kb"), "PERSON"))
    assert [(e.text, e.label_) for e in nlp("They called him BIG O today.").ents] == [("BIG O", "PERSON")]
