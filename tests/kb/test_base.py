import pytest
import spacy
import srsly

from spacy_m3el import KBError, MultimodalKB


@pytest.fixture
def nlp():
    return spacy.blank("en")


def small_kb(nlp, picture_dir):
    kb = MultimodalKB(nlp.vocab)
    kb.add_entity("Q17717", name="Oscar Robertson", description="American basketball player",
                  images=[picture_dir / "item1.png", picture_dir / "item2.png"], freq=3)
    kb.add_entity("Q123", name="Robertson screwdriver", description="A square-socket screwdriver",
                  images=[picture_dir / "item3.png"], freq=1)
    kb.add_alias("Robertson", ["Q17717", "Q123"], [0.6, 0.3])
    return kb


def test_candidates_use_normalised_aliases(nlp, picture_dir):
    kb = small_kb(nlp, picture_dir)
    doc = nlp("ROBERTSON scored")
    candidates = kb.get_candidates(doc[0:1])
    assert [c.entity_ for c in candidates] == ["Q17717", "Q123"]
    assert [round(c.prior_prob, 3) for c in candidates] == [0.6, 0.3]
    assert kb.alias_rows("  robertson ") == kb.alias_rows("Robertson")
    assert kb.get_candidates_batch([doc[1:2]]) == [[]]


def test_round_trip_is_self_contained(nlp, picture_dir, tmp_path):
    kb = small_kb(nlp, picture_dir)
    kb.to_disk(tmp_path / "kb")
    images = sorted(p.name for p in (tmp_path / "kb" / "images").iterdir())
    assert len(images) == 3
    loaded = MultimodalKB(nlp.vocab).from_disk(tmp_path / "kb")
    assert loaded.get_entity("Q123")["description"] == "A square-socket screwdriver"
    assert all(str(tmp_path / "kb") in p for p in loaded.get_entity("Q17717")["images"])
    assert loaded.alias_rows("robertson") == [(0, 0.6), (1, 0.3)]
    assert sorted(p.name for p in (tmp_path / "kb").iterdir()) == ["images", "kb.json"]  # no index: not the KB's
    again = MultimodalKB(nlp.vocab).from_bytes(loaded.to_bytes())
    assert again.get_entity_strings() == ["Q17717", "Q123"]


def test_jsonl_round_trip(nlp, picture_dir, tmp_path):
    kb = small_kb(nlp, picture_dir)
    kb.to_jsonl(tmp_path / "entities.jsonl")
    again = MultimodalKB.from_jsonl(nlp.vocab, tmp_path / "entities.jsonl", name_as_alias=False)
    assert again.get_entity("Q17717") == kb.get_entity("Q17717")
    assert again.alias_rows("Robertson") == kb.alias_rows("Robertson")


def test_jsonl_with_relative_images_and_frequency_priors(nlp, picture_dir, tmp_path):
    srsly.write_jsonl(tmp_path / "e.jsonl", [
        {"id": "A", "name": "Jordan", "description": "river", "images": ["item1.png"], "freq": 1, "aliases": ["Jordan"]},
        {"id": "B", "name": "Michael Jordan", "description": "player", "images": ["item2.png"], "freq": 3, "aliases": ["Jordan"]},
    ])
    kb = MultimodalKB.from_jsonl(nlp.vocab, tmp_path / "e.jsonl", image_dir=picture_dir)
    assert kb.alias_rows("jordan") == [(0, 0.25), (1, 0.75)]
    assert kb.images(1) == [str(picture_dir / "item2.png")]
    assert kb.contains_alias("Michael Jordan")


def test_bad_kb_input_names_the_problem(nlp, picture_dir, tmp_path):
    kb = small_kb(nlp, picture_dir)
    with pytest.raises(KBError, match="Duplicate entity id 'Q123'"):
        kb.add_entity("Q123", name="again")
    with pytest.raises(KBError, match="unknown entity id.*Q999"):
        kb.add_alias("Oscar", ["Q999"], [0.5])
    with pytest.raises(KBError, match="sum to at most 1"):
        kb.add_alias("Oscar", ["Q17717", "Q123"], [0.8, 0.4])
    with pytest.raises(KBError, match="reserved"):
        kb.add_entity("NIL", name="nothing")
    with pytest.warns(UserWarning, match="not found"):
        kb.add_entity("Q5", name="Five", images=[tmp_path / "missing.png"])
    assert kb.missing_images == {"Q5": [str(tmp_path / "missing.png")]}
    srsly.write_jsonl(tmp_path / "dup.jsonl", [{"id": "A", "name": "a"}, {"id": "A", "name": "b"}])
    with pytest.raises(KBError, match=r"dup.jsonl, line 2: Duplicate entity id 'A'"):
        MultimodalKB.from_jsonl(nlp.vocab, tmp_path / "dup.jsonl")


