import math
import random

import numpy
import pytest
import torch

from spacy_m3el.kb.base import NIL
from spacy_m3el.model import NIL_FEATURES, CandidateScorer
from spacy_m3el.pipeline.calibration import (
    ScorerOptions,
    apply_scorer,
    choose_threshold,
    expected_calibration_error,
    fit,
    fit_picture_gate,
    fit_weights,
    to_tensors,
)
from spacy_m3el.pipeline.features import lexical_features
from spacy_m3el.pipeline.settings import LinkerSettings

BRANCHES = ("text", "image", "t2v", "v2t")
PAPER = ScorerOptions(prior=False, name=False, branches=False, gate=False)


def mention(rng, *, gold, n=6, prior_decides=True, with_alias=True, image=True):
    """A result as the linker makes it. The M3EL score is noisy evidence for
    the gold (index ``gold``, or none for NIL); the alias prior is a second
    source of evidence."""
    candidates = []
    for j in range(n):
        score = rng.gauss(60.0, 4.0) + (6.0 if j == gold else 0.0)
        prior = None
        if with_alias:
            prior = 0.7 if (j == gold and prior_decides) else 0.3 / n
        candidates.append({
            "id": f"E{j}", "score": score, "prior": prior or 0.0,
            "branches": {b: score + rng.gauss(0, 1) for b in BRANCHES},
            "features": lexical_features("apple", f"Name {j}", prior),
        })
    return {"id": None, "score": None, "nil_prob": None, "candidates": candidates,
            "modalities": ["text", "image"] if image else ["text"]}


def data(seed, count, **kwargs):
    rng = random.Random(seed)
    results, gold = [], []
    for _ in range(count):
        g = rng.randrange(6)
        results.append(mention(rng, gold=g, **kwargs))
        gold.append(f"E{g}")
    return results, gold


def accuracy(results, gold):
    return sum(r["id"] == g for r, g in zip(results, gold)) / len(gold)


def test_fit_learns_the_prior_and_beats_the_m3el_score_alone():
    train, train_gold = data(0, 300)
    test, test_gold = data(1, 300)
    with_prior, paper = CandidateScorer(BRANCHES), CandidateScorer(BRANCHES)
    fit(with_prior, train, train_gold, options=ScorerOptions())
    fit(paper, [dict(r, candidates=[dict(c) for c in r["candidates"]]) for r in train], train_gold, options=PAPER)
    copy = [dict(r, candidates=[dict(c) for c in r["candidates"]]) for r in test]
    apply_scorer(with_prior, test, options=ScorerOptions(), threshold=None)
    apply_scorer(paper, copy, options=PAPER, threshold=None)
    assert accuracy(test, test_gold) > accuracy(copy, test_gold) + 0.1
    assert float(with_prior.feature_weights[0].detach()) > 0.5  # log prior
    # The paper's switch keeps the M3EL ranking: the best raw score wins.
    assert all(r["candidates"][0]["score"] == max(c["score"] for c in r["candidates"]) for r in copy)


def test_fitted_probabilities_are_calibrated_on_held_out_data():
    train, train_gold = data(2, 600, prior_decides=False)
    test, test_gold = data(3, 600, prior_decides=False)
    scorer = CandidateScorer(BRANCHES)
    report = fit(scorer, train, train_gold, options=ScorerOptions())
    assert report["nll_after"] < report["nll_before"] and not report["nil_option"]
    # No gradient is left behind for the next training step to apply.
    assert all(param.grad is None for param in scorer.parameters())
    apply_scorer(scorer, test, options=ScorerOptions(), threshold=None)
    confidences = [r["score"] for r in test]
    assert all(0.0 <= c <= 1.0 for c in confidences)
    assert expected_calibration_error(confidences, [r["id"] == g for r, g in zip(test, test_gold)]) < 0.05
    # Uncalibrated (temperature 5) the same scores are overconfident.
    raw = CandidateScorer(BRANCHES)
    apply_scorer(raw, test, options=ScorerOptions(), threshold=None)
    raw_ece = expected_calibration_error([r["score"] for r in test], [r["id"] == g for r, g in zip(test, test_gold)])
    assert raw_ece > 0.1


