"""Probabilities from the candidate scorer, and fitting it on held-out data.

Works on linking results (``{"candidates": [...], "modalities": [...]}``),
where each candidate keeps its raw M3EL ``score``, its ``branches`` and its
lexical ``features``: the probabilities can be recomputed from results alone
(after a fit, without running the model again). ``fit`` fits the picture
gate (a logistic classifier of a mention's own picture against another's),
then each expert as a multinomial logistic regression over its mentions'
candidates plus NIL, solved with L-BFGS (the picture expert's inverse
temperature, branch and feature weights and NIL option on mentions with
their own picture, the text expert's on mentions without one), then picks
the NIL threshold that maximises accuracy. ``calibrate_scorer`` does the same with cross-fitting:
every mention also gets probabilities from a scorer fitted without it, the
threshold is chosen on those (and kept only when its gain there is more
than chance: with calibrated probabilities the NIL option alone already
gives the most likely answer), and the figures it reports are out of sample.
Last, it fits the confidence map: the answer's probability mapped,
monotonically, to the share of such answers that were right out of fold
(isotonic regression): one scorer serves mentions with their picture,
without one and with a wrong one, and its probabilities come out under- or
over-confident by condition in a way no temperature fixes.
Every fit and the threshold can weigh the held-out items (``weights``): the
linker weighs each picture condition by the share of mentions it expects
under it.
"""
import copy
import math
import random
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy
import torch

from ..errors import warn
from ..kb.base import NIL
from ..model.candidate_scorer import (
    CONFIDENCE_KNOTS,
    LEXICAL_FEATURES,
    NIL_FEATURES,
    CandidateScorer,
    best_scores,
    text_and_picture_scores,
)
from ..progress import progress_bar

Result = Dict[str, Any]
#: L2 penalty on every fitted weight except the scale and the NIL bias.
L2 = 1e-3
ECE_BINS = 10
#: Folds of the cross-fit that gives out-of-sample probabilities.
FOLDS = 5
#: A NIL threshold on top of the NIL option is kept only when, on out-of-fold answers, it turns this many
#: standard deviations more answers right than wrong (a sign test). On the demo, thresholds that turned 2-4
#: of 792 out-of-fold dev answers right (0-1 wrong) sent 1.7-5.4 % more of the test's linkable mentions without
#: a picture to NIL, for at most one more right answer.
THRESHOLD_MIN_Z = 2.0
#: Fewest held-out answers the confidence map is fitted on (else answers keep their probability).
MIN_MAP_ANSWERS = 100
#: Pseudo-answers at the scorer's own probability that every step of the map is shrunk towards.
MAP_PRIOR_WEIGHT = 1.0


@dataclass(frozen=True)
class ScorerOptions:
    """Which feature groups the scorer uses (the linker's incl_* settings)."""

    prior: bool = True
    name: bool = True
    branches: bool = True
    gate: bool = True

    @classmethod
    def of(cls, settings: Any, *, uses_image: bool) -> "ScorerOptions":
        """The options a linker's settings ask for (no picture gate without an image branch)."""
        return cls(prior=settings.incl_prior, name=settings.incl_name_match, branches=settings.reweight_branches,
                   gate=settings.picture_gate and uses_image)


@dataclass
class CandidateTensors:
    m3el: torch.Tensor  # [B, K]
    branches: torch.Tensor  # [B, K, n_branches]
    lexical: torch.Tensor  # [B, K, F]
    valid: torch.Tensor  # [B, K] bool
    nil: torch.Tensor  # [B, len(NIL_FEATURES)]
    has_image: torch.Tensor  # [B] bool

    def select(self, chosen: torch.Tensor) -> "CandidateTensors":
        """The mentions where ``chosen`` [B] (bool) is true."""
        return CandidateTensors(self.m3el[chosen], self.branches[chosen], self.lexical[chosen], self.valid[chosen],
                                self.nil[chosen], self.has_image[chosen])


