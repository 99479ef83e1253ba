import math

import pytest
import torch

from spacy_m3el.model import intra_modal_contrastive_loss


def _by_hand(entity, mention, tau, w_inter, w_intra):
    """The intra-modal contrastive loss written out with scalars, row by row."""

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    entity = [unit(v) for v in entity]
    mention = [unit(v) for v in mention]
    size = len(entity)

    def side(rows, cols):
        total = 0.0
        for i in range(size):
            inter = [w_inter * dot(rows[i], cols[j]) / tau for j in range(size)]
            intra = [w_intra * dot(rows[i], rows[j]) / tau for j in range(size) if j != i]
            denominator = sum(math.exp(x) for x in inter + intra)
            total += -math.log(math.exp(inter[i]) / denominator)
        return total / size

    return (side(entity, mention) + side(mention, entity)) / 2


def test_matches_hand_computed_2x2():
    entity = [[1.0, 0.0], [0.6, 0.8]]
    mention = [[0.8, 0.6], [0.0, 2.0]]
    got = intra_modal_contrastive_loss(
        torch.tensor(entity), torch.tensor(mention), temperature=0.5, inter_weight=1.0, intra_weight=0.8
    )
    expected = _by_hand(entity, mention, 0.5, 1.0, 0.8)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # A concrete value, so that a changed formula cannot pass by accident.
    # Worked on paper: rows lose -log(e^1.6 / (e^1.6 + e^0 + e^0.96)) = 0.5477 and
    # -log(e^1.6 / (e^1.92 + e^1.6 + e^0.96)) = 1.0662 on both sides.
    assert expected == pytest.approx((0.54769 + 1.06620) / 2, rel=1e-4)


def test_paper_defaults_random_batch():
    torch.manual_seed(0)
    entity, mention = torch.randn(5, 7), torch.randn(5, 7)
    got = intra_modal_contrastive_loss(entity, mention)
    assert got.item() == pytest.approx(_by_hand(entity.tolist(), mention.tolist(), 0.03, 1.0, 0.8), rel=1e-4)


def test_same_modality_negatives_raise_the_loss():
    # Entities that look alike among themselves are harder negatives.
    mention = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    apart = torch.tensor([[1.0, 0.1], [0.1, 1.0]])
    alike = torch.tensor([[1.0, 0.9], [0.9, 1.0]])
    loss_apart = intra_modal_contrastive_loss(apart, mention, temperature=0.1)
    loss_alike = intra_modal_contrastive_loss(alike, mention, temperature=0.1)
    no_intra = intra_modal_contrastive_loss(alike, mention, temperature=0.1, intra_weight=0.0)
    assert loss_alike > loss_apart
    assert loss_alike > no_intra


def test_duplicate_gold_entities_are_not_negatives():
    entity = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    mention = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    with_labels = intra_modal_contrastive_loss(entity, mention, labels=torch.tensor([0, 0, 1]))
    without = intra_modal_contrastive_loss(entity, mention)
    assert with_labels < 1e-3 < without


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\[B, d\]"):
        intra_modal_contrastive_loss(torch.zeros(2, 3), torch.zeros(3, 3))


def test_works_under_bf16_autocast():
    torch.manual_seed(0)
    entity, mention = torch.randn(4, 8), torch.randn(4, 8)
    expected = intra_modal_contrastive_loss(entity, mention)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = intra_modal_contrastive_loss(entity.bfloat16(), mention.bfloat16())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=2e-2)
