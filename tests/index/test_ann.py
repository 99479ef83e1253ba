"""Top-K search: the chunked exact scan and the faiss index with rescoring."""
import numpy
import pytest
import torch

from spacy_m3el.errors import KBError
from spacy_m3el.index import ann as retrieval
from spacy_m3el.index.ann import AnnIndex, default_factory, exact_top_k, rescore
from spacy_m3el.index.entity_index import EntityIndex

faiss = pytest.importorskip("faiss", reason="the ann extra is not installed")


def clustered(n, dim=48, clusters=20, seed=0):
    rng = numpy.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    return (centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, dim))).astype(numpy.float16)


def test_chunked_scan_equals_one_matrix_product(monkeypatch):
    monkeypatch.setattr(retrieval, "EXACT_CHUNK_ROWS", 37)  # chunk edges inside the top-k
    matrix = clustered(500)
    query = torch.randn(5, matrix.shape[1])
    scores, rows = exact_top_k(matrix, query, 12)
    full = query @ torch.from_numpy(matrix.astype(numpy.float32)).T
    expected_scores, expected_rows = full.topk(12, dim=1)
    assert torch.equal(rows, expected_rows)
    assert torch.allclose(scores, expected_scores)
    assert exact_top_k(matrix[:5], query, 12)[1].shape == (5, 5)  # k larger than the matrix


def test_rescore_orders_candidates_exactly_and_keeps_pads():
    matrix = clustered(50)
    query = torch.randn(2, matrix.shape[1])
    candidates = numpy.array([[3, 9, 40, 1], [7, -1, -1, -1]])
    found = rescore(matrix, query, candidates, 3)
    scores = query @ torch.from_numpy(matrix.astype(numpy.float32)).T
    first = sorted([3, 9, 40, 1], key=lambda r: -float(scores[0, r]))[:3]
    assert found[0].tolist() == first
    assert found[1].tolist() == [7, -1, -1]


def test_default_factory_sizes_lists_to_the_kb():
    assert default_factory(1_000_000, 672) == "IVF4096,SQ8"
    assert default_factory(300, 672) == "IVF16,SQ8"
    assert default_factory(100_000, 100) == "IVF1024,SQ8"


def test_ann_index_recall_search_and_round_trip(tmp_path):
    matrix = clustered(3000)
    queries = torch.from_numpy(clustered(40, seed=1).astype(numpy.float32))
    ann = AnnIndex.build(matrix, factory="IVF8,Flat", nprobe=8, shortlist=64, queries=queries, recall_k=10)
    # Every list visited and the shortlist rescored exactly: the exact top-10.
    assert ann.meta["recall"]["recall"] == 1.0
    assert torch.equal(ann.search(matrix, queries, 10), exact_top_k(matrix, queries, 10)[1])
    ann.nprobe = 1
    assert ann.recall(matrix, queries, 10)["recall"] < 1.0  # one list of eight misses some
    ann.save(tmp_path)
    loaded = AnnIndex.load(tmp_path, n_entities=3000)
    assert loaded.factory == "IVF8,Flat" and loaded.nprobe == 1 and len(loaded) == 3000
    with pytest.raises(KBError, match="holds 3000 entities, the KB has 10"):
        AnnIndex.load(tmp_path, n_entities=10)
    data = bytearray((tmp_path / "ann.faiss").read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "ann.faiss").write_bytes(bytes(data))
    with pytest.raises(KBError, match="does not match the checksum"):
        AnnIndex.load(tmp_path, n_entities=3000)


def test_bad_factory_is_named():
    with pytest.raises(ValueError, match="faiss cannot build the index 'NoSuchIndex'"):
        AnnIndex.build(clustered(100), factory="NoSuchIndex")


def test_cache_searches_with_its_index_only_when_asked(tmp_path):
    matrix = clustered(400)
    cache = EntityIndex({"retrieval": matrix}, {"format": 2, "retrieval_parts": [["text_global", 48]]})
    query = torch.randn(3, 48)
    exact = cache.retrieve(query, 5)
    cache.ann = AnnIndex.build(matrix, factory="IVF4,Flat", nprobe=1, shortlist=5)
    assert torch.equal(cache.retrieve(query, 5), exact)  # use_ann is off
    cache.use_ann = True
    assert torch.equal(cache.retrieve(query, 5), cache.ann.search(matrix, query, 5))
    cache.save(tmp_path / "cache")
    loaded = EntityIndex.load(tmp_path / "cache", n_entities=400)
    loaded.save(tmp_path / "again")  # an index never read is copied as it is
    assert (tmp_path / "again" / "ann.faiss").read_bytes() == (tmp_path / "cache" / "ann.faiss").read_bytes()
    assert loaded.ann is None and loaded.ann_index().factory == "IVF4,Flat"  # read at first use


def test_nprobe_is_chosen_to_reach_the_target_recall_and_saved(tmp_path):
    matrix = clustered(6000, clusters=60)
    noise = torch.randn(120, matrix.shape[1], generator=torch.Generator().manual_seed(0))
    queries = torch.from_numpy(matrix[::50].astype(numpy.float32)) + 0.3 * noise
    ann = AnnIndex.build(matrix, factory="IVF64,Flat", nprobe=None, shortlist=64, queries=queries, recall_k=32,
                         target_recall=0.95)
    choice = ann.meta["nprobe_choice"]
    by_nprobe = {int(n): r for n, r in choice["stand_in_recall_by_nprobe"].items()}
    first = min(n for n, r in by_nprobe.items() if r >= 0.95)
    assert list(by_nprobe) == [2 ** i for i in range(len(by_nprobe))]  # 1, 2, 4, ... up to the first that reaches it
    assert max(by_nprobe) == first >= 2 and all(r < 0.95 for n, r in by_nprobe.items() if n < first)
    assert ann.nprobe == choice["chosen"] == min(2 * first, 64) and ann.meta["recall"]["nprobe"] == ann.nprobe
    assert ann.meta["recall"]["recall"] >= by_nprobe[first]  # the margin never loses recall
    ann.save(tmp_path)
    assert AnnIndex.load(tmp_path, n_entities=6000).nprobe == ann.nprobe
    fixed = AnnIndex.build(matrix, factory="IVF64,Flat", nprobe=3, queries=queries, recall_k=32)
    assert fixed.nprobe == 3 and "nprobe_choice" not in fixed.meta