def nil_feature_tensor(branches: torch.Tensor, names: Sequence[str], lexical: torch.Tensor, valid: torch.Tensor,
                       has_image: torch.Tensor) -> torch.Tensor:
    """[B, len(NIL_FEATURES)]: bias, no alias-table candidate, no image, the
    best candidate's picture score (0 without an image) and text score, from
    the padded candidate tensors (branch scores named ``names``)."""
    # Summed in float64: the branch scores are float32, so the picture's sum is exact whatever the branches'
    # order, and the same in training, calibration and linking.
    text, picture = text_and_picture_scores(branches.double(), names)
    from_alias = (lexical[..., LEXICAL_FEATURES.index("from_alias")] != 0) & valid
    values = {"bias": torch.ones(len(valid), dtype=torch.float64),
              "no_alias_candidates": (~from_alias.any(dim=1)).double(), "no_image": (~has_image).double(),
              "picture_best_score": best_scores(picture, valid)[0] * has_image,
              "text_best_score": best_scores(text, valid)[0]}
    return torch.stack([values[name] for name in NIL_FEATURES], dim=1).float()


def to_tensors(results: Sequence[Result], branches: Sequence[str]) -> CandidateTensors:
    """Pad the results' candidates into tensors."""
    width = max((len(r["candidates"]) for r in results), default=0)
    batch = len(results)
    m3el = torch.zeros(batch, width)
    branch = torch.zeros(batch, width, len(branches))
    lexical = torch.zeros(batch, width, len(LEXICAL_FEATURES))
    valid = torch.zeros(batch, width, dtype=torch.bool)
    for i, result in enumerate(results):
        candidates = result["candidates"]
        if not candidates:
            continue
        count = len(candidates)
        m3el[i, :count] = torch.tensor([c["score"] for c in candidates])
        if branches:
            branch[i, :count] = torch.tensor([[c["branches"].get(b, 0.0) for b in branches] for c in candidates])
        lexical[i, :count] = torch.tensor([[c["features"][f] for f in LEXICAL_FEATURES] for c in candidates])
        valid[i, :count] = True
    has_image = torch.tensor(["image" in (r.get("modalities") or []) for r in results], dtype=torch.bool)
    nil = nil_feature_tensor(branch, branches, lexical, valid, has_image)
    return CandidateTensors(m3el, branch, lexical, valid, nil, has_image)


def _log_probabilities(scorer: CandidateScorer, tensors: CandidateTensors, options: ScorerOptions,
                       *, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, K + 1] log-probabilities of the candidates and NIL (last); the
    mixture of both experts by the picture gate (or ``gate``) with ``options.gate``."""
    mask = scorer.feature_mask(prior=options.prior, name=options.name)
    device = scorer.log_scale.device
    branches, valid = tensors.branches.to(device), tensors.valid.to(device)
    if options.gate and gate is None:
        gate = scorer.gate(branches, valid, tensors.has_image.to(device))
    return scorer.log_probabilities(tensors.m3el.to(device), branches, tensors.lexical.to(device), valid,
                                    feature_mask=mask, use_branches=options.branches,
                                    gate=gate.to(device) if options.gate else None,
                                    nil_features=tensors.nil.to(device))


def effective_threshold(scorer: CandidateScorer, threshold: Optional[float]) -> float:
    """The configured threshold, else the one fitted on held-out data, else 0."""
    if threshold is not None:
        return float(threshold)
    fitted = float(scorer.fitted_threshold)
    return 0.0 if math.isnan(fitted) else fitted


@torch.no_grad()
def apply_scorer(
    scorer: CandidateScorer, results: Sequence[Result], *, options: ScorerOptions, threshold: Optional[float]
) -> None:
    """Give every candidate its probability, sort the candidates by it and
    decide each mention: the best candidate when its probability is at least
    NIL's and the threshold, else NIL. ``result["score"]`` is the probability
    that the answer given is right: the answer's probability (the
    candidate's, or NIL's) through the scorer's confidence map."""
    if not results:
        return
    joint = _log_probabilities(scorer, to_tensors(results, scorer.branches), options).exp()
    probs, nil_probs = joint[:, :-1], joint[:, -1]
    cutoff = effective_threshold(scorer, threshold)
    for result, row, nil_prob in zip(results, probs.cpu().tolist(), nil_probs.cpu().tolist()):
        candidates = result["candidates"]
        for candidate, prob in zip(candidates, row):
            candidate["prob"] = prob
        candidates.sort(key=lambda c: -c["prob"])
        result["nil_prob"] = nil_prob
        decide(result, cutoff)
    map_confidence(scorer, results)


def map_confidence(scorer: CandidateScorer, results: Sequence[Result]) -> None:
    """``result["score"]`` through the scorer's confidence map (where it has one)."""
    knots = confidence_knots(scorer)
    if knots is not None:
        mapped = numpy.interp([r["score"] for r in results], *knots)
        for result, value in zip(results, mapped.tolist()):
            result["score"] = value


