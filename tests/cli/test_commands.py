"""The command line on the user's path: build a KB, link JSONL rows with
images (bad rows reported, the job goes on), make raw text linkable, view."""
import json
import re
import subprocess
import sys

import pytest
import spacy
from spacy.language import Language
from typer.testing import CliRunner

from spacy_m3el import KBError, MultimodalKB
from spacy_m3el.cli.commands import app
from tests.pipeline.test_linker import train_pipeline


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def linker_dir(picture_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    nlp, _ = train_pipeline(picture_dir, epochs=10)
    nlp.to_disk(folder / "pipeline")
    run("add-alias-ruler", folder / "pipeline", folder / "ruled")
    return folder


def test_build_kb_from_jsonl_and_csv(picture_dir, tmp_path):
    (tmp_path / "e.jsonl").write_text(
        '{"id": "A", "name": "Jordan", "description": "river", "images": ["item1.png"], "freq": 1}\n'
        '{"id": "B", "name": "Michael Jordan", "images": ["item2.png", "gone.png"], "freq": 3, "aliases": ["Jordan"]}\n')
    result = run("build-kb", tmp_path / "e.jsonl", tmp_path / "kb_jsonl", "--image-dir", picture_dir)
    assert "1 image file(s) of 1 entities not found" in result.output
    kb = MultimodalKB(spacy.blank("en").vocab).from_disk(tmp_path / "kb_jsonl")
    assert kb.entity_ids == ["A", "B"] and kb.alias_rows("jordan") == [(0, 0.25), (1, 0.75)]
    (tmp_path / "e.csv").write_text("id,name,description,images,freq,aliases\n"
                                    "A,Jordan,river,item1.png,1,\nB,Michael Jordan,,item2.png;item3.png,3,Jordan;MJ\n")
    run("build-kb", tmp_path / "e.csv", tmp_path / "kb_csv", "--image-dir", picture_dir)
    kb = MultimodalKB(spacy.blank("en").vocab).from_disk(tmp_path / "kb_csv")
    assert len(kb.images(1)) == 2 and kb.alias_rows("mj") == [(1, 1.0)] and kb.get_entity("B")["freq"] == 3.0
    (tmp_path / "bad.csv").write_text("name\nJordan\n")
    result = CliRunner().invoke(app, ["build-kb", str(tmp_path / "bad.csv"), str(tmp_path / "kb_bad")])
    assert result.exit_code != 0 and "'id'" in str(result.exception)


def test_build_kb_with_a_pipeline_writes_its_cache_and_index(linker_dir, picture_dir, tmp_path):
    rows = [{"id": f"N{i}", "name": f"new item {i}", "description": "a picture", "images": [f"item{i}.png"]}
            for i in range(6)]
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run("build-kb", tmp_path / "e.jsonl", tmp_path / "kb", "--image-dir", picture_dir,
                 "--pipeline", linker_dir / "pipeline", "--ann-index", "IVF2,Flat")
    output = " ".join(result.output.split())  # wasabi wraps long lines
    assert "6 entities encoded" in output and "ANN index IVF2,Flat: recall@" in output
    assert (tmp_path / "kb" / "index" / "ann.faiss").is_file() and (tmp_path / "kb" / "index" / "meta.json").is_file()
    assert not (tmp_path / ".kb.cache-build").exists()  # the shards are gone once the KB is written
    from spacy_m3el.index.entity_index import saved_index
    from spacy_m3el.kb.base import create_kb_loader
    from spacy_m3el.pipeline.linker import find_linker

    nlp = spacy.load(linker_dir / "pipeline")
    linker = find_linker(nlp)
    linker.set_kb(create_kb_loader(tmp_path / "kb"))
    saved = saved_index([tmp_path / "kb" / "index"], n_entities=len(linker.kb))
    linker.index_keeper.adopt(linker.kb, saved)
    assert linker.entity_index is saved  # valid for this pipeline's weights: used as it is
    other = find_linker(spacy.load(linker_dir / "pipeline"))
    with pytest.raises(KBError, match="built for another KB"):  # the pipeline's own KB is another one
        other.index_keeper.adopt(other.kb, saved)


def test_build_cache_resumes_a_killed_build(linker_dir, tmp_path):
    from spacy_m3el.index.streamed import BUILD_META

    work = tmp_path / ".out.cache-build"
    work.mkdir()
    (work / BUILD_META).write_text('{"identity": {"fingerprint": "another"}, "done": false}')
    result = CliRunner().invoke(app, ["build-cache", str(linker_dir / "pipeline"), str(tmp_path / "out")])
    assert result.exit_code != 0 and "holds an index build of another KB, model or settings" in str(result.exception)
    (work / BUILD_META).unlink()
    work.rmdir()
    run("build-cache", linker_dir / "pipeline", tmp_path / "out")
    assert (tmp_path / "out" / "m3el_linker" / "index" / "meta.json").is_file() and not work.exists()


def test_link_writes_rows_and_reports_bad_ones(linker_dir, picture_dir, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    rows = [
        {"id": "ok-1", "text": "They showed me the item at the fair.", "image": str(picture_dir / "item7_alt.png")},
        "this line is not JSON",
        {"id": "no-text", "image": "x.png"},
        {"id": "gone", "text": "The item again.", "image": "missing.png"},
        {"id": "given-span", "text": "Look at the item.", "spans": [[12, 16, "THING"]],
         "image": str(picture_dir / "item3_alt.png")},
        {"id": "cut-span", "text": "Look at the item.", "spans": [[13, 16, "THING"]]},
        {"id": "off-span", "text": "Look at the item.", "spans": [[12, 16, "THING"], [40, 44, "THING"]]},
        {"id": "undecodable", "text": "Another item here.", "image": "broken.png"},
        {"id": "url", "text": "An item online.", "image": "https://example.com/item.png"},
    ]
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    run("link", linker_dir / "ruled", tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["id"] for row in out] == ["ok-1", "given-span", "cut-span", "off-span", "undecodable", "url"]
    # A span that cuts a token is aligned to it, its original offsets kept; one outside the text is left out.
    cut = out[2]["ents"][0]
    assert (cut["start"], cut["end"], cut["text"], cut["original"]) == (12, 16, "item", [13, 16])
    assert [e["text"] for e in out[3]["ents"]] == ["item"] and "original" not in out[3]["ents"][0]
    first = out[0]["ents"][0]
    assert first["text"] == "item" and first["kb_id"].startswith("E") and first["modalities"] == ["text", "image"]
    assert len(first["candidates"]) == 5 and first["candidates"][0]["id"] == first["kb_id"]
    assert out[4]["ents"][0]["modalities"] == ["text"]
    errors = {e["id"] or e["line"]: e["error"]
              for e in map(json.loads, (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines())}
    assert "not valid JSON" in errors[2] and "'text' must be a string" in errors["no-text"]
    assert "missing.png' not found" in errors["gone"] and "outside the text" in errors["off-span"]
    assert "cut-span" not in errors
    assert "linked on text alone" in errors["undecodable"]
    # An image URL is not fetched (nothing is, by default): the row is linked on its text and says why.
    assert out[5]["ents"][0]["modalities"] == ["text"] and "allow_image_urls" in errors["url"]
    # Two worker processes give the same rows (scores up to float rounding across batch sizes).
    run("link", linker_dir / "ruled", tmp_path / "in.jsonl", tmp_path / "out2.jsonl", "--n-process", 2,
        "--batch-size", 2)
    again = [json.loads(line) for line in (tmp_path / "out2.jsonl").read_text().splitlines()]
    assert [[e["kb_id"] for e in row["ents"]] for row in again] == [[e["kb_id"] for e in row["ents"]] for row in out]
    assert [e["score"] for row in again for e in row["ents"]] == pytest.approx(
        [e["score"] for row in out for e in row["ents"]], rel=1e-5)


def test_raw_text_links_through_the_alias_ruler(linker_dir, picture_dir):
    from spacy_m3el import make_doc

    nlp = spacy.load(linker_dir / "ruled")
    assert nlp.pipe_names == ["alias_ruler", "m3el_linker"]
    doc = nlp(make_doc(nlp, "They showed me the ITEM at the fair.", str(picture_dir / "item7_alt.png")))
    assert [(e.text, e.label_) for e in doc.ents] == [("ITEM", "ENTITY")]
    assert doc.ents[0].kb_id_.startswith("E") and doc.ents[0]._.m3el_modalities == ["text", "image"]
    with pytest.warns(UserWarning, match="1 of 1 mentions have no image"):
        text_only = nlp("Just the item, no picture.")
    assert text_only.ents[0]._.m3el_modalities == ["text"]


def test_visualize_writes_a_self_contained_page(linker_dir, picture_dir, tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps(
        {"id": 1, "text": "They showed me the item at the fair.", "image": str(picture_dir / "item2_alt.png")}) + "\n")
    run("visualize", linker_dir / "ruled", tmp_path / "in.jsonl", "--output", tmp_path / "page.html")
    page = (tmp_path / "page.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and len(re.findall(r'class="m3el-cand( best)?"', page)) == 5
    assert "http" not in page.replace("http-equiv", "") and page.count("data:image/jpeg;base64,") == 6


def test_commands_run_under_spacys_cli():
    out = subprocess.run([sys.executable, "-m", "spacy", "m3el", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for command in ("link", "build-kb", "evaluate", "visualize", "add-alias-ruler", "convert-mimic"):
        assert command in out.stdout


@pytest.mark.parametrize("command", ["link", "build-cache"])
def test_help_names_the_extra_to_install(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "pip install 'spacy-m3el[ray]'" in result.output


def test_calibrate_fits_on_held_out_data_and_saves(linker_dir, picture_dir, tmp_path):
    import math

    from spacy.tokens import DocBin

    from spacy_m3el.pipeline.linker import find_linker
    from tests.pipeline.test_linker import make_docs, nil_examples

    nlp = spacy.blank("en")
    docs = make_docs(nlp, picture_dir) + [eg.reference for eg in nil_examples(nlp, picture_dir)]
    DocBin(docs=docs, store_user_data=True).to_disk(tmp_path / "dev.spacy")
    result = run("calibrate", linker_dir / "pipeline", tmp_path / "dev.spacy", tmp_path / "calibrated")
    assert re.search(r"nil_mentions\s+8", result.output) and re.search(r"nil_option\s+True", result.output)
    # Fitted on each mention with its picture, without and shuffled; figures out of fold per condition.
    assert re.search(r"mentions\s+48", result.output) and re.search(r"fitted_on\s+144", result.output)
    assert re.search(r"after \(held out: 5-fold[^)]*\)\s+[01]\.\d+", result.output) and re.search(r"\nshuffled\s+[01]\.\d+", result.output)
    assert "weigh the picture conditions given 0.60, none 0.20, shuffled 0.20" in " ".join(result.output.split())
    assert re.search(r"NIL threshold tried: [01]\.\d+ \(out of fold it turned \d+ answers right", result.output)
    assert "Confidence map (answer probability -> share right out of fold): 0." in " ".join(result.output.split())
    scorer = find_linker(spacy.load(tmp_path / "calibrated")).network.scorer
    assert not math.isnan(float(scorer.fitted_threshold)) and not math.isnan(float(scorer.confidence_x[0]))
    result = run("evaluate", tmp_path / "calibrated", tmp_path / "dev.spacy", "--output", tmp_path / "m.json")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["m3el_n_nil"] == 8 and 0.0 <= metrics["m3el_ece"] <= 1.0 and metrics["m3el_nil_r"] > 0.5


def test_evaluate_and_calibrate_stop_when_the_pictures_are_not_where_the_corpus_says(linker_dir, picture_dir,
                                                                                       tmp_path):
    from spacy.tokens import DocBin

    from tests.pipeline.test_linker import make_docs

    docs = make_docs(spacy.blank("en"), picture_dir)[:4]
    for doc in docs:
        doc._.image = doc._.image.rsplit("/", 1)[-1]  # relative, as converted corpora store them
    DocBin(docs=docs, store_user_data=True).to_disk(tmp_path / "rel.spacy")
    for command in ("evaluate", "calibrate"):
        args = [command, str(linker_dir / "pipeline"), str(tmp_path / "rel.spacy")]
        args += [str(tmp_path / "out")] if command == "calibrate" else []
        result = CliRunner().invoke(app, args)
        said = " ".join(result.output.split())
        assert result.exit_code == 1 and "2 of 2 pictures of" in said and "'item0_alt.png'" in said, said
        assert "give --image-dir" in said and "Traceback" not in said
        result = CliRunner().invoke(app, args + ["--image-dir", str(tmp_path)])
        assert result.exit_code == 1 and "check --image-dir" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["evaluate", str(linker_dir / "pipeline"), str(tmp_path / "rel.spacy"),
                                      "--image-dir", str(picture_dir)])
    assert result.exit_code == 0, result.output


def test_swap_kb_links_against_your_own_kb_in_one_command(linker_dir, picture_dir, tmp_path):
    from spacy_m3el import make_doc
    from spacy_m3el.pipeline.linker import find_linker

    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(
        {"id": f"G{k}", "name": f"Gadget {k}", "description": "A gadget.", "images": [f"item{k}.png"],
         "aliases": ["gadget"]}) + "\n" for k in (3, 5, 7)))
    run("build-kb", tmp_path / "mine.jsonl", tmp_path / "kb_cached", "--image-dir", picture_dir,
        "--pipeline", linker_dir / "ruled")
    run("build-kb", tmp_path / "mine.jsonl", tmp_path / "kb_plain", "--image-dir", picture_dir)
    reused = run("swap-kb", linker_dir / "ruled", tmp_path / "kb_cached", tmp_path / "swapped")
    assert "Entity index in" in reused.output and "reused" in reused.output
    encoded = run("swap-kb", linker_dir / "ruled", tmp_path / "kb_plain", tmp_path / "swapped2")
    assert "reused" not in encoded.output and "3 entities encoded" in encoded.output
    links = []
    for folder in ("swapped", "swapped2"):
        nlp = spacy.load(tmp_path / folder)
        assert sorted(find_linker(nlp).kb.entity_ids) == ["G3", "G5", "G7"]
        # The alias ruler follows the KB: the old alias is gone, the new one marks mentions.
        patterns = sorted(p["pattern"] for p in nlp.get_pipe("alias_ruler").patterns)
        assert patterns == ["Gadget 3", "Gadget 5", "Gadget 7", "gadget"]
        doc = nlp(make_doc(nlp, "They showed me the gadget and the item.", str(picture_dir / "item5_alt.png")))
        assert [e.text for e in doc.ents] == ["gadget"]
        links.append([(c["id"], round(c["score"], 4)) for c in doc.ents[0]._.m3el_candidates])
    assert links[0] == links[1] and {c for c, _ in links[0]} == {"G3", "G5", "G7"}


def test_add_alias_ruler_twice_needs_replace(linker_dir, tmp_path):
    result = CliRunner().invoke(app, ["add-alias-ruler", str(linker_dir / "ruled"), str(tmp_path / "again")])
    assert result.exit_code == 1 and "already has a component named 'alias_ruler'" in result.output
    assert "--replace" in result.output and not (tmp_path / "again").exists()
    run("add-alias-ruler", linker_dir / "ruled", tmp_path / "again", "--replace", "--label", "THING")
    nlp = spacy.load(tmp_path / "again")
    assert nlp.pipe_names == ["alias_ruler", "m3el_linker"]
    assert {p["label"] for p in nlp.get_pipe("alias_ruler").patterns} == {"THING"}


def test_link_progress_counts_every_row_once_in_a_log(linker_dir, picture_dir, tmp_path, monkeypatch):
    from spacy_m3el import progress

    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)
    monkeypatch.delenv(progress.MODE_VARIABLE, raising=False)
    good = {"text": "They showed me the item.", "image": str(picture_dir / "item1_alt.png")}
    (tmp_path / "in.jsonl").write_text("\n".join([json.dumps({"id": 1, **good}), "{not json", json.dumps(
        {"id": 3, **good, "spans": 5}), json.dumps({"id": 4, **good})]) + "\n")
    result = run("link", linker_dir / "ruled", tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    lines = [line for line in result.output.splitlines() if line.startswith("Linking: ")]
    assert lines and lines[-1].startswith("Linking: 4/4 (100%)") and "\r" not in result.output
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2
    errors = [json.loads(line) for line in (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["skipped"]) for e in errors] == [(2, True), (3, True)]


@Language.component("fails_on_boom_for_tests")
def fails_on_boom(doc):
    if "BOOM" in doc.text:
        raise RuntimeError("this component cannot read BOOM")
    return doc


@pytest.mark.parametrize("n_process", [1, 2])
def test_link_never_loses_a_good_row(linker_dir, picture_dir, tmp_path, n_process):
    nlp = spacy.load(linker_dir / "ruled")
    nlp.add_pipe("fails_on_boom_for_tests", first=True)
    nlp.to_disk(tmp_path / "fragile")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    picture = str(picture_dir / "item2_alt.png")
    rows = [{"id": "good-1", "text": "The item.", "image": picture},
            {"id": "spans-int", "text": "The item.", "spans": 5},
            {"id": "spans-shape", "text": "The item.", "spans": [[4]]},
            {"id": "spans-nested", "text": "The item.", "spans": [{"start": 4}]},
            {"id": "image-type", "text": "The item.", "image": 42},
            [1, 2, 3],
            {"id": "boom", "text": "BOOM goes the item.", "image": picture},
            {"id": "good-2", "text": "One more item.", "image": picture},
            {"id": "unreadable-1", "text": "An item.", "image": "broken.png"},
            {"id": "good-3", "text": "The item, last.", "image": picture},
            {"id": "unreadable-2", "text": "An item again.", "image": "broken.png"}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    # Batches of 4: the failing row shares its batch with good ones.
    result = run("link", tmp_path / "fragile", tmp_path / "in.jsonl", tmp_path / "out.jsonl",
                 "--batch-size", 4, "--n-process", n_process)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(row["id"] for row in out) == ["good-1", "good-2", "good-3", "unreadable-1", "unreadable-2"]
    assert all(row["ents"][0]["kb_id"].startswith("E") for row in out)
    errors = {e["line"]: e for e in map(json.loads, (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines())}
    assert sorted(errors) == [2, 3, 4, 5, 6, 7, 9, 11]
    assert "'spans' must be a list" in errors[2]["error"] and "a span must be [start, end]" in errors[3]["error"]
    assert "a span must be [start, end]" in errors[4]["error"] and "'image' must be a path" in errors[5]["error"]
    assert errors[6]["error"] == "a row must be a JSON object"
    assert errors[7]["id"] == "boom" and "cannot read BOOM" in errors[7]["error"] and errors[7]["skipped"]
    assert [errors[n]["skipped"] for n in (9, 11)] == [False, False]
    # Counted over every worker process, not the parent's linker alone.
    assert "6 left out, 2 linked on text alone (image unreadable)" in result.output.replace("\n", " ")


def test_visualize_skips_the_rows_link_would_skip_with_the_same_messages(linker_dir, picture_dir, tmp_path):
    picture = str(picture_dir / "item2_alt.png")
    (tmp_path / "in.jsonl").write_text("\n".join([
        json.dumps({"id": 1, "text": "They showed me the item.", "image": picture}), "{not json",
        json.dumps({"id": 3, "text": "The item.", "spans": 5}), json.dumps({"id": 4, "text": 7})]) + "\n")
    result = run("visualize", linker_dir / "ruled", tmp_path / "in.jsonl", "--output", tmp_path / "page.html")
    output = result.output.replace("\n", " ")
    assert "line 2: not valid JSON" in output and "line 3: 'spans' must be a list" in output
    assert "line 4: 'text' must be a string" in output and "1 docs ->" in output
