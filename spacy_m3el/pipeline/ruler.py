"""Entity spans for raw text from the KB's own aliases: an ``entity_ruler``
whose phrase patterns are the alias table, matched case-insensitively."""
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Union

from spacy.language import Language
from spacy.pipeline import EntityRuler

from ..kb.base import MultimodalKB


def alias_patterns(kb: MultimodalKB, *, label: str = "ENTITY") -> List[Dict[str, str]]:
    """One ``entity_ruler`` phrase pattern per alias of ``kb``."""
    return [{"label": label, "pattern": alias, "id": alias} for alias in kb.get_alias_strings()]


def add_alias_ruler(
    nlp: Language,
    kb: Optional[MultimodalKB] = None,
    *,
    label: str = "ENTITY",
    name: str = "alias_ruler",
    before: Optional[str] = None,
    replace: bool = False,
) -> Language:
    """Add an ``entity_ruler`` that marks every KB alias in the text
    (case-insensitive, longest match, existing entities kept) in front of the
    pipeline's m3el_linker, so ``nlp("raw text")`` links. ``kb`` defaults to
    the linker's. A pipeline that already has a component ``name`` is an
    error unless ``replace``: its patterns are then replaced by the KB's."""
    from .linker import find_linker

    linker = find_linker(nlp)
    kb = kb if kb is not None else linker.kb
    if name in nlp.pipe_names:
        if not replace:
            raise ValueError(f"The pipeline already has a component named '{name}' ({nlp.pipe_names}): pass "
                             "replace=True (add-alias-ruler --replace) to replace its patterns with the KB's aliases")
        set_alias_patterns(nlp.get_pipe(name), kb, label=label)
        return nlp
    ruler = nlp.add_pipe("entity_ruler", name=name, before=before or linker.name,
                         config={"phrase_matcher_attr": "LOWER", "overwrite_ents": False})
    ruler.add_patterns(alias_patterns(kb, label=label))
    return nlp


def set_alias_patterns(ruler: EntityRuler, kb: MultimodalKB, *, label: Optional[str] = None) -> int:
    """Replace every pattern of ``ruler`` with the aliases of ``kb``, under
    ``label`` (default: the label its patterns had). Returns the count."""
    if not isinstance(ruler, EntityRuler):
        raise TypeError(f"Alias patterns go into an entity_ruler, not a {type(ruler).__name__}")
    if label is None:
        labels = Counter(pattern["label"] for pattern in ruler.patterns)
        label = labels.most_common(1)[0][0] if labels else "ENTITY"
    ruler.clear()
    patterns = alias_patterns(kb, label=label)
    ruler.add_patterns(patterns)
    return len(patterns)


def find_alias_ruler(nlp: Language, name: Optional[str] = None) -> Optional[str]:
    """The name of the pipeline's alias ruler: ``name`` when given, else the
    entity_ruler whose patterns are all KB aliases (as
    :func:`alias_patterns` writes them); None when there is none."""
    if name is not None:
        if name not in nlp.pipe_names:
            raise ValueError(f"The pipeline has no component named '{name}' ({nlp.pipe_names})")
        return name
    for pipe_name, pipe in nlp.pipeline:
        if isinstance(pipe, EntityRuler) and pipe.patterns and all(
                isinstance(p["pattern"], str) and p.get("id") == p["pattern"] for p in pipe.patterns):
            return pipe_name
    return None


def create_alias_patterns(kb: Union[str, Path], label: str = "ENTITY") -> List[Dict[str, str]]:
    """Registered as ``spacy-m3el.AliasPatterns.v1``: the patterns of a saved
    KB, for ``[initialize.components.entity_ruler.patterns]``."""
    from spacy.vocab import Vocab

    return alias_patterns(MultimodalKB(Vocab()).from_disk(kb), label=label)
