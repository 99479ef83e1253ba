"""MultimodalKB: entities with names, descriptions and images, plus aliases.

Saved as a self-contained directory::

    kb_dir/
      kb.json              entities, aliases, format version (no pickle)
      images/<sha1>.<ext>  copies of the entity images
      cache/meta.json      which model built the entity feature cache
      cache/<name>.npy     fp16 arrays, memory-mapped on load
"""
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy
import srsly
from spacy.kb import Candidate, KnowledgeBase
from spacy.tokens import Span
from spacy.util import SimpleFrozenList
from spacy.vocab import Vocab

FORMAT_VERSION = 1
NIL = "NIL"
_SPACE = re.compile(r"\s+")


class KBError(ValueError):
    """A knowledge base is inconsistent or its directory is damaged."""


def normalize_alias(alias: str) -> str:
    """Case- and whitespace-insensitive form used for alias lookup."""
    return _SPACE.sub(" ", alias).strip().casefold()


def _inside(root: Path, relative: str, what: str) -> Path:
    """Resolve ``relative`` under ``root``, refusing paths that leave it."""
    candidate = (root / relative).resolve()
    if Path(relative).is_absolute() or root.resolve() not in candidate.parents:
        raise KBError(f"{what} '{relative}' points outside the KB directory {root}")
    return candidate


