"""``python -m spacy m3el COMMAND``: this package's commands inside spaCy's
CLI. spaCy imports this module through the ``spacy_cli`` entry point when
its CLI starts; adding the sub-app is what registering means there."""
from spacy.cli._util import app as spacy_app

from .commands import app

spacy_app.add_typer(app, name="m3el", help="spacy-m3el: multimodal entity linking (link, evaluate, build-kb, ...)")
