"""Entities added, replaced and removed in a pipeline's KB without a rebuild.

A change file holds one entity a line in the ``build-kb`` JSONL format (a
new id adds the entity, a known id replaces it, aliases included) or
``{"id": "...", "remove": true}``. The updated KB is the one ``build-kb``
would make from the KB's own entity file (``MultimodalKB.to_jsonl``: every
alias with its prior) with those lines applied, so aliases and their priors
are those of a rebuild; only the added and replaced entities are encoded,
the other rows of the entity index are carried over
(:meth:`spacy_m3el.index.entity_index.EntityIndex.select`).
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from ..errors import KBError
from .base import MultimodalKB
from .files import jsonl_records, kb_records, read_kb_records


@dataclass
class KBUpdate:
    """An updated KB and how its rows relate to the old one's."""

    kb: MultimodalKB
    #: Per row of the new KB: the old row whose encoding it keeps, or None (to encode).
    kept_rows: List[Optional[int]]
    added: List[str]
    replaced: List[str]
    removed: List[str]

    @property
    def to_encode(self) -> List[int]:
        return [row for row, old in enumerate(self.kept_rows) if old is None]


def read_changes(path: Union[str, Path]) -> List[Tuple[str, Dict[str, Any]]]:
    """``(where, change)`` per line of a change file; a malformed line or an
    id changed twice is a :class:`KBError` naming the line."""
    changes, seen = [], {}
    for where, record in jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("id"), (str, int)) or record.get("id") == "":
            raise KBError(f"{where}: a change is an entity object with an 'id', or {{\"id\": ..., \"remove\": true}}")
        entity_id = str(record["id"])
        if "remove" in record and (record["remove"] is not True or set(record) != {"id", "remove"}):
            raise KBError(f"{where}: a removal is {{\"id\": \"{entity_id}\", \"remove\": true}} and nothing else")
        if entity_id in seen:
            raise KBError(f"{where}: entity '{entity_id}' is changed twice (also {seen[entity_id]})")
        seen[entity_id] = where
        changes.append((where, {**record, "id": entity_id}))
    return changes


def apply_changes(
    kb: MultimodalKB,
    changes: Iterable[Tuple[str, Dict[str, Any]]],
    *,
    image_dir: Optional[Union[str, Path]] = None,
    name_as_alias: bool = True,
) -> KBUpdate:
    """The KB with ``changes`` applied (replaced entities keep their row,
    removed ones leave theirs, added ones come last), built as ``build-kb``
    builds one; relative image paths of the changes are read from ``image_dir``."""
    records: List[Tuple[str, Dict[str, Any]]] = [(f"the KB's entity '{r['id']}'", r) for r in kb_records(kb)]
    kept: List[Optional[int]] = list(range(len(records)))
    position = {record["id"]: i for i, (_, record) in enumerate(records)}
    added, replaced, removed = [], [], []
    for where, change in changes:
        entity_id = change["id"]
        if change.get("remove"):
            if entity_id not in position:
                raise KBError(f"{where}: cannot remove entity '{entity_id}': it is not in the KB")
            removed.append(entity_id)
            continue
        record = _resolved(change, image_dir)
        if entity_id in position:
            records[position[entity_id]] = (where, record)
            kept[position[entity_id]] = None
            replaced.append(entity_id)
        else:
            position[entity_id] = len(records)
            records.append((where, record))
            kept.append(None)
            added.append(entity_id)
    gone = {position[entity_id] for entity_id in removed}
    order = [i for i in range(len(records)) if i not in gone]
    new_kb = read_kb_records(MultimodalKB(kb.vocab), [records[i] for i in order], name_as_alias=name_as_alias)
    return KBUpdate(new_kb, [kept[i] for i in order], added, replaced, removed)


def _resolved(record: Dict[str, Any], image_dir: Optional[Union[str, Path]]) -> Dict[str, Any]:
    images = record.get("images", [])
    if not isinstance(images, list):
        raise KBError(f"entity '{record['id']}': 'images' must be a list of paths")
    if image_dir is not None:
        images = [str(Path(image_dir) / p) if not Path(str(p)).is_absolute() else str(p) for p in images]
    return {**record, "images": images}