def test_damaged_kb_directories_are_refused(nlp, picture_dir, tmp_path):
    kb = small_kb(nlp, picture_dir)
    kb.to_disk(tmp_path / "kb")
    with pytest.raises(KBError, match="not a MultimodalKB directory"):
        MultimodalKB(nlp.vocab).from_disk(tmp_path)
    data = srsly.read_json(tmp_path / "kb" / "kb.json")
    data["entities"][0]["images"] = ["../../etc/passwd"]
    srsly.write_json(tmp_path / "kb" / "kb.json", data)
    with pytest.raises(KBError, match="outside the KB directory"):
        MultimodalKB(nlp.vocab).from_disk(tmp_path / "kb")
    (tmp_path / "kb" / "kb.json").write_text('{"format_version": 1, "entities": [')
    with pytest.raises(KBError, match="not valid JSON"):
        MultimodalKB(nlp.vocab).from_disk(tmp_path / "kb")


def test_interrupted_save_keeps_the_old_directory(nlp, picture_dir, tmp_path, monkeypatch):
    kb = small_kb(nlp, picture_dir)
    kb.to_disk(tmp_path / "kb")
    before = (tmp_path / "kb" / "kb.json").read_text()
    kb.add_entity("Q9", name="Nine")

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("spacy_m3el.kb.directory.write_json", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        kb.to_disk(tmp_path / "kb")
    assert (tmp_path / "kb" / "kb.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["kb"]


def test_from_bytes_directory_lives_as_long_as_the_kb(nlp, picture_dir):
    import gc
    import tempfile
    from pathlib import Path

    data = small_kb(nlp, picture_dir).to_bytes()
    before = set(Path(tempfile.gettempdir()).glob("spacy_m3el_kb_*"))
    kb = MultimodalKB(nlp.vocab).from_bytes(data)
    created = set(Path(tempfile.gettempdir()).glob("spacy_m3el_kb_*")) - before
    assert len(created) == 1 and all(Path(p).is_file() for p in kb.images(0))
    del kb
    gc.collect()
    assert not any(p.exists() for p in created)
    with pytest.raises(KBError):
        MultimodalKB(nlp.vocab).from_bytes(srsly.msgpack_dumps({"kb.json": b"{"}))
    assert set(Path(tempfile.gettempdir()).glob("spacy_m3el_kb_*")) == before


def test_numbers_are_validated(nlp):
    kb = MultimodalKB(nlp.vocab)
    with pytest.raises(KBError, match="finite"):
        kb.add_entity("A", name="a", freq=float("nan"))
    kb.add_entity("A", name="a")
    with pytest.raises(KBError, match="prior probabilities"):
        kb.add_alias("a", ["A"], [float("nan")])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("entities"), "'entities' must be a list"),
        (lambda d: d["entities"][0].pop("name"), "entity 'Q17717': field 'name' must be str"),
        (lambda d: d["entities"][1].update(freq="3"), "entity 'Q123': field 'freq' must be int or float"),
        (lambda d: d["entities"][1].update(images=[7]), "entity 'Q123': every image must be a path string"),
        (lambda d: d["aliases"].append(["Robertson"]), "an alias must be"),
        (lambda d: d["aliases"][0].update(priors=["0.5", 0.2]), "an alias must be"),
        (lambda d: d.update(entities=[{"name": "no id"}]), "every entity needs a string 'id'"),
    ],
)
def test_malformed_kb_json_names_the_field(nlp, picture_dir, tmp_path, edit, message):
    small_kb(nlp, picture_dir).to_disk(tmp_path / "kb")
    data = srsly.read_json(tmp_path / "kb" / "kb.json")
    edit(data)
    srsly.write_json(tmp_path / "kb" / "kb.json", data)
    with pytest.raises(KBError, match=message):
        MultimodalKB(nlp.vocab).from_disk(tmp_path / "kb")


def test_kb_json_that_is_a_list_or_nested_too_deeply_is_refused(nlp, tmp_path):
    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "kb.json").write_text("[]")
    with pytest.raises(KBError, match="unsupported format_version"):
        MultimodalKB(nlp.vocab).from_disk(tmp_path / "kb")
    (tmp_path / "kb" / "kb.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(KBError, match="nested too deeply"):
        MultimodalKB(nlp.vocab).from_disk(tmp_path / "kb")
