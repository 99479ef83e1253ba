"""The entity index: the KB's entities encoded by the linker's weights, its
search (exact, ANN, on a GPU) and its files, and the one route that encodes KB rows."""
from .entity_index import EntityIndex

__all__ = ["EntityIndex"]
