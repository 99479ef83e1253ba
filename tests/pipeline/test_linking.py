import pytest
import torch

from spacy_m3el.pipeline import linking
from tests.index.test_entity_index import built, default_shaped, items  # noqa: F401 - fixture


@pytest.fixture(scope="module")
def exact_cache(default_shaped):  # noqa: F811
    matcher, batches, mention = default_shaped
    return matcher, built(matcher, batches, max_queries=None), mention


def test_two_stage_over_every_entity_is_the_exhaustive_ranking(exact_cache):
    matcher, cache, mention = exact_cache
    full = linking.exhaustive_scores(matcher, mention, cache, entity_chunk=5, mention_chunk=2)
    assert full.shape == (3, 12)
    ranking = linking.two_stage(matcher, mention, cache, k=len(cache))
    assert ranking.counts == [12, 12, 12]
    torch.testing.assert_close(ranking.rows, full.argsort(dim=1, descending=True, stable=True))
    torch.testing.assert_close(ranking.scores["score"], full.sort(dim=1, descending=True).values)
    torch.testing.assert_close(ranking.best_rows(), full.argmax(dim=1))
    # Branch scores stay aligned with the rows they belong to.
    branches = sum(ranking.scores[b] for b in ("text", "image", "t2v", "v2t")) / 4
    torch.testing.assert_close(branches, ranking.scores["score"])


def test_alias_rows_come_first_and_are_not_duplicated(exact_cache):
    matcher, cache, mention = exact_cache
    query = matcher.mention_retrieval_vectors(mention)
    dense = cache.retrieve(query, 3).tolist()
    rows = linking.candidate_rows(cache, query, k=3, alias_rows=[[dense[0][1], 7], [], [11]])
    assert rows[0][:2] == [dense[0][1], 7] and len(rows[0]) == len(set(rows[0]))
    assert rows[1] == dense[1]
    assert rows[2][0] == 11
    assert linking.candidate_rows(cache, query, k=0, alias_rows=[[1], [], [2]]) == [[1], [], [2]]


def test_rerank_pads_short_candidate_lists(exact_cache):
    matcher, cache, mention = exact_cache
    ranking = linking.rerank(matcher, mention, cache, [[4, 9], [], [1, 2, 3]])
    assert ranking.counts == [2, 0, 3]
    assert ranking.rows[1].tolist() == [-1, -1, -1]
    assert sorted(ranking.rows[0, :2].tolist()) == [4, 9] and ranking.rows[0, 2] == -1
    assert ranking.scores["score"][0, 0] >= ranking.scores["score"][0, 1]
    assert ranking.best_rows()[1] == -1
    empty = linking.rerank(matcher, mention, cache, [[], [], []])
    assert empty.rows.shape == (3, 0) and empty.best_rows().tolist() == [-1, -1, -1]


def test_rerank_in_passes_of_a_few_mentions_equals_one_pass(exact_cache, monkeypatch):
    matcher, cache, mention = exact_cache
    candidates = [[4, 9, 0], [], [1, 2, 3, 5, 11]]
    whole = linking.rerank(matcher, mention, cache, candidates)
    monkeypatch.setattr(linking, "CPU_RERANK_MENTIONS", 2)
    passes = linking.rerank(matcher, mention, cache, candidates)
    assert passes.rows.tolist() == whole.rows.tolist()
    assert set(passes.scores) == set(whole.scores)
    for name, value in whole.scores.items():
        torch.testing.assert_close(passes.scores[name], value)
