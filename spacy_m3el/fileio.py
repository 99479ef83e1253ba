"""Filesystem helpers: JSON with errors that name the file, paths confined
to a directory, and directory writes that an interruption cannot half-do."""
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Type, Union

from .errors import KBError


def read_json(path: Union[str, Path], *, error: Type[Exception] = KBError) -> Any:
    """Parse a JSON file; a missing or invalid file raises ``error`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"Missing file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf8"))
    except ValueError as err:
        raise error(f"{path} is not valid JSON (truncated?): {err}") from None


def write_json(path: Union[str, Path], data: Any) -> None:
    """Write JSON with the standard module, which round-trips floats exactly
    (ujson does not)."""
    Path(path).write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf8")


def inside(root: Path, relative: str, what: str) -> Path:
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


def save_pipeline(nlp, path: Union[str, Path]) -> None:
    """``nlp.to_disk`` through a temporary directory and a rename: an
    interrupted save leaves the previous pipeline directory intact."""
    atomic_directory_write(path, nlp.to_disk)
