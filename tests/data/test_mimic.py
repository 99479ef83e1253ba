import json
import shutil

import pytest
import spacy
from spacy.tokens import DocBin
from typer.testing import CliRunner

from spacy_m3el.cli.commands import app
from spacy_m3el.data.mimic import ConversionReport, MIMICCorpus, MIMICFormatError, load_mimic_kb, read_mimic_docs
from spacy_m3el.kb.base import NIL, MultimodalKB


def write_fixture(root, picture_dir):
    """A small dataset written exactly in the MIMIC release format."""
    (root / "mention_image").mkdir(parents=True)
    (root / "kb_image").mkdir()
    for k in (1, 2, 3):
        shutil.copy(picture_dir / f"item{k}.png", root / "kb_image" / f"Q{k}.png")
    # MIMIC converted mention images to .jpg while imgPath keeps the old suffix.
    shutil.copy(picture_dir / "item1_alt.png", root / "mention_image" / "m1.jpg")
    shutil.copy(picture_dir / "item2_alt.png", root / "mention_image" / "m2.png")
    kb = [
        {"id": "Q1", "entity_name": "Oscar%20Robertson", "desc": "American basketball player",
         "image_list": ["Q1.png"], "type": "entity"},
        {"id": "Q2", "entity_name": "Robertson screwdriver", "desc": "A square socket screwdriver",
         "image_list": ["Q2.png", "gone.png"], "type": "entity"},
        {"id": "Q3", "entity_name": "Jordan", "desc": "A river", "image_list": [], "type": "entity"},
    ]
    train = [
        {"id": "t1", "sentence": "Robertson as a member of the Milwaukee Bucks.", "mentions": "Robertson",
         "entities": "Oscar Robertson", "answer": "Q1", "imgPath": "m1.png"},
        {"id": "t2", "sentence": "Use a robertson for these screws.", "mentions": "Robertson",
         "entities": "Robertson screwdriver", "answer": "Q2", "imgPath": "m2.png"},
        {"id": "t3", "sentence": "Nobody knows this one.", "mentions": "Smith", "entities": "x",
         "answer": "Q3", "imgPath": ""},
        {"id": "t4", "sentence": "The Jordan was high in spring.", "mentions": "Jordan", "entities": "x",
         "answer": "nil", "imgPath": "missing.jpg"},
    ]
    (root / "toy_train.json").write_text(json.dumps(train))
    (root / "toy_dev.json").write_text(json.dumps(train[:2]))
    (root / "toy_test.json").write_text(json.dumps(train[1:]))
    (root / "kb_entity.json").write_text(json.dumps(kb))
    (root / "qid2id.json").write_text(json.dumps({"Q1": 0, "Q2": 1, "Q3": 2}))
    return root


@pytest.fixture
def mimic_dir(tmp_path, picture_dir):
    return write_fixture(tmp_path / "toy", picture_dir)


def test_kb_from_mimic(mimic_dir):
    nlp = spacy.blank("en")
    with pytest.warns(UserWarning, match="1 entity image"):
        kb = load_mimic_kb(nlp.vocab, mimic_dir)
    assert kb.get_entity("Q1")["name"] == "Oscar Robertson"  # URL-unquoted
    assert len(kb.images(kb.row("Q2"))) == 1 and kb.missing_images["Q2"][0].endswith("gone.png")
    assert kb.images(kb.row("Q3")) == []
    assert dict(kb.alias_rows("robertson")) == {0: 0.5, 1: 0.5}  # from the train mentions
    assert kb.alias_rows("Oscar Robertson") == [(0, 1.0)]


def test_docs_keep_nil_and_report_unlocated_mentions(mimic_dir):
    from spacy_m3el.data.mimic import ConversionReport

    nlp = spacy.blank("en")
    report = ConversionReport()
    docs = list(read_mimic_docs(nlp, mimic_dir, "train", known_entities={"Q1", "Q2", "Q3"}, report=report))
    assert [d.ents[0].kb_id_ for d in docs] == ["Q1", "Q2", "Q3", NIL]
    assert [d.ents[0].text for d in docs] == ["Robertson", "robertson", "Smith", "Jordan"]
    # A mention that is not in its sentence is kept, after it, as the official code keeps it.
    assert docs[2].text == "Nobody knows this one. (Smith)"
    assert docs[0]._.image == "mention_image/m1.jpg"  # .png in imgPath, .jpg on disk
    assert docs[1]._.image == "mention_image/m2.png"
    assert docs[3]._.image is None
    assert report.unlocated == ["t3"] and report.missing_mention_images == ["t4"] and report.nil == 1
    with pytest.warns(UserWarning, match="1 mention\\(s\\) not found on word boundaries"):
        report.warn("toy")


