"""MultimodalKB as JSON Lines: one entity per line, with its aliases.

::

    {"id": "Q17717", "name": "Oscar Robertson", "description": "American basketball player",
     "images": ["oscar.jpg"], "freq": 3, "aliases": ["Robertson", {"alias": "Big O", "prior": 0.9}]}

An alias is a string or ``{"alias", "prior"}``. Without priors, an alias's
priors follow its entities' ``freq`` (uniform if all are 0).
"""
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

from .aliases import AliasPriors
from .errors import KBError

if TYPE_CHECKING:  # pragma: no cover
    from .kb import MultimodalKB


def write_kb_jsonl(kb: "MultimodalKB", path: Union[str, Path]) -> None:
    """One entity per line, with the aliases (and priors) that point to it."""
    by_entity: Dict[str, List[Dict[str, Any]]] = {}
    for alias, ids, priors in kb.alias_table():
        for entity_id, prior in zip(ids, priors):
            by_entity.setdefault(entity_id, []).append({"alias": alias, "prior": prior})
    # The standard json module round-trips floats exactly (ujson does not).
    with Path(path).open("w", encoding="utf8") as file:
        for entity_id in kb.entity_ids:
            record = {**kb.get_entity(entity_id), "aliases": by_entity.get(entity_id, [])}
            file.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_kb_jsonl(
    kb: "MultimodalKB",
    path: Union[str, Path],
    *,
    image_dir: Optional[Union[str, Path]] = None,
    name_as_alias: bool = True,
) -> "MultimodalKB":
    """Fill the empty ``kb`` from a JSONL file. Relative image paths are
    resolved against ``image_dir``; with ``name_as_alias`` every entity's name
    is one of its aliases. Errors name the file and line."""
    aliases = AliasPriors()
    with Path(path).open(encoding="utf8") as lines:
        for line_no, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    _read_line(kb, aliases, line, image_dir=image_dir, name_as_alias=name_as_alias)
                except KBError as err:
                    raise KBError(f"{path}, line {line_no}: {err}") from None
    aliases.add_to(kb, weight=lambda entity_id, count: kb.get_entity(entity_id)["freq"])
    return kb


def _read_line(kb, aliases: AliasPriors, line: str, *, image_dir, name_as_alias: bool) -> None:
    try:
        record = json.loads(line)
    except ValueError as err:
        raise KBError(f"not valid JSON ({err})") from None
    if not isinstance(record, dict) or "id" not in record:
        raise KBError("each line must be an object with an 'id'")
    entity_id = str(record["id"])
    images = [
        str(Path(image_dir) / p) if image_dir and not Path(p).is_absolute() else str(p)
        for p in record.get("images", [])
    ]
    try:
        freq = float(record.get("freq", 0.0))
    except (TypeError, ValueError):
        raise KBError(f"entity '{entity_id}': 'freq' must be a number, got {record.get('freq')!r}") from None
    kb.add_entity(entity_id, name=str(record.get("name", entity_id)),
                  description=str(record.get("description", "")), images=images, freq=freq)
    forms = list(record.get("aliases", []))
    if name_as_alias and record.get("name"):
        forms.append(str(record["name"]))
    for alias in forms:
        text, prior = (alias.get("alias"), alias.get("prior")) if isinstance(alias, dict) else (alias, None)
        if not text or not str(text).strip():
            raise KBError(f"empty alias for entity '{entity_id}'")
        aliases.add(str(text), entity_id, prior=prior)
