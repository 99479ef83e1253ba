"""Every shipped config builds a pipeline; the paper configs follow the
official runs per dataset."""
import re
from pathlib import Path

import pytest
from spacy.util import load_config, load_model_from_config

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.cfg")))
def test_config_builds(name, tiny_clip_dir, tmp_path):
    from spacy.tokens import DocBin

    DocBin().to_disk(tmp_path / "empty.spacy")
    overrides = {"paths.train": str(tmp_path / "empty.spacy"), "paths.dev": str(tmp_path / "empty.spacy"),
                 "paths.kb": str(tmp_path / "no_kb_yet")}
    if "paths.clip" in (CONFIGS / name).read_text():
        overrides["paths.clip"] = str(tiny_clip_dir)
    config = load_config(CONFIGS / name, overrides=overrides)
    nlp = load_model_from_config(config, auto_fill=True, validate=True)
    assert nlp.pipe_names[-1] == "m3el_linker"
    assert nlp.get_pipe("m3el_linker").settings.max_cached_queries is None  # exact cache


@pytest.mark.parametrize("name, cross_modal, eval_frequency",
                         [("wikimel", "unidirectional", 282), ("richpediamel", "unidirectional", 196),
                          ("wikidiverse", "bidirectional", 178)])
def test_paper_configs_per_dataset(name, cross_modal, eval_frequency):
    config = load_config(CONFIGS / f"{name}.cfg")
    assert config["components"]["m3el_linker"]["model"]["cross_modal"] == cross_modal
    assert config["components"]["m3el_linker"]["score_protocol"] == "exhaustive"
    training = config["training"]
    assert training["eval_frequency"] == eval_frequency and training["patience"] == 3 * eval_frequency
    assert config["system"]["seed"] == 43 and training["max_epochs"] == 20
    optimizer = training["optimizer"]
    assert optimizer["learn_rate"] == 1e-5 and optimizer["eps"] == 1e-4 and optimizer["L2"] == 1e-4
    assert training["batcher"]["size"] == 128


def test_every_training_command_of_the_project_honours_its_epoch_variable():
    import srsly

    project = srsly.read_yaml(ROOT / "project.yml")
    trainings = [(command["name"], line) for command in project["commands"] for line in command["script"]
                 if "spacy train" in line]
    assert len(trainings) >= 7
    for name, line in trainings:
        assert re.search(r"--training\.max_epochs \$\{vars\.\w*max_epochs\}", line), name