def atomic_directory_write(path: Union[str, Path], write: Callable[[Path], None]) -> None:
    """Write a directory via a temporary sibling and a rename, so an
    interrupted save leaves the previous directory intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        backup = None
        if path.exists():
            backup = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, backup)
        os.replace(tmp, path)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf8"))
    except ValueError as err:
        raise KBError(f"{path} is not valid JSON (truncated?): {err}") from None


def _write_json(path: Path, data: Any) -> None:
    # The standard json module round-trips floats exactly (ujson does not).
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf8")


class MultimodalKB(KnowledgeBase):
    """A knowledge base whose entities carry text and images (DESIGN 3, 4)."""

    def __init__(self, vocab: Vocab, entity_vector_length: int = 0) -> None:
        # entity_vector_length is fixed by the cdef base class; M3EL keeps its
        # entity features in the cache below instead.
        super().__init__(vocab, entity_vector_length)
        self._ids: List[str] = []
        self._index: Dict[str, int] = {}
        self._names: List[str] = []
        self._descriptions: List[str] = []
        self._images: List[List[str]] = []
        self._freqs: List[float] = []
        self._aliases: Dict[str, Tuple[str, List[int], List[float]]] = {}
        self.missing_images: Dict[str, List[str]] = {}
        self.entity_cache: Dict[str, numpy.ndarray] = {}
        self.cache_meta: Dict[str, Any] = {}

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
        if freq < 0:
            raise KBError(f"Entity '{entity_id}': freq must be >= 0, got {freq}")
        kept = []
        for image in images:
            if check_images and not Path(image).is_file():
                self.missing_images.setdefault(entity_id, []).append(str(image))
                continue
            kept.append(str(image))
        if entity_id in self.missing_images:
            warnings.warn(
                f"Entity '{entity_id}': {len(self.missing_images[entity_id])} image file(s) not "
                f"found, e.g. '{self.missing_images[entity_id][0]}'; the entity keeps "
                f"{len(kept)} image(s). See MultimodalKB.missing_images.",
                stacklevel=2,
            )
        row = len(self._ids)
        self._ids.append(entity_id)
        self._index[entity_id] = row
        self._names.append(str(name))
        self._descriptions.append(str(description or ""))
        self._images.append(kept)
        self._freqs.append(float(freq))
        self.vocab.strings.add(entity_id)
        self.clear_entity_cache()  # a new entity makes the cache incomplete
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
        if any(p < 0 for p in probabilities) or sum(probabilities) > 1.0 + 1e-6:
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
        try:
            return self._index[entity_id]
        except KeyError:
            raise KeyError(f"Entity '{entity_id}' is not in the KB") from None

    def entity_id(self, row: int) -> str:
        return self._ids[row]

    def get_entity(self, entity_id: str) -> Dict[str, Any]:
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
        return self.get_alias_candidates(mention.text)

    def get_candidates_batch(self, mentions: Iterable[Span]) -> List[List[Candidate]]:
        return [self.get_candidates(span) for span in mentions]

    def get_vector(self, entity: str) -> List[float]:
        return []

    # ---------------------------------------------------------------- cache
    def set_entity_cache(self, arrays: Dict[str, numpy.ndarray], meta: Dict[str, Any]) -> None:
        """Attach the model's precomputed entity features (one row per entity)."""
        for name, array in arrays.items():
            if array.shape[0] != len(self):
                raise KBError(
                    f"Entity cache '{name}' has {array.shape[0]} rows but the KB has {len(self)} entities"
                )
        self.entity_cache = dict(arrays)
        self.cache_meta = {**meta, "n_entities": len(self), "arrays": sorted(arrays)}

    def clear_entity_cache(self) -> None:
        """Drop the cache (it no longer matches the entities or the model)."""
        self.entity_cache = {}
        self.cache_meta = {}

    # ---------------------------------------------------------------- JSON(L)
    def _alias_records(self) -> List[Dict[str, Any]]:
        return [
            {"alias": original, "entities": [self._ids[r] for r in rows], "priors": priors}
            for original, rows, priors in self._aliases.values()
        ]

    def to_jsonl(self, path: Union[str, Path]) -> None:
        """One entity per line, with the aliases that point to it."""
        by_entity: Dict[int, List[Dict[str, Any]]] = {}
        for original, rows, priors in self._aliases.values():
            for row, prior in zip(rows, priors):
                by_entity.setdefault(row, []).append({"alias": original, "prior": prior})
        records = []
        for row, entity_id in enumerate(self._ids):
            record = self.get_entity(entity_id)
            record["aliases"] = by_entity.get(row, [])
            records.append(record)
        # The standard json module round-trips floats exactly (ujson does not).
        with Path(path).open("w", encoding="utf8") as file:
            for record in records:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")

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
        "freq", "aliases"}``. An alias is a string or ``{"alias", "prior"}``;
        without priors they follow the entities' ``freq`` (uniform if all 0).
        Relative image paths are resolved against ``image_dir``."""
        kb = cls(vocab)
        alias_entries: Dict[str, Dict[str, Any]] = {}
        lines = Path(path).read_text(encoding="utf8").splitlines()
        for line_no, line in enumerate(lines, start=1):
            where = f"{path}, line {line_no}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise KBError(f"{where}: not valid JSON ({err})") from None
            if not isinstance(record, dict) or "id" not in record:
                raise KBError(f"{where}: each line must be an object with an 'id'")
            entity_id = str(record["id"])
            images = [
                str(Path(image_dir) / p) if image_dir and not Path(p).is_absolute() else str(p)
                for p in record.get("images", [])
            ]
            try:
                kb.add_entity(
                    entity_id,
                    name=str(record.get("name", entity_id)),
                    description=str(record.get("description", "")),
                    images=images,
                    freq=float(record.get("freq", 0.0)),
                )
            except KBError as err:
                raise KBError(f"{where}: {err}") from None
            aliases = list(record.get("aliases", []))
            if name_as_alias and record.get("name"):
                aliases.append(str(record["name"]))
            for alias in aliases:
                text, prior = (alias.get("alias"), alias.get("prior")) if isinstance(alias, dict) else (alias, None)
                if not text or not normalize_alias(str(text)):
                    raise KBError(f"{where}: empty alias for entity '{entity_id}'")
                entry = alias_entries.setdefault(normalize_alias(text), {"alias": text, "rows": {}})
                entry["rows"].setdefault(entity_id, prior)
        for entry in alias_entries.values():
            ids = list(entry["rows"])
            given = [entry["rows"][e] for e in ids]
            if all(p is not None for p in given):
                priors = [float(p) for p in given]
            else:
                freqs = [kb._freqs[kb._index[e]] for e in ids]
                total = sum(freqs)
                priors = [f / total for f in freqs] if total > 0 else [1.0 / len(ids)] * len(ids)
            kb.add_alias(entry["alias"], ids, priors)
        return kb

    # ---------------------------------------------------------------- disk
    def to_disk(self, path: Union[str, Path], exclude: Iterable[str] = SimpleFrozenList()) -> None:
        """Write a self-contained directory (images copied in), atomically."""
        atomic_directory_write(path, lambda tmp: self._write(tmp, exclude))

    def _write(self, root: Path, exclude: Iterable[str]) -> None:
        (root / "images").mkdir()
        stored: Dict[str, str] = {}
        images = []
        for entity_id, paths in zip(self._ids, self._images):
            rows = []
            for source in paths:
                if source not in stored:
                    data = Path(source).read_bytes()
                    name = hashlib.sha1(data).hexdigest()[:20] + Path(source).suffix.lower()
                    target = root / "images" / name
                    if not target.exists():
                        target.write_bytes(data)
                    stored[source] = f"images/{name}"
                rows.append(stored[source])
            images.append(rows)
        _write_json(
            root / "kb.json",
            {
                "format_version": FORMAT_VERSION,
                "entities": [
                    {"id": i, "name": n, "description": d, "images": im, "freq": f}
                    for i, n, d, im, f in zip(self._ids, self._names, self._descriptions, images, self._freqs)
                ],
                "aliases": self._alias_records(),
                "missing_images": self.missing_images,
            },
        )
        if self.entity_cache and "cache" not in exclude:
            (root / "cache").mkdir()
            for name, array in self.entity_cache.items():
                numpy.save(root / "cache" / f"{name}.npy", numpy.asarray(array), allow_pickle=False)
            _write_json(root / "cache" / "meta.json", self.cache_meta)

    def from_disk(self, path: Union[str, Path], exclude: Iterable[str] = SimpleFrozenList()) -> "MultimodalKB":
        root = Path(path)
        meta_path = root / "kb.json"
        if not meta_path.is_file():
            raise KBError(f"{root} is not a MultimodalKB directory: kb.json is missing")
        data = _read_json(meta_path)
        if data.get("format_version") != FORMAT_VERSION:
            raise KBError(f"{meta_path}: unsupported format_version {data.get('format_version')!r}")
        # Load into a fresh KB: a directory that fails half-way leaves this one untouched.
        fresh = type(self)(self.vocab)
        for record in data["entities"]:
            images = [str(_inside(root, p, f"Image of entity '{record['id']}'")) for p in record["images"]]
            for image in images:
                if not Path(image).is_file():
                    raise KBError(f"{root}: image '{image}' of entity '{record['id']}' is missing")
            fresh.add_entity(
                record["id"], name=record["name"], description=record["description"],
                images=images, freq=record["freq"], check_images=False,
            )
        for alias in data["aliases"]:
            fresh.add_alias(alias["alias"], alias["entities"], alias["priors"])
        fresh.missing_images = data.get("missing_images", {})
        if "cache" not in exclude and (root / "cache").exists():
            fresh._load_cache(root / "cache")
        for name in ("_ids", "_index", "_names", "_descriptions", "_images", "_freqs", "_aliases",
                     "missing_images", "entity_cache", "cache_meta"):
            setattr(self, name, getattr(fresh, name))
        return self

    def _load_cache(self, folder: Path) -> None:
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise KBError(f"{folder}: the entity cache has no meta.json")
        meta = _read_json(meta_path)
        if meta.get("n_entities") != len(self):
            raise KBError(
                f"{folder}: the entity cache was built for {meta.get('n_entities')} entities, "
                f"the KB has {len(self)}"
            )
        arrays = {}
        for name in meta.get("arrays", []):
            file = _inside(folder.parent, f"cache/{name}.npy", "Cache file")
            if not file.is_file():
                raise KBError(f"{folder}: cache file '{name}.npy' is missing")
            try:
                arrays[name] = numpy.load(file, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as err:
                raise KBError(f"{file}: cache file is truncated or corrupt ({err})") from None
            if arrays[name].shape[0] != len(self):
                raise KBError(f"{file}: {arrays[name].shape[0]} rows, expected {len(self)}")
        self.entity_cache = arrays
        self.cache_meta = meta

    def to_bytes(self, **kwargs) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            self.to_disk(Path(tmp) / "kb")
            files = {
                str(p.relative_to(Path(tmp) / "kb")): p.read_bytes()
                for p in (Path(tmp) / "kb").rglob("*") if p.is_file()
            }
        return srsly.msgpack_dumps(files)

    def from_bytes(self, bytes_data: bytes, *, exclude: Tuple[str] = tuple()) -> "MultimodalKB":
        """Unpack into a private directory that lives as long as the process:
        images and the memory-mapped cache are read from there."""
        files = srsly.msgpack_loads(bytes_data)
        root = Path(tempfile.mkdtemp(prefix="spacy_m3el_kb_"))
        for relative, data in files.items():
            target = _inside(root, relative, "KB file")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return self.from_disk(root, exclude=exclude)


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


def save_pipeline(nlp, path: Union[str, Path]) -> None:
    """``nlp.to_disk`` through a temporary directory and a rename: an
    interrupted save leaves the previous pipeline directory intact."""
    atomic_directory_write(path, nlp.to_disk)
