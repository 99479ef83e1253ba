"""The README's main job: `spacy project run all` on the bundled demo."""
import ast
import json
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_project_all_runs_end_to_end(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    # The project is the repository: its package step also builds spacy-m3el's own wheel.
    for name in ("project.yml", "configs", "scripts", "assets", "benchmarks", "pyproject.toml", "README.md",
                 "spacy_m3el"):
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
    assert metrics["m3el_n_nil"] == 24 and 0.0 <= metrics["m3el_ece"] <= 1.0 and 0.0 <= metrics["m3el_nil_f"] <= 1.0
    assert list((project / "packages").rglob("en_m3el_demo-*.whl"))
    assert "add-alias-ruler" in (project / "project.lock").read_text()
    # The README's quick start, as written, in a fresh venv holding the two wheels (its other
    # dependencies come from this interpreter's site-packages: nothing is downloaded).
    wheels = [next((project / "packages").glob("spacy_m3el-*.whl")),
              next((project / "packages").rglob("en_m3el_demo-*.whl"))]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # The new venv sees this interpreter's packages (a venv's, a conda env's or the system's: what
    # --system-site-packages would miss from inside a venv), after its own: the wheels win.
    own = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                         capture_output=True, text=True).stdout.strip()
    Path(own, "_outer_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--force-reinstall",
                    *map(str, wheels)], check=True)
    readme = (ROOT / "README.md").read_text()
    install = re.search(r"```bash\n(pip install torch==2\.13\.0 packages/.*?)\n```", readme).group(1)
    assert all(f"packages/{w.relative_to(project / 'packages')}" in install for w in wheels)
    quick_start = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "en_m3el_demo" in b)
    code = quick_start + "print(spacy_m3el.__file__)\n"
    user = tmp_path / "user"  # somewhere else than the sources: the package carries its example picture
    user.mkdir()
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=user)
    assert out.returncode == 0, f"the quick start failed:\n{out.stderr[-3000:]}"
    linked, location = out.stdout.strip().splitlines()
    assert location.startswith(str(venv))  # the wheel's copy, not the repository's
    entities = ast.literal_eval(linked)
    assert [text for text, _, _ in entities] == ["clock", "eye"]  # both are aliases in the demo KB
    # "clock" names clip arts in the KB; "eye" may be linked or said to be NIL. Scores are probabilities.
    assert entities[0][1].startswith("CA") and all(kb_id.startswith("CA") or kb_id == "NIL"
                                                  for _, kb_id, _ in entities)
    assert all(isinstance(score, float) and 0.0 <= score <= 1.0 for _, _, score in entities)
    # The command line on the installed demo package, with a bad row among good ones.
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"id": 1, "text": "The clock on the poster caught everyone's eye.",
                                "image": str(project / "assets/clipart_mel/mention_image/CA00213-m2.jpg")})
                    + "\n{not json\n")
    linking = subprocess.run([python, "-m", "spacy_m3el", "link", "en_m3el_demo", str(rows),
                              str(tmp_path / "out.jsonl")], capture_output=True, text=True, cwd=tmp_path)
    assert linking.returncode == 0, f"link failed:\n{linking.stderr[-3000:]}"
    (row,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [e["text"] for e in row["ents"]] == ["clock", "eye"]
    assert "not valid JSON" in (tmp_path / "out.jsonl.errors.jsonl").read_text()
    # The README's "Link against your own KB", as written, in the project with the venv's python first.
    section = readme[readme.index("## Link against your own KB"):]
    script = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    own_kb = subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True, cwd=project, env=env)
    assert own_kb.returncode == 0, f"the own-KB section failed:\n{own_kb.stdout[-2000:]}\n{own_kb.stderr[-3000:]}"
    assert "Entity index in my_kb reused" in own_kb.stdout
    (row,) = [json.loads(line) for line in (project / "my_linked.jsonl").read_text().splitlines()]
    links = {e["text"]: e["kb_id"] for e in row["ents"]}
    # Linked against the new KB only (a one-epoch model may follow the clock picture for "poster").
    assert set(links) == {"clock", "poster"} and links["clock"] in {"wall-clock", "alarm-clock"}
    assert links["poster"] in {"film-poster", "wall-clock", "alarm-clock", "NIL"}


@pytest.mark.slow
def test_workflows_run_on_any_mimic_directory(tmp_path, picture_dir):
    from tests.data.test_mimic import write_release_layout

    data = write_release_layout(tmp_path / "my_data", picture_dir)
    project = tmp_path / "project"
    project.mkdir()
    for name in ("project.yml", "configs", "scripts"):
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, project / name)
    for command in ("convert", "train", "evaluate", "modalities"):
        subprocess.run([sys.executable, "-m", "spacy", "project", "run", command, str(project),
                        "--vars.data", str(data), "--vars.demo", "toy", "--vars.max_epochs", "1"], check=True)
    metrics = json.loads((project / "metrics" / "toy.json").read_text())
    assert metrics["m3el_n_mentions"] == 2  # the test split: two linkable mentions, one NIL
    assert metrics["exhaustive"]["m3el_n_mentions"] == 2 and 0.0 <= metrics["top1_agreement"] <= 1.0
    assert (project / "metrics" / "toy_text_only.json").exists() and (project / "metrics" / "toy_image_only.json").exists()
