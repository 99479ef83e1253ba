"""Directory saves that a kill, a file in the way or a crash cannot damage."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import spacy

from spacy_m3el import KBError, MultimodalKB
from spacy_m3el.fileio import atomic_directory_write

SAVER = """
import sys, spacy
from spacy_m3el import MultimodalKB
nlp = spacy.blank("en")
kb = MultimodalKB(nlp.vocab)
for i in range(400):
    kb.add_entity(f"E{i}", name=f"entity {i}", description="x" * 200)
print("ready", flush=True)
while True:
    kb.to_disk(sys.argv[1])
"""


def test_killed_saves_always_leave_a_loadable_directory(tmp_path):
    target = tmp_path / "kb"
    nlp = spacy.blank("en")
    first = MultimodalKB(nlp.vocab)
    first.add_entity("ONLY", name="only")
    first.to_disk(target)
    for attempt in range(8):
        child = subprocess.Popen([sys.executable, "-c", SAVER, str(target)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.037 * attempt)  # land at different points of a save
        child.send_signal(signal.SIGKILL)
        child.wait()
        loaded = MultimodalKB(nlp.vocab).from_disk(target)
        assert len(loaded) in (1, 400)
    MultimodalKB(nlp.vocab).from_disk(target).to_disk(target)  # a save cleans up after dead savers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kb"]


def test_a_dead_savers_backup_is_restored(tmp_path):
    nlp = spacy.blank("en")
    kb = MultimodalKB(nlp.vocab)
    kb.add_entity("A", name="a")
    kb.to_disk(tmp_path / "kb")
    dead = 2**22 + 12345  # above the default pid_max: no such process
    os.replace(tmp_path / "kb", tmp_path / f".kb.old-{dead}")
    (tmp_path / f".kb.tmp-{dead}-abcd").mkdir()
    assert MultimodalKB(nlp.vocab).from_disk(tmp_path / "kb").entity_ids == ["A"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kb"]


def test_a_file_in_the_way_is_not_replaced(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    kb = MultimodalKB(spacy.blank("en").vocab)
    with pytest.raises(FileExistsError, match="notes.txt.*not a directory"):
        kb.to_disk(notes)
    assert notes.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_failed_write_removes_its_temporary_directory(tmp_path):
    def fail(root: Path) -> None:
        (root / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_directory_write(tmp_path / "out", fail)
    assert list(tmp_path.iterdir()) == []


def test_kb_json_linked_outside_the_directory_is_refused(tmp_path):
    nlp = spacy.blank("en")
    kb = MultimodalKB(nlp.vocab)
    kb.add_entity("A", name="a")
    kb.to_disk(tmp_path / "kb")
    (tmp_path / "elsewhere.json").write_bytes((tmp_path / "kb" / "kb.json").read_bytes())
    (tmp_path / "kb" / "kb.json").unlink()
    (tmp_path / "kb" / "kb.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(KBError, match="kb.json.*outside the KB directory"):
        MultimodalKB(nlp.vocab).from_disk(tmp_path / "kb")


KILLED_BETWEEN_RENAMES = """
import os, signal, sys, spacy
import spacy_m3el.fileio as fileio
from spacy_m3el import MultimodalKB
fileio._exchange = lambda first, second: False  # as on a system without renameat2
real_replace = os.replace
def replace_then_die(source, target):
    real_replace(source, target)
    if os.path.basename(str(target)).startswith(".kb.old-"):
        os.kill(os.getpid(), signal.SIGKILL)  # between moving the old copy away and the new one in
os.replace = replace_then_die
kb = MultimodalKB(spacy.blank("en").vocab)
kb.add_entity("NEW", name="new")
kb.to_disk(sys.argv[1])
"""


def test_a_kill_between_the_two_renames_is_recovered(tmp_path):
    nlp = spacy.blank("en")
    kb = MultimodalKB(nlp.vocab)
    kb.add_entity("OLD", name="old")
    kb.to_disk(tmp_path / "kb")
    child = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(tmp_path / "kb")])
    assert child.returncode == -signal.SIGKILL
    assert MultimodalKB(nlp.vocab).from_disk(tmp_path / "kb").entity_ids == ["OLD"]