def confidence_knots(scorer: CandidateScorer) -> Optional[Tuple[numpy.ndarray, numpy.ndarray]]:
    """The confidence map's knots (x increasing, y non-decreasing), or None."""
    x = scorer.confidence_x.detach().cpu().numpy()
    y = scorer.confidence_y.detach().cpu().numpy()
    used = ~numpy.isnan(x)
    return (x[used].astype(numpy.float64), y[used].astype(numpy.float64)) if used.any() else None


def set_confidence_map(scorer: CandidateScorer, knots: Optional[Tuple[numpy.ndarray, numpy.ndarray]]) -> None:
    """Keep ``knots`` in the scorer (None: every answer keeps its probability)."""
    with torch.no_grad():
        scorer.confidence_x.fill_(float("nan"))
        scorer.confidence_y.fill_(float("nan"))
        if knots is not None:
            count = len(knots[0])
            scorer.confidence_x[:count] = torch.as_tensor(knots[0], dtype=scorer.confidence_x.dtype)
            scorer.confidence_y[:count] = torch.as_tensor(knots[1], dtype=scorer.confidence_y.dtype)


def fit_confidence_map(
    confidences: Sequence[float], correct: Sequence[bool], weights: Optional[Sequence[float]] = None, *,
    knots: int = CONFIDENCE_KNOTS,
) -> Optional[Tuple[numpy.ndarray, numpy.ndarray]]:
    """Isotonic regression of ``correct`` on ``confidences`` (weighted; pool
    adjacent violators), as at most ``knots`` knots (x: the mean confidence
    of each step, y: its share right, shrunk towards x by ``MAP_PRIOR_WEIGHT``
    answers). None with fewer than ``MIN_MAP_ANSWERS`` weighted answers."""
    values = _normalised([1.0] * len(confidences) if weights is None else weights, len(confidences)).double().numpy()
    answers = int((values > 0).sum())
    if answers < MIN_MAP_ANSWERS:
        return None
    values = values * answers / values.sum()  # in answers, for the shrinkage
    order = numpy.argsort(numpy.asarray(confidences, dtype=numpy.float64), kind="stable")
    steps: List[List[float]] = []  # [weight, weight * confidence, weight * right]
    for i in order.tolist():
        if values[i] <= 0:
            continue
        steps.append([values[i], values[i] * confidences[i], values[i] * float(correct[i])])
        while len(steps) > 1 and (steps[-2][2] / steps[-2][0] >= steps[-1][2] / steps[-1][0]
                                  or steps[-2][1] / steps[-2][0] >= steps[-1][1] / steps[-1][0]):
            last = steps.pop()
            steps[-1] = [a + b for a, b in zip(steps[-1], last)]
    while len(steps) > knots:  # the lightest pair of neighbours becomes one step
        i = min(range(len(steps) - 1), key=lambda j: steps[j][0] + steps[j + 1][0])
        steps[i : i + 2] = [[a + b for a, b in zip(steps[i], steps[i + 1])]]
    table = numpy.array(steps)
    x = table[:, 1] / table[:, 0]
    y = (table[:, 2] + MAP_PRIOR_WEIGHT * x) / (table[:, 0] + MAP_PRIOR_WEIGHT)
    return x, numpy.maximum.accumulate(y)


def decide(result: Result, cutoff: float) -> None:
    """The answer of a result whose candidates carry probabilities (best
    first): the best candidate when its probability is at least NIL's and
    ``cutoff``, else NIL."""
    candidates = result["candidates"]
    best = candidates[0] if candidates else None
    if best is not None and best["prob"] >= result["nil_prob"] and best["prob"] >= cutoff:
        result["id"], result["score"] = best["id"], best["prob"]
    else:
        result["id"], result["score"] = NIL, result["nil_prob"]


def _labels(results: Sequence[Result], gold_ids: Sequence[str]) -> List[Optional[int]]:
    """Position of the gold candidate, len(candidates) for NIL, None when the
    gold entity is not among the candidates (nothing to learn from)."""
    labels: List[Optional[int]] = []
    for result, gold in zip(results, gold_ids):
        ids = [c["id"] for c in result["candidates"]]
        if gold == NIL:
            labels.append(-1)
        else:
            labels.append(ids.index(gold) if gold in ids else None)
    return labels


