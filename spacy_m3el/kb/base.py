"""MultimodalKB: entities with names, descriptions and images, plus aliases.

This module holds the data model and spaCy's ``KnowledgeBase`` API. The
directory format lives in :mod:`.directory`, JSONL and CSV in :mod:`.files`,
changes (add, replace, remove) in :mod:`.changes`. The entities as a model
sees them are not kept here: that is the linker's entity index
(:mod:`spacy_m3el.index`).
"""
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from spacy.kb import Candidate, KnowledgeBase
from spacy.tokens import Span
from spacy.util import SimpleFrozenList
from spacy.vocab import Vocab

from ..errors import KBError, warn
from .aliases import normalize_alias

NIL = "NIL"

__all__ = ["MultimodalKB", "KBError", "NIL", "normalize_alias", "create_empty_kb", "create_kb_loader"]


class MultimodalKB(KnowledgeBase):
    """A knowledge base whose entities carry text and images.

    Rows are numbered in insertion order; ``revision`` counts the entities
    added, so an entity index built for the KB knows when it is stale.
    Besides spaCy's ``KnowledgeBase`` API (``contains_*``, ``get_size_*``,
    ``get_*_strings``, candidates), rows give ``entity_id``, ``name``,
    ``description`` and ``images`` by position, for the encoders.
    """

    def __init__(self, vocab: Vocab, entity_vector_length: int = 0) -> None:
        # entity_vector_length is fixed by the cdef base class; M3EL keeps its
        # entity features in the linker's entity index instead.
        super().__init__(vocab, entity_vector_length)
        self._ids: List[str] = []
        self._index: Dict[str, int] = {}
        self._names: List[str] = []
        self._descriptions: List[str] = []
        self._images: List[List[str]] = []
        self._freqs: List[float] = []
        self._aliases: Dict[str, Tuple[str, List[int], List[float]]] = {}
        self.missing_images: Dict[str, List[str]] = {}
        #: Changes with every entity added: an index built before is stale.
        self.revision = 0

    # ---------------------------------------------------------------- building
    def add_entity(
        self,
        entity_id: str,
        *,
        name: str,
        description: str = "",
        images: Sequence[Union[str, Path]] = (),
        freq: float = 0.0,
        check_images: bool = True,
    ) -> int:
        """Add an entity; returns its row. Image files that do not exist are
        dropped with a warning and recorded in ``missing_images``."""
        if not isinstance(entity_id, str) or not entity_id.strip():
            raise KBError(f"Entity id must be a non-empty string, got {entity_id!r}")
        if entity_id == NIL:
            raise KBError(f"'{NIL}' is reserved for unlinkable mentions and cannot be an entity id")
        if entity_id in self._index:
            raise KBError(f"Duplicate entity id '{entity_id}' (name '{name}')")
        if not math.isfinite(freq) or freq < 0:
            raise KBError(f"Entity '{entity_id}': freq must be a finite number >= 0, got {freq}")
        kept = []
        for image in images:
            if check_images and not Path(image).is_file():
                self.missing_images.setdefault(entity_id, []).append(str(image))
                continue
            kept.append(str(image))
        if entity_id in self.missing_images:
            warn(
                f"Entity '{entity_id}': {len(self.missing_images[entity_id])} image file(s) not "
                f"found, e.g. '{self.missing_images[entity_id][0]}'; the entity keeps "
                f"{len(kept)} image(s). See MultimodalKB.missing_images."
            )
        row = len(self._ids)
        self._ids.append(entity_id)
        self._index[entity_id] = row
        self._names.append(str(name))
        self._descriptions.append(str(description or ""))
        self._images.append(kept)
        self._freqs.append(float(freq))
        self.vocab.strings.add(entity_id)
        self.revision += 1  # an index built before lacks this entity
        return row

    def add_alias(self, alias: str, entities: Sequence[str], probabilities: Sequence[float]) -> None:
        """Map ``alias`` to entities with prior probabilities (summing to <= 1)."""
        key = normalize_alias(alias)
        if not key:
            raise KBError(f"Alias must contain non-space characters, got {alias!r}")
        if len(entities) != len(probabilities):
            raise KBError(
                f"Alias '{alias}': {len(entities)} entities but {len(probabilities)} probabilities"
            )
        unknown = [e for e in entities if e not in self._index]
        if unknown:
            raise KBError(f"Alias '{alias}' points to unknown entity id(s): {unknown}")
        if any(not math.isfinite(p) or p < 0 for p in probabilities) or sum(probabilities) > 1.0 + 1e-6:
            raise KBError(
                f"Alias '{alias}': prior probabilities must be >= 0 and sum to at most 1, "
                f"got {list(probabilities)} (sum {sum(probabilities):.4f})"
            )
        if key in self._aliases:
            raise KBError(f"Alias '{alias}' is already in the KB (as '{self._aliases[key][0]}')")
        self.vocab.strings.add(alias)
        self._aliases[key] = (alias, [self._index[e] for e in entities], [float(p) for p in probabilities])

    # ---------------------------------------------------------------- lookups
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, entity_id: object) -> bool:
        return entity_id in self._index

    def contains_entity(self, entity_id: str) -> bool:
        return entity_id in self._index

    def contains_alias(self, alias: str) -> bool:
        return normalize_alias(alias) in self._aliases

    def get_size_entities(self) -> int:
        return len(self._ids)

    def get_size_aliases(self) -> int:
        return len(self._aliases)

    def get_entity_strings(self) -> List[str]:
        return list(self._ids)

    def get_alias_strings(self) -> List[str]:
        return [original for original, _, _ in self._aliases.values()]

    @property
    def entity_ids(self) -> List[str]:
        return list(self._ids)

    def row(self, entity_id: str) -> int:
        """The row of ``entity_id`` (KeyError naming it if absent)."""
        try:
            return self._index[entity_id]
        except KeyError:
            raise KeyError(f"Entity '{entity_id}' is not in the KB") from None

    def entity_id(self, row: int) -> str:
        return self._ids[row]

    def get_entity(self, entity_id: str) -> Dict[str, Any]:
        """id, name, description, images and freq of an entity."""
        row = self.row(entity_id)
        return {
            "id": entity_id,
            "name": self._names[row],
            "description": self._descriptions[row],
            "images": list(self._images[row]),
            "freq": self._freqs[row],
        }

    def name(self, row: int) -> str:
        return self._names[row]

    def description(self, row: int) -> str:
        return self._descriptions[row]

    def images(self, row: int) -> List[str]:
        return self._images[row]

    def alias_rows(self, text: str) -> List[Tuple[int, float]]:
        """(entity row, prior) pairs for an alias, by normalised lookup."""
        entry = self._aliases.get(normalize_alias(text))
        return list(zip(entry[1], entry[2])) if entry else []

    def get_alias_candidates(self, alias: str) -> List[Candidate]:
        """spaCy ``Candidate``s of an alias, with their priors (no vectors)."""
        entry = self._aliases.get(normalize_alias(alias))
        if entry is None:
            return []
        original, rows, priors = entry
        alias_hash = self.vocab.strings.add(original)
        return [
            Candidate(
                kb=self,
                entity_hash=self.vocab.strings.add(self._ids[row]),
                entity_freq=self._freqs[row],
                entity_vector=[],
                alias_hash=alias_hash,
                prior_prob=prior,
            )
            for row, prior in zip(rows, priors)
        ]

    def get_candidates(self, mention: Span) -> List[Candidate]:
        """Alias-table candidates of a mention (the linker adds dense ones)."""
        return self.get_alias_candidates(mention.text)

    def get_candidates_batch(self, mentions: Iterable[Span]) -> List[List[Candidate]]:
        return [self.get_candidates(span) for span in mentions]

    def get_vector(self, entity: str) -> List[float]:
        """Empty: entity features live in the linker's entity index, not in vectors."""
        return []

    def alias_table(self) -> List[Tuple[str, List[str], List[float]]]:
        """Every alias as ``(alias, entity ids, priors)``."""
        return [(original, [self._ids[r] for r in rows], list(priors))
                for original, rows, priors in self._aliases.values()]

    # ---------------------------------------------------------------- JSON(L)
    def to_jsonl(self, path: Union[str, Path]) -> None:
        """One entity per line, with the aliases that point to it (see :mod:`.kb_files`)."""
        from .files import write_kb_jsonl

        write_kb_jsonl(self, path)

    @classmethod
    def from_jsonl(
        cls,
        vocab: Vocab,
        path: Union[str, Path],
        *,
        image_dir: Optional[Union[str, Path]] = None,
        name_as_alias: bool = True,
    ) -> "MultimodalKB":
        """Build a KB from JSONL lines ``{"id", "name", "description", "images",
        "freq", "aliases"}`` (or a ``.csv`` with those columns; see :mod:`.kb_files`)."""
        from .files import read_kb_file

        return read_kb_file(cls(vocab), path, image_dir=image_dir, name_as_alias=name_as_alias)

    # ---------------------------------------------------------------- disk
    def to_disk(self, path: Union[str, Path], exclude: Iterable[str] = SimpleFrozenList()) -> None:
        """Write a self-contained directory (images copied in), atomically."""
        from .directory import write_kb_directory

        write_kb_directory(self, path, exclude=exclude)

    def from_disk(self, path: Union[str, Path], exclude: Iterable[str] = SimpleFrozenList()) -> "MultimodalKB":
        """Load a directory written by :meth:`to_disk`; a damaged one raises
        :class:`KBError` and leaves this KB as it was."""
        from .directory import read_kb_directory

        self._adopt(read_kb_directory(type(self)(self.vocab), path, exclude=exclude))
        return self

    def _adopt(self, other: "MultimodalKB") -> None:
        for name in ("_ids", "_index", "_names", "_descriptions", "_images", "_freqs", "_aliases",
                     "missing_images"):
            setattr(self, name, getattr(other, name))
        self.revision += 1

    def to_bytes(self, exclude: Iterable[str] = SimpleFrozenList(), **kwargs) -> bytes:
        """The KB directory (images included) as one msgpack blob."""
        from .directory import kb_to_bytes

        return kb_to_bytes(self, exclude=exclude)

    def from_bytes(self, bytes_data: bytes, *, exclude: Iterable[str] = SimpleFrozenList()) -> "MultimodalKB":
        """Load :meth:`to_bytes` output, unpacked to a private directory that
        lives as long as this KB (images are read from there)."""
        from .directory import kb_from_bytes

        return kb_from_bytes(self, bytes_data, exclude=exclude)


def create_empty_kb() -> Callable[[Vocab, int], MultimodalKB]:
    """Registered as ``spacy-m3el.EmptyMultimodalKB.v1``: so a saved pipeline
    comes back with a MultimodalKB."""

    def empty_kb(vocab: Vocab, entity_vector_length: int = 0) -> MultimodalKB:
        return MultimodalKB(vocab)

    return empty_kb


def create_kb_loader(path: Union[str, Path]) -> Callable[[Vocab], MultimodalKB]:
    """Registered as ``spacy-m3el.LoadMultimodalKB.v1``: ``[initialize.components.
    m3el_linker.kb_loader]`` in a training config."""

    def load(vocab: Vocab) -> MultimodalKB:
        return MultimodalKB(vocab).from_disk(path)

    return load
