import math

import pytest
import torch

from spacy_m3el.model.matching import IntraModalMatching


def plain_g2l(module: IntraModalMatching, mention, entity, m: int, e: int) -> torch.Tensor:
    """G2L of one mention and one entity, written as the formula reads: each
    entity query attends over the mention's real tokens, the contexts are
    averaged with the query weights, normalised and met by the class vector."""
    keep = mention["key_mask"][m]
    keys, values = mention["key"][m][keep], mention["value"][m][keep]
    contexts = []
    for query in entity["query"][e]:
        if len(keys):
            attention = torch.softmax(keys @ query / math.sqrt(module.hidden_dim), dim=0)
            contexts.append(attention @ values)
        else:
            contexts.append(torch.zeros(module.hidden_dim))
    weights = entity["query_weight"][e]
    context = (torch.stack(contexts) * weights[:, None]).sum(0) / weights.sum().clamp(min=1.0)
    return (entity["cls"][e] * module.layer_norm(context)).sum()


@pytest.fixture
def sides():
    torch.manual_seed(3)
    module = IntraModalMatching(12, 8).eval()
    with torch.no_grad():
        module.layer_norm.weight.uniform_(0.5, 1.5)
        module.layer_norm.bias.uniform_(-0.5, 0.5)
    key_mask = torch.tensor([[True] * 5, [True, True, True, False, False], [False] * 5])
    with torch.no_grad():
        mention = module.mention_side(torch.randn(3, 12), torch.randn(3, 5, 12), key_mask)
        entity = module.entity_side(torch.randn(4, 12), torch.randn(4, 6, 12), torch.ones(4, 6, dtype=torch.bool))
    # Pooled caches weigh queries by cluster size; a padded query weighs 0.
    entity["query_weight"] = torch.tensor([[1.0] * 6, [3.0, 1.0, 2.0, 0.0, 0.0, 0.0],
                                           [0.5] * 6, [0.0] * 6])
    return module, mention, entity


def test_g2l_against_every_entity_equals_the_formula(sides):
    module, mention, entity = sides
    with torch.no_grad():
        scores = module.g2l(mention, entity, pairwise=True)
        expected = torch.tensor([[plain_g2l(module, mention, entity, m, e) for e in range(4)] for m in range(3)])
    assert scores.shape == (3, 4)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_g2l_against_gathered_candidates_equals_the_formula(sides):
    module, mention, entity = sides
    candidates = torch.tensor([[3, 0], [1, 1], [2, 0]])
    gathered = {name: value[candidates] for name, value in entity.items()}
    with torch.no_grad():
        scores = module.g2l(mention, gathered, pairwise=False)
        expected = torch.tensor([[plain_g2l(module, mention, entity, m, int(e)) for e in row]
                                 for m, row in enumerate(candidates)])
    assert scores.shape == (3, 2)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_g2l_gradients_stay_finite_for_a_mention_without_tokens(sides):
    module, mention, entity = sides
    module.train()
    mention = {name: value.detach().requires_grad_(value.is_floating_point()) for name, value in mention.items()}
    module.g2l(mention, entity, pairwise=True).sum().backward()
    assert torch.isfinite(mention["key"].grad).all() and torch.isfinite(module.layer_norm.weight.grad).all()
    assert mention["key"].grad[2].abs().sum() == 0  # the tokenless mention attends to nothing
