"""The README's commands and example must stay exact."""
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    command = re.search(r"```bash\n(pip install torch==2\.13\.0 -e \"\.\[test\]\" && .*?)\n```", README).group(1)
    assert command in (ROOT / ".ci" / "run").read_text()


def test_main_job_installs_what_packaging_needs():
    # `spacy package --build wheel` fails without the `build` package.
    command = re.search(r"```bash\n(pip install torch==2\.13\.0 -e \"\.\[project\]\" && python -m spacy project run all)\n```", README)
    assert command is not None
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'project = \[\s*"build', pyproject)


def test_python_example_runs_as_written(picture_dir, tmp_path, monkeypatch):
    code = next(block for block in re.findall(r"```python\n(.*?)```", README, re.S) if "MultimodalKB(nlp.vocab)" in block)
    for name, source in (("oscar.jpg", "item1.png"), ("screw.jpg", "item2.png"), ("photo.jpg", "item1_alt.png")):
        from PIL import Image

        Image.open(picture_dir / source).convert("RGB").save(tmp_path / name)
    (tmp_path / "images").mkdir()
    shutil.copy(tmp_path / "oscar.jpg", tmp_path / "images" / "oscar.jpg")
    (tmp_path / "entities.jsonl").write_text(
        '{"id": "Q17717", "name": "Oscar Robertson", "description": "basketball", "images": ["oscar.jpg"]}\n'
    )
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    ent = namespace["ent"]
    assert ent.kb_id_ in {"Q17717", "Q123"}
    assert {c["id"] for c in ent._.m3el_candidates} == {"Q17717", "Q123"}
    assert namespace["kb2"].get_entity("Q17717")["name"] == "Oscar Robertson"
    assert namespace["kb3"].images(0) == [str(Path("images") / "oscar.jpg")]
