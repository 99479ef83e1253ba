"""The candidate scorer on top of M3EL: the learned score plus what a KB
already knows about a (mention, candidate) pair, and a NIL option.

M3EL's score ranks by content alone; production linkers also use the alias
prior ("Paris" is usually the city) and whether the mention names the
entity. The scorer's logit for candidate j of a mention is

    scale * (m3el_j + sum_b w_b * branch_b,j) + sum_f v_f * feature_f,j

and the NIL option's logit is ``u . nil_features`` (a bias, "the mention has
no alias-table candidate", "the mention has no image", and how well the
picture and the text match their best candidate: a mention of an entity
outside the KB matches none of its candidates well). A softmax over the candidates plus NIL gives probabilities;
``scale`` is the inverse temperature. Disabled feature groups are masked, so
the paper's M3EL score alone is ``scale * m3el``: same ranking, still calibrated.

The picture gate: one picture often serves many mentions and shows only some
of them, and many mentions have none. The scorer holds two experts: the one
above, which reads every branch, and a text expert, which reads only the
branches that do not look at the mention's picture, with its own scale,
lexical weights and NIL option. Each gives a distribution over the
candidates plus NIL; a mention's is their mixture,

    p = g * p_picture + (1 - g) * p_text

    g = has_image * sigmoid(a0 + a1 * corr(text, picture) + a2 * z_picture(text's best)
                            + a3 * z_text(picture's best) + a4 * picture's best + a5 * text's best)

with g the probability that the picture is the mention's own: from how well
the picture agrees with the text over the mention's candidates (the
correlation of the text and picture scores across them, how high the
picture ranks the text's favourite and the text the picture's, in standard
scores over the candidates) and how well the picture and the text match
their best candidate at all (a picture of another entity matches none of
the candidates well). A mention without a picture is scored by the text
expert alone. A mixture of probabilities rather than of logits: each
expert is fitted on the mentions it is meant for (the picture expert on
mentions with their own picture, the text expert on mentions without one),
and a picture that is trusted keeps its expert's answer (on the demo's
linking results, a blend of logits cost 4 of 264 test answers with the
mentions' own pictures against a mixture of the same experts). Two experts
rather than one set of weights with the picture branches switched off: a
fit on mentions with their own pictures, without any and with wrong ones
needs other weights for the prior, the temperature and NIL where the
picture counts than where it does not. The gate's inputs are detached: it
decides which expert to trust, it does not train the branches.
"""
import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

#: Per (mention, candidate): log alias prior (0 when not in the alias table),
#: in the alias table, name equal to the mention, normalised name equal.
LEXICAL_FEATURES = ("log_prior", "from_alias", "name_exact", "name_normalized")
#: Which feature group (component setting) each lexical feature belongs to.
FEATURE_GROUPS = {"log_prior": "prior", "from_alias": "prior", "name_exact": "name", "name_normalized": "name"}
#: Per mention, for the NIL option.
NIL_FEATURES = ("bias", "no_alias_candidates", "no_image", "picture_best_score", "text_best_score")
#: NIL features of a scorer saved before the text expert (the first ones of ``NIL_FEATURES``).
LEGACY_NIL_FEATURES = 3
#: Branches that read the mention's picture: the text expert does without them.
PICTURE_BRANCHES = ("image", "t2v", "v2t")
#: Inputs of the picture gate after its bias.
GATE_FEATURES = ("text_picture_correlation", "picture_z_of_text_choice", "text_z_of_picture_choice",
                 "picture_best_score", "text_best_score")
#: The gate's bias before any training: the picture is trusted (g ~ 0.98).
GATE_OPEN = 4.0
#: Lexical features whose weight cannot be negative: a higher alias prior
#: can only make a candidate more likely, never less.
NONNEGATIVE_FEATURES = ("log_prior", "from_alias")
#: The NIL logit before any fit: NIL is never chosen until data says otherwise.
NIL_OFF = -50.0
#: Largest log inverse temperature (a scale of about 4.8e8).
MAX_LOG_SCALE = 20.0
#: Floor of the log prior of a candidate that is in the alias table.
MIN_LOG_PRIOR = math.log(1e-4)
#: Knots of the confidence map (answer probability -> probability that the answer is right).
CONFIDENCE_KNOTS = 32
#: State a pipeline saved before it existed may lack (it then maps every confidence to itself).
OPTIONAL_STATE = ("confidence_x", "confidence_y")
#: Log-probability of what a mention cannot be (a padded candidate): finite, so that no gradient is NaN.
IMPOSSIBLE = -1e30
#: The key that marks a scorer saved before the text expert (one set of weights, the text boosted
#: where the picture was distrusted, a NIL weight for a distrusted picture).
LEGACY_KEY = "text_boost"


