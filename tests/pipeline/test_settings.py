import json
import re
from pathlib import Path

import pytest
import spacy

from spacy_m3el.pipeline.settings import LinkerSettings

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_readme_documents_every_option_with_its_default():
    table = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", README, re.M))
    for option in LinkerSettings.describe():
        assert option["name"] in table, f"README has no row for {option['name']}"
        assert json.loads(table[option["name"]]) == option["default"], option["name"]
    factory_args = set(spacy.blank("en").add_pipe("m3el_linker").cfg) | {"model", "generate_empty_kb", "candidate_generator", "scorer"}
    config = spacy.blank("en").get_factory_meta("m3el_linker").default_config
    assert set(config) == factory_args <= set(table)


@pytest.mark.parametrize(
    "options, message",
    [({"on_bad_image": "ignore"}, "on_bad_image"), ({"n_candidates": -1}, "n_candidates"),
     ({"n_candidates": 0, "use_alias_candidates": False}, "no candidate source"),
     ({"max_cached_queries": 0}, "max_cached_queries"), ({"entity_batch_size": 0}, "entity_batch_size")],
)
def test_bad_settings_are_refused_by_the_factory(options, message):
    with pytest.raises(ValueError, match=message):
        spacy.blank("en").add_pipe("m3el_linker", config=options)


def test_settings_changed_at_run_time_apply_at_once():
    linker = spacy.blank("en").add_pipe("m3el_linker", config={"on_bad_image": "warn", "context_chars": 50})
    assert linker.inputs.images.policy is linker.settings and linker.inputs.settings is linker.settings
    assert linker.cfg["on_bad_image"] == "warn" and linker.cfg["context_chars"] == 50


@pytest.mark.parametrize(
    "shares, message",
    [({"given": 1.0, "blurred": 0.5}, "unknown picture condition"), ({"given": -0.1}, ">= 0"),
     ({"given": 0.0, "none": 0.0, "shuffled": 0}, "not all be 0"), ({"given": "a lot"}, "float")],
)
def test_bad_calibration_picture_shares_are_refused(shares, message):
    # The factory's config merges the shares given with the defaults: a condition is left out by its 0.
    with pytest.raises(ValueError, match=message):
        spacy.blank("en").add_pipe("m3el_linker", config={"calibration_pictures": shares})


def test_calibration_mix_puts_the_given_pictures_first_and_sums_to_one():
    from spacy_m3el.pipeline.settings import LinkerSettings

    assert LinkerSettings().calibration_mix() == pytest.approx({"given": 0.6, "none": 0.2, "shuffled": 0.2})
    mix = LinkerSettings(calibration_pictures={"shuffled": 1, "none": 3}).calibration_mix()
    assert list(mix) == ["given", "shuffled", "none"] and mix == {"given": 0.0, "shuffled": 0.25, "none": 0.75}
    assert LinkerSettings(calibration_pictures={"given": 2, "half": 0}).calibration_mix() == {"given": 1.0}
