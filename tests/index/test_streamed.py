"""Streamed entity index builds: equal to the in-memory build, resumable,
bfloat16, unreadable images, and an ANN index kept with the pipeline."""
import numpy
import pytest
import spacy
import torch

from spacy_m3el import M3ELWarning
from spacy_m3el.errors import KBError
from spacy_m3el.index.encoding import EntityEncoding
from spacy_m3el.index.streamed import StreamedBuild
from spacy_m3el.pipeline.linker import find_linker
from tests.pipeline.test_linker import N_ENTITIES, train_pipeline


@pytest.fixture(scope="module")
def linker(picture_dir):
    nlp, _ = train_pipeline(picture_dir, epochs=2)
    linker = find_linker(nlp)
    linker.configure(entity_batch_size=4)
    linker.configure(inference_precision="float32")
    return linker


def streamed(linker, folder, **options):
    return StreamedBuild(linker.index_keeper.encoding, linker.kb, folder, shard_size=8, progress=False, **options)


def arrays_of(cache):
    return {name: numpy.asarray(array) for name, array in cache.arrays.items()}


def test_streamed_build_matches_the_in_memory_build(linker, tmp_path):
    linker.configure(image_workers=1)
    built = streamed(linker, tmp_path / "cache").run()
    linker.network.feature_cache.clear()
    reference = linker.index_keeper.encoding.encode(linker.kb, max_queries=None)
    assert len(built) == N_ENTITIES and sorted(built.arrays) == sorted(reference.arrays)
    assert built.meta["fingerprint"] == reference.meta["fingerprint"]
    assert built.meta["retrieval_parts"] == reference.meta["retrieval_parts"]
    for name, array in arrays_of(reference).items():
        # The in-memory path keeps backbone features in fp16 in between: differences of that size.
        assert numpy.allclose(built.arrays[name], array, atol=2e-2), name
    query = torch.from_numpy(numpy.asarray(reference.arrays["retrieval"][:6], dtype=numpy.float32))
    assert torch.equal(built.retrieve(query, 1), reference.retrieve(query, 1))
    assert not (tmp_path / "cache" / "shards").exists()  # shards are dropped once assembled
    again = streamed(linker, tmp_path / "cache").run()  # a finished build is loaded, not redone
    assert again.meta["checksums"] == built.meta["checksums"]


def test_a_killed_build_resumes_from_its_finished_shards(linker, tmp_path, monkeypatch):
    linker.configure(image_workers=0)
    whole = arrays_of(streamed(linker, tmp_path / "whole").run())
    real_write = StreamedBuild._write_shard

    def die_after_first(self, index, *args):
        if index > 0:
            raise KeyboardInterrupt("killed")
        real_write(self, index, *args)

    monkeypatch.setattr(StreamedBuild, "_write_shard", die_after_first)
    with pytest.raises(KeyboardInterrupt):
        streamed(linker, tmp_path / "resumed").run()
    monkeypatch.setattr(StreamedBuild, "_write_shard", real_write)
    assert [p.name for p in (tmp_path / "resumed" / "shards").glob("*.npz")] == ["000000.npz"]
    encoded = []
    real_side = EntityEncoding.side
    monkeypatch.setattr(EntityEncoding, "side", lambda self, kb, batch: encoded.append(batch.rows[0])
                        or real_side(self, kb, batch))
    build = streamed(linker, tmp_path / "resumed")
    resumed = build.run()
    assert build.reused_shards == 1 and min(encoded) == 8  # rows 0-7 were not encoded again
    for name, array in whole.items():
        assert numpy.array_equal(resumed.arrays[name], array), name


def test_build_on_two_processes_equals_the_single_process_build(linker, tmp_path):
    linker.configure(image_workers=0)
    single = arrays_of(streamed(linker, tmp_path / "one").run())
    linker.configure(build_processes=2)
    try:
        build = streamed(linker, tmp_path / "two")
        parallel = build.run()
    finally:
        linker.configure(build_processes=1)
    assert not build.loaded and len(parallel) == N_ENTITIES
    for name, array in single.items():
        # One torch thread per process: the sums inside the kernels may differ in the last bits.
        assert numpy.allclose(parallel.arrays[name], array, atol=1e-2), name


def test_a_failed_encoding_process_keeps_the_others_shards(linker, tmp_path, monkeypatch):
    linker.configure(build_processes=2)
    real_side = EntityEncoding.side

    def fail_on_second_shard(self, kb, batch):
        if 8 <= batch.rows[0] < 16:
            raise ValueError("a broken batch")
        return real_side(self, kb, batch)

    monkeypatch.setattr(EntityEncoding, "side", fail_on_second_shard)
    try:
        with pytest.raises(RuntimeError, match="1 of 2 entity encoding processes failed.*run the same build again"):
            streamed(linker, tmp_path / "cache").run()
    finally:
        linker.configure(build_processes=1)
    kept = sorted(p.name for p in (tmp_path / "cache" / "shards").glob("*.npz"))
    assert kept == ["000000.npz", "000002.npz"]  # the other process finished its shards
    monkeypatch.setattr(EntityEncoding, "side", real_side)
    build = streamed(linker, tmp_path / "cache")
    assert len(build.run()) == N_ENTITIES and build.reused_shards == 2