def fit_picture_gate(
    scorer: CandidateScorer,
    results: Sequence[Result],
    picture_fits: Sequence[Optional[bool]],
    *,
    weights: Optional[Sequence[float]] = None,
    max_iter: int = 200,
) -> bool:
    """Fit the picture gate as a classifier of whether a mention's picture is
    its own (``picture_fits`` True) or another mention's (False; None: not
    known, left out). The two kinds weigh half each (within a kind, items
    weigh by ``weights``): the gate then is the probability, at even odds,
    that the picture is the mention's own. False (gate unchanged) unless
    both kinds of pictured mentions are there."""
    item_weights = _normalised([1.0] * len(results) if weights is None else weights, len(results))
    kept = [i for i, (result, fits) in enumerate(zip(results, picture_fits))
            if fits is not None and "image" in (result.get("modalities") or []) and float(item_weights[i]) > 0]
    labels = torch.tensor([float(picture_fits[i]) for i in kept])
    if not kept or labels.min() == labels.max():
        return False
    tensors = to_tensors([results[i] for i in kept], scorer.branches)
    device = scorer.gate_weights.device
    inputs = scorer.gate_inputs(tensors.branches.to(device), tensors.valid.to(device))
    labels = labels.to(device)
    item_weights = item_weights[kept].to(device)
    # Each kind weighs half: the gate's odds are the evidence's, not the mix's share of wrong pictures.
    for value in (0.0, 1.0):
        item_weights = torch.where(labels == value, item_weights / item_weights[labels == value].sum() / 2,
                                   item_weights)
    optimizer = torch.optim.LBFGS([scorer.gate_weights], max_iter=max_iter, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        raw = scorer.gate_weights[0] + inputs @ scorer.gate_weights[1:]
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(raw, labels, reduction="none")
                * item_weights).sum() + L2 * scorer.gate_weights[1:].pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    scorer.gate_weights.grad = None
    return True


def fit_weights(
    scorer: CandidateScorer,
    results: Sequence[Result],
    gold_ids: Sequence[str],
    *,
    options: ScorerOptions,
    weights: Optional[Sequence[float]] = None,
    picture_fits: Optional[Sequence[Optional[bool]]] = None,
    max_iter: int = 200,
) -> Dict[str, Any]:
    """Fit the scorer's weights to held-out mentions (their results and gold
    ids, NIL included) by L-BFGS, each mention's loss weighed by
    ``weights`` (default: equal); the threshold is left alone. With the
    picture gate each expert learns from the mentions it serves: the
    picture expert from mentions with a picture that is their own
    (``picture_fits`` per item: True, False for another mention's, None
    where not known, taken as own), the text expert from mentions without
    a picture (an expert without such mentions learns from the other's,
    reading only what it reads of them, the NIL option without the picture
    features); mentions with
    another's picture teach the gate only, fitted first as a classifier of
    that (:func:`fit_picture_gate`; without both kinds the gate trusts
    every picture). Without the gate the picture expert learns from every
    mention. An expert whose mentions have no NIL gold keeps its NIL option off."""
    labels = _labels(results, gold_ids)
    kept = [i for i, label in enumerate(labels) if label is not None]
    if not kept:
        raise ValueError(
            f"calibration needs mentions whose gold entity is among their candidates (or NIL); none of the "
            f"{len(results)} is: check that the examples' KB ids are this KB's, or raise n_candidates"
        )
    all_weights = _normalised([1.0] * len(results) if weights is None else weights, len(results))
    if not float(all_weights[kept].sum()) > 0:
        raise ValueError(f"calibration: every one of the {len(kept)} mentions whose gold entity is among their "
                         "candidates (or NIL) has weight 0: nothing to fit")
    kept = [i for i in kept if float(all_weights[i]) > 0]  # exactly as if they were not there
    tensors = to_tensors([results[i] for i in kept], scorer.branches)
    width = tensors.m3el.shape[1]
    device = scorer.log_scale.device
    target = torch.tensor([width if labels[i] == -1 else labels[i] for i in kept], device=device)
    item_weights = all_weights[kept].to(device)
    had = {name: value.detach().clone() for name, value in scorer.named_parameters()}
    # Every fit starts from the untrained scorer, not from the weights training left: the fit is not convex
    # in the experts' log scales, and a trained start (a text expert at scale 1e-4) kept the demo's text
    # expert from reading the text at all.
    scorer.reset_parameters()
    set_confidence_map(scorer, None)  # fitted to the weights it had
    experts = [(False, torch.ones(len(kept), dtype=torch.bool))]
    if options.gate:
        fit_picture_gate(scorer, results, picture_fits or [None] * len(results), weights=weights, max_iter=max_iter)
        own = torch.tensor([picture_fits is None or picture_fits[i] is not False for i in kept])
        experts = [(False, tensors.has_image & own), (True, ~tensors.has_image)]
    before = _mean_nll(scorer, tensors, target, item_weights, options)
    own_mentions = dict(experts)
    for text_expert, chosen in experts:
        # Nothing of its own to learn from: the other expert's mentions, read as this expert reads them.
        borrowed = not bool(chosen.any())
        if borrowed:
            chosen = own_mentions.get(not text_expert, chosen)
        if not bool(chosen.any()):
            continue
        chosen_at = chosen.to(device)
        subset = tensors.select(chosen)
        if borrowed:
            subset = replace(subset, nil=_without_picture_features(subset.nil))
        _fit_expert(scorer, subset, target[chosen_at], item_weights[chosen_at], options=options,
                    text_expert=text_expert, max_iter=max_iter)
    after = _mean_nll(scorer, tensors, target, item_weights, options)
    if not math.isfinite(after) or not all(bool(torch.isfinite(value).all()) for value in scorer.parameters()):
        # A diverged line search must not leave NaN weights behind (they would poison training too).
        with torch.no_grad():
            for name, value in scorer.named_parameters():
                value.copy_(had[name])
        warn(f"calibration: the fit diverged on {len(kept)} mentions; the scorer keeps the weights it had",
             stacklevel=3)
        after = before
    for param in scorer.parameters():
        param.grad = None  # else the next training step would apply the fit's gradients
    return {"mentions": len(results), "fitted_on": len(kept), "nil_option": bool((target == width).any()),
            "nil_mentions": int(sum(1 for g in gold_ids if g == NIL)), "nll_before": before, "nll_after": after}