def test_nil_is_learned_from_mentions_without_alias_candidates():
    rng = random.Random(4)
    results, gold = data(5, 200)
    for _ in range(60):
        results.append(mention(rng, gold=-1, with_alias=False))
        gold.append(NIL)
    scorer = CandidateScorer(BRANCHES)
    report = fit(scorer, results, gold, options=ScorerOptions())
    assert report["nil_option"] and report["nil_mentions"] == 60
    zorgl = mention(rng, gold=-1, with_alias=False, image=False)
    linked = mention(rng, gold=2)
    apply_scorer(scorer, [zorgl, linked], options=ScorerOptions(), threshold=None)
    assert zorgl["id"] == NIL and zorgl["score"] == zorgl["nil_prob"] > 0.5
    assert linked["id"] == "E2" and 0.5 < linked["score"] <= 1.0


def test_threshold_is_chosen_to_maximise_correct_answers():
    def result(prob, best="E1"):
        return {"candidates": [{"id": best, "prob": prob}], "nil_prob": 0.0}

    results = [result(0.9), result(0.8), result(0.3), result(0.2)]
    gold = ["E1", "E1", NIL, NIL]
    threshold, share = choose_threshold(results, gold)
    assert 0.3 < threshold <= 0.8 and share == 1.0
    # Without NIL golds nothing is gained by a threshold.
    assert choose_threshold(results, ["E1", "E1", "E1", "E2"])[0] == 0.0


def test_an_explicit_threshold_wins_over_the_fitted_one():
    rng = random.Random(6)
    result = mention(rng, gold=0)
    scorer = CandidateScorer(BRANCHES)
    with torch.no_grad():
        scorer.fitted_threshold.fill_(0.0)
    apply_scorer(scorer, [result], options=ScorerOptions(), threshold=None)
    assert result["id"] != NIL  # the fitted threshold (0) links the best candidate
    apply_scorer(scorer, [result], options=ScorerOptions(), threshold=1.0)
    assert result["id"] == NIL and result["candidates"][0]["prob"] < 1.0
    with torch.no_grad():
        scorer.fitted_threshold.fill_(1.0)
    apply_scorer(scorer, [result], options=ScorerOptions(), threshold=0.0)
    assert result["id"] != NIL


def test_expected_calibration_error_by_hand():
    assert expected_calibration_error([0.9, 0.9, 0.1, 0.1], [True, False, False, False]) == pytest.approx(
        0.5 * 0.4 + 0.5 * 0.1)
    assert expected_calibration_error([], []) == 0.0


@pytest.mark.parametrize("threshold", [-0.1, 1.5, 80.0])
def test_threshold_is_a_probability(threshold):
    with pytest.raises(ValueError, match="threshold is a probability"):
        LinkerSettings(threshold=threshold)


def test_fit_says_what_to_do_when_no_gold_is_among_the_candidates():
    results, _ = data(7, 3)
    with pytest.raises(ValueError, match="none of the 3 is: check that the examples' KB ids"):
        fit(CandidateScorer(BRANCHES), results, ["Q-elsewhere"] * 3, options=ScorerOptions())