def test_a_folder_of_another_build_is_refused(linker, tmp_path):
    streamed(linker, tmp_path / "cache").run()
    linker.configure(max_cached_queries=3)
    try:
        with pytest.raises(KBError, match="holds an index build of another KB, model or settings"):
            streamed(linker, tmp_path / "cache").run()
    finally:
        linker.configure(max_cached_queries=None)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(KBError, match="is not empty and holds no index build"):
        streamed(linker, tmp_path / "other").run()


def test_bfloat16_build_is_close_to_float32(linker, tmp_path):
    linker.configure(image_workers=0)
    exact = arrays_of(streamed(linker, tmp_path / "fp32").run())
    linker.configure(inference_precision="bfloat16")
    try:
        half = streamed(linker, tmp_path / "bf16").run()
    finally:
        linker.configure(inference_precision="float32")
    assert half.meta["encode_precision"] == "bfloat16"
    retrieval = numpy.asarray(half.arrays["retrieval"], dtype=numpy.float32)
    reference = exact["retrieval"].astype(numpy.float32)
    relative = numpy.linalg.norm(retrieval - reference, axis=1) / numpy.linalg.norm(reference, axis=1)
    assert numpy.median(relative) < 0.08 and relative.max() < 0.25
    # Each entity, standing in for a mention, still finds itself first.
    assert half.retrieve(torch.from_numpy(reference), 1).reshape(-1).tolist() == list(range(N_ENTITIES))


def test_unreadable_kb_image_is_encoded_without_it_and_named(linker, tmp_path, picture_dir):
    kb = linker.kb
    row = 3
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    original = kb.images(row)
    kb._images[row] = [str(broken)]  # what a file damaged after the KB was built looks like
    try:
        linker.configure(image_workers=1)
        with pytest.warns(UserWarning, match=f"1 KB entities are linked without their image.*{kb.entity_id(row)}"):
            cache = linker.index_keeper.build_streamed(kb, tmp_path / "cache", progress=False)
    finally:
        kb._images[row] = original
    assert cache.meta["unreadable_kb_images"] == {"count": 1, "ids": [kb.entity_id(row)]}
    assert not numpy.asarray(cache.arrays["has_image"])[row]


def test_ann_index_is_built_with_the_index_and_saved_with_the_pipeline(picture_dir, tmp_path):
    nlp, _ = train_pipeline(picture_dir, epochs=1)
    linker = find_linker(nlp)
    linker.configure(ann_index="IVF2,Flat")
    linker.configure(ann_nprobe=2)
    cache = linker.build_entity_index()
    assert cache.use_ann and cache.ann.factory == "IVF2,Flat"
    assert cache.ann.meta["recall"]["recall"] == 1.0  # both lists visited, shortlist rescored exactly
    nlp.to_disk(tmp_path / "pipeline")
    loaded = spacy.load(tmp_path / "pipeline", config={"components": {"m3el_linker": {
        "ann_index": "IVF2,Flat", "ann_nprobe": 2}}})
    loaded_linker = find_linker(loaded)
    assert loaded_linker.entity_index.ann.meta["recall"] == cache.ann.meta["recall"]  # read, not rebuilt
    doc = loaded.make_doc("Look at the item over there.")
    doc._.image = str(picture_dir / "item7_alt.png")
    doc.ents = [doc.char_span(12, 16, label="THING")]
    assert loaded(doc).ents[0].kb_id_  # linked through the index


def test_an_ann_index_with_low_recall_is_reported(picture_dir):
    nlp, _ = train_pipeline(picture_dir, epochs=1)
    linker = find_linker(nlp)
    linker.configure(ann_index="IVF4,Flat", ann_nprobe=1)  # one of four lists visited
    with pytest.warns(M3ELWarning, match=r"finds only .*Raise ann_nprobe \(now 1\)"):
        cache = linker.build_entity_index()
    assert cache.ann.meta["recall"]["recall"] < 0.95


def test_auto_keeps_exact_search_below_50000_entities(linker, capsys):
    linker.configure(ann_index="auto")
    try:
        index = linker.build_entity_index()
    finally:
        linker.configure(ann_index=None)
    assert not index.use_ann and index.ann is None  # exact: recall 1, and fast at this size
    assert f'ann_index "auto" over {N_ENTITIES} entities: exact search' in capsys.readouterr().out
