"""A link job's files: killed at any moment, resumed, each row exactly once;
one writer at a time."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from spacy_m3el.cli.commands import app
from spacy_m3el.cli.link_output import LinkOutput, OutputBusyError
from tests.pipeline.test_linker import train_pipeline


@pytest.fixture(scope="module")
def pipeline(picture_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("link_output") / "pipeline"
    nlp, _ = train_pipeline(picture_dir, epochs=1)
    nlp.to_disk(folder)
    return folder


def write_rows(path, picture_dir, count):
    lines = []
    for i in range(count):
        if i % 50 == 7:
            lines.append("{not json")
        else:
            lines.append(json.dumps({"id": f"r{i}", "text": "They showed me the item.", "spans": [[19, 23]],
                                     "image": str(picture_dir / f"item{i % 10}_alt.png")}))
    path.write_text("\n".join(lines) + "\n")


def outcome(output):
    """Input lines in the output, and those the errors file says were skipped."""
    linked = [json.loads(line)["line"] for line in output.read_text().splitlines()]
    errors = output.with_name(output.name + ".errors.jsonl")
    skipped = [json.loads(line)["line"] for line in errors.read_text().splitlines() if json.loads(line)["skipped"]]
    return linked, skipped


def link_until_killed(pipeline, rows, output, *, lines, resume):
    command = [sys.executable, "-m", "spacy_m3el", "link", str(pipeline), str(rows), str(output),
               "--batch-size", "4", *(["--resume"] if resume else [])]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if output.exists() and output.read_text().count("\n") >= lines:
            break
        time.sleep(0.05)
    assert process.poll() is None, f"the run ended before it could be killed:\n{process.stderr.read().decode()}"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@pytest.mark.slow
def test_a_killed_link_resumes_with_each_row_exactly_once(pipeline, picture_dir, tmp_path):
    rows, output = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    write_rows(rows, picture_dir, 160)
    link_until_killed(pipeline, rows, output, lines=20, resume=False)
    first, _ = outcome(output)
    link_until_killed(pipeline, rows, output, lines=len(first) + 40, resume=True)
    assert (tmp_path / "out.jsonl.lock").exists()  # left by the killed run, free for the next
    result = CliRunner().invoke(app, ["link", str(pipeline), str(rows), str(output), "--resume"])
    assert result.exit_code == 0, result.output
    assert "Resuming: " in result.output and not (tmp_path / "out.jsonl.lock").exists()
    linked, skipped = outcome(output)
    assert sorted(linked + skipped) == list(range(1, 161))  # every input line once, none twice
    assert skipped == [8, 58, 108, 158]
    assert all(json.loads(line)["ents"][0]["kb_id"] for line in output.read_text().splitlines())


def test_a_half_written_last_row_is_cut_off_on_resume(tmp_path):
    output, errors = tmp_path / "out.jsonl", tmp_path / "out.jsonl.errors.jsonl"
    output.write_text('{"line": 1, "id": "a", "ents": []}\n{"line": 2, "id": "b", "en')
    # Line 3 was reported as linked with a problem but its row was never written: reported again.
    errors.write_text('{"line": 4, "id": null, "error": "not valid JSON", "skipped": true}\n'
                      '{"line": 3, "id": "c", "error": "span left out: ...", "skipped": false}\n{"line": 5, ')
    with LinkOutput(output, errors, resume=True) as job:
        assert job.done == {1, 4} and job.resumed_rows == 1
        job.write_row({"line": 2, "id": "b", "ents": []})
    assert [json.loads(line)["line"] for line in output.read_text().splitlines()] == [1, 2]
    assert [json.loads(line)["line"] for line in errors.read_text().splitlines()] == [4]


def test_a_second_writer_to_the_same_output_is_refused(pipeline, picture_dir, tmp_path):
    rows, output = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    write_rows(rows, picture_dir, 3)
    with LinkOutput(output, tmp_path / "errors.jsonl"):
        with pytest.raises(OutputBusyError, match="being written by another link"):
            LinkOutput(output, tmp_path / "other_errors.jsonl").__enter__()
        result = CliRunner().invoke(app, ["link", str(pipeline), str(rows), str(output)])
        assert result.exit_code == 1 and f"pid {os.getpid()}" in result.output
    result = CliRunner().invoke(app, ["link", str(pipeline), str(rows), str(output)])
    assert result.exit_code == 0, result.output


def test_resume_refuses_an_output_without_line_numbers(pipeline, picture_dir, tmp_path):
    rows, output = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    write_rows(rows, picture_dir, 3)
    output.write_text('{"id": "r0", "ents": []}\n')
    result = CliRunner().invoke(app, ["link", str(pipeline), str(rows), str(output), "--resume"])
    assert result.exit_code == 1 and "no 'line' field" in result.output
