"""spacy-m3el: multimodal entity linking for spaCy (M3EL, KDD 2025)."""
from .errors import ImageLoadError, KBError, M3ELWarning, MIMICFormatError
from .extensions import register_extensions
from .fileio import save_pipeline
from .images import load_image
from .kb import MultimodalKB

register_extensions()

__version__ = "0.1.0"
__all__ = [
    "MultimodalKB", "KBError", "ImageLoadError", "MIMICFormatError", "M3ELWarning", "load_image",
    "register_extensions", "save_pipeline", "__version__",
]