#: NIL features that read the picture: one expert's mentions never have a picture, the other's always do.
PICTURE_NIL_FEATURES = ("no_image", "picture_best_score")


def _without_picture_features(nil: torch.Tensor) -> torch.Tensor:
    """``nil`` [B, len(NIL_FEATURES)] with the picture features zeroed, so
    that an expert fitted on the other's mentions puts no weight on them: a
    text expert that learnt NIL from pictured mentions would otherwise say
    NIL for every mention without a picture (best picture score 0)."""
    nil = nil.clone()
    nil[:, [NIL_FEATURES.index(name) for name in PICTURE_NIL_FEATURES]] = 0.0
    return nil


@torch.no_grad()
def _mean_nll(scorer: CandidateScorer, tensors: CandidateTensors, target: torch.Tensor, item_weights: torch.Tensor,
              options: ScorerOptions) -> float:
    log_probs = _log_probabilities(scorer, tensors, options)
    return float(-(log_probs.gather(1, target[:, None])[:, 0] * item_weights).sum() / item_weights.sum())


def _fit_expert(scorer: CandidateScorer, tensors: CandidateTensors, target: torch.Tensor,
                item_weights: torch.Tensor, *, options: ScorerOptions, text_expert: bool, max_iter: int) -> None:
    """Fit one expert's scale, lexical (and, for the picture expert, branch)
    weights and NIL option to its mentions; the other expert is left as it is."""
    has_nil = bool((target == tensors.m3el.shape[1]).any())
    if text_expert:
        params = [scorer.text_log_scale, scorer.text_feature_weights]
        nil, gate, expert_options = scorer.text_nil_weights, torch.zeros(len(target)), options
        penalised = [scorer.text_feature_weights]
    else:
        params = [scorer.log_scale, scorer.feature_weights]
        if options.branches and scorer.branches:
            params.append(scorer.branch_weights)
        nil, gate, expert_options = scorer.nil_weights, None, replace(options, gate=False)
        penalised = [scorer.feature_weights, scorer.branch_weights]
    if has_nil:  # else the NIL option stays off, as the reset left it
        params.append(nil)
        with torch.no_grad():
            nil.zero_()
    weights = item_weights / item_weights.sum()
    optimizer = torch.optim.LBFGS(params, max_iter=max_iter, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        log_probs = _log_probabilities(scorer, tensors, expert_options, gate=gate)
        loss = -(log_probs.gather(1, target[:, None])[:, 0] * weights).sum()
        penalty = sum(value.pow(2).sum() for value in penalised)
        if has_nil:
            penalty = penalty + nil[1:].pow(2).sum()
        loss = loss + L2 * penalty
        loss.backward()
        return loss

    optimizer.step(objective)


def _normalised(weights: Sequence[float], count: int) -> torch.Tensor:
    """``weights`` as a float tensor, checked: one per item, finite, >= 0, not all 0."""
    values = torch.tensor([float(w) for w in weights], dtype=torch.float64)
    if len(values) != count:
        raise ValueError(f"calibration: {len(values)} weights for {count} items; give one weight per item")
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()) or float(values.sum()) <= 0:
        raise ValueError("calibration: item weights must be finite, >= 0 and not all 0")
    return values.float()


