"""The knowledge base: entities, their aliases and pictures (:class:`MultimodalKB`),
its folder and file formats, and changes to it (added, replaced, removed entities)."""
from .base import NIL, MultimodalKB

__all__ = ["MultimodalKB", "NIL"]