def test_reader_gives_examples_with_absolute_images(mimic_dir):
    nlp = spacy.blank("en")
    with pytest.warns(UserWarning):
        examples = list(MIMICCorpus(mimic_dir, "train")(nlp))
    assert len(examples) == 4
    assert examples[0].predicted._.image == str(mimic_dir / "mention_image" / "m1.jpg")
    assert [e.text for e in examples[0].predicted.ents] == ["Robertson"]
    assert examples[0].predicted.ents[0].kb_id_ == ""  # the gold id stays on the reference


def test_malformed_files_are_named(tmp_path):
    (tmp_path / "kb_entity.json").write_text("[{")
    (tmp_path / "x_train.json").write_text("[]")
    with pytest.raises(MIMICFormatError, match="kb_entity.json is not valid JSON"):
        load_mimic_kb(spacy.blank("en").vocab, tmp_path)
    with pytest.raises(MIMICFormatError, match=r"Expected one '\*_dev.json'"):
        MIMICCorpus(tmp_path, "dev")


def test_convert_command_writes_docbins_and_kb(mimic_dir, tmp_path):
    result = CliRunner().invoke(app, ["convert-mimic", str(mimic_dir), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    nlp = spacy.blank("en")
    docs = list(DocBin().from_disk(tmp_path / "out" / "train.spacy").get_docs(nlp.vocab))
    assert len(docs) == 4 and docs[0]._.image == "mention_image/m1.jpg"
    kb = MultimodalKB(nlp.vocab).from_disk(tmp_path / "out" / "kb")
    assert kb.get_size_entities() == 3
    summary = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert summary["splits"]["train"] == {"mentions": 4, "nil": 1, "unlocated": 1, "unknown_answers": 0,
                                          "missing_mention_images": 1, "aligned_to_tokens": 0,
                                          "unaligned_skipped": 0, "malformed_skipped": 0, "alignment_examples": []}


def write_release_layout(root, picture_dir):
    """As the releases lay it out: kb_entity ids are row numbers, answers are
    QIDs, qid2id.json maps one to the other; descriptions may be 'attr'."""
    write_fixture(root, picture_dir)
    kb = json.loads((root / "kb_entity.json").read_text())
    for position, record in enumerate(kb):
        record["id"] = position
    kb[1]["attr"] = kb[1].pop("desc")
    del kb[2]["desc"]
    (root / "kb_entity.json").write_text(json.dumps(kb))
    return root


def test_release_layout_maps_answers_through_qid2id(tmp_path, picture_dir):
    root = write_release_layout(tmp_path / "release", picture_dir)
    nlp = spacy.blank("en")
    with pytest.warns(UserWarning, match="1 of 3 entities have no description"):
        kb = load_mimic_kb(nlp.vocab, root)
    assert kb.entity_ids == ["Q1", "Q2", "Q3"]
    assert kb.get_entity("Q2")["description"] == "A square socket screwdriver"  # from 'attr'
    report = ConversionReport()
    docs = list(read_mimic_docs(nlp, root, "train", known_entities=kb.entity_ids, report=report))
    assert [d.ents[0].kb_id_ for d in docs] == ["Q1", "Q2", "Q3", NIL] and not report.unknown_answers
    result = CliRunner().invoke(app, ["convert-mimic", str(root), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output


def test_converter_refuses_data_whose_answers_are_mostly_unknown(tmp_path, picture_dir):
    root = write_release_layout(tmp_path / "release", picture_dir)
    (root / "qid2id.json").unlink()  # the answers (QIDs) now name no entity
    result = CliRunner().invoke(app, ["convert-mimic", str(root), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "answers are not entities of kb_entity.json" in result.output and "qid2id.json" in result.output


def test_malformed_samples_and_entities_are_skipped_with_a_count(mimic_dir, tmp_path):
    """Rows of the wrong shape or type are skipped and counted, the run goes on;
    a duplicate entity id keeps its first record; an 'image_list' that is a
    single name is read as one picture."""
    kb = json.loads((mimic_dir / "kb_entity.json").read_text())
    kb[2]["image_list"] = "Q2.png"
    kb.append({"id": "Q1", "entity_name": "Another Oscar", "desc": "a repeat"})
    kb.append("not an entity")
    (mimic_dir / "kb_entity.json").write_text(json.dumps(kb))
    train = json.loads((mimic_dir / "toy_train.json").read_text())
    train += [{"id": "bad-mention", "sentence": "In 1984 it rained.", "mentions": 1984, "answer": "Q1"},
              {"id": "bad-sentence", "sentence": None, "mentions": "Jordan", "answer": "Q3"},
              {"id": "no-answer", "sentence": "Jordan flows.", "mentions": "Jordan"},
              ["a", "list"],
              {"id": "odd-picture", "sentence": "Jordan flows.", "mentions": "Jordan", "answer": "Q3",
               "imgPath": ["m1.png"]}]
    (mimic_dir / "toy_train.json").write_text(json.dumps(train))
    with pytest.warns(UserWarning) as caught:
        kb_read = load_mimic_kb(spacy.blank("en").vocab, mimic_dir)
    messages = " ".join(str(w.message) for w in caught)
    assert "1 of 5 malformed record(s) skipped" in messages and "entry 4" in messages
    assert "1 record(s) repeat an entity id already read, e.g. ['Q1']" in messages
    assert "'image_list' that is not a list of file names, e.g. ['Q3']" in messages
    assert kb_read.get_entity("Q1")["name"] == "Oscar Robertson" and len(kb_read.images(kb_read.row("Q3"))) == 1
    report = ConversionReport()
    docs = list(read_mimic_docs(spacy.blank("en"), mimic_dir, "train", known_entities=kb_read.entity_ids,
                                report=report))
    assert len(docs) == 5 and docs[-1].user_data["mimic_id"] == "odd-picture" and docs[-1]._.image is None
    assert report.malformed == [("id bad-mention", "'mentions' is int, not a string"),
                                ("id bad-sentence", "'sentence' is NoneType, not a string"),
                                ("id no-answer", "no 'answer'"), ("entry 7", "not an object but list")]
    assert "odd-picture" in report.missing_mention_images
    result = CliRunner().invoke(app, ["convert-mimic", str(mimic_dir), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "4 malformed sample(s) skipped" in result.output
    summary = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert summary["splits"]["train"]["mentions"] == 5 and summary["splits"]["train"]["malformed_skipped"] == 4


def test_mostly_malformed_inputs_are_refused(mimic_dir, tmp_path):
    train = [{"id": f"s{i}", "sentence": None, "mentions": "Jordan", "answer": "Q3"} for i in range(3)]
    (mimic_dir / "toy_train.json").write_text(json.dumps(train + [{"id": "ok", "sentence": "Jordan flows.",
                                                                    "mentions": "Jordan", "answer": "Q3"}]))
    result = CliRunner().invoke(app, ["convert-mimic", str(mimic_dir), str(tmp_path / "out")])
    assert result.exit_code == 1 and "3 of 4 samples are malformed" in result.output, result.output
    assert "Traceback" not in result.output
    with pytest.raises(MIMICFormatError, match="3 of 4 samples are malformed"):
        list(MIMICCorpus(mimic_dir, "train")(spacy.blank("en")))
    (mimic_dir / "kb_entity.json").write_text(json.dumps([{"id": "Q1"}, {"entity_name": "x"}, []]))
    result = CliRunner().invoke(app, ["convert-mimic", str(mimic_dir), str(tmp_path / "out2")])
    assert result.exit_code == 1 and "3 of 3 entries are malformed" in result.output


@pytest.mark.parametrize(
    "sentence, mention, found",
    [("Léonie Léon sang.", "Léon", "Léon"), ("The Russian envoy left Russia.", "Russia", "Russia"),
     ("russia and RUSSIA", "Russia", "russia"), ("Only Russians here.", "Russia", None),
     ("Hermann von Beckerath painted.", "Hermann Beckerath", None), ("Cafe\u0301 Noir", "Caf\u00e9", None)],
)
def test_mentions_are_located_on_word_boundaries(sentence, mention, found):
    from spacy_m3el.data.mimic import locate_mention

    offsets = locate_mention(sentence, mention)
    assert (sentence[slice(*offsets)] if offsets else None) == found


def test_a_mention_that_lacks_a_space_of_its_sentence_is_found():
    from spacy_m3el.data.mimic import locate_mention

    sentence = "They met in Washington, D.C. last year."
    assert sentence[slice(*locate_mention(sentence, "Washington,D.C"))] == "Washington, D.C"
    assert sentence[slice(*locate_mention(sentence, " Washington, D.C "))] == "Washington, D.C"
    assert locate_mention(sentence, "   ") is None


QUIRKS = [  # (sentence, mention as the releases write it, the aligned mention)
    ("Protesters gathered in Washington D.C. on Monday.", "Washington D.C", "Washington D.C."),
    ("A speech by Martin Luther King Jr. moved the crowd.", "King Jr", "King Jr."),
    ("Portrait of George Washington by Gilbert Stuart.", " George Washington", "George Washington"),
    ("They met in Washington, D.C. last year.", "Washington,D.C", "Washington, D.C."),
]


def write_quirks_release(root, picture_dir):
    """The release layout (lists in PREFIX_split.json, QID answers through
    qid2id.json) with the mention quirks of the public releases, and one
    mention that no token can hold (empty)."""
    write_release_layout(root, picture_dir)
    samples = [{"id": f"q{i}", "sentence": sentence, "mentions": mention, "entities": "x",
                "answer": ("Q1", "Q2", "Q1", "Q2")[i], "imgPath": ("m1.png", "m2.png")[i % 2]}
               for i, (sentence, mention, _) in enumerate(QUIRKS)]
    samples.append({"id": "q-empty", "sentence": "Nothing to see.", "mentions": "  ", "entities": "x",
                    "answer": "Q1", "imgPath": "m1.png"})
    for split in ("train", "dev", "test"):
        (root / f"toy_{split}.json").write_text(json.dumps(samples))
    return root


def test_release_quirks_convert_read_train_and_evaluate(tmp_path, picture_dir):
    """Mentions that cut tokens, carry a leading space or lack a space go
    through convert -> reader -> one training step -> evaluate, aligned and
    reported; the empty one is skipped with a count."""
    root = write_quirks_release(tmp_path / "release", picture_dir)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["convert-mimic", str(root), str(out)])
    assert result.exit_code == 0, result.output
    assert "3 of 5 mention(s) did not fall on token boundaries" in result.output
    assert "1 of 5 mention(s) could not be aligned" in result.output and "id q-empty" in result.output
    summary = json.loads((out / "conversion.json").read_text())["splits"]["test"]
    assert summary["mentions"] == 4 and summary["aligned_to_tokens"] == 3 and summary["unaligned_skipped"] == 1
    nlp = spacy.blank("en")
    docs = list(DocBin().from_disk(out / "train.spacy").get_docs(nlp.vocab))
    assert [d.ents[0].text for d in docs] == [aligned for _, _, aligned in QUIRKS]
    assert [d.ents[0].kb_id_ for d in docs] == ["Q1", "Q2", "Q1", "Q2"]
    # The original offsets are recoverable, and the pipeline reproduces the stored tokens.
    assert docs[0].text[slice(*docs[0].ents[0]._.m3el_original_chars)] == "Washington D.C"
    assert all([t.text for t in d] == [t.text for t in nlp.make_doc(d.text)] for d in docs)

    from spacy_m3el.data.readers import MultimodalCorpus

    linker = nlp.add_pipe("m3el_linker", config={"n_candidates": 2})
    linker.set_kb(lambda vocab: MultimodalKB(vocab).from_disk(out / "kb"))
    examples = list(MultimodalCorpus(out / "train.spacy", image_dir=root)(nlp))
    assert [eg.predicted.ents[0].text for eg in examples] == [aligned for _, _, aligned in QUIRKS]
    optimizer = nlp.initialize(lambda: examples)
    losses = nlp.update(examples, sgd=optimizer)
    assert losses["m3el_linker"] > 0
    nlp.to_disk(tmp_path / "pipeline")
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "pipeline"), str(out / "test.spacy"),
                                      "--image-dir", str(root), "--output", str(tmp_path / "m.json"),
                                      "--pictures", "all"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["m3el_n_mentions"] == 4 and set(metrics["pictures"]) == {"given", "none", "half", "shuffled"}
    assert all(figures["m3el_n_mentions"] == 4 for figures in metrics["pictures"].values())
