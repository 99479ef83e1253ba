"""The README's main job: `spacy project run all` on the bundled demo."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_project_all_runs_end_to_end(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("project.yml", "configs", "scripts", "assets", "benchmarks"):
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, project / name)
    # One epoch: the full run (25 epochs) is the README's main job, not a unit test.
    subprocess.run(
        [sys.executable, "-m", "spacy", "project", "run", "all", str(project), "--vars.max_epochs", "1"],
        check=True,
    )
    metrics = json.loads((project / "metrics" / "clipart_mel.json").read_text())
    assert metrics["m3el_n_mentions"] == 240
    for key in ("m3el_hits1", "m3el_hits3", "m3el_hits5", "m3el_hits10", "m3el_hits20", "m3el_mrr", "nel_micro_f"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["m3el_hits1"] > 0.3  # far above chance (about 0.1 within a surface-form group)
    assert list((project / "packages").rglob("en_m3el_demo-*.whl"))
