import dataclasses

import pytest
import torch

from spacy_m3el.model import EncodedItems, M3ELConfig, M3ELMatcher
from tests.model.conftest import DIMS, random_items

ALL_PARTS = {"text_g2g", "text_g2l", "text", "image_g2g", "image_g2l", "image", "t2v", "v2t", "score"}


def build(config=None, seed=0, **switches):
    torch.manual_seed(seed)
    return M3ELMatcher(config or M3ELConfig(**DIMS, **switches)).eval()


def all_scores(matcher, mentions, entities):
    return matcher.scores(matcher.mention_side(mentions), matcher.entity_side(entities))


def test_shapes_and_parts(config):
    matcher = build(config)
    scores = all_scores(matcher, random_items(4, seed=1), random_items(7, seed=2))
    assert set(scores) == ALL_PARTS
    assert all(value.shape == (4, 7) for value in scores.values())
    expected = (scores["text"] + scores["image"] + scores["t2v"] + scores["v2t"]) / 4
    torch.testing.assert_close(scores["score"], expected)
    torch.testing.assert_close(scores["text"], (scores["text_g2g"] + scores["text_g2l"]) / 2)


def _pad_text(items: EncodedItems, extra: int) -> EncodedItems:
    garbage = torch.randn(len(items), extra, items.text_tokens.shape[-1]) * 100
    return dataclasses.replace(
        items,
        text_tokens=torch.cat([items.text_tokens, garbage], dim=1),
        text_mask=torch.cat([items.text_mask, torch.zeros(len(items), extra, dtype=torch.bool)], dim=1),
    )


def test_padded_text_tokens_do_not_change_any_score(config):
    matcher = build(config)
    mentions, entities = random_items(3, seed=3), random_items(5, seed=4)
    before = all_scores(matcher, mentions, entities)
    after = all_scores(matcher, _pad_text(mentions, 4), _pad_text(entities, 9))
    for name in ALL_PARTS:
        torch.testing.assert_close(after[name], before[name], msg=name)


def test_absent_images_are_ignored_whatever_their_pixels_hold(config):
    matcher = build(config)
    mask = torch.tensor([True, False, True, False])
    mentions = random_items(4, seed=5, image_mask=mask)
    entities = random_items(6, seed=6, image_mask=torch.tensor([False, True, True, False, True, True]))
    noisy_m = dataclasses.replace(
        mentions,
        image_global=torch.where(mask[:, None], mentions.image_global, torch.randn_like(mentions.image_global) * 50),
        image_tokens=torch.where(mask[:, None, None], mentions.image_tokens, torch.randn_like(mentions.image_tokens) * 50),
    )
    before = all_scores(matcher, mentions, entities)
    after = all_scores(matcher, noisy_m, entities)
    for name in ALL_PARTS:
        torch.testing.assert_close(after[name], before[name], msg=name)
    # No image on either side: no image evidence.
    assert torch.all(before["image"][1] == 0) and torch.all(before["image"][:, 0] == 0)
    assert torch.all(before["image"][0, 1:3] != 0)


def test_batch_composition_does_not_change_a_mentions_scores(config):
    matcher = build(config)
    mentions, entities = random_items(5, seed=7), random_items(4, seed=8)
    together = all_scores(matcher, mentions, entities)["score"]
    alone = all_scores(matcher, mentions.select(torch.tensor([2])), entities)["score"]
    torch.testing.assert_close(alone[0], together[2])


@pytest.mark.parametrize(
    "switch,removed",
    [
        ("use_g2g", {"text_g2g", "image_g2g"}),
        ("use_g2l", {"text_g2l", "image_g2l"}),
        ("use_text", {"text", "text_g2g", "text_g2l"}),
        ("use_image", {"image", "image_g2g", "image_g2l"}),
        ("use_t2v", {"t2v"}),
        ("use_v2t", {"v2t"}),
    ],
)
def test_each_switch_removes_exactly_its_branch(switch, removed):
    mentions, entities = random_items(3, seed=9), random_items(4, seed=10)
    full_matcher = build()
    full = all_scores(full_matcher, mentions, entities)
    ablated_matcher = build(**{switch: False})
    # Share the weights the two models have in common.
    missing, _ = ablated_matcher.load_state_dict(full_matcher.state_dict(), strict=False)
    assert not missing
    ablated = all_scores(ablated_matcher, mentions, entities)
    assert set(ablated) == ALL_PARTS - removed
    kept = [n for n in ("text", "image", "t2v", "v2t") if n in ablated]
    for name in kept:
        if name in ("text", "image") and switch in ("use_g2g", "use_g2l"):
            continue
        torch.testing.assert_close(ablated[name], full[name], msg=name)
    torch.testing.assert_close(ablated["score"], torch.stack([ablated[n] for n in kept]).mean(0))