def fit(
    scorer: CandidateScorer,
    results: Sequence[Result],
    gold_ids: Sequence[str],
    *,
    options: ScorerOptions,
    max_iter: int = 200,
) -> Dict[str, Any]:
    """Fit the scorer to held-out mentions and choose the NIL threshold on
    the same mentions (in sample; :func:`calibrate_scorer` cross-fits);
    returns a report."""
    report = fit_weights(scorer, results, gold_ids, options=options, max_iter=max_iter)
    apply_scorer(scorer, list(results), options=options, threshold=0.0)
    threshold, accuracy = choose_threshold(results, gold_ids)
    with torch.no_grad():
        scorer.fitted_threshold.fill_(threshold)
    apply_scorer(scorer, list(results), options=options, threshold=None)
    return {**report, "temperature": float(1.0 / scorer.scale.item()), "threshold": threshold,
            "accuracy": accuracy}


def answer_figures(results: Sequence[Result], gold_ids: Sequence[str]) -> Dict[str, float]:
    """Accuracy (NIL included), ECE of the answers' probabilities, the mean
    negative log-probability of the gold answer, and the share of linkable
    mentions answered NIL."""
    correct = [r["id"] == g for r, g in zip(results, gold_ids)]
    nll = []
    for result, gold in zip(results, gold_ids):
        prob = result["nil_prob"] if gold == NIL else next(
            (c["prob"] for c in result["candidates"] if c["id"] == gold), 0.0)
        nll.append(-math.log(max(prob, 1e-12)))
    linkable = [r["id"] == NIL for r, g in zip(results, gold_ids) if g != NIL]
    return {
        "accuracy": sum(correct) / len(correct) if correct else 0.0,
        "ece": expected_calibration_error([r["score"] for r in results], correct),
        "nll": sum(nll) / len(nll) if nll else 0.0,
        "nil_on_linkable": sum(linkable) / len(linkable) if linkable else 0.0,
    }


def _folds(groups: Sequence[Any], folds: int, seed: int) -> List[int]:
    """A fold number per item; items of one group share their fold."""
    unique = list(dict.fromkeys(groups))
    random.Random(seed).shuffle(unique)
    fold_of = {group: i % folds for i, group in enumerate(unique)}
    return [fold_of[group] for group in groups]


def cross_fit(
    scorer: CandidateScorer,
    results: Sequence[Result],
    gold_ids: Sequence[str],
    groups: Sequence[Any],
    *,
    options: ScorerOptions,
    weights: Optional[Sequence[float]] = None,
    picture_fits: Optional[Sequence[Optional[bool]]] = None,
    folds: int = FOLDS,
    seed: int = 0,
    on_fold: Optional[Callable[[], None]] = None,
) -> List[Result]:
    """Out-of-fold copies of ``results``: each scored (threshold 0) by the
    scorer fitted on the other folds.
    Items of one group (the same mention under several picture conditions)
    stay in one fold. The scorer is left as it was."""
    initial = {name: value.detach().clone() for name, value in scorer.state_dict().items()}
    fold_of = _folds(groups, folds, seed)
    out: List[Optional[Result]] = [None] * len(results)
    for fold in range(folds):
        inside = [i for i, f in enumerate(fold_of) if f != fold]
        outside = [i for i, f in enumerate(fold_of) if f == fold]
        if not outside:
            continue
        scorer.load_state_dict(initial)
        try:
            fit_weights(scorer, [results[i] for i in inside], [gold_ids[i] for i in inside], options=options,
                        weights=None if weights is None else [weights[i] for i in inside],
                        picture_fits=None if picture_fits is None else [picture_fits[i] for i in inside])
        except ValueError:
            pass  # no usable mention in the other folds: scored by the weights it started with
        held_out = [copy.deepcopy(results[i]) for i in outside]
        apply_scorer(scorer, held_out, options=options, threshold=0.0)
        for i, result in zip(outside, held_out):
            out[i] = result
        if on_fold is not None:
            on_fold()
    scorer.load_state_dict(initial)
    return out  # type: ignore[return-value]