def text_and_picture_scores(branches: torch.Tensor, names: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """[B, K] each, from the branch scores [B, K, n_branches] named ``names``:
    the text branch's score of each candidate and the sum of the branches that
    read the picture (0 where the model has none)."""
    text = branches[..., list(names).index("text")] if "text" in names else branches.new_zeros(branches.shape[:2])
    reads_picture = torch.tensor([name in PICTURE_BRANCHES for name in names], dtype=branches.dtype,
                                 device=branches.device)
    return text, (branches * reads_picture).sum(dim=-1)


def best_scores(scores: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[B] each: the best of each mention's valid candidates' scores [B, K]
    (0 for a mention without candidates) and which candidate it is."""
    if scores.shape[1] == 0:
        return scores.new_zeros(scores.shape[0]), torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    best = scores.masked_fill(~valid, float("-inf")).max(dim=1)
    return best.values.where(valid.any(dim=1), 0.0), best.indices


class CandidateScorer(nn.Module):
    """Feature weights, branch weights, inverse temperature and NIL option of
    the picture expert and the text expert, and the picture gate."""

    def __init__(self, branches: Sequence[str], *, initial_scale: float = 0.2) -> None:
        super().__init__()
        self.branches = tuple(branches)
        self._initial_scale = initial_scale
        # [1], not a scalar: thinc's optimizer takes len() of every gradient.
        self.log_scale = nn.Parameter(torch.tensor([math.log(initial_scale)]))
        self.branch_weights = nn.Parameter(torch.zeros(len(self.branches)))
        self.feature_weights = nn.Parameter(torch.zeros(len(LEXICAL_FEATURES)))
        self.nil_weights = nn.Parameter(torch.tensor([NIL_OFF] + [0.0] * (len(NIL_FEATURES) - 1)))
        self.gate_weights = nn.Parameter(torch.tensor([GATE_OPEN] + [0.0] * len(GATE_FEATURES)))
        self.text_log_scale = nn.Parameter(torch.tensor([math.log(initial_scale)]))
        self.text_feature_weights = nn.Parameter(torch.zeros(len(LEXICAL_FEATURES)))
        self.text_nil_weights = nn.Parameter(torch.tensor([NIL_OFF] + [0.0] * (len(NIL_FEATURES) - 1)))
        self.register_buffer("nonnegative", torch.tensor([f in NONNEGATIVE_FEATURES for f in LEXICAL_FEATURES]))
        self.register_buffer("picture_branches", torch.tensor([b in PICTURE_BRANCHES for b in self.branches]))
        # Set by a calibration fit: the NIL threshold on the best candidate's
        # probability chosen on held-out data (NaN: never fitted).
        self.register_buffer("fitted_threshold", torch.tensor(float("nan")))
        # Set by a cross-fitted calibration: a monotone map of the answer's probability to the share of
        # such answers that were right on held-out data, as knots (NaN: unused knots; all NaN: identity).
        self.register_buffer("confidence_x", torch.full((CONFIDENCE_KNOTS,), float("nan")))
        self.register_buffer("confidence_y", torch.full((CONFIDENCE_KNOTS,), float("nan")))

    @property
    def scale(self) -> torch.Tensor:
        # Bounded so that no fit can overflow it to inf (and the logits to NaN).
        return self.log_scale.clamp(max=MAX_LOG_SCALE).exp()

    @property
    def text_scale(self) -> torch.Tensor:
        """The text expert's inverse temperature."""
        return self.text_log_scale.clamp(max=MAX_LOG_SCALE).exp()

    def feature_mask(self, *, prior: bool, name: bool) -> torch.Tensor:
        """[F] 1 for the lexical features of the enabled groups."""
        enabled = {"prior": prior, "name": name}
        return torch.tensor([float(enabled[FEATURE_GROUPS[f]]) for f in LEXICAL_FEATURES],
                            device=self.feature_weights.device)

    def lexical_weights(self, feature_mask: torch.Tensor, *, text_expert: bool = False) -> torch.Tensor:
        """[F] the effective lexical weights (of the picture expert, or of the
        text expert): masked, the prior's kept >= 0."""
        raw = self.text_feature_weights if text_expert else self.feature_weights
        weights = torch.where(self.nonnegative, raw.clamp(min=0.0), raw)
        return weights * feature_mask

    def reset_parameters(self) -> None:
        """Every parameter back to its value before any training or fit (buffers are kept)."""
        fresh = CandidateScorer(self.branches, initial_scale=self._initial_scale)
        with torch.no_grad():
            for name, value in fresh.named_parameters():
                getattr(self, name).copy_(value.to(getattr(self, name).device))

    def upgrade_legacy_state(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """A scorer state saved before the text expert (keys without the
        ``scorer.`` prefix) in this layout: the picture expert keeps its
        weights; the text expert gets the ones that reproduce the old scores
        of a mention without a picture (with branch reweighting on, the default).
        Mentions with a distrusted picture score differently: refit the scorer."""
        state = dict(state)
        boost = state.pop(LEGACY_KEY).reshape(-1)[0]
        old_nil = state["nil_weights"]
        state["nil_weights"] = old_nil[:LEGACY_NIL_FEATURES].clone()
        state["text_nil_weights"] = old_nil[:LEGACY_NIL_FEATURES].clone()
        state["text_feature_weights"] = state["feature_weights"].clone()
        text_weight = 1.0
        if "text" in self.branches:
            text_weight = 1.0 + len(self.branches) * float(state["branch_weights"][self.branches.index("text")])
        scale = state["log_scale"].clamp(max=MAX_LOG_SCALE).exp() * (1.0 + boost) * max(text_weight, 1e-3)
        state["text_log_scale"] = scale.clamp(min=1e-6).log().reshape(1)
        self.upgrade_input_sizes(state)
        return state

    def upgrade_input_sizes(self, state: Dict[str, torch.Tensor]) -> bool:
        """Give the gate and NIL options of a scorer saved with fewer inputs
        (keys without the ``scorer.`` prefix) a zero weight on each input
        they lack, in place: the same gate and NIL options. True when it did."""
        upgraded = False
        for name in ("gate_weights", "nil_weights", "text_nil_weights"):
            saved, size = state.get(name), getattr(self, name).numel()
            if saved is not None and saved.numel() < size:
                state[name] = torch.cat([saved.reshape(-1), saved.new_zeros(size - saved.numel())])
                upgraded = True
        return upgraded

    def gate_inputs(self, branches: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, len(GATE_FEATURES)] from the branch scores [B, K, n_branches]
        of each mention's valid candidates [B, K] (detached)."""
        if not bool(self.picture_branches.any()) or branches.shape[1] == 0:
            return branches.new_zeros(branches.shape[0], len(GATE_FEATURES))
        # Every input that is defined counts: one candidate has no spread (its standard scores and the
        # correlation are 0) and a model without a text branch has no text side, but how well the picture
        # matches its best candidate still tells its own picture from another's.
        branches = branches.detach().float()
        weight = valid.to(branches.dtype)
        count = weight.sum(dim=1, keepdim=True).clamp(min=1.0)
        text, picture = text_and_picture_scores(branches, self.branches)

        def standardised(x: torch.Tensor) -> torch.Tensor:
            mean = (x * weight).sum(dim=1, keepdim=True) / count
            centred = (x - mean) * weight
            std = (centred.pow(2).sum(dim=1, keepdim=True) / count).sqrt()
            return centred / std.clamp(min=1e-6) * (std > 1e-6)

        z_text, z_picture = standardised(text), standardised(picture)
        correlation = (z_text * z_picture).sum(dim=1) / count[:, 0]
        text_best, text_choice = best_scores(text, valid)
        picture_best, picture_choice = best_scores(picture, valid)
        return torch.stack([correlation, z_picture.gather(1, text_choice[:, None])[:, 0],
                            z_text.gather(1, picture_choice[:, None])[:, 0], picture_best, text_best], dim=1)

    def gate(self, branches: torch.Tensor, valid: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        """[B] the probability that the mention's picture is its own, 0 without a picture."""
        inputs = self.gate_inputs(branches, valid)
        raw = self.gate_weights[0] + inputs @ self.gate_weights[1:]
        return torch.sigmoid(raw) * has_image.to(raw.dtype)

    def logits(
        self, m3el: torch.Tensor, branches: torch.Tensor, lexical: torch.Tensor, *,
        feature_mask: torch.Tensor, use_branches: bool,
    ) -> torch.Tensor:
        """[B, K] the picture expert's candidate logits from the M3EL score
        [B, K], the branch scores [B, K, n_branches] and the lexical features [B, K, F]."""
        content = m3el
        if use_branches and self.branches:
            content = content + branches @ self.branch_weights
        return self.scale * content + lexical @ self.lexical_weights(feature_mask)

    def text_logits(self, branches: torch.Tensor, lexical: torch.Tensor, *, feature_mask: torch.Tensor) -> torch.Tensor:
        """[B, K] the text expert's candidate logits: the branches that do not read the picture."""
        text_only = (~self.picture_branches).to(branches.dtype) / max(len(self.branches), 1)
        return self.text_scale * (branches @ text_only) + lexical @ self.lexical_weights(feature_mask, text_expert=True)

    def nil_logits(self, nil_features: torch.Tensor, *, text_expert: bool = False) -> torch.Tensor:
        """[B] the NIL option's logit (the picture expert's, or the text
        expert's) from per-mention features [B, len(NIL_FEATURES)]."""
        return nil_features @ (self.text_nil_weights if text_expert else self.nil_weights)

    def log_probabilities(
        self, m3el: torch.Tensor, branches: torch.Tensor, lexical: torch.Tensor, valid: torch.Tensor, *,
        feature_mask: torch.Tensor, use_branches: bool, gate: Optional[torch.Tensor] = None,
        nil_features: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """[B, K] log-probabilities of the valid candidates [B, K] (-inf for
        the others), or [B, K + 1] with NIL last given ``nil_features``: the
        picture expert's, or with a ``gate`` [B] the mixture of both experts'."""
        pictured = self._log_softmax(self.logits(m3el, branches, lexical, feature_mask=feature_mask,
                                                 use_branches=use_branches), valid, nil_features, text_expert=False)
        if gate is not None:
            text = self._log_softmax(self.text_logits(branches, lexical, feature_mask=feature_mask), valid,
                                     nil_features, text_expert=True)
            gate = gate[:, None].to(pictured.dtype)
            tiny = torch.finfo(pictured.dtype).tiny
            pictured = torch.logaddexp(pictured + gate.clamp(min=tiny).log(), text + (1.0 - gate).clamp(min=tiny).log())
        if nil_features is not None:
            valid = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1)
        return pictured.masked_fill(~valid, float("-inf"))

    def _log_softmax(self, logits: torch.Tensor, valid: torch.Tensor, nil_features: Optional[torch.Tensor], *,
                     text_expert: bool) -> torch.Tensor:
        logits = logits.masked_fill(~valid, IMPOSSIBLE)
        if nil_features is not None:
            logits = torch.cat([logits, self.nil_logits(nil_features, text_expert=text_expert)[:, None]], dim=1)
        return logits.log_softmax(dim=1)

    def training_loss(
        self, scores: Dict[str, torch.Tensor], lexical: torch.Tensor, labels: torch.Tensor, *,
        feature_mask: torch.Tensor, use_branches: bool, has_image: Optional[torch.Tensor] = None,
        pictures_are_own: bool = False,
    ) -> torch.Tensor:
        """Negative log-likelihood of the labels under the scorer over in-batch
        candidates (``scores`` from the matcher, [B, E]); gradients reach M3EL
        too. With ``has_image`` [B] both experts are mixed: by the picture
        gate, which is trained as well, or, with ``pictures_are_own`` (the
        mentions' own pictures as the data gives them), by ``has_image``
        itself, so that the gate never turns down the gradient of a right picture."""
        branches = torch.stack([scores[b] for b in self.branches], dim=-1) if self.branches else \
            scores["score"].new_zeros(scores["score"].shape + (0,))
        branches = branches.float()
        valid = torch.ones_like(scores["score"], dtype=torch.bool)
        gate = None
        if has_image is not None and pictures_are_own:
            gate = has_image.to(branches.dtype)
        elif has_image is not None:
            gate = self.gate(branches, valid, has_image)
        log_probs = self.log_probabilities(scores["score"].float(), branches, lexical.float(), valid,
                                           feature_mask=feature_mask, use_branches=use_branches, gate=gate)
        return F.nll_loss(log_probs, labels)
