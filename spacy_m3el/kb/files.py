"""MultimodalKB entity files: JSON Lines (one entity per line, with its
aliases) and CSV.

::

    {"id": "Q17717", "name": "Oscar Robertson", "description": "American basketball player",
     "images": ["oscar.jpg"], "freq": 3, "aliases": ["Robertson", {"alias": "Big O", "prior": 0.9}]}

    id,name,description,images,freq,aliases
    Q17717,Oscar Robertson,American basketball player,oscar.jpg;oscar2.jpg,3,Robertson;Big O

An alias is a string or ``{"alias", "prior"}`` (CSV: ``;``-separated strings,
as are CSV images). Without priors, an alias's priors follow its entities'
``freq`` (uniform if all are 0). Only ``id`` is required.
"""
import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from ..errors import KBError
from .aliases import AliasPriors

if TYPE_CHECKING:  # pragma: no cover
    from .base import MultimodalKB


def kb_records(kb: "MultimodalKB") -> Iterator[Dict[str, Any]]:
    """Each entity as a record of the JSONL format, in row order, with the
    aliases (and priors) that point to it: read back, they make the same KB."""
    by_entity: Dict[str, List[Dict[str, Any]]] = {}
    for alias, ids, priors in kb.alias_table():
        for entity_id, prior in zip(ids, priors):
            by_entity.setdefault(entity_id, []).append({"alias": alias, "prior": prior})
    for entity_id in kb.entity_ids:
        yield {**kb.get_entity(entity_id), "aliases": by_entity.get(entity_id, [])}


def write_kb_jsonl(kb: "MultimodalKB", path: Union[str, Path]) -> None:
    """One entity per line, with the aliases (and priors) that point to it."""
    # The standard json module round-trips floats exactly (ujson does not).
    with Path(path).open("w", encoding="utf8") as file:
        for record in kb_records(kb):
            file.write(json.dumps(record, ensure_ascii=False) + "\n")


def jsonl_records(path: Union[str, Path]) -> Iterator[Tuple[str, Any]]:
    """``(where, record)`` per non-empty line of a JSONL file."""
    with Path(path).open(encoding="utf8") as lines:
        for line_no, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    yield f"{path}, line {line_no}", json.loads(line)
                except ValueError as err:
                    raise KBError(f"{path}, line {line_no}: not valid JSON ({err})") from None


def csv_records(path: Union[str, Path]) -> Iterator[Tuple[str, Any]]:
    """``(where, record)`` per row of a CSV file with a header row."""
    with Path(path).open(encoding="utf8", newline="") as file:
        reader = csv.DictReader(file)
        if reader.fieldnames is None or "id" not in reader.fieldnames:
            raise KBError(f"{path}: the first row must name the columns, 'id' among them")
        for row in reader:
            record: Dict[str, Any] = {k: v for k, v in row.items() if k and v not in (None, "")}
            for key in ("images", "aliases"):
                if key in record:
                    record[key] = [part.strip() for part in record[key].split(";") if part.strip()]
            yield f"{path}, line {reader.line_num}", record


def read_kb_records(
    kb: "MultimodalKB",
    records: Iterable[Tuple[str, Any]],
    *,
    image_dir: Optional[Union[str, Path]] = None,
    name_as_alias: bool = True,
) -> "MultimodalKB":
    """Fill the empty ``kb`` from ``(where, record)`` pairs. Relative image
    paths are resolved against ``image_dir``; with ``name_as_alias`` every
    entity's name is one of its aliases. Errors name the file and line."""
    aliases = AliasPriors()
    for where, record in records:
        try:
            _add_record(kb, aliases, record, image_dir=image_dir, name_as_alias=name_as_alias)
        except KBError as err:
            raise KBError(f"{where}: {err}") from None
    aliases.add_to(kb, weight=lambda entity_id, count: kb.get_entity(entity_id)["freq"])
    return kb


def read_kb_file(kb: "MultimodalKB", path: Union[str, Path], **options: Any) -> "MultimodalKB":
    """Fill the empty ``kb`` from a ``.jsonl`` or ``.csv`` file."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise KBError(f"{path}: expected a .jsonl or .csv file of entities")
    records = csv_records(path) if suffix == ".csv" else jsonl_records(path)
    return read_kb_records(kb, records, **options)


def _add_record(kb, aliases: AliasPriors, record: Any, *, image_dir, name_as_alias: bool) -> None:
    if not isinstance(record, dict) or "id" not in record:
        raise KBError("each entity must be an object with an 'id'")
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