def calibrate_scorer(
    scorer: CandidateScorer,
    results: Sequence[Result],
    gold_ids: Sequence[str],
    groups: Sequence[Any],
    *,
    options: ScorerOptions,
    weights: Optional[Sequence[float]] = None,
    picture_fits: Optional[Sequence[Optional[bool]]] = None,
    folds: int = FOLDS,
    seed: int = 0,
    progress: bool = False,
) -> Tuple[Dict[str, Any], List[Result]]:
    """Cross-fit, choose the NIL threshold on the out-of-fold probabilities,
    then fit on everything (fits and threshold weigh the items by
    ``weights``; default: equal; ``picture_fits``: see :func:`fit_weights`).
    Returns the report (``before``: the scorer as it came; ``out_of_fold``:
    every mention scored by a fit that did not see it) and the out-of-fold
    results, answered with the chosen threshold.
    ``results`` end up scored by the final fit. ``progress``: a line per fit."""
    before = [copy.deepcopy(r) for r in results]
    apply_scorer(scorer, before, options=options, threshold=None)
    folds = min(folds, len(set(groups)))
    bar = progress_bar(total=(folds if folds >= 2 else 0) + 1, desc=f"Calibration: fits on {len(results)} items",
                       unit="fit", disable=not progress)
    with bar:
        if folds >= 2:
            held_out = cross_fit(scorer, results, gold_ids, groups, options=options, weights=weights,
                                 picture_fits=picture_fits, folds=folds, seed=seed, on_fold=lambda: bar.update(1))
        report = fit_weights(scorer, results, gold_ids, options=options, weights=weights, picture_fits=picture_fits)
        bar.update(1)
    if folds < 2:  # one mention: nothing to hold out, the figures are in sample
        folds = 0
        held_out = [copy.deepcopy(r) for r in results]
        apply_scorer(scorer, held_out, options=options, threshold=0.0)
    candidate, _ = choose_threshold(held_out, gold_ids, weights=weights)
    right, wrong = threshold_changes(held_out, gold_ids, candidate)
    threshold = candidate if threshold_is_significant(right, wrong) else 0.0
    for result in held_out:
        decide(result, threshold)
    knots = _cross_fitted_map(held_out, gold_ids, groups, weights=weights, folds=folds, seed=seed)
    with torch.no_grad():
        scorer.fitted_threshold.fill_(threshold)
    set_confidence_map(scorer, knots)
    apply_scorer(scorer, list(results), options=options, threshold=None)
    report.update({
        "folds": folds,
        "temperature": float(1.0 / scorer.scale.item()),
        "threshold": threshold,
        # The accuracy-maximising threshold, and the out-of-fold answers it would turn right and wrong.
        "threshold_tried": {"threshold": candidate, "right": right, "wrong": wrong},
        "confidence_map": None if knots is None else [[round(float(x), 4), round(float(y), 4)]
                                                      for x, y in zip(*knots)],
        "before": answer_figures(before, gold_ids),
        "out_of_fold": answer_figures(held_out, gold_ids),
        "in_sample": answer_figures(results, gold_ids),
        "weights": scorer_weights(scorer),
    })
    return report, held_out


def _cross_fitted_map(
    held_out: Sequence[Result], gold_ids: Sequence[str], groups: Sequence[Any], *,
    weights: Optional[Sequence[float]], folds: int, seed: int,
) -> Optional[Tuple[numpy.ndarray, numpy.ndarray]]:
    """The confidence map of the decided out-of-fold answers; their scores
    are mapped by maps fitted without their fold, so figures on them stay out
    of sample (in sample when there are no folds)."""
    confidences = [r["score"] for r in held_out]
    correct = [r["id"] == gold for r, gold in zip(held_out, gold_ids)]
    weights = [1.0] * len(held_out) if weights is None else list(weights)
    knots = fit_confidence_map(confidences, correct, weights)
    if knots is None:
        return None
    if folds < 2:
        for result, confidence in zip(held_out, confidences):
            result["score"] = float(numpy.interp(confidence, *knots))
        return knots
    fold_of = _folds(groups, folds, seed)  # the cross-fit's folds
    for fold in set(fold_of):
        inside = [i for i, f in enumerate(fold_of) if f != fold]
        fold_knots = fit_confidence_map([confidences[i] for i in inside], [correct[i] for i in inside],
                                        [weights[i] for i in inside])
        for i in (i for i, f in enumerate(fold_of) if f == fold):
            held_out[i]["score"] = confidences[i] if fold_knots is None else \
                float(numpy.interp(confidences[i], *fold_knots))
    return knots


