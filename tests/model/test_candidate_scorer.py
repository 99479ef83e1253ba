import math

import pytest
import torch

from spacy_m3el.model import LEXICAL_FEATURES, NIL_FEATURES, CandidateScorer
from spacy_m3el.model.candidate_scorer import GATE_FEATURES

BRANCHES = ("text", "image", "t2v", "v2t")


def inputs(batch=3, width=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m3el = torch.randn(batch, width, generator=gen) * 10
    branches = torch.randn(batch, width, len(BRANCHES), generator=gen) * 10
    lexical = torch.rand(batch, width, len(LEXICAL_FEATURES), generator=gen)
    return m3el, branches, lexical


def test_an_untrained_scorer_ranks_by_m3el_and_never_says_nil():
    scorer = CandidateScorer(BRANCHES)
    m3el, branches, lexical = inputs()
    mask = scorer.feature_mask(prior=True, name=True)
    logits = scorer.logits(m3el, branches, lexical, feature_mask=mask, use_branches=True)
    assert torch.allclose(logits, 0.2 * m3el, atol=1e-5)
    valid = torch.ones_like(m3el, dtype=torch.bool)
    joint = scorer.log_probabilities(m3el, branches, lexical, valid, feature_mask=mask, use_branches=True,
                                     nil_features=torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]] * 3)).detach().exp()
    assert torch.allclose(joint.sum(1), torch.ones(3))
    assert torch.equal(joint[:, :-1].argmax(1), m3el.argmax(1))
    assert float(joint[:, -1].max()) < 1e-15


def test_feature_mask_switches_groups_off():
    scorer = CandidateScorer(BRANCHES)
    with torch.no_grad():
        scorer.feature_weights.fill_(1.0)
    m3el, branches, lexical = inputs()
    prior_only = scorer.feature_mask(prior=True, name=False)
    assert prior_only.tolist() == [1.0, 1.0, 0.0, 0.0]
    logits = scorer.logits(m3el, branches, lexical, feature_mask=prior_only, use_branches=False)
    expected = 0.2 * m3el + lexical[..., 0] + lexical[..., 1]
    assert torch.allclose(logits, expected, atol=1e-5)


def test_padding_gets_no_probability():
    scorer = CandidateScorer(BRANCHES)
    m3el, branches, lexical = inputs(batch=2, width=4)
    valid = torch.tensor([[True, True, False, False], [True, True, True, True]])
    mask = scorer.feature_mask(prior=True, name=True)
    for gate in (None, torch.tensor([0.3, 1.0])):
        joint = scorer.log_probabilities(m3el, branches, lexical, valid, feature_mask=mask, use_branches=True,
                                         gate=gate, nil_features=torch.zeros(2, len(NIL_FEATURES))).exp()
        assert joint[0, 2:4].tolist() == [0.0, 0.0]
        assert torch.allclose(joint.sum(1), torch.ones(2))


def test_training_loss_learns_a_prior_the_m3el_score_cannot_see():
    torch.manual_seed(0)
    scorer = CandidateScorer(BRANCHES)
    batch, width = 64, 6
    scores = {"score": torch.randn(batch, width)}
    scores.update({b: torch.randn(batch, width) for b in BRANCHES})
    labels = torch.randint(0, width, (batch,))
    lexical = torch.zeros(batch, width, len(LEXICAL_FEATURES))
    lexical[torch.arange(batch), labels, LEXICAL_FEATURES.index("from_alias")] = 1.0  # the gold is the alias
    mask = scorer.feature_mask(prior=True, name=True)
    optimizer = torch.optim.Adam(scorer.parameters(), lr=0.1)
    first = None
    for _ in range(50):
        optimizer.zero_grad()
        loss = scorer.training_loss(scores, lexical, labels, feature_mask=mask, use_branches=True)
        first = float(loss) if first is None else first
        loss.backward()
        optimizer.step()
    assert float(loss) < first / 3
    assert float(scorer.feature_weights[LEXICAL_FEATURES.index("from_alias")]) > 1.0
    # Masked features get no gradient at all.
    scorer.feature_weights.grad = None
    scorer.training_loss(scores, lexical, labels, feature_mask=scorer.feature_mask(prior=False, name=False),
                         use_branches=True).backward()
    assert scorer.feature_weights.grad.abs().sum() == 0


def test_a_new_scorer_is_unfitted_and_fits_thinc():
    scorer = CandidateScorer(BRANCHES)
    assert NIL_FEATURES[0] == "bias" and math.isnan(float(scorer.fitted_threshold))
    assert scorer.log_scale.shape == (1,)  # thinc's optimizer takes len() of every parameter


