"""The files a ``link`` job writes: one writer at a time, every row flushed
as it is written, and a job killed at any moment resumed where it stopped.

Output rows carry their input ``line``; the errors file's records carry it
too. Resuming reads both back: a row is done when its output row is
complete, or when the errors file says it was skipped. A half-written last
line (the kill came mid-write) is cut off, and error records of rows that
are not done are dropped (the row is linked again and says so again), so
that each input row ends up exactly once in the output or among the
skipped rows.
"""
import fcntl
import json
import os
from pathlib import Path
from typing import IO, Any, Dict, List, Optional, Set, Tuple


class OutputBusyError(RuntimeError):
    """Another process is writing the same output."""


class ResumeError(ValueError):
    """An output that cannot be resumed."""


class LinkOutput:
    """The output and errors files of one link job (a context manager)."""

    def __init__(self, output: Path, errors: Path, *, resume: bool = False) -> None:
        self.output = Path(output)
        self.errors = Path(errors)
        self.resume = resume
        self.lock_path = self.output.with_name(self.output.name + ".lock")
        #: Input lines already done (resume), and how many of them were linked.
        self.done: Set[Any] = set()
        self.resumed_rows = 0
        self._lock: Optional[IO] = None
        self._out: Optional[IO] = None
        self._bad: Optional[IO] = None

    def __enter__(self) -> "LinkOutput":
        """Take the lock (:class:`OutputBusyError` when another job holds
        it), recover what a killed run wrote (resume), open the files."""
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            if self.resume:
                self._recover()
            mode = "a" if self.resume else "w"
            self._out = self.output.open(mode, encoding="utf8")
            self._bad = self.errors.open(mode, encoding="utf8")
        except BaseException:
            self._release_lock()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for file in (self._out, self._bad):
            if file is not None:
                file.close()
        self._release_lock()

    def write_row(self, row: Dict[str, Any]) -> None:
        assert self._out is not None
        self._out.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._out.flush()  # in the OS's hands: a killed process loses nothing written

    def write_error(self, record: Dict[str, Any]) -> None:
        assert self._bad is not None
        self._bad.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._bad.flush()

    # ------------------------------------------------------------------ one writer
    def _take_lock(self) -> None:
        lock = self.lock_path.open("a+", encoding="utf8")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise OutputBusyError(
                f"{self.output} is being written by another link (pid {holder}; lock {self.lock_path}): "
                "wait for it to finish, or choose another output") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock = lock

    def _release_lock(self) -> None:
        if self._lock is not None:
            self.lock_path.unlink(missing_ok=True)  # a lock left by a killed job is free: flock died with it
            self._lock.close()
            self._lock = None

    # ------------------------------------------------------------------ resume
    def _recover(self) -> None:
        rows, complete = _complete_lines(self.output)
        for number, text in enumerate(rows, start=1):
            row = json.loads(text)
            if "line" not in row:
                raise ResumeError(f"{self.output}, row {number}: no 'line' field, so it cannot be resumed (was it "
                                 "written by `link` of an older version, or with --ray?): link it again without --resume")
            self.done.add(row["line"])
        self.resumed_rows = len(rows)
        if self.output.exists():
            os.truncate(self.output, complete)  # a partial last row goes; the complete ones stay where they are
        kept = []
        for text in _complete_lines(self.errors)[0]:
            record = json.loads(text)
            if record.get("skipped"):
                self.done.add(record.get("line"))
                kept.append(text)
            elif record.get("line") in self.done:
                kept.append(text)
        _rewrite(self.errors, kept)


def _complete_lines(path: Path) -> Tuple[List[str], int]:
    """The lines of ``path`` that end with a newline (a kill mid-write leaves
    the last one without), and how many bytes they take; none when the file
    does not exist."""
    lines: List[str] = []
    end = 0
    if path.exists():
        with path.open("rb") as file:
            for raw in file:
                if not raw.endswith(b"\n"):
                    break
                end += len(raw)
                if raw.strip():
                    lines.append(raw.decode("utf8").strip())
    return lines, end


def _rewrite(path: Path, lines: List[str]) -> None:
    """``path`` holding ``lines`` only, replaced in one rename."""
    temporary = path.with_name(path.name + ".resume-tmp")
    temporary.write_text("".join(line + "\n" for line in lines), encoding="utf8")
    os.replace(temporary, path)