def scorer_weights(scorer: CandidateScorer) -> Dict[str, Any]:
    """The fitted weights by name, for reports."""
    every = torch.ones_like(scorer.feature_weights)
    return {
        "scale": float(scorer.scale.item()),
        "lexical": dict(zip(LEXICAL_FEATURES, scorer.lexical_weights(every).tolist())),
        "branches": dict(zip(scorer.branches, scorer.branch_weights.tolist())),
        "nil": dict(zip(NIL_FEATURES, scorer.nil_weights.tolist())),
        "gate": scorer.gate_weights.tolist(),
        "text_expert": {
            "scale": float(scorer.text_scale.item()),
            "lexical": dict(zip(LEXICAL_FEATURES, scorer.lexical_weights(every, text_expert=True).tolist())),
            "nil": dict(zip(NIL_FEATURES, scorer.text_nil_weights.tolist())),
        },
    }


def threshold_changes(results: Sequence[Result], gold_ids: Sequence[str], threshold: float) -> Tuple[int, int]:
    """(answers ``threshold`` turns right, answers it turns wrong) against
    the NIL option deciding alone (threshold 0), on results with probabilities."""
    right = wrong = 0
    for result, gold in zip(results, gold_ids):
        alone, cut = dict(result), dict(result)
        decide(alone, 0.0)
        decide(cut, threshold)
        right += cut["id"] == gold and alone["id"] != gold
        wrong += alone["id"] == gold and cut["id"] != gold
    return right, wrong


def threshold_is_significant(right: int, wrong: int) -> bool:
    """Whether a threshold's gain is more than chance: a sign test over the
    answers it changes, ``right - wrong >= THRESHOLD_MIN_Z * sqrt(right + wrong)``."""
    return right - wrong > 0 and right - wrong >= THRESHOLD_MIN_Z * math.sqrt(right + wrong)


def choose_threshold(
    results: Sequence[Result], gold_ids: Sequence[str], *, weights: Optional[Sequence[float]] = None
) -> Tuple[float, float]:
    """The threshold on the best candidate's probability that maximises the
    (weighted) share of correct answers (NIL included); the smallest on ties."""
    if not results:
        return 0.0, 0.0
    item_weights = _normalised([1.0] * len(results) if weights is None else weights, len(results)).tolist()
    pairs = []
    for result, gold, weight in zip(results, gold_ids, item_weights):
        best = result["candidates"][0] if result["candidates"] else None
        # (probability, weight if the link is right, weight if NIL is right)
        if best is None or best["prob"] < result["nil_prob"]:
            pairs.append((-1.0, weight * (gold == NIL), weight * (gold == NIL)))  # NIL at any threshold
        else:
            pairs.append((best["prob"], weight * (best["id"] == gold), weight * (gold == NIL)))
    total = sum(item_weights)
    # Linked when prob >= t: correct links at or above t, NIL golds below it.
    always_nil = sum(nil for p, _, nil in pairs if p < 0)
    linkable = sorted(((p, ok, nil) for p, ok, nil in pairs if p >= 0), key=lambda x: x[0])
    nil_below, above_ok = 0, sum(ok for _, ok, _ in linkable)
    best_t, best_correct = 0.0, always_nil + above_ok
    for index, (p, ok, nil) in enumerate(linkable):
        # t just above this p: it and everything below it become NIL
        nil_below += nil
        above_ok -= ok
        if index + 1 < len(linkable) and linkable[index + 1][0] == p:
            continue
        t = linkable[index + 1][0] if index + 1 < len(linkable) else min(1.0, p + 1e-6)
        correct = always_nil + nil_below + above_ok
        if correct > best_correct + 1e-9:  # weighted sums: ties must not turn on rounding
            best_t, best_correct = t, correct
    return best_t, best_correct / total


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> float:
    """ECE with equal-width bins: the gap between confidence and accuracy,
    weighted by the share of answers in each bin."""
    total = len(confidences)
    if not total:
        return 0.0
    error = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(confidences) if (low < c <= high) or (b == 0 and c == 0.0)]
        if members:
            accuracy = sum(correct[i] for i in members) / len(members)
            confidence = sum(confidences[i] for i in members) / len(members)
            error += len(members) / total * abs(accuracy - confidence)
    return error
