import pytest

from spacy_m3el.errors import KBError
from spacy_m3el.kb.aliases import AliasPriors, normalize_alias


def test_priors_from_counts_explicit_priors_or_weights():
    table = AliasPriors()
    for form, entity in (("Jordan", "A"), ("jordan ", "B"), ("JORDAN", "B"), ("Big  O", "C")):
        table.add(form, entity)
    table.add("Air", "B", prior=0.25)
    table.add("air", "A", prior=0.5)
    rows = {alias: (ids, priors) for alias, ids, priors in table.tables()}
    assert rows["Jordan"] == (["A", "B"], pytest.approx([1 / 3, 2 / 3]))
    assert rows["Big  O"] == (["C"], [1.0])
    assert rows["Air"] == (["B", "A"], [0.25, 0.5])
    by_weight = {alias: priors for alias, _, priors in table.tables(weight=lambda e, n: {"A": 3, "B": 1}.get(e, 0))}
    assert by_weight["Jordan"] == [0.75, 0.25] and by_weight["Big  O"] == [1.0]  # all 0: uniform
    assert normalize_alias("  Big \t O ") == "big o"
    with pytest.raises(KBError, match="Empty alias for entity 'A'"):
        table.add("  ", "A")


def test_unicode_forms_of_one_alias_are_one_alias():
    import spacy

    from spacy_m3el import MultimodalKB

    assert normalize_alias("İstanbul") == normalize_alias("ISTANBUL") == "istanbul"
    assert normalize_alias("Jos\u00e9") == normalize_alias("Jose\u0301") == "jos\u00e9"
    assert normalize_alias("ﬁsh") == "fish"  # compatibility ligature
    kb = MultimodalKB(spacy.blank("en").vocab)
    kb.add_entity("Q1", name="José")
    kb.add_alias("Jos\u00e9", ["Q1"], [1.0])
    assert kb.alias_rows("JOSE\u0301") == [(0, 1.0)]
    kb.add_entity("Q2", name="Istanbul")
    kb.add_alias("İstanbul", ["Q2"], [1.0])
    with pytest.raises(KBError, match="already in the KB"):
        kb.add_alias("Istanbul", ["Q1"], [1.0])