def test_the_picture_gate_trusts_an_agreeing_picture_and_drops_a_missing_one():
    scorer = CandidateScorer(BRANCHES)
    with torch.no_grad():
        scorer.gate_weights.copy_(torch.tensor([0.0, 3.0, 0.0, 0.0, 0.0, 0.0]))
    text = torch.tensor([[5.0, 1.0, 0.0, -1.0]] * 3)
    agreeing = torch.stack([text, text, text, text], dim=-1)  # the picture ranks as the text does
    against = torch.stack([text, -text, -text, -text], dim=-1)
    valid = torch.ones(3, 4, dtype=torch.bool)
    has_image = torch.tensor([True, True, False])
    inputs_ = scorer.gate_inputs(agreeing, valid)
    assert torch.allclose(inputs_[:, 0], torch.ones(3), atol=1e-5)  # correlation 1
    assert inputs_[0, 3:].tolist() == [15.0, 5.0]  # the picture's and the text's best scores
    trust, distrust = scorer.gate(agreeing, valid, has_image), scorer.gate(against, valid, has_image)
    assert float(trust[0]) > 0.9 and float(distrust[0]) < 0.1 and float(trust[2]) == 0.0
    # Without a picture (gate 0) the picture branches do not count: the text alone ranks.
    mask = scorer.feature_mask(prior=False, name=False)
    lexical = torch.zeros(3, 4, len(LEXICAL_FEATURES))
    m3el = against.mean(dim=-1)
    gated = scorer.log_probabilities(m3el, against, lexical, valid, feature_mask=mask, use_branches=False,
                                     gate=torch.zeros(3))
    assert torch.allclose(gated, (scorer.text_scale * text / 4).log_softmax(1), atol=1e-5)
    assert gated[0].argmax() == 0 and m3el[0].argmax() != 0


def test_the_alias_prior_weight_is_never_negative():
    scorer = CandidateScorer(BRANCHES)
    with torch.no_grad():
        scorer.feature_weights.copy_(torch.tensor([-2.0, -1.0, -3.0, 0.5]))
    weights = scorer.lexical_weights(torch.ones(len(LEXICAL_FEATURES)))
    assert weights.tolist() == [0.0, 0.0, -3.0, 0.5]  # log_prior, from_alias kept >= 0; name features free


def test_the_gate_mixes_the_experts_probabilities():
    scorer = CandidateScorer(BRANCHES)
    with torch.no_grad():
        scorer.nil_weights.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0, 0.0]))
        scorer.text_nil_weights.copy_(torch.tensor([0.0, 1.0, 0.5, 0.0, -0.1]))
        scorer.text_log_scale.fill_(math.log(3.0))
        scorer.text_feature_weights.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0]))
    m3el, branches, lexical = inputs()
    mask = scorer.feature_mask(prior=True, name=True)
    valid = torch.ones_like(m3el, dtype=torch.bool)
    features = torch.tensor([[1.0, 0.0, 0.0, 9.0, 3.0], [1.0, 1.0, 1.0, 0.0, 2.0], [1.0, 1.0, 0.0, 5.0, 4.0]])
    pictured = torch.cat([scorer.logits(m3el, branches, lexical, feature_mask=mask, use_branches=True),
                          torch.full((3, 1), 2.0)], dim=1).softmax(1)
    text_logits = 3.0 * branches[..., BRANCHES.index("text")] / len(BRANCHES) + lexical[..., 1]  # no picture branch
    text = torch.cat([text_logits, (features @ torch.tensor([0.0, 1.0, 0.5, 0.0, -0.1]))[:, None]], dim=1).softmax(1)
    gate = torch.tensor([1.0, 0.0, 0.25])
    mixed = scorer.log_probabilities(m3el, branches, lexical, valid, feature_mask=mask, use_branches=True,
                                     gate=gate, nil_features=features).exp()
    assert torch.allclose(mixed[0], pictured[0], atol=1e-6)  # a trusted picture: the picture expert's answer
    assert torch.allclose(mixed[1], text[1], atol=1e-6)
    assert torch.allclose(mixed[2], 0.25 * pictured[2] + 0.75 * text[2], atol=1e-6)
    alone = scorer.log_probabilities(m3el, branches, lexical, valid, feature_mask=mask, use_branches=True,
                                     nil_features=features).exp()
    assert torch.allclose(alone, pictured, atol=1e-6)  # no gate: the picture expert alone


def test_a_gate_and_nil_options_saved_with_fewer_inputs_are_the_same():
    scorer = CandidateScorer(BRANCHES)
    state = {"gate_weights": torch.tensor([1.0, 2.0, 0.0, 0.5]), "nil_weights": torch.tensor([3.0, 1.0, 0.5]),
             "text_nil_weights": torch.tensor([2.0, 1.0, 0.5]), "log_scale": torch.tensor([0.0])}
    assert scorer.upgrade_input_sizes(state)
    assert state["gate_weights"].tolist() == [1.0, 2.0, 0.0, 0.5, 0.0, 0.0]
    assert state["nil_weights"].tolist() == [3.0, 1.0, 0.5, 0.0, 0.0]
    assert state["text_nil_weights"].tolist() == [2.0, 1.0, 0.5, 0.0, 0.0]
    assert not scorer.upgrade_input_sizes(state)  # already current


