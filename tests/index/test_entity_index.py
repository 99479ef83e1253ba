import json

import numpy
import pytest
import torch

from spacy_m3el.errors import KBError
from spacy_m3el.index.encoding import index_arrays
from spacy_m3el.index.entity_index import INDEX_FORMAT, EntityIndex, saved_index
from spacy_m3el.model import EncodedItems, M3ELConfig, M3ELMatcher


def items(n, *, text_len, patches, text_dim, image_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    text_mask = torch.ones(n, text_len, dtype=torch.bool)
    text_mask[::2, text_len // 2 :] = False
    return EncodedItems(
        text_global=torch.randn(n, text_dim, generator=gen),
        text_tokens=torch.randn(n, text_len, text_dim, generator=gen),
        text_mask=text_mask,
        image_global=torch.randn(n, image_dim, generator=gen),
        image_tokens=torch.randn(n, patches, image_dim, generator=gen),
        image_mask=torch.arange(n) % 5 != 0,
    )


def built(matcher, batches, *, max_queries, fingerprint="x", kb="kb-digest"):
    """An index of ``batches`` with the meta every build writes."""
    arrays, layout = index_arrays(matcher, batches, max_queries=max_queries)
    return EntityIndex(arrays, {"format": INDEX_FORMAT, "max_queries": max_queries, "fingerprint": fingerprint,
                                "kb": kb, "retrieval_parts": layout})


@pytest.fixture(scope="module")
def default_shaped():
    """The default backbone's shapes: 384-d MiniLM text, 40 tokens, 49 x 1280 patches."""
    torch.manual_seed(0)
    matcher = M3ELMatcher(M3ELConfig(text_dim=384, image_global_dim=1280, image_token_dim=1280)).eval()
    shapes = dict(text_len=40, patches=49, text_dim=384, image_dim=1280)
    with torch.no_grad():
        entity_batches = [matcher.entity_side(items(6, seed=s, **shapes)) for s in (1, 2)]
        mention = matcher.mention_side(items(3, seed=3, **shapes))
    return matcher, entity_batches, mention


def test_exact_cache_reproduces_the_training_score(default_shaped):
    matcher, batches, mention = default_shaped
    cache = built(matcher, batches, max_queries=None)
    assert len(cache) == 12
    full = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    candidates = torch.tensor([[0, 5, 11], [3, 3, 7], [10, 2, 1]])
    with torch.no_grad():
        expected = matcher.scores(mention, full, candidates)["score"]
        got = matcher.candidate_scores(mention, cache.gather(candidates))["score"]
        exhaustive = matcher.scores(mention, cache.full_side())["score"]
    # fp16 storage is the only difference.
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-2)
    torch.testing.assert_close(exhaustive.gather(1, candidates), got, rtol=1e-5, atol=1e-5)
    vectors = matcher.mention_retrieval_vectors(mention)
    torch.testing.assert_close(
        cache.retrieve(vectors, 4), (vectors @ matcher.entity_retrieval_vectors(full).T).topk(4).indices
    )


def test_decomposable_parts_are_stored_once(default_shaped):
    matcher, batches, _ = default_shaped
    index = built(matcher, batches, max_queries=None)
    arrays, meta = index.arrays, index.meta
    assert meta["format"] == INDEX_FORMAT and meta["max_queries"] is None
    for key in ("text_global", "image_global", "t2v", "v2t"):
        assert key not in arrays
    assert [part for part, _ in meta["retrieval_parts"]] == matcher.retrieval_parts()
    assert arrays["retrieval"].shape == (12, 384 + 3 * 96)
    assert all(a.dtype in (numpy.float16, numpy.bool_) for a in arrays.values())


def test_pooled_cache_fits_8_kb_per_entity(default_shaped):
    matcher, batches, mention = default_shaped
    exact = built(matcher, batches, max_queries=None)
    pooled = built(matcher, batches, max_queries=12)
    # 672 retrieval + 2 x 96 cls + 2 x 12 x 96 queries (fp16), 2 x 12 weights (fp16), has_image
    assert pooled.bytes_per_entity == 2 * (672 + 192 + 2304 + 24) + 1 == 6385 <= 8192
    assert exact.bytes_per_entity == 2 * (672 + 192 + 89 * 96 + 89) + 1 == 18995
    assert pooled.arrays["text_query"].shape == (12, 12, 96)
    # Pooling leaves every decomposable part (retrieval) as it is.
    numpy.testing.assert_array_equal(pooled.arrays["retrieval"], exact.arrays["retrieval"])
    # Entities with <= 12 real text tokens (every other one here has 20) keep exact text G2L.
    rows = torch.tensor([[0, 2, 4]])
    with torch.no_grad():
        a = matcher.candidate_scores({k: v[:1] for k, v in mention.items()}, pooled.gather(rows))
        b = matcher.candidate_scores({k: v[:1] for k, v in mention.items()}, exact.gather(rows))
    assert not torch.allclose(a["text_g2l"], b["text_g2l"])  # 20 tokens pooled to 12
    torch.testing.assert_close(a["t2v"], b["t2v"])


def test_memory_mapped_cache_gathers_the_same_rows(default_shaped, tmp_path):
    matcher, batches, _ = default_shaped
    in_memory = built(matcher, batches, max_queries=12)
    arrays, meta = in_memory.arrays, in_memory.meta
    mapped = {}
    for name, array in arrays.items():
        numpy.save(tmp_path / f"{name}.npy", array, allow_pickle=False)
        mapped[name] = numpy.load(tmp_path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
    from_disk = EntityIndex(mapped, meta)
    assert isinstance(from_disk.arrays["image_query"], numpy.memmap)
    rows = torch.tensor([[1, 11], [4, 4]])
    for key, value in in_memory.gather(rows).items():
        torch.testing.assert_close(from_disk.gather(rows)[key], value, rtol=0, atol=0)
        assert value.shape[:2] == (2, 2)


def test_index_of_another_format_is_refused_for_search(default_shaped):
    matcher, batches, _ = default_shaped
    index = built(matcher, batches, max_queries=4)
    old = EntityIndex(index.arrays, {**index.meta, "format": 1})
    identity = {"format": INDEX_FORMAT, "max_queries": 4, "fingerprint": "x", "kb": "kb-digest", "n_entities": 12}
    assert old.mismatch(identity) == ["format"] and index.mismatch(identity) == []
    with pytest.raises(KBError, match="format 1 is not"):
        old.retrieve(torch.zeros(1, index.arrays["retrieval"].shape[1]), 2)


def test_one_check_names_what_differs(default_shaped):
    matcher, batches, _ = default_shaped
    index = built(matcher, batches, max_queries=12, fingerprint="abc")
    identity = {"format": INDEX_FORMAT, "max_queries": 12, "fingerprint": "abc", "kb": "kb-digest", "n_entities": 12}
    assert index.mismatch(identity) == []
    assert index.mismatch({**identity, "n_entities": 13}) == ["n_entities"]
    assert index.mismatch({**identity, "max_queries": None}) == ["max_queries"]
    assert index.mismatch({**identity, "fingerprint": "other", "kb": "another"}) == ["fingerprint", "kb"]
    # An index saved before the KB digest was recorded is checked without it.
    legacy = EntityIndex(index.arrays, {k: v for k, v in index.meta.items() if k != "kb"})
    assert legacy.mismatch({**identity, "kb": "another"}) == []


def test_validity_save_and_load(default_shaped, tmp_path):
    matcher, batches, _ = default_shaped
    cache = built(matcher, batches, max_queries=12, fingerprint="abc")
    cache.save(tmp_path / "cache")
    loaded = EntityIndex.load(tmp_path / "cache", n_entities=12)
    assert loaded.meta == cache.meta and isinstance(loaded.arrays["text_query"], numpy.memmap)
    with pytest.raises(KBError, match="built for 12 entities, the KB has 11"):
        EntityIndex.load(tmp_path / "cache", n_entities=11)
    with pytest.raises(KBError, match="disagree on the number of entities"):
        EntityIndex({"a": numpy.zeros((2, 3)), "b": numpy.zeros((3, 3))}, {})
    # A pipeline's index/, else kb/cache/ where pipelines saved before kept it; none is None.
    assert saved_index([tmp_path / "index", tmp_path / "cache"], n_entities=12).meta == cache.meta
    assert saved_index([tmp_path / "index", tmp_path / "nothing"], n_entities=12) is None
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "retrieval.npy").write_bytes(b"")
    with pytest.raises(KBError, match="index folder has no meta.json"):
        saved_index([tmp_path / "index", tmp_path / "cache"], n_entities=12)


def test_cached_keys_are_what_the_cache_stores(default_shaped):
    matcher, batches, _ = default_shaped
    arrays, _ = index_arrays(matcher, batches, max_queries=None)
    assert set(arrays) == {"retrieval", *matcher.cached_entity_keys()}
    no_g2l = M3ELMatcher(M3ELConfig(text_dim=384, image_global_dim=1280, image_token_dim=1280, use_g2l=False))
    assert no_g2l.cached_entity_keys() == ["has_image"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda a: a.update(retrieval=a["retrieval"][:, :-1]), "'retrieval' must be 672 wide"),
        (lambda a: a.update(text_cls=a["text_cls"][:, 0]), "'text_cls' must have 2 dimensions"),
        (lambda a: a.update(image_query=a["image_query"][:, :, :5]), "'image_query' must be as wide"),
        (lambda a: a.update(text_query_weight=a["text_query_weight"][:, :3]), "'text_query_weight' must match"),
        (lambda a: a.update(has_image=a["has_image"].astype("float16")), "'has_image' must be a 1-D bool"),
        (lambda a: a.update(text_cls=a["text_cls"].astype("float32")), "'text_cls' must be float16"),
    ],
)
def test_damaged_cache_arrays_are_named_at_load(default_shaped, tmp_path, damage, message):
    matcher, batches, _ = default_shaped
    cache = built(matcher, batches, max_queries=None)
    cache.save(tmp_path / "cache")
    arrays = {name: numpy.load(tmp_path / "cache" / f"{name}.npy") for name in cache.arrays}
    damage(arrays)
    for name, array in arrays.items():
        numpy.save(tmp_path / "cache" / f"{name}.npy", array)
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    del meta["checksums"]  # a hand-edited cache: the shape checks still apply
    (tmp_path / "cache" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(KBError, match=message):
        EntityIndex.load(tmp_path / "cache", n_entities=12)


def test_changed_values_fail_the_checksum(default_shaped, tmp_path):
    matcher, batches, mention = default_shaped
    cache = built(matcher, batches, max_queries=None)
    cache.save(tmp_path / "cache")
    retrieval = numpy.load(tmp_path / "cache" / "retrieval.npy")
    retrieval[3, 5] = numpy.nan
    numpy.save(tmp_path / "cache" / "retrieval.npy", retrieval)
    with pytest.raises(KBError, match="retrieval.npy: its content does not match the checksum"):
        EntityIndex.load(tmp_path / "cache", n_entities=12)
    unchecked = EntityIndex({**cache.arrays, "retrieval": retrieval}, cache.meta)
    with pytest.raises(KBError, match="NaN"):
        unchecked.retrieve(matcher.mention_retrieval_vectors(mention), 2)


@pytest.mark.parametrize(
    "meta, message",
    [([], "expected an object"), ({"arrays": []}, "'n_entities' is missing"),
     ({"n_entities": "12", "arrays": []}, "'n_entities' is malformed"),
     ({"n_entities": 12, "arrays": [3]}, "'arrays' is malformed")],
)
def test_malformed_meta_json_names_the_field(tmp_path, meta, message):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(KBError, match=message):
        EntityIndex.load(tmp_path / "cache", n_entities=12)


def test_cache_builds_from_bfloat16_sides(default_shaped):
    """Sides computed under bf16 autocast used to crash the build (numpy has no bfloat16)."""
    matcher, batches, _ = default_shaped
    bf16 = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in b.items()} for b in batches]
    arrays, _ = index_arrays(matcher, bf16, max_queries=12)
    reference, _ = index_arrays(matcher, batches, max_queries=12)
    assert all(arrays[name].dtype == reference[name].dtype for name in reference)
    numpy.testing.assert_allclose(arrays["retrieval"], reference["retrieval"], rtol=0.02, atol=0.05)


