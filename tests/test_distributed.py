"""Corpus linking on Ray Data: local Ray, 2 CPU workers (the `ray` extra)."""
import json
import os
import re
import subprocess
import sys
import time

import numpy
import pytest
import spacy
import torch

from spacy_m3el.data.rows import link_rows, read_rows
from spacy_m3el.pipeline.linker import find_linker
from tests.pipeline.test_linker import CONTEXTS, N_ENTITIES, train_pipeline

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
from spacy_m3el import distributed  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    marker = tmp_path_factory.mktemp("fault") / "fail-once"
    # Workers inherit the driver's environment: the fault test creates the marker.
    os.environ[distributed.FAIL_ONCE_ENV] = str(marker)
    os.environ[distributed.FAIL_ON_TEXT_ENV] = POISON
    distributed.start_ray(num_cpus=3)  # two workers and the reader
    yield marker
    ray.shutdown()
    del os.environ[distributed.FAIL_ONCE_ENV]
    del os.environ[distributed.FAIL_ON_TEXT_ENV]


#: A row with this text kills every worker that takes its batch.
POISON = "this row kills its worker"


@pytest.fixture(scope="module")
def pipeline_dir(picture_dir, tmp_path_factory):
    nlp, _ = train_pipeline(picture_dir, epochs=5)
    path = tmp_path_factory.mktemp("ray") / "pipeline"
    nlp.to_disk(path)
    assert not distributed.has_entity_index(path)  # saving never encodes: built once here, for every worker
    nlp.get_pipe("m3el_linker").build_entity_index()
    nlp.to_disk(path)
    assert distributed.has_entity_index(path)
    # Small entity batches, so that the 20 entities make several shards for the distributed build.
    config = path / "config.cfg"
    # float32: Ray workers run one torch thread, this process two; in bfloat16 the kernels' sums
    # then differ by more than the 1e-5 the comparisons below allow.
    config.write_text(config.read_text().replace("entity_batch_size = 64", "entity_batch_size = 4")
                      .replace('inference_precision = "auto"', 'inference_precision = "float32"'))
    return path


def write_rows(path, picture_dir, *, bad=False):
    lines = []
    for k in range(N_ENTITIES):
        for c, text in enumerate(CONTEXTS):
            start = text.index("item")
            lines.append(json.dumps({"id": f"r{k}-{c}", "text": text, "image": str(picture_dir / f"item{k}_alt.png"),
                                     "spans": [[start, start + 4, "THING"]]}))
    if bad:
        lines[3:3] = ["{not json", json.dumps({"id": "no-text"}),
                      json.dumps({"id": "no-image", "text": "the item", "image": "missing.png"})]
    path.write_text("\n".join(lines) + "\n")
    return path


def by_id(path):
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


def test_distributed_output_equals_nlp_pipe(local_ray, pipeline_dir, picture_dir, tmp_path):
    rows = write_rows(tmp_path / "rows.jsonl", picture_dir)
    counts = distributed.link(rows, str(pipeline_dir), tmp_path / "out.jsonl", num_workers=2, batch_size=8)
    assert counts == {"linked": 2 * N_ENTITIES, "errors": 0}
    nlp = spacy.load(pipeline_dir)
    expected = {row["id"]: row for row in link_rows(nlp, read_rows(rows), lambda error: None)}
    got = by_id(tmp_path / "out.jsonl")
    assert set(got) == set(expected)
    for row_id, row in expected.items():
        assert [e["kb_id"] for e in got[row_id]["ents"]] == [e["kb_id"] for e in row["ents"]]
        for mine, theirs in zip(got[row_id]["ents"], row["ents"]):
            assert mine["score"] == pytest.approx(theirs["score"], abs=1e-5)
            assert [c["id"] for c in mine["candidates"]] == [c["id"] for c in theirs["candidates"]]
            for a, b in zip(mine["candidates"], theirs["candidates"]):
                assert a["prob"] == pytest.approx(b["prob"], abs=1e-5)


def test_parquet_rows_link_like_jsonl(local_ray, pipeline_dir, picture_dir, tmp_path):
    import pyarrow
    import pyarrow.parquet

    rows = [json.loads(line) for line in write_rows(tmp_path / "rows.jsonl", picture_dir).read_text().splitlines()]
    for row in rows:
        row["spans"] = [{"start": s, "end": e, "label": label} for s, e, label in row["spans"]]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "rows.parquet")
    distributed.link(tmp_path / "rows.parquet", str(pipeline_dir), tmp_path / "parquet.jsonl", num_workers=2)
    distributed.link(tmp_path / "rows.jsonl", str(pipeline_dir), tmp_path / "jsonl.jsonl", num_workers=2)
    from_parquet, from_jsonl = by_id(tmp_path / "parquet.jsonl"), by_id(tmp_path / "jsonl.jsonl")
    assert set(from_parquet) == set(from_jsonl) and len(from_parquet) == 2 * N_ENTITIES
    for row_id, row in from_jsonl.items():
        assert [(e["start"], e["kb_id"]) for e in from_parquet[row_id]["ents"]] == [
            (e["start"], e["kb_id"]) for e in row["ents"]]


