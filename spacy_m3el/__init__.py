"""spacy-m3el: multimodal entity linking for spaCy (M3EL, KDD 2025)."""
from .extensions import register_extensions
from .images import ImageLoadError, load_image
from .kb import KBError, MultimodalKB, save_pipeline

register_extensions()

__version__ = "0.1.0"
__all__ = ["MultimodalKB", "KBError", "ImageLoadError", "load_image", "register_extensions", "save_pipeline", "__version__"]
