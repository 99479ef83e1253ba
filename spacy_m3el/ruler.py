"""Entity spans for raw text from the KB's own aliases: an ``entity_ruler``
whose phrase patterns are the alias table, matched case-insensitively."""
from pathlib import Path
from typing import Dict, List, Optional, Union

from spacy.language import Language

from .kb import MultimodalKB


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
) -> Language:
    """Add an ``entity_ruler`` that marks every KB alias in the text
    (case-insensitive, longest match, existing entities kept) in front of the
    pipeline's m3el_linker, so ``nlp("raw text")`` links. ``kb`` defaults to
    the linker's."""
    from .pipe import find_linker

    linker = find_linker(nlp)
    ruler = nlp.add_pipe("entity_ruler", name=name, before=before or linker.name,
                         config={"phrase_matcher_attr": "LOWER", "overwrite_ents": False})
    ruler.add_patterns(alias_patterns(kb if kb is not None else linker.kb, label=label))
    return nlp


def create_alias_patterns(kb: Union[str, Path], label: str = "ENTITY") -> List[Dict[str, str]]:
    """Registered as ``spacy-m3el.AliasPatterns.v1``: the patterns of a saved
    KB, for ``[initialize.components.entity_ruler.patterns]``."""
    from spacy.vocab import Vocab

    return alias_patterns(MultimodalKB(Vocab()).from_disk(kb), label=label)