def _rows(side, rows):
    return {key: value[rows] for key, value in side.items()}


@pytest.mark.parametrize("max_queries", [None, 4])
def test_entities_added_removed_and_replaced_equal_a_build_of_the_result(default_shaped, max_queries):
    """add/remove/replace give, row for row, the index a build of the changed entities in their new order gives."""
    matcher, batches, _ = default_shaped
    full = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    index = built(matcher, [_rows(full, list(range(8)))], max_queries=max_queries)
    identity = {"fingerprint": "x", "kb": "new", "n_entities": 0}

    def same(got, rows):
        expected = built(matcher, [_rows(full, rows)], max_queries=max_queries)
        assert len(got) == len(rows) and got.meta["kb"] == "new"
        for name, array in expected.arrays.items():
            width = array.shape[1] if array.ndim >= 2 else None
            numpy.testing.assert_array_equal(got.arrays[name][:, :width] if width else got.arrays[name], array)
            if width:  # anything beyond the widest encoded row is padding (weight 0)
                assert not numpy.asarray(got.arrays[name][:, width:]).any()

    added = index.add(built(matcher, [_rows(full, [8, 9, 10, 11])], max_queries=max_queries),
                      identity={**identity, "n_entities": 12})
    same(added, list(range(12)))
    same(index.remove([0, 5], identity={**identity, "n_entities": 6}), [1, 2, 3, 4, 6, 7])
    replaced = index.replace([2, 6], built(matcher, [_rows(full, [10, 11])], max_queries=max_queries),
                             identity={**identity, "n_entities": 8})
    same(replaced, [0, 1, 10, 3, 4, 5, 11, 7])
    assert "checksums" not in replaced.meta and "pooling_agreement" not in replaced.meta  # whole-KB figures
    with pytest.raises(ValueError, match="2 rows to encode, but 1 encoded"):
        index.replace([2, 6], built(matcher, [_rows(full, [10])], max_queries=max_queries), identity=identity)