def test_cross_fitting_reports_out_of_sample_figures_and_keeps_groups_together():
    from spacy_m3el.pipeline.calibration import _folds, calibrate_scorer

    results, gold = data(5, 200)
    groups = [i // 2 for i in range(200)]  # pairs of the same mention
    folds = _folds(groups, 5, 0)
    assert all(folds[i] == folds[i + 1] for i in range(0, 200, 2)) and set(folds) == set(range(5))
    scorer = CandidateScorer(BRANCHES)
    report, held_out = calibrate_scorer(scorer, results, gold, groups, options=ScorerOptions())
    assert report["folds"] == 5 and len(held_out) == 200
    # Out of sample is no better than in sample, and both beat the uncalibrated scorer's NLL.
    assert report["out_of_fold"]["nll"] >= report["in_sample"]["nll"] - 1e-6
    assert report["out_of_fold"]["nll"] < report["before"]["nll"]
    assert report["out_of_fold"]["accuracy"] > 0.8
    assert report["weights"]["lexical"]["log_prior"] >= 0.0 and "gate" in report["weights"]
    # held-out results were scored by other folds' fits: not the final fit's probabilities
    assert any(abs(h["candidates"][0]["prob"] - r["candidates"][0]["prob"]) > 1e-6
               for h, r in zip(held_out, results))


def test_a_fit_on_mentions_without_pictures_keeps_them_linkable():
    """The NIL option learns "no image" from mentions without a picture, not
    from a dev set where every mention had one."""
    train, train_gold = data(6, 200)
    without, without_gold = data(7, 200, image=False)
    for result in without:  # text-only evidence is weaker: smaller spreads of the M3EL score
        for candidate in result["candidates"]:
            candidate["score"] = candidate["score"] / 4
    scorer = CandidateScorer(BRANCHES)
    fit(scorer, train + without, train_gold + without_gold, options=ScorerOptions())
    test, test_gold = data(8, 100, image=False)
    for result in test:
        for candidate in result["candidates"]:
            candidate["score"] = candidate["score"] / 4
    apply_scorer(scorer, test, options=ScorerOptions(), threshold=None)
    assert sum(r["id"] == NIL for r in test) == 0 and accuracy(test, test_gold) > 0.8


def test_a_diverged_fit_leaves_the_weights_as_they_were(monkeypatch):
    from spacy_m3el.pipeline.calibration import fit_weights

    results, gold = data(9, 50)
    scorer = CandidateScorer(BRANCHES)
    with torch.no_grad():  # weights a training left: not the untrained scorer's that the fit starts from
        scorer.feature_weights.fill_(0.5)
        scorer.text_log_scale.fill_(-3.0)
    start = {name: value.detach().clone() for name, value in scorer.named_parameters()}

    def diverge(self, closure):
        with torch.no_grad():
            for group in self.param_groups:
                for param in group["params"]:
                    param.fill_(float("nan"))

    monkeypatch.setattr(torch.optim.LBFGS, "step", diverge)
    with pytest.warns(UserWarning, match="the fit diverged"):
        report = fit_weights(scorer, results, gold, options=ScorerOptions())
    for name, value in scorer.named_parameters():
        assert torch.equal(value.detach(), start[name]), name
    assert all(bool(torch.isfinite(v).all()) for v in scorer.parameters())
    assert report["nll_after"] == report["nll_before"]


def test_the_scale_cannot_overflow():
    scorer = CandidateScorer(BRANCHES)
    with torch.no_grad():
        scorer.log_scale.fill_(500.0)
    assert bool(torch.isfinite(scorer.scale).all())


def test_weighted_threshold_follows_the_heavier_items():
    def result(prob):
        return {"candidates": [{"id": "E1", "prob": prob}], "nil_prob": 0.0}

    # A right link at 0.3, a NIL mention linked at 0.4, a right link at 0.9: a threshold above 0.4 trades
    # the first for the second (2 of 3 right either way: the smallest threshold wins) until one weighs more.
    results = [result(0.3), result(0.4), result(0.9)]
    gold = ["E1", NIL, "E1"]
    assert choose_threshold(results, gold) == (0.0, pytest.approx(2 / 3))
    threshold, share = choose_threshold(results, gold, weights=[1, 3, 1])
    assert 0.4 < threshold <= 0.9 and share == pytest.approx(0.8)
    assert choose_threshold(results, gold, weights=[3, 1, 1]) == (0.0, pytest.approx(0.8))
    with pytest.raises(ValueError, match="one weight per item"):
        choose_threshold(results, gold, weights=[1, 1])
    with pytest.raises(ValueError, match=">= 0"):
        choose_threshold(results, gold, weights=[1, -1, 1])


def test_a_zero_weight_leaves_items_out_of_the_fit():
    from spacy_m3el.pipeline.calibration import fit_weights

    kept, kept_gold = data(11, 120)
    noise, noise_gold = data(12, 80, prior_decides=False)
    alone, weighted = CandidateScorer(BRANCHES), CandidateScorer(BRANCHES)
    fit_weights(alone, kept, kept_gold, options=ScorerOptions())
    fit_weights(weighted, kept + noise, kept_gold + noise_gold, options=ScorerOptions(),
                weights=[1.0] * len(kept) + [0.0] * len(noise))
    for (name, a), (_, b) in zip(alone.named_parameters(), weighted.named_parameters()):
        assert torch.allclose(a, b, atol=1e-4), name
    # With their weight the other items change the fit: the prior decides less there.
    everything = CandidateScorer(BRANCHES)
    fit_weights(everything, kept + noise, kept_gold + noise_gold, options=ScorerOptions())
    assert not torch.allclose(everything.feature_weights, alone.feature_weights, atol=1e-2)
    # Weight only on mentions whose gold is not among their candidates: nothing to fit, said so.
    missing = [dict(r, candidates=r["candidates"][1:]) for r in noise[:2]]
    with pytest.raises(ValueError, match="weight 0"):
        fit_weights(CandidateScorer(BRANCHES), noise[2:] + missing, noise_gold[2:] + ["E0", "E0"],
                    options=ScorerOptions(), weights=[0.0] * (len(noise) - 2) + [1.0, 1.0])


def test_a_threshold_is_kept_only_when_its_gain_is_more_than_chance():
    from spacy_m3el.pipeline.calibration import threshold_changes, threshold_is_significant

    def result(prob, best="E1"):
        return {"candidates": [{"id": best, "prob": prob}], "nil_prob": 0.05}

    # Below 0.5: three NIL mentions and one right link; above it two right links.
    results = [result(0.3), result(0.35), result(0.4), result(0.45), result(0.9), result(0.95)]
    gold = [NIL, NIL, NIL, "E1", "E1", "E1"]
    assert threshold_changes(results, gold, 0.5) == (3, 1)
    assert threshold_changes(results, gold, 0.0) == (0, 0)
    assert all("id" not in r for r in results)  # the results are left as they were
    assert not threshold_is_significant(3, 1)  # 2 < 2 * sqrt(4)
    assert not threshold_is_significant(3, 0)  # 3 < 2 * sqrt(3)
    assert threshold_is_significant(4, 0) and threshold_is_significant(30, 10)
    assert not threshold_is_significant(0, 0) and not threshold_is_significant(1, 5)


def test_cross_fitting_reports_the_threshold_it_tried_and_keeps_it_only_when_significant():
    from spacy_m3el.pipeline.calibration import calibrate_scorer, threshold_is_significant

    results, gold = data(8, 200)
    nil_results, _ = data(9, 60, with_alias=False)
    for r in nil_results:  # no gold among the candidates: M3EL's scores carry no bump
        for c in r["candidates"]:
            c["score"] -= 6.0
    scorer = CandidateScorer(BRANCHES)
    report, _ = calibrate_scorer(scorer, results + nil_results, gold + [NIL] * 60, list(range(260)),
                                 options=ScorerOptions())
    tried = report["threshold_tried"]
    assert set(tried) == {"threshold", "right", "wrong"}
    kept = threshold_is_significant(tried["right"], tried["wrong"])
    assert report["threshold"] == (tried["threshold"] if kept else 0.0) == float(scorer.fitted_threshold)


def test_the_confidence_map_is_the_isotonic_share_right():
    from spacy_m3el.pipeline.calibration import MIN_MAP_ANSWERS, fit_confidence_map

    rng = random.Random(12)
    confidences = [rng.random() for _ in range(4000)]
    correct = [rng.random() < c * c for c in confidences]  # over-confident: right c^2 of the time
    x, y = fit_confidence_map(confidences, correct)
    assert len(x) <= 32 and all(numpy.diff(x) > 0) and all(numpy.diff(y) >= 0)
    probes = numpy.array([0.2, 0.5, 0.8])
    assert numpy.allclose(numpy.interp(probes, x, y), probes ** 2, atol=0.06)
    # Weights count: the same answers with the right ones weighed 3x are mapped higher.
    heavy = fit_confidence_map(confidences, correct, [3.0 if ok else 1.0 for ok in correct])
    assert all(numpy.interp(probes, *heavy) > numpy.interp(probes, x, y))
    assert fit_confidence_map(confidences[: MIN_MAP_ANSWERS - 1], correct[: MIN_MAP_ANSWERS - 1]) is None


def stepped(seed, count):
    """Results whose evidence has every strength, but points at a random
    candidate instead of the gold below half strength: how often the answer
    is right jumps with its probability, which no temperature can follow."""
    rng = random.Random(seed)
    results, gold = [], []
    for _ in range(count):
        answer, strength = rng.randrange(6), rng.uniform(0.0, 12.0)
        target = answer if strength > 6.0 else rng.randrange(6)
        candidates = []
        for j in range(6):
            score = rng.gauss(60.0, 1.0) + (strength if j == target else 0.0)
            candidates.append({"id": f"E{j}", "score": score, "prior": 0.0, "branches": {b: score for b in BRANCHES},
                               "features": lexical_features("apple", f"Name {j}", None)})
        results.append({"id": None, "score": None, "nil_prob": None, "candidates": candidates,
                        "modalities": ["text", "image"]})
        gold.append(f"E{answer}")
    return results, gold


def test_cross_fitting_maps_confidences_so_that_held_out_answers_are_calibrated():
    from spacy_m3el.pipeline.calibration import calibrate_scorer, confidence_knots, set_confidence_map

    train, train_gold = stepped(17, 1000)
    scorer = CandidateScorer(BRANCHES)
    report, _ = calibrate_scorer(scorer, train, train_gold, list(range(1000)), options=ScorerOptions())
    assert report["confidence_map"] and confidence_knots(scorer) is not None
    assert report["out_of_fold"]["ece"] < 0.05 < report["before"]["ece"]
    test, test_gold = stepped(18, 1000)

    def test_ece():
        apply_scorer(scorer, test, options=ScorerOptions(), threshold=None)
        return expected_calibration_error([r["score"] for r in test], [r["id"] == g for r, g in zip(test, test_gold)])

    mapped = test_ece()
    assert all(r["score"] != r["candidates"][0]["prob"] for r in test if r["id"] != NIL)  # the answer's, mapped
    set_confidence_map(scorer, None)
    assert test_ece() > 1.5 * mapped and mapped < 0.045  # measured: 0.069 and 0.040


def own_and_other_pictures(seed, count):
    """Mentions with their own picture (the picture branches rank the
    candidates as the text does) and with another's (they rank at random)."""
    rng = random.Random(seed)
    results, gold, fits = [], [], []
    for own in (True, False):
        for _ in range(count):
            g = rng.randrange(6)
            result = mention(rng, gold=g)
            if not own:
                for candidate in result["candidates"]:
                    for branch in ("image", "t2v", "v2t"):
                        candidate["branches"][branch] = rng.gauss(60.0, 4.0)
            results.append(result)
            gold.append(f"E{g}")
            fits.append(own)
    return results, gold, fits


def test_the_picture_gate_is_fitted_to_tell_a_mention_s_own_picture_from_another_s():
    results, gold, fits = own_and_other_pictures(11, 150)
    scorer = CandidateScorer(BRANCHES)
    assert fit_picture_gate(scorer, results, fits)
    test, _, test_fits = own_and_other_pictures(12, 100)
    tensors = to_tensors(test, BRANCHES)
    gates = scorer.gate(tensors.branches, tensors.valid, tensors.has_image)
    own = torch.tensor(test_fits)
    assert float(gates[own].mean()) > 0.7 and float(gates[~own].mean()) < 0.3
    # The full fit keeps that gate, and it does not depend on how the mix weighs the two kinds.
    fitted = scorer.gate_weights.detach().clone()
    again = CandidateScorer(BRANCHES)
    fit_weights(again, results, gold, options=ScorerOptions(), picture_fits=fits,
                weights=[3.0 if own else 1.0 for own in fits])
    assert torch.allclose(again.gate_weights.detach(), fitted, atol=1e-3)


def test_the_picture_gate_needs_both_kinds_of_picture():
    results, _, fits = own_and_other_pictures(13, 20)
    scorer = CandidateScorer(BRANCHES)
    before = scorer.gate_weights.detach().clone()
    assert not fit_picture_gate(scorer, results[:20], fits[:20])  # own pictures only
    assert not fit_picture_gate(scorer, results, [None] * len(results))
    assert torch.equal(scorer.gate_weights.detach(), before)


def test_a_fit_does_not_depend_on_the_weights_training_left():
    results, gold, fits = own_and_other_pictures(14, 100)
    fresh, trained = CandidateScorer(BRANCHES), CandidateScorer(BRANCHES)
    with torch.no_grad():  # as a training run left the demo's: a text expert that no longer reads the text
        trained.text_log_scale.fill_(math.log(1e-4))
        trained.text_feature_weights.copy_(torch.tensor([0.0, 4.5, -2.7, -0.3]))
        trained.gate_weights.copy_(torch.tensor([-3.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    for scorer in (fresh, trained):
        fit_weights(scorer, results, gold, options=ScorerOptions(), picture_fits=fits)
    for (name, a), (_, b) in zip(fresh.named_parameters(), trained.named_parameters()):
        assert torch.equal(a, b), name
    assert float(fresh.text_scale) > 0.01


def test_each_expert_learns_from_the_mentions_it_serves():
    pictured, pictured_gold, fits = own_and_other_pictures(15, 80)
    rng = random.Random(16)
    text_only, text_gold = [], []
    for _ in range(80):
        g = rng.randrange(6)
        result = mention(rng, gold=g, image=False, prior_decides=False)
        for candidate in result["candidates"]:
            candidate["branches"].update({branch: 0.0 for branch in ("image", "t2v", "v2t")})
        text_only.append(result)
        text_gold.append(f"E{g}")
    picture_expert = ("log_scale", "feature_weights", "branch_weights", "nil_weights")
    text_expert = ("text_log_scale", "text_feature_weights", "text_nil_weights")

    def fitted(results, gold, fits):
        scorer = CandidateScorer(BRANCHES)
        fit_weights(scorer, results, gold, options=ScorerOptions(), picture_fits=fits)
        return dict(scorer.named_parameters())

    everything = fitted(pictured + text_only, pictured_gold + text_gold, fits + [None] * len(text_only))
    own = [i for i, fit in enumerate(fits) if fit]
    # Without the mentions that have another's picture: the same experts, a gate that trusts every picture.
    without_others = fitted([pictured[i] for i in own] + text_only, [pictured_gold[i] for i in own] + text_gold,
                            [True] * len(own) + [None] * len(text_only))
    for name in picture_expert + text_expert:
        assert torch.allclose(everything[name], without_others[name], atol=1e-5), name
    assert not torch.allclose(everything["gate_weights"], without_others["gate_weights"])
    # Other golds for the mentions without a picture move the text expert only.
    shifted = [f"E{(int(g[1:]) + 1) % 6}" for g in text_gold]
    moved = fitted(pictured + text_only, pictured_gold + shifted, fits + [None] * len(text_only))
    for name in picture_expert:
        assert torch.allclose(everything[name], moved[name], atol=1e-5), name
    assert float(moved["text_log_scale"]) < float(everything["text_log_scale"]) - 1.0  # the text no longer tells


def test_nil_is_learned_from_a_picture_that_matches_no_candidate():
    """Out-of-KB mentions whose M3EL score and text read like a linked
    one's but whose picture matches none of the candidates get NIL: the
    NIL option reads the best picture score (the branches are not
    reweighted here, so nothing else can tell)."""
    rng = random.Random(17)
    options = ScorerOptions(branches=False)

    def out_of_kb(rng):
        result = mention(rng, gold=rng.randrange(6), prior_decides=False)
        for candidate in result["candidates"]:
            candidate["branches"].update({b: rng.gauss(40.0, 4.0) for b in ("image", "t2v", "v2t")})
        return result

    def split(seed, count):
        results, gold = data(seed, count, prior_decides=False)
        for _ in range(count // 3):
            results.append(out_of_kb(rng))
            gold.append(NIL)
        return results, gold

    results, gold = split(18, 240)
    scorer = CandidateScorer(BRANCHES)
    fit(scorer, results, gold, options=options)
    assert scorer.nil_weights[NIL_FEATURES.index("picture_best_score")] < 0  # a better picture match: less NIL
    test, test_gold = split(19, 150)
    apply_scorer(scorer, test, options=options, threshold=None)
    answered_nil = [(r["id"] == NIL, g == NIL) for r, g in zip(test, test_gold)]
    nil_recall = sum(said for said, nil in answered_nil if nil) / test_gold.count(NIL)
    linked_as_nil = sum(said for said, nil in answered_nil if not nil) / (len(test) - test_gold.count(NIL))
    assert nil_recall > 0.9 and linked_as_nil < 0.1


def nil_features(result):
    return dict(zip(NIL_FEATURES, to_tensors([result], BRANCHES).nil[0].tolist()))


def test_nil_features_read_the_best_candidate_of_each_modality():
    rng = random.Random(20)
    result = mention(rng, gold=1)
    features = nil_features(result)
    candidates = result["candidates"]
    assert features["picture_best_score"] == pytest.approx(
        max(sum(c["branches"][b] for b in ("image", "t2v", "v2t")) for c in candidates))
    assert features["text_best_score"] == pytest.approx(max(c["branches"]["text"] for c in candidates))
    assert features["no_alias_candidates"] == 0.0 and features["no_image"] == 0.0
    no_picture = mention(rng, gold=1, image=False, with_alias=False)
    assert nil_features(no_picture)["picture_best_score"] == 0.0
    assert nil_features(no_picture)["no_alias_candidates"] == nil_features(no_picture)["no_image"] == 1.0
    # Padding (a mention with fewer candidates than its batch's widest) is not a candidate.
    few = mention(rng, gold=0, n=2)
    for candidate in few["candidates"]:
        candidate["branches"] = {b: -5.0 for b in BRANCHES}
    batch = to_tensors([result, few, {"candidates": [], "modalities": ["text"]}], BRANCHES).nil
    assert dict(zip(NIL_FEATURES, batch[1].tolist()))["text_best_score"] == -5.0
    assert batch[2].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert to_tensors([{"candidates": [], "modalities": ["text", "image"]}], BRANCHES).nil.tolist() == [
        [1.0, 1.0, 0.0, 0.0, 0.0]]


def test_an_expert_without_mentions_learns_from_the_other_s():
    pictured, gold, fits = own_and_other_pictures(21, 60)
    rng = random.Random(23)
    for _ in range(30):  # out of the KB: their picture matches none of the candidates
        result = mention(rng, gold=-1, with_alias=False)
        for candidate in result["candidates"]:
            candidate["branches"].update({b: rng.gauss(40.0, 4.0) for b in ("image", "t2v", "v2t")})
        pictured.append(result)
        gold.append(NIL)
        fits.append(True)
    scorer = CandidateScorer(BRANCHES)
    fit_weights(scorer, pictured, gold, options=ScorerOptions(), picture_fits=fits)  # none without a picture
    assert float(scorer.text_scale) > 0.3  # the text expert learnt to read the pictured mentions' text
    # Its NIL option reads no picture feature, while the picture expert's reads how well the picture matches.
    picture_features = [NIL_FEATURES.index(name) for name in ("no_image", "picture_best_score")]
    assert scorer.text_nil_weights[picture_features].tolist() == [0.0, 0.0]
    assert float(scorer.nil_weights[NIL_FEATURES.index("picture_best_score")]) < 0.0
    # So a linkable mention without a picture is linked by its text, not sent to NIL for the missing picture,
    # while one without alias-table candidates (as the NIL mentions here) still gets NIL.
    linkable = [mention(rng, gold=rng.randrange(6), image=False) for _ in range(40)]
    outside = [mention(rng, gold=-1, with_alias=False, image=False) for _ in range(40)]
    apply_scorer(scorer, linkable + outside, options=ScorerOptions(), threshold=None)
    assert sum(r["id"] == NIL for r in linkable) <= 2 and sum(r["id"] == NIL for r in outside) >= 38
    rng = random.Random(22)
    text_only = [mention(rng, gold=rng.randrange(6), image=False) for _ in range(60)]
    text_gold = [f"E{max(range(6), key=lambda j: r['candidates'][j]['branches']['text'])}" for r in text_only]
    scorer = CandidateScorer(BRANCHES)
    fit_weights(scorer, text_only, text_gold, options=ScorerOptions(), picture_fits=[None] * len(text_only))
    assert float(scorer.text_scale) > 0.3 and float(scorer.scale) > 0.3  # the picture expert learnt from them
