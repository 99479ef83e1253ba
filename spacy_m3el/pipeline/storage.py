"""Saving and loading an ``m3el_linker``, and the training state it carries.

On disk a linker is::

    model        the trainable weights (safetensors; a frozen backbone is
                 reloaded from its own package)
    kb/          the MultimodalKB directory (entities, aliases, images)
    index/       the entity index, when it is valid for the weights: saving
                 never encodes (``kb/cache/`` in pipelines saved before)
    state.json   training updates and whether the linker is calibrated
"""
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Optional

import srsly
from spacy import util

from ..errors import warn
from ..fileio import folder_from_bytes, folder_to_bytes
from ..index.entity_index import EntityIndex, saved_index

if TYPE_CHECKING:  # pragma: no cover
    from .linker import M3ELLinker

#: to_bytes warns above this size: a KB with its images belongs on disk.
LARGE_BYTES = 200 * 2**20


class LinkerState:
    """How far a linker got: training updates (None: not known, as for
    pipelines saved before it was recorded) and whether it was calibrated
    since; loaded, an untrained or uncalibrated linker is said once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.updates: Optional[int] = 0
        #: True once training updates changed the weights since the last calibration.
        self.calibration_stale = False
        # Said once, on the first call after loading.
        self.warning: Optional[str] = None
        #: The NIL mentions that training leaves out have been warned about (once per linker).
        self.told_about_nil = False

    def to_dict(self) -> Dict[str, Any]:
        return {"updates": self.updates, "calibrated": not self.calibration_stale}

    def from_dict(self, state: Dict[str, Any]) -> None:
        self.updates = state.get("updates")
        self.calibration_stale = not state.get("calibrated", True)
        if state.get("updates") == 0:
            self.warning = (
                f"{self.name}: this linker has not been trained (0 updates): its links come from untrained "
                "matching layers. Train it (spacy train) before relying on them.")
        elif self.calibration_stale:
            self.warning = (
                f"{self.name}: this linker was trained after its last calibration: its probabilities and NIL "
                "answers are not calibrated for its weights. Run `python -m spacy_m3el calibrate` on held-out "
                "data (or train with calibrate_on_score = true).")
        else:
            self.warning = None

    def from_file(self, file: Path) -> None:
        # Pipelines saved before the state was written have none: taken as trained and calibrated.
        self.from_dict(srsly.read_json(file) if file.is_file() else {"updates": None, "calibrated": True})

    def say_once(self) -> None:
        if self.warning is not None:
            warn(self.warning, stacklevel=4)
            self.warning = None


def _current_index(linker: "M3ELLinker", exclude: Iterable[str]) -> Optional[EntityIndex]:
    """The index to save: only one valid for the weights (saving never
    encodes), and not without its KB (``exclude=["kb"]`` leaves both out)."""
    keeper = linker.index_keeper
    if "kb" in exclude or not len(linker.kb):
        return None
    return keeper.index if keeper.is_current(linker.kb) else None


def _reads_index(exclude: Iterable[str]) -> bool:
    return not {"kb", "index"} & set(exclude)


def to_disk(linker: "M3ELLinker", path: Path, exclude: Iterable[str]) -> None:
    index = _current_index(linker, exclude)
    writers: Dict[str, Callable[[Path], Any]] = {
        "model": lambda p: p.write_bytes(linker.model.to_bytes()),
        "kb": lambda p: linker.kb.to_disk(p),
        "state.json": lambda p: srsly.write_json(p, linker.state.to_dict()),
    }
    if index is not None:
        writers["index"] = index.save
    util.to_disk(path, writers, exclude)


def from_disk(linker: "M3ELLinker", path: Path, exclude: Iterable[str]) -> None:
    found: Dict[str, Optional[EntityIndex]] = {"index": None}

    def read_index(folder: Path) -> None:
        if _reads_index(exclude):
            found["index"] = saved_index([folder, folder.parent / "kb" / "cache"], n_entities=len(linker.kb))

    util.from_disk(path, {"model": lambda p: _read_model(linker, p),
                          "kb": lambda p: _read_kb(linker, lambda kb: kb.from_disk(p)),
                          "index": read_index, "state.json": linker.state.from_file}, exclude)
    linker.index_keeper.adopt(linker.kb, found["index"] if _reads_index(exclude) else None)


def to_bytes(linker: "M3ELLinker", exclude: Iterable[str]) -> bytes:
    index = _current_index(linker, exclude)
    data = util.to_bytes({"model": linker.model.to_bytes, "kb": linker.kb.to_bytes,
                          "index": lambda: folder_to_bytes(index.save) if index is not None else b"",
                          "state": lambda: srsly.json_dumps(linker.state.to_dict())}, exclude)
    if len(data) > LARGE_BYTES:
        warn(f"m3el_linker.to_bytes: {len(data) / 2**20:.0f} MB, mostly the KB's images and "
             "entity index; use to_disk (memory-mapped) or exclude=['kb']")
    return data


def from_bytes(linker: "M3ELLinker", data: bytes, exclude: Iterable[str]) -> None:
    found: Dict[str, Optional[EntityIndex]] = {"index": None}

    def read_index(blob: bytes) -> None:
        if blob and _reads_index(exclude):
            found["index"] = folder_from_bytes(blob, lambda root: EntityIndex.load(root, n_entities=len(linker.kb)),
                                               what="Index file", prefix="spacy_m3el_index_")

    util.from_bytes(data, {"model": linker.model.from_bytes,
                           "kb": lambda b: _read_kb(linker, lambda kb: kb.from_bytes(b)), "index": read_index,
                           "state": lambda b: linker.state.from_dict(srsly.json_loads(b))}, exclude)
    linker.index_keeper.adopt(linker.kb, found["index"] if _reads_index(exclude) else None)


def _read_model(linker: "M3ELLinker", file: Path) -> None:
    if not file.is_file():
        raise ValueError(f"{file.parent}: the m3el_linker weights file 'model' is missing")
    linker.model.from_bytes(file.read_bytes())


def _read_kb(linker: "M3ELLinker", read: Callable[[Any], Any]) -> None:
    linker.set_kb(lambda vocab: read(linker.generate_empty_kb(vocab, 0)))