def test_a_scorer_saved_before_the_text_expert_scores_picture_less_mentions_as_it_did():
    old_nil = torch.tensor([1.0, 2.0, -0.5, 0.7])
    old = {"log_scale": torch.tensor([math.log(0.1)]), "branch_weights": torch.tensor([0.5, 1.0, 0.0, 0.0]),
           "feature_weights": torch.tensor([0.3, 1.5, -0.2, 0.1]), "nil_weights": old_nil,
           "gate_weights": torch.tensor([1.0, 2.0, 0.0, 0.5]), "text_boost": torch.tensor([0.4])}
    scorer = CandidateScorer(BRANCHES)
    state = scorer.upgrade_legacy_state(old)
    assert "text_boost" not in state and state["nil_weights"].tolist() == old_nil[:3].tolist() + [0.0, 0.0]
    current = scorer.state_dict()
    scorer.load_state_dict({**current, **state})
    m3el, branches, lexical = inputs()
    mask = scorer.feature_mask(prior=True, name=True)
    text = branches[..., BRANCHES.index("text")]
    # The old formula without a picture (gate 0): the text branch's share of the content, boosted.
    before = 0.1 * (text / 4 + 0.5 * text) * 1.4 + lexical @ torch.tensor([0.3, 1.5, -0.2, 0.1])
    now = scorer.text_logits(branches, lexical, feature_mask=mask)
    assert torch.allclose(now, before, atol=1e-4)
    no_image = torch.tensor([[1.0, 1.0, 1.0, 0.0, 7.0]])
    assert scorer.nil_logits(no_image, text_expert=True).tolist() == pytest.approx([1.0 + 2.0 - 0.5])


def test_own_pictures_train_the_experts_without_the_gate():
    scorer = CandidateScorer(BRANCHES)
    gen = torch.Generator().manual_seed(3)
    scores = {b: torch.randn(4, 6, generator=gen) * 10 for b in BRANCHES}
    scores["score"] = torch.stack([scores[b] for b in BRANCHES]).mean(dim=0)
    lexical = torch.rand(4, 6, len(LEXICAL_FEATURES), generator=gen)
    labels, has_image = torch.tensor([0, 1, 2, 3]), torch.tensor([True, True, False, True])
    mask = scorer.feature_mask(prior=True, name=True)
    own = scorer.training_loss(scores, lexical, labels, feature_mask=mask, use_branches=True, has_image=has_image,
                               pictures_are_own=True)
    own.backward()
    assert scorer.gate_weights.grad is None or float(scorer.gate_weights.grad.abs().sum()) == 0.0
    branches = torch.stack([scores[b] for b in BRANCHES], dim=-1)
    pictured = scorer.logits(scores["score"], branches, lexical, feature_mask=mask, use_branches=True)
    text = scorer.text_logits(branches, lexical, feature_mask=mask)
    expected = torch.nn.functional.cross_entropy(torch.where(has_image[:, None], pictured, text), labels)
    assert torch.allclose(own, expected)
    scorer.zero_grad()
    scorer.training_loss(scores, lexical, labels, feature_mask=mask, use_branches=True,
                         has_image=has_image).backward()  # varied pictures: the gate learns
    assert float(scorer.gate_weights.grad.abs().sum()) > 0.0


def test_the_gate_reads_what_is_defined_with_one_candidate_or_no_text_branch():
    scorer = CandidateScorer(BRANCHES)
    one = torch.tensor([[[4.0, 5.0, 6.0, 7.0]]])  # one candidate: text 4, picture 5 + 6 + 7
    inputs_ = scorer.gate_inputs(one, torch.ones(1, 1, dtype=torch.bool))
    assert inputs_.tolist() == [[0.0, 0.0, 0.0, 18.0, 4.0]]  # no spread, but the best scores
    image_only = CandidateScorer(("image",))
    pictures = torch.tensor([[[3.0], [9.0], [1.0]]])
    inputs_ = image_only.gate_inputs(pictures, torch.tensor([[True, True, False]]))
    assert inputs_[0, 3] == 9.0 and inputs_[0, 4] == 0.0
    with torch.no_grad():
        image_only.gate_weights.copy_(torch.tensor([-9.0, 0.0, 0.0, 0.0, 1.0, 0.0]))
    gate = image_only.gate(pictures, torch.tensor([[True, True, False]]), torch.tensor([True]))
    assert float(gate[0]) == pytest.approx(0.5)  # the picture's best score moves it
    empty = scorer.gate_inputs(torch.zeros(2, 0, len(BRANCHES)), torch.zeros(2, 0, dtype=torch.bool))
    assert empty.shape == (2, len(GATE_FEATURES)) and not empty.any()
