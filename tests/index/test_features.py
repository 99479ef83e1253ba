"""The KB's backbone features kept on disk: after a training update the
entity index is rebuilt by the trained layers alone, and equals a rebuild
that ran the backbone."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch

from spacy_m3el.index import encoding as encoding_module
from spacy_m3el.index import memory
from spacy_m3el.index.memory import PeriodicRelease
from spacy_m3el.pipeline.linker import find_linker

from tests.pipeline.test_linker import train_pipeline


@pytest.fixture(scope="module")
def linker(picture_dir):
    nlp, _ = train_pipeline(picture_dir, epochs=1)
    return find_linker(nlp)


def test_a_rebuild_after_an_update_runs_only_the_trained_layers(linker, monkeypatch):
    encoding, encoder = linker.index_keeper.encoding, linker.network.encoder
    first = encoding.encode(linker.kb, max_queries=None)
    store = encoding.feature_store(linker.kb)
    assert store is not None and store.filled.all() and len(store) == len(linker.kb)
    with torch.no_grad():  # what a training update does to the matcher (the backbone is frozen)
        for parameter in linker.network.matcher.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))

    def backbone_called(*args, **kwargs):
        raise AssertionError("the backbone ran")

    with monkeypatch.context() as patched:
        patched.setattr(encoder, "encode_text", backbone_called)
        patched.setattr(encoder, "encode_pixels", backbone_called)
        patched.setattr(encoder, "encode_image", backbone_called)
        rebuilt = encoding.encode(linker.kb, max_queries=None)
    encoding._store = None  # a new store: the backbone runs again
    linker.network.feature_cache.clear()
    fresh = encoding.encode(linker.kb, max_queries=None)
    # The cache keeps them too while they fit (here, all): training then scores the index's very features.
    assert len(linker.network.feature_cache.texts) == len(linker.kb)
    assert encoding.feature_store(linker.kb) is not store
    assert not numpy.array_equal(rebuilt.arrays["retrieval"], first.arrays["retrieval"])  # the new weights
    for name, array in fresh.arrays.items():
        numpy.testing.assert_array_equal(rebuilt.arrays[name], array, err_msg=name)
    assert rebuilt.meta["unreadable_kb_images"] == fresh.meta["unreadable_kb_images"]


def test_a_changed_kb_or_precision_gets_its_own_store(linker):
    encoding = linker.index_keeper.encoding
    linker.configure(inference_precision="float32")
    try:
        store = encoding.feature_store(linker.kb)
        assert encoding.feature_store(linker.kb) is store
        linker.configure(inference_precision="bfloat16")
        assert encoding.feature_store(linker.kb) is not store
    finally:
        linker.configure(inference_precision="auto")
    linker.kb.add_entity("E-new", name="a new item", check_images=False)
    assert len(encoding.feature_store(linker.kb)) == len(linker.kb)


def test_row_files_read_back_what_was_written_in_any_order_and_zeros_elsewhere(tmp_path):
    from spacy_m3el.index.features import _RowFile

    rows = _RowFile(tmp_path / "x.bin", 10, (3, 2), numpy.float16)
    values = numpy.arange(4 * 6, dtype=numpy.float16).reshape(4, 3, 2)
    rows.write(numpy.array([7, 2, 3, 4]), values)  # runs [7] and [2, 3, 4]
    numpy.testing.assert_array_equal(rows.read(numpy.array([2, 3, 4, 7])), values[[1, 2, 3, 0]])
    numpy.testing.assert_array_equal(rows.read(numpy.array([9, 0])), numpy.zeros((2, 3, 2), numpy.float16))
    assert rows.read(numpy.array([], dtype=numpy.int64)).shape == (0, 3, 2)
    flags = _RowFile(tmp_path / "m.bin", 4, (), numpy.bool_)
    flags.write(numpy.array([1, 3]), numpy.array([True, True]))
    assert flags.read(numpy.arange(4)).tolist() == [False, True, False, True]
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: positioned I/O, the files are not mapped into the process
        assert str(tmp_path) not in maps.read_text()


def test_a_whole_kb_build_gives_freed_memory_back_as_it_goes(linker, monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append("batch") or True)
    monkeypatch.setattr(encoding_module, "release_freed_memory", lambda: calls.append("end") or True)
    encoding = linker.index_keeper.encoding
    monkeypatch.setattr(encoding, "_release", PeriodicRelease(every=1))
    encoding.encode(linker.kb, max_queries=None)
    batches = -(-len(linker.kb) // linker.settings.entity_batch_size)
    assert calls == ["batch"] * batches + ["end"]


@pytest.mark.skipif(os.name != "posix", reason="open files cannot be unlinked on Windows")
def test_a_store_leaves_no_files_behind_even_when_its_process_is_killed(tmp_path):
    script = (
        "import os, signal, sys, tempfile, torch\n"
        "from spacy_m3el.index.features import EntityFeatureStore\n"
        "from spacy_m3el.model import EncodedItems\n"
        "store = EntityFeatureStore(4, text_dim=3, text_length=5, image_global=(2,), image_tokens=(2, 2), key='k')\n"
        "items = EncodedItems(torch.ones(2, 3), torch.ones(2, 4, 3), torch.ones(2, 4, dtype=torch.bool),\n"
        "                     torch.ones(2, 2), torch.ones(2, 2, 2), torch.tensor([True, False]))\n"
        "store.put([1, 3], items)\n"
        "back = store.get([3, 1], torch.device('cpu'))\n"
        "assert back.text_tokens.shape == (2, 4, 3) and back.image_mask.tolist() == [False, True], back\n"
        "print(sorted(os.listdir(tempfile.gettempdir())), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.stdout.strip() == "[]"  # unlinked while the store was in use
    assert list(tmp_path.iterdir()) == []
