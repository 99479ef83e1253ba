"""The on-disk format of a MultimodalKB: a self-contained directory.

::

    kb_dir/
      kb.json              entities, aliases, format version (no pickle)
      images/<sha1>.<ext>  copies of the entity images

A KB directory written by ``build-kb --pipeline`` also holds that
pipeline's entity index in ``index/`` (written and read by the index, not
the KB; ``cache/`` in directories written before).
"""
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Union

from ..errors import KBError
from ..fileio import (
    atomic_directory_write,
    folder_from_bytes,
    folder_to_bytes,
    inside,
    read_json,
    recover_directory,
    write_json,
)

if TYPE_CHECKING:  # pragma: no cover
    from .base import MultimodalKB

FORMAT_VERSION = 1


def write_kb_directory(kb: "MultimodalKB", path: Union[str, Path], *, exclude: Iterable[str] = ()) -> None:
    """Write ``kb`` through a temporary directory and a rename."""
    atomic_directory_write(path, lambda root: _write(kb, root))


def _copy_images(kb: "MultimodalKB", root: Path) -> List[List[str]]:
    """Copy every entity image into ``root/images`` (content-addressed, once)."""
    (root / "images").mkdir()
    stored: Dict[str, str] = {}
    out = []
    for row in range(len(kb)):
        rows = []
        for source in kb.images(row):
            if source not in stored:
                data = Path(source).read_bytes()
                name = hashlib.sha1(data).hexdigest()[:20] + Path(source).suffix.lower()
                target = root / "images" / name
                if not target.exists():
                    target.write_bytes(data)
                stored[source] = f"images/{name}"
            rows.append(stored[source])
        out.append(rows)
    return out


def _write(kb: "MultimodalKB", root: Path) -> None:
    images = _copy_images(kb, root)
    entities = []
    for row, entity_id in enumerate(kb.entity_ids):
        record = kb.get_entity(entity_id)
        record["images"] = images[row]
        entities.append(record)
    aliases = [{"alias": a, "entities": ids, "priors": priors} for a, ids, priors in kb.alias_table()]
    write_json(root / "kb.json", {
        "format_version": FORMAT_VERSION,
        "entities": entities,
        "aliases": aliases,
        "missing_images": kb.missing_images,
    })


def read_kb_directory(
    kb: "MultimodalKB", path: Union[str, Path], *, exclude: Iterable[str] = ()
) -> "MultimodalKB":
    """Fill the empty ``kb`` from a directory written by :func:`write_kb_directory`."""
    root = Path(path)
    recover_directory(root)
    meta_path = root / "kb.json"
    if not meta_path.is_file():
        raise KBError(f"{root} is not a MultimodalKB directory: kb.json is missing")
    inside(root, "kb.json", "kb.json")
    data = read_json(meta_path)
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        version = data.get("format_version") if isinstance(data, dict) else None
        raise KBError(f"{meta_path}: unsupported format_version {version!r}")
    for record in _field(data, "entities", meta_path):
        _add_entity(kb, root, record)
    for alias in _field(data, "aliases", meta_path):
        _add_alias(kb, root, alias)
    kb.missing_images = data.get("missing_images", {})
    return kb


def _field(data: Dict[str, Any], name: str, path: Path) -> list:
    value = data.get(name)
    if not isinstance(value, list):
        raise KBError(f"{path}: '{name}' must be a list")
    return value


_ENTITY_FIELDS = {
    "name": (str,), "description": (str,), "freq": (int, float), "images": (list,),
}


def _add_entity(kb: "MultimodalKB", root: Path, record: Any) -> None:
    where = root / "kb.json"
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        raise KBError(f"{where}: every entity needs a string 'id', got {str(record)[:80]}")
    entity_id = record["id"]
    for field, types in _ENTITY_FIELDS.items():
        value = record.get(field)
        if not isinstance(value, types) or isinstance(value, bool):
            raise KBError(f"{where}: entity '{entity_id}': field '{field}' must be "
                          f"{' or '.join(t.__name__ for t in types)}, got {str(value)[:40]!r}")
    if not all(isinstance(p, str) for p in record["images"]):
        raise KBError(f"{where}: entity '{entity_id}': every image must be a path string")
    images = [str(inside(root, p, f"Image of entity '{entity_id}'")) for p in record["images"]]
    for image in images:
        if not Path(image).is_file():
            raise KBError(f"{root}: image '{image}' of entity '{entity_id}' is missing")
    kb.add_entity(entity_id, name=record["name"], description=record["description"], images=images,
                  freq=record["freq"], check_images=False)


def _add_alias(kb: "MultimodalKB", root: Path, record: Any) -> None:
    valid = (
        isinstance(record, dict) and isinstance(record.get("alias"), str)
        and isinstance(record.get("entities"), list) and isinstance(record.get("priors"), list)
        and all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in record["priors"])
    )
    if not valid:
        raise KBError(f"{root / 'kb.json'}: an alias must be {{'alias': str, 'entities': [...], "
                      f"'priors': [numbers]}}, got {str(record)[:80]}")
    kb.add_alias(record["alias"], record["entities"], record["priors"])


def kb_to_bytes(kb: "MultimodalKB", *, exclude: Iterable[str] = ()) -> bytes:
    """The KB directory's files as one msgpack map (relative path -> bytes)."""
    return folder_to_bytes(lambda root: write_kb_directory(kb, root, exclude=exclude))


def kb_from_bytes(kb: "MultimodalKB", data: bytes, *, exclude: Iterable[str] = ()) -> "MultimodalKB":
    """Load :func:`kb_to_bytes` output into ``kb`` (``from_disk`` on a private
    directory that is removed when ``kb`` is garbage collected)."""
    return folder_from_bytes(data, lambda root: kb.from_disk(root, exclude=exclude), what="KB file",
                             prefix="spacy_m3el_kb_")
