"""spacy-m3el: multimodal entity linking for spaCy (M3EL, KDD 2025)."""
from .data.images import load_image
from .errors import ImageLoadError, KBError, M3ELWarning, MIMICFormatError
from .extensions import make_doc, register_extensions
from .fileio import save_pipeline
from .kb.base import MultimodalKB
from .pipeline.render import render
from .pipeline.ruler import add_alias_ruler, alias_patterns

register_extensions()

__version__ = "0.1.0"
__all__ = [
    "MultimodalKB", "KBError", "ImageLoadError", "MIMICFormatError", "M3ELWarning", "load_image", "make_doc",
    "render", "add_alias_ruler", "alias_patterns", "register_extensions", "save_pipeline", "__version__",
]
