"""Numbers a user can trust: the exhaustive protocol, and spaCy's own
``evaluate`` giving either our numbers or a clear failure."""
import json
import subprocess
import sys

import pytest
import spacy
from spacy.tokens import DocBin
from typer.testing import CliRunner

from spacy_m3el.cli.commands import app
from tests.pipeline.test_linker import make_docs, train_pipeline


@pytest.fixture(scope="module")
def saved(picture_dir, tmp_path_factory):
    """A trained pipeline on disk, and its training docs as a DocBin."""
    folder = tmp_path_factory.mktemp("evaluation")
    nlp, _ = train_pipeline(picture_dir, epochs=10)
    nlp.to_disk(folder / "pipeline")
    DocBin(docs=make_docs(nlp, picture_dir), store_user_data=True).to_disk(folder / "data.spacy")
    return folder


def evaluate(*args):
    result = CliRunner().invoke(app, ["evaluate", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def test_two_stage_over_the_whole_kb_agrees_with_the_exhaustive_protocol(saved):
    evaluate(saved / "pipeline", saved / "data.spacy", "--protocol", "both", "--output", saved / "both.json")
    metrics = json.loads((saved / "both.json").read_text())
    # 20 entities, 64 candidates, exact cache: the two rankings are the same.
    assert metrics["top1_agreement"] == 1.0
    for key in ("m3el_hits1", "m3el_hits3", "m3el_mrr", "m3el_n_mentions"):
        assert metrics["exhaustive"][key] == pytest.approx(metrics[key]), key
    assert metrics["m3el_n_mentions"] == 40 and metrics["m3el_hits1"] > 0.3


def test_exhaustive_protocol_ranks_beyond_the_candidates(saved):
    nlp = spacy.load(saved / "pipeline", config={"components.m3el_linker.n_candidates": 2,
                                                   "components.m3el_linker.use_alias_candidates": False,
                                                   "components.m3el_linker.score_protocol": "exhaustive"})
    from spacy_m3el.data.readers import MultimodalCorpus

    examples = list(MultimodalCorpus(saved / "data.spacy")(nlp))
    scores = nlp.evaluate(examples)
    # Every gold entity has a rank among all 20 entities: Hits@20 is 1 whatever K is.
    assert scores["m3el_hits20"] == 1.0 and 0.0 <= scores["m3el_top1_agreement"] <= 1.0
    assert nlp.get_pipe("m3el_linker").exact_entity_index() is nlp.get_pipe("m3el_linker").entity_index


def test_spacy_evaluate_fails_loudly_instead_of_printing_zeros(saved):
    out = subprocess.run([sys.executable, "-m", "spacy", "evaluate", str(saved / "pipeline"),
                          str(saved / "data.spacy")], capture_output=True, text=True)
    assert out.returncode != 0
    assert "has entity spans" in out.stderr and "spacy_m3el evaluate" in out.stderr


def test_spacy_evaluate_with_an_entity_ruler(saved, tmp_path):
    nlp = spacy.load(saved / "pipeline")
    ruler = nlp.add_pipe("entity_ruler", before="m3el_linker")
    ruler.add_patterns([{"label": "THING", "pattern": "item"}])
    nlp.to_disk(tmp_path / "ruled")
    # With images in the data, spaCy's reader would link on text alone: refused.
    out = subprocess.run([sys.executable, "-m", "spacy", "evaluate", str(tmp_path / "ruled"),
                          str(saved / "data.spacy")], capture_output=True, text=True)
    assert out.returncode != 0 and "lost the image" in out.stderr
    # Without images, it is a fair evaluation and gives our numbers.
    docs = list(DocBin().from_disk(saved / "data.spacy").get_docs(nlp.vocab))
    for doc in docs:
        doc._.image = None
    DocBin(docs=docs, store_user_data=True).to_disk(tmp_path / "text.spacy")
    out = subprocess.run([sys.executable, "-m", "spacy", "evaluate", str(tmp_path / "ruled"),
                          str(tmp_path / "text.spacy"), "--output", str(tmp_path / "spacy.json")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    theirs = json.loads((tmp_path / "spacy.json").read_text())
    evaluate(tmp_path / "ruled", tmp_path / "text.spacy", "--output", tmp_path / "ours.json")
    ours = json.loads((tmp_path / "ours.json").read_text())
    assert theirs["nel_micro_f"] == pytest.approx(ours["nel_micro_f"])


@pytest.mark.parametrize("label", ["ENTITY", "THING"])
def test_end_to_end_scores_mentions_by_offsets_whatever_their_label(saved, tmp_path, label):
    import warnings

    nlp = spacy.load(saved / "pipeline")
    nlp.add_pipe("entity_ruler", before="m3el_linker").add_patterns([{"label": label, "pattern": "item"}])
    nlp.to_disk(tmp_path / "ruled")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(tmp_path / "ruled", saved / "data.spacy", "--output", tmp_path / "m.json")
    said = [str(w.message) for w in caught if "end to end" in str(w.message)]
    end_to_end = json.loads((tmp_path / "m.json").read_text())["end_to_end"]
    # Gold mentions are the word "item", labelled THING: the ruler finds every one of them.
    assert end_to_end["mentions_p"] == end_to_end["mentions_r"] == 1.0
    assert end_to_end["nel_micro_f"] > 0.0
    if label == "THING":
        assert said == [] and end_to_end["ents_f"] == 1.0
    else:
        assert len(said) == 1 and "labels its mentions ['ENTITY']" in said[0] and "['THING']" in said[0]
        assert end_to_end["ents_f"] is None