def test_parquet_output_holds_the_jsonl_rows(local_ray, pipeline_dir, picture_dir, tmp_path):
    import pyarrow.parquet

    rows = write_rows(tmp_path / "rows.jsonl", picture_dir)
    distributed.link(rows, str(pipeline_dir), tmp_path / "out.parquet", num_workers=2, batch_size=8)
    distributed.link(rows, str(pipeline_dir), tmp_path / "out.jsonl", num_workers=2, batch_size=8)
    table = pyarrow.parquet.read_table(tmp_path / "out.parquet").to_pylist()
    expected = by_id(tmp_path / "out.jsonl")
    assert sorted(row["id"] for row in table) == sorted(expected)
    for row in table:
        theirs = expected[row["id"]]["ents"]
        assert [(e["start"], e["kb_id"]) for e in row["ents"]] == [(e["start"], e["kb_id"]) for e in theirs]
        assert [e["score"] for e in row["ents"]] == pytest.approx([e["score"] for e in theirs], abs=1e-5)
        assert [c["id"] for c in row["ents"][0]["candidates"]] == [c["id"] for c in theirs[0]["candidates"]]


def test_bad_rows_go_to_the_errors_file_and_the_job_goes_on(local_ray, pipeline_dir, picture_dir, tmp_path):
    rows = write_rows(tmp_path / "rows.jsonl", picture_dir, bad=True)
    counts = distributed.link(rows, str(pipeline_dir), tmp_path / "out.jsonl", num_workers=2, batch_size=8)
    assert counts == {"linked": 2 * N_ENTITIES, "errors": 3}
    errors = [json.loads(line) for line in (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines()]
    reasons = {str(error["row"]): error["error"] for error in errors}
    assert "not valid JSON" in reasons["{not json"]
    assert reasons["no-text"] == "'text' must be a string"
    assert "missing.png" in reasons["no-image"] and "not found" in reasons["no-image"]


def test_a_killed_worker_loses_and_repeats_nothing(local_ray, pipeline_dir, picture_dir, tmp_path):
    rows = write_rows(tmp_path / "rows.jsonl", picture_dir)
    local_ray.write_text("kill the next worker that takes a batch")
    counts = distributed.link(rows, str(pipeline_dir), tmp_path / "out.jsonl", num_workers=2, batch_size=8)
    assert not local_ray.exists()  # a worker did die
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert counts["linked"] == len(ids) == len(set(ids)) == 2 * N_ENTITIES


def test_cli_link_with_ray_and_relative_image_paths(pipeline_dir, picture_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    (tmp_path / "pictures").symlink_to(picture_dir)
    rows.write_text("\n".join(json.dumps({"id": f"r{k}", "text": CONTEXTS[0], "image": f"pictures/item{k}_alt.png",
                                          "spans": [[19, 23, "THING"]]}) for k in range(4)) + "\n")
    subprocess.run([sys.executable, "-m", "spacy_m3el", "link", str(pipeline_dir), "rows.jsonl", "out.jsonl", "--ray",
                    "--num-workers", "1"], check=True, cwd=tmp_path)
    got = by_id(tmp_path / "out.jsonl")
    assert sorted(got) == ["r0", "r1", "r2", "r3"]
    assert all(row["ents"][0]["modalities"] == ["text", "image"] for row in got.values())
    assert (tmp_path / "out.jsonl.errors.jsonl").read_text() == ""


def test_unreadable_pipeline_is_named(local_ray, picture_dir, tmp_path):
    rows = write_rows(tmp_path / "rows.jsonl", picture_dir)
    with pytest.raises(Exception, match="cannot load the pipeline"):
        distributed.link(rows, str(tmp_path / "no-such-pipeline"), tmp_path / "out.jsonl", num_workers=1)


def test_distributed_kb_cache_equals_the_single_machine_build(local_ray, pipeline_dir, tmp_path):
    counts = distributed.build_kb_cache(pipeline_dir, tmp_path / "built", num_workers=2, shards_per_worker=2)
    assert counts["entities"] == N_ENTITIES and counts["shards"] >= 2
    nlp = spacy.load(pipeline_dir)
    linker = find_linker(nlp)
    # Ray gives each 1-CPU worker one torch thread; the sums inside the
    # encoders' kernels depend on the thread count, so the reference uses one
    # too, and encodes afresh (this process's feature cache holds features
    # computed with two threads, during training).
    linker.network.feature_cache.clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = linker.index_keeper.encoding.encode(linker.kb, max_queries=linker.settings.max_cached_queries)
    finally:
        torch.set_num_threads(threads)
    built = find_linker(spacy.load(tmp_path / "built"))
    cache = built.index_keeper.index
    assert cache is not None and sorted(cache.arrays) == sorted(single.arrays)
    for name, array in single.arrays.items():
        assert numpy.array_equal(numpy.asarray(cache.arrays[name]), array), name
    assert cache.meta["fingerprint"] == single.meta["fingerprint"] == linker.network.fingerprint()
    assert cache.meta["kb"] == single.meta["kb"] and cache.meta["encode_precision"] == single.meta["encode_precision"]
    assert cache.meta["retrieval_parts"] == single.meta["retrieval_parts"]
    assert built.entity_index is cache  # taken as it is, not rebuilt


def test_a_row_that_kills_every_worker_fails_the_job_by_name_after_bounded_retries(local_ray, pipeline_dir,
                                                                                  picture_dir, tmp_path):
    rows = write_rows(tmp_path / "rows.jsonl", picture_dir)
    lines = rows.read_text().splitlines()
    lines.insert(10, json.dumps({"id": "poison", "text": POISON}))
    rows.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"after 1 retries \(ActorDiedError\): the batch of \d+ rows, .* "
                                           r"\(started 2 times\).* kept killing its worker") as caught:
        distributed.link(rows, str(pipeline_dir), tmp_path / "out.jsonl", num_workers=2, batch_size=8, max_retries=1)
    assert time.monotonic() - started < 300
    # The batch is named by its first and last rows: the poison row lies between them.
    first, last = re.search(r"rows, '([^']+)' to '([^']+)'", str(caught.value)).groups()
    ids = [json.loads(line)["id"] for line in lines]
    assert ids.index(first) <= ids.index("poison") <= ids.index(last)
