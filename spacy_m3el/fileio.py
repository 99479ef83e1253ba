"""Filesystem helpers: JSON with errors that name the file, paths confined
to a directory, directory writes that an interruption cannot half-do, and
folders as bytes (for ``to_bytes``)."""
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, Type, Union

import srsly

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
    except RecursionError:
        raise error(f"{path} is nested too deeply to be a valid file") from None


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


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False
    where the system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0
    if not done and ctypes.get_errno() not in (errno.EINVAL, errno.ENOSYS, errno.EXDEV):
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(second))
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_directory(path: Union[str, Path]) -> None:
    """Undo what a killed :func:`atomic_directory_write` left behind: restore
    its backup when the target is gone, and remove its leftovers. Leftovers of
    savers that are still running are left alone."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(tmp|old)-(\d+)(-.*)?$")
    if not path.parent.is_dir():
        return
    for entry in sorted(path.parent.iterdir()):
        match = pattern.match(entry.name)
        if match is None or _alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not path.exists():
            os.replace(entry, path)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def atomic_directory_write(path: Union[str, Path], write: Callable[[Path], None]) -> None:
    """Write a directory via a temporary sibling swapped in at once, so a
    failure or a kill at any point leaves the previous directory (or the new
    one) loadable; leftovers of killed saves are cleaned up on the next one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory: refusing to replace it with one")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        write(tmp)
        if path.exists() and _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
            return
        backup = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, backup)  # a kill here is undone by recover_directory
        os.replace(tmp, path)
        shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pipeline(nlp, path: Union[str, Path]) -> None:
    """``nlp.to_disk`` through a temporary directory and a rename: an
    interrupted save leaves the previous pipeline directory intact."""
    atomic_directory_write(path, nlp.to_disk)


def folder_to_bytes(write: Callable[[Path], None]) -> bytes:
    """The files ``write(folder)`` puts in a new folder, as one msgpack map
    (relative path -> bytes)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "folder"
        write(root)
        files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    return srsly.msgpack_dumps(files)


def folder_from_bytes(data: bytes, read: Callable[[Path], Any], *, what: str, prefix: str) -> Any:
    """Unpack :func:`folder_to_bytes` output into a private folder and
    return what ``read(folder)`` makes of it; the folder is removed when
    that object is garbage collected (its files may be memory-mapped or
    read later). ``what`` names the files in errors; ``prefix`` starts the folder's name."""
    files = srsly.msgpack_loads(data)
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        for relative, content in files.items():
            target = inside(root, relative, what)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        result = read(root)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    weakref.finalize(result, shutil.rmtree, str(root), True)
    return result
