"""Progress output readable in a log, and one warning per linking call."""
import io
import warnings

import pytest
import spacy

from spacy_m3el import progress
from spacy_m3el.progress import create_console_logger, progress_bar
from tests.pipeline.test_linker import train_pipeline


@pytest.fixture
def every_update(monkeypatch):
    """Progress lines at every update instead of every few seconds."""
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)
    monkeypatch.delenv(progress.MODE_VARIABLE, raising=False)


def test_outside_a_terminal_progress_is_whole_lines_with_done_total_and_rate(every_update):
    stream = io.StringIO()
    for _ in progress_bar(range(3), desc="Encoding KB entities", unit="entity", stream=stream):
        pass
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[-1].startswith("Encoding KB entities: 3/3 (100%)") and "entity/s" in lines[-1]
    assert len(lines) == len(set(lines)) >= 2  # one line per refresh, the closing repeat left out


def test_progress_can_be_switched_off(every_update, monkeypatch):
    monkeypatch.setenv(progress.MODE_VARIABLE, "off")
    stream = io.StringIO()
    for _ in progress_bar(range(3), desc="x", stream=stream):
        pass
    assert stream.getvalue() == ""


def test_the_training_log_prints_lines_between_evaluations_when_piped(every_update):
    nlp = spacy.blank("en")
    stdout, stderr = io.StringIO(), io.StringIO()
    log_step, finalize = create_console_logger(progress_bar=True)(nlp, stdout, stderr)
    for _ in range(3):
        log_step(None)
    finalize()
    frequency = nlp.config["training"]["eval_frequency"]
    assert stderr.getvalue().splitlines()[-1].startswith(f"training: 3/{frequency} steps to the next evaluation")
    assert "\r" not in stderr.getvalue() and "SCORE" in stdout.getvalue()  # spaCy's table header


@pytest.mark.slow
def test_a_stream_warns_once_with_its_total_and_says_how_far_it_is(picture_dir, every_update, capsys):
    nlp, examples = train_pipeline(picture_dir, epochs=1)
    docs = []
    for eg in examples:
        doc = eg.predicted.copy()
        doc._.image = None
        docs.append(doc)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        linked = list(nlp.pipe(docs, batch_size=8))
    said = [str(w.message) for w in caught if "have no image" in str(w.message)]
    assert said == [f"m3el_linker: {len(docs)} of {len(docs)} mentions have no image (set doc._.image or "
                    "span._.image): linked on text alone (see ent._.m3el_modalities)"]
    assert all(doc.ents[0]._.m3el_modalities == ["text"] for doc in linked)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("m3el_linker: ")]
    assert lines and lines[-1].startswith(f"m3el_linker: {len(docs)} docs ({len(docs)} mentions) linked in")
    # A stream waiting between batches (as zip(examples, nlp.pipe(...)) leaves it) counts only its own docs.
    pictured = [eg.predicted.copy() for eg in examples]
    stream = nlp.pipe(pictured, batch_size=8)
    next(stream)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nlp(docs[0].copy())
        stream.close()
    assert [str(w.message).split(" (")[0] for w in caught] == ["m3el_linker: 1 of 1 mentions have no image"]