def test_contrastive_switch_removes_only_that_loss(config):
    mentions, entities = random_items(4, seed=11), random_items(4, seed=12)
    labels = torch.arange(4)
    with_cl = build(config).loss(mentions, entities, labels)
    without = build(M3ELConfig(**DIMS, use_contrastive=False)).loss(mentions, entities, labels)
    assert "contrastive" in with_cl and "contrastive" not in without
    for name in ("score", "text", "image", "t2v", "v2t"):
        torch.testing.assert_close(with_cl[name], without[name])


def test_unidirectional_variant_has_one_cross_branch():
    matcher = build(cross_modal="unidirectional")
    scores = all_scores(matcher, random_items(2, seed=13), random_items(3, seed=14))
    assert "t2v" in scores and "v2t" not in scores
    assert hasattr(matcher.cross_matching, "fusion")
    with pytest.raises(ValueError, match="cross_modal"):
        M3ELConfig(**DIMS, cross_modal="sideways")


def test_config_rejects_a_model_without_branches():
    with pytest.raises(ValueError, match="no scoring branch"):
        M3ELConfig(**DIMS, use_text=False, use_image=False, use_t2v=False, use_v2t=False)
    with pytest.raises(ValueError, match="use_g2g or use_g2l"):
        M3ELConfig(**DIMS, use_g2g=False, use_g2l=False)


@pytest.mark.parametrize("switches", [{}, {"use_g2l": False}, {"cross_modal": "unidirectional"}, {"use_image": False, "use_t2v": False, "use_v2t": False}])
def test_gradients_reach_every_enabled_parameter(switches):
    matcher = build(**switches).train()
    mask = torch.tensor([True, True, False, True, True, True])
    loss = matcher.loss(random_items(6, seed=15, image_mask=mask), random_items(6, seed=16), torch.arange(6))["loss"]
    loss.backward()
    for name, param in matcher.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} got a zero gradient"


@pytest.mark.parametrize("switches", [{}, {"use_g2l": False}, {"use_g2g": False}, {"use_text": False}, {"cross_modal": "unidirectional"}])
def test_retrieval_plus_late_interaction_equals_full_score(switches):
    matcher = build(**switches)
    mentions = random_items(5, seed=17, image_mask=torch.tensor([True, False, True, True, True]))
    entities = random_items(9, seed=18, image_mask=torch.tensor([True] * 7 + [False] * 2))
    m_side, e_side = matcher.mention_side(mentions), matcher.entity_side(entities)
    full = matcher.scores(m_side, e_side)["score"]
    retrieval = matcher.mention_retrieval_vectors(m_side) @ matcher.entity_retrieval_vectors(e_side).T
    late = matcher.late_interaction_scores(m_side, e_side)
    torch.testing.assert_close(retrieval + late, full, rtol=1e-5, atol=1e-5)
    candidates = torch.tensor([[0, 3, 8], [1, 1, 2], [7, 6, 5], [4, 0, 1], [8, 8, 8]])
    per_candidate = matcher.scores(m_side, e_side, candidates)
    torch.testing.assert_close(per_candidate["score"], full.gather(1, candidates), rtol=1e-5, atol=1e-5)
    late_candidates = matcher.late_interaction_scores(m_side, e_side, candidates)
    torch.testing.assert_close(late_candidates, late.gather(1, candidates), rtol=1e-5, atol=1e-5)


def test_training_steps_lower_the_loss(config):
    torch.manual_seed(0)
    matcher = M3ELMatcher(config).train()
    mentions, entities = random_items(8, seed=19), random_items(8, seed=20)
    optimizer = torch.optim.AdamW(matcher.parameters(), lr=1e-3, weight_decay=1e-4)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = matcher.loss(mentions, entities, torch.arange(8))["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]
    assert losses[-1] == min(losses)


def test_config_round_trips_through_a_dict(config):
    data = config.to_dict()
    assert data["csra_temperatures"][-1] == "inf"
    assert M3ELConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="Unknown"):
        M3ELConfig.from_dict({**data, "colour": "blue"})
