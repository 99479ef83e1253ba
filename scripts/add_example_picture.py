"""Put an example picture inside a saved pipeline (``PIPELINE/example/``),
so that the packaged pipeline carries it and the README's quick start runs
from any directory: ``nlp.path / "example" / NAME``."""
import shutil
import sys
from pathlib import Path


def main(pipeline: str, picture: str) -> None:
    source, folder = Path(picture), Path(pipeline) / "example"
    if not (Path(pipeline) / "config.cfg").is_file():
        sys.exit(f"{pipeline}: not a saved spaCy pipeline (no config.cfg)")
    if not source.is_file():
        # Another dataset than the demo: its first mention picture will do.
        others = sorted(p for p in source.parent.glob("*") if p.is_file()) if source.parent.is_dir() else []
        if not others:
            print(f"{source}: no such picture, and no other in {source.parent}: the pipeline has no example picture")
            return
        print(f"{source}: no such picture, {others[0].name} instead")
        source = others[0]
    folder.mkdir(exist_ok=True)
    shutil.copy(source, folder / source.name)
    print(f"{source} -> {folder / source.name}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/add_example_picture.py PIPELINE PICTURE")
    main(*sys.argv[1:])
