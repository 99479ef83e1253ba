"""`spacy package` builds an installable pipeline that needs only spacy-m3el."""
import json
import subprocess
import sys

import pytest

from tests.pipeline.test_linker import train_pipeline

NAME = "m3el_citest"


def package_wheel(nlp, name: str, tmp_path) -> tuple:
    """`spacy package` the pipeline as a wheel, install it (no deps) and
    return its meta and wheel path; uninstall with ``pip uninstall en_NAME``."""
    nlp.meta["name"] = name
    nlp.to_disk(tmp_path / "pipeline")
    (tmp_path / "packages").mkdir()
    subprocess.run(
        [sys.executable, "-m", "spacy", "package", str(tmp_path / "pipeline"), str(tmp_path / "packages"),
         "--name", name, "--version", "0.0.1", "--build", "wheel", "--force"],
        check=True,
    )
    meta = json.loads((tmp_path / "packages" / f"en_{name}-0.0.1" / "meta.json").read_text())
    wheel = next((tmp_path / "packages").rglob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", "-q", str(wheel)],
                   check=True)
    return meta, wheel


@pytest.mark.slow
def test_packaged_wheel_installs_loads_and_links(picture_dir, tmp_path):
    nlp, _ = train_pipeline(picture_dir, epochs=5)
    meta, _ = package_wheel(nlp, NAME, tmp_path)
    try:
        assert any(req.startswith("spacy-m3el") for req in meta["requirements"]), meta["requirements"]
        script = (
            "import spacy\n"
            f"nlp = spacy.load('en_{NAME}')\n"
            "doc = nlp.make_doc('They showed me the item at the fair.')\n"
            f"doc._.image = {str(picture_dir / 'item5_alt.png')!r}\n"
            "doc.ents = [doc.char_span(19, 23, label='THING')]\n"
            "doc = nlp(doc)\n"
            "print(doc.ents[0].kb_id_, type(nlp.get_pipe('m3el_linker').kb).__name__)\n"
        )
        out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                             cwd=tmp_path)
        kb_id, kb_type = out.stdout.split()
        assert kb_id.startswith("E") and kb_type == "MultimodalKB"
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", f"en_{NAME}"], check=False)

