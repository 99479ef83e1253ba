"""Progress output for long work that reads well on a terminal and in a log.

On a terminal: a tqdm bar. Anywhere else (a pipe, a CI log, ``nohup``): a
line every :data:`LOG_INTERVAL` seconds with done/total and the rate, each
ending with a newline, where a bar would leave one long line of carriage
returns (or, buffered, nothing until the end).
"""
import contextlib
import os
import sys
import time
import warnings
from typing import IO, Any, Callable, Dict, Iterable, Iterator, Optional, Tuple

from tqdm import tqdm

from .errors import M3ELWarning

#: Seconds between two progress lines in a log.
LOG_INTERVAL = 5.0
#: ``SPACY_M3EL_PROGRESS=log`` gives log lines on a terminal too; ``off`` silences progress.
MODE_VARIABLE = "SPACY_M3EL_PROGRESS"


def _mode(stream: IO) -> str:
    mode = os.environ.get(MODE_VARIABLE, "").strip().lower()
    if mode in ("log", "off", "bar"):
        return mode
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "log"


class _LineStream:
    """What tqdm writes, one line per refresh: carriage returns and cursor
    moves dropped, a newline added."""

    def __init__(self, stream: IO) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        text = text.replace("\r", "").replace("\x1b[A", "").strip()
        if text and text != self.last:  # closing repeats the last refresh
            self.last = text
            self.stream.write(text + "\n")
            self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(
    iterable: Optional[Iterable] = None,
    *,
    total: Optional[float] = None,
    desc: str,
    unit: str = "it",
    stream: Optional[IO] = None,
    **options: Any,
) -> tqdm:
    """A tqdm bar on a terminal, timed log lines elsewhere (same API): the
    first after :data:`LOG_INTERVAL` seconds, then one every as many."""
    stream = stream if stream is not None else sys.stderr
    mode = _mode(stream)
    if mode == "bar":
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, **options)
    options.setdefault("mininterval", LOG_INTERVAL)
    options.setdefault("delay", LOG_INTERVAL)  # work done within it leaves no line
    options["disable"] = options.get("disable", False) or mode == "off"
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if total is not None:
        options.setdefault("bar_format", "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) in {elapsed}, "
                                         "{rate_fmt}, about {remaining} left")
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=_LineStream(stream), dynamic_ncols=False,
                **options)


#: The end of the one warning a linking run gives about mentions without a picture.
MISSING_PICTURES = "mentions have no image"


@contextlib.contextmanager
def pictures_removed_on_purpose(removed: bool = True) -> Iterator[None]:
    """Inside, no "linked on text alone" warning (when ``removed``): the
    picture conditions of evaluation and calibration take pictures away."""
    with warnings.catch_warnings():
        if removed:
            warnings.filterwarnings("ignore", message=f".*{MISSING_PICTURES}", category=M3ELWarning)
        yield


class LinkingRun:
    """What one call (``nlp(doc)``) or stream (``nlp.pipe``) of the linker
    did: docs and mentions linked, mentions without a picture. Past
    :data:`LOG_INTERVAL` x 2 seconds, a line every :data:`LOG_INTERVAL`
    seconds tells how far a long stream is; at the end, one warning for all
    the mentions linked without a picture."""

    def __init__(self, name: str, *, warn_missing: bool) -> None:
        self.name = name
        self.warn_missing = warn_missing
        self.docs = 0
        self.mentions = 0
        self.without_picture = 0
        self.started = time.perf_counter()
        self.last_line = self.started

    def count(self, *, mentions: int, without_picture: int) -> None:
        self.mentions += mentions
        self.without_picture += without_picture

    def doc_done(self) -> None:
        self.docs += 1
        now = time.perf_counter()
        if now - self.started >= 2 * LOG_INTERVAL and now - self.last_line >= LOG_INTERVAL:
            self.last_line = now
            stream = sys.stderr
            if _mode(stream) != "off":
                elapsed = now - self.started
                stream.write(f"{self.name}: {self.docs:,} docs ({self.mentions:,} mentions) linked in "
                             f"{elapsed:.0f} s, {self.docs / elapsed:.1f} docs/s\n")
                stream.flush()

    def finish(self) -> None:
        if self.warn_missing and self.without_picture:
            warnings.warn(
                f"{self.name}: {self.without_picture} of {self.mentions} {MISSING_PICTURES} (set doc._.image "
                "or span._.image): linked on text alone (see ent._.m3el_modalities)", M3ELWarning, stacklevel=4)


def create_console_logger(progress_bar: bool = False, console_output: bool = True,
                          output_file: Optional[str] = None) -> Callable:
    """Registered as ``spacy-m3el.ConsoleLogger.v1``: spaCy's console logger
    (a table row per evaluation, flushed), with ``progress_bar`` a bar to the
    next evaluation on a terminal, and elsewhere a line every
    :data:`LOG_INTERVAL` seconds (steps done of the ``eval_frequency``, the
    rate), where a bar would print nothing readable."""
    from spacy.training.loggers import console_logger_v3

    def setup_printer(nlp: Any, stdout: IO = sys.stdout, stderr: IO = sys.stderr) -> Tuple[Callable, Callable]:
        terminal = _mode(stderr) == "bar"
        inner = console_logger_v3(progress_bar="eval" if progress_bar and terminal else None,
                                  console_output=console_output, output_file=output_file)
        log_step, finalize = inner(nlp, stdout, stderr)
        if terminal or not progress_bar or not console_output or _mode(stderr) == "off":
            return log_step, finalize
        eval_frequency = nlp.config["training"]["eval_frequency"]
        steps, since = 0, time.perf_counter()
        last_line = since

        def log_with_lines(info: Optional[Dict[str, Any]]) -> None:
            nonlocal steps, since, last_line
            if info is not None:  # an evaluation: its table row, and the count starts again
                log_step(info)
                steps, since = 0, time.perf_counter()
                last_line = since
                return
            steps += 1
            now = time.perf_counter()
            if now - last_line >= LOG_INTERVAL:
                last_line = now
                stderr.write(f"training: {steps}/{eval_frequency} steps to the next evaluation, "
                             f"{steps / (now - since):.2f} steps/s\n")
                stderr.flush()
            log_step(info)

        return log_with_lines, finalize

    return setup_printer