def test_damaged_index_files_are_named(tmp_path):
    index = EntityIndex({"vec": numpy.ones((2, 64), dtype=numpy.float16)}, {"fingerprint": "x"})
    index.save(tmp_path / "index")
    file = tmp_path / "index" / "vec.npy"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(KBError, match="vec.npy: index file is truncated or corrupt"):
        EntityIndex.load(tmp_path / "index", n_entities=2)
    file.unlink()
    with pytest.raises(KBError, match="index file 'vec.npy' is missing"):
        EntityIndex.load(tmp_path / "index", n_entities=2)
    (tmp_path / "index" / "meta.json").write_text('{"n_entities": ')
    with pytest.raises(KBError, match="meta.json is not valid JSON"):
        EntityIndex.load(tmp_path / "index", n_entities=2)


def test_files_are_written_a_block_at_a_time_from_several_parts(default_shaped, tmp_path, monkeypatch):
    from spacy_m3el.index import store

    matcher, batches, _ = default_shaped
    index = built(matcher, batches, max_queries=None)
    monkeypatch.setattr(store, "WRITE_ROWS", 5)  # blocks that cut the parts
    shapes = {name: list(array.shape) for name, array in index.arrays.items()}
    parts = {name: [array[:0], array[:7], array[7:]] for name, array in index.arrays.items()}  # an empty part too
    checksums = store.write_arrays(tmp_path / "index", shapes, lambda name: parts[name])
    store.write_meta(tmp_path / "index", {**index.meta, "checksums": checksums})
    loaded = EntityIndex.load(tmp_path / "index", n_entities=12)  # the checksums hold
    for name, array in index.arrays.items():
        numpy.testing.assert_array_equal(loaded.arrays[name], array)
