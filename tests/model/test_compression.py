import pytest
import torch

from spacy_m3el.model import M3ELMatcher, pool_queries
from tests.model.conftest import random_items


def test_rows_with_few_tokens_are_kept_exactly():
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(3, 10, 4, generator=gen)
    weights = torch.zeros(3, 10)
    weights[0, :3] = 1  # 3 real tokens
    weights[1, :6] = 1  # 6 real tokens (= size)
    weights[2, [1, 4, 8]] = 1  # real tokens need not be a prefix
    pooled, mass = pool_queries(queries, weights, 6)
    assert pooled.shape == (3, 6, 4) and mass.shape == (3, 6)
    torch.testing.assert_close(pooled[0, :3], queries[0, :3], rtol=0, atol=0)
    torch.testing.assert_close(pooled[1], queries[1, :6], rtol=0, atol=0)
    torch.testing.assert_close(pooled[2, :3], queries[2, [1, 4, 8]], rtol=0, atol=0)
    assert mass.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6, [1, 1, 1, 0, 0, 0]]


def test_repeated_queries_become_one_weighted_centroid_each():
    gen = torch.Generator().manual_seed(1)
    distinct = torch.randn(2, 3, 5, generator=gen) * 10
    pattern = torch.tensor([0, 1, 0, 2, 2, 0, 1, 0, 2, 0])  # counts 5, 2, 3
    queries = distinct[:, pattern]
    weights = torch.ones(2, 10)
    weights[1, 8:] = 0  # row 1: counts 4, 2, 2
    pooled, mass = pool_queries(queries, weights, 4)
    for row, expected in ((0, {0: 5.0, 1: 2.0, 2: 3.0}), (1, {0: 4.0, 1: 2.0, 2: 2.0})):
        found = {}
        for vector, weight in zip(pooled[row], mass[row]):
            if weight > 0:
                index = int(torch.cdist(vector[None], distinct[row]).argmin())
                torch.testing.assert_close(vector, distinct[row, index])
                found[index] = float(weight)
        assert found == expected


def test_total_weight_is_kept_and_pooling_is_deterministic():
    gen = torch.Generator().manual_seed(2)
    queries = torch.randn(4, 49, 8, generator=gen)
    weights = torch.ones(4, 49)
    weights[3] = 0  # an entity without an image
    first = pool_queries(queries, weights, 12)
    second = pool_queries(queries, weights, 12)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first[1].sum(dim=1), weights.sum(dim=1))
    assert first[0].shape == (4, 12, 8)
    with pytest.raises(ValueError, match="size >= 1"):
        pool_queries(queries, weights, 0)


def test_compressed_side_scores_exactly_when_nothing_needs_pooling(config):
    matcher = M3ELMatcher(config).eval()
    mentions, entities = random_items(3, seed=3), random_items(5, seed=4)
    with torch.no_grad():
        mention = matcher.mention_side(mentions)
        exact = matcher.entity_side(entities)
        # Every entity has at most 6 text tokens and 5 patches.
        same = matcher.compress_entity_side(exact, 6)
        torch.testing.assert_close(matcher.scores(mention, same)["score"], matcher.scores(mention, exact)["score"])
        pooled = matcher.compress_entity_side(exact, 2)
        assert pooled["text_query"].shape[1] == 2 and pooled["image_query"].shape[1] == 2
        approx = matcher.scores(mention, pooled)
    exact_scores = matcher.scores(mention, exact)
    # Pooling only touches G2L: every other branch is unchanged.
    for name in ("text_g2g", "image_g2g", "t2v", "v2t"):
        torch.testing.assert_close(approx[name], exact_scores[name])
    assert not torch.allclose(approx["text_g2l"], exact_scores["text_g2l"])
