"""The candidate scorer on top of M3EL: the learned score plus what a KB
already knows about a (mention, candidate) pair, and a NIL option.

M3EL's score ranks by content alone; production linkers also use the alias
prior ("Paris" is usually the city) and whether the mention names the
entity. The scorer's logit for candidate j of a mention is

    scale * (m3el_j + sum_b w_b * branch_b,j) + sum_f v_f * feature_f,j

and the NIL option's logit is ``u . nil_features`` (a bias, "the mention has
no alias-table candidate", "the mention has no image", "its picture is not
trusted"). A softmax over the candidates plus NIL gives probabilities;
``scale`` is the inverse temperature. Disabled feature groups are masked, so
the paper's M3EL score alone is ``scale * m3el``: same ranking, still calibrated.

The picture gate: one picture often serves many mentions and shows only some
of them, and many mentions have none. The branches that read the mention's
picture (image, T2V, V2T) are multiplied per mention by a gate in [0, 1],

    g = has_image * sigmoid(a0 + a1 * corr(text, picture) + a2 * z_picture(text's best)
                            + a3 * z_text(picture's best))

from how well the picture agrees with the text over the mention's candidates
(the correlation of the text and picture scores across them, how high the
picture ranks the text's favourite and the text the picture's, in standard
scores over the candidates); the text's evidence is sharpened by
``1 + beta * (1 - g)`` where the picture is distrusted. A mention without a
picture is scored by its text alone. The gate's inputs are detached: it
decides how far to trust the branches, it does not train them.
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
#: Per mention, for the NIL option (the last one comes from the picture gate).
NIL_FEATURES = ("bias", "no_alias_candidates", "no_image", "distrusted_picture")
#: Branches that read the mention's picture: the ones the gate weighs.
PICTURE_BRANCHES = ("image", "t2v", "v2t")
#: Inputs of the picture gate after its bias.
GATE_FEATURES = ("text_picture_correlation", "picture_z_of_text_choice", "text_z_of_picture_choice")
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


class CandidateScorer(nn.Module):
    """Feature weights, branch weights, inverse temperature and NIL option."""

    def __init__(self, branches: Sequence[str], *, initial_scale: float = 0.2) -> None:
        super().__init__()
        self.branches = tuple(branches)
        # [1], not a scalar: thinc's optimizer takes len() of every gradient.
        self.log_scale = nn.Parameter(torch.tensor([math.log(initial_scale)]))
        self.branch_weights = nn.Parameter(torch.zeros(len(self.branches)))
        self.feature_weights = nn.Parameter(torch.zeros(len(LEXICAL_FEATURES)))
        self.nil_weights = nn.Parameter(torch.tensor([NIL_OFF] + [0.0] * (len(NIL_FEATURES) - 1)))
        self.gate_weights = nn.Parameter(torch.tensor([GATE_OPEN] + [0.0] * len(GATE_FEATURES)))
        self.text_boost = nn.Parameter(torch.zeros(1))
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

    def feature_mask(self, *, prior: bool, name: bool) -> torch.Tensor:
        """[F] 1 for the lexical features of the enabled groups."""
        enabled = {"prior": prior, "name": name}
        return torch.tensor([float(enabled[FEATURE_GROUPS[f]]) for f in LEXICAL_FEATURES],
                            device=self.feature_weights.device)

    def lexical_weights(self, feature_mask: torch.Tensor) -> torch.Tensor:
        """[F] the effective lexical weights: masked, the prior's kept >= 0."""
        weights = torch.where(self.nonnegative, self.feature_weights.clamp(min=0.0), self.feature_weights)
        return weights * feature_mask

    def gate_inputs(self, branches: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, len(GATE_FEATURES)] from the branch scores [B, K, n_branches]
        of each mention's valid candidates [B, K] (detached)."""
        batch = branches.shape[0]
        if "text" not in self.branches or not bool(self.picture_branches.any()) or branches.shape[1] < 2:
            return branches.new_zeros(batch, len(GATE_FEATURES))
        branches = branches.detach().float()
        weight = valid.to(branches.dtype)
        count = weight.sum(dim=1, keepdim=True).clamp(min=1.0)
        text = branches[..., self.branches.index("text")]
        picture = (branches * self.picture_branches.to(branches.dtype)).sum(dim=-1)

        def standardised(x: torch.Tensor) -> torch.Tensor:
            mean = (x * weight).sum(dim=1, keepdim=True) / count
            centred = (x - mean) * weight
            std = (centred.pow(2).sum(dim=1, keepdim=True) / count).sqrt()
            return centred / std.clamp(min=1e-6) * (std > 1e-6)

        z_text, z_picture = standardised(text), standardised(picture)
        correlation = (z_text * z_picture).sum(dim=1) / count[:, 0]
        text_best = text.masked_fill(~valid, float("-inf")).argmax(dim=1)
        picture_best = picture.masked_fill(~valid, float("-inf")).argmax(dim=1)
        return torch.stack([correlation, z_picture.gather(1, text_best[:, None])[:, 0],
                            z_text.gather(1, picture_best[:, None])[:, 0]], dim=1)

    def gate(self, branches: torch.Tensor, valid: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        """[B] the weight of the mention's picture evidence, 0 without a picture."""
        inputs = self.gate_inputs(branches, valid)
        raw = self.gate_weights[0] + inputs @ self.gate_weights[1:]
        return torch.sigmoid(raw) * has_image.to(raw.dtype)

    def logits(
        self,
        m3el: torch.Tensor,
        branches: torch.Tensor,
        lexical: torch.Tensor,
        *,
        feature_mask: torch.Tensor,
        use_branches: bool,
        gate: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """[B, K] candidate logits from the M3EL score [B, K], the branch
        scores [B, K, n_branches] and the lexical features [B, K, F]; with
        a ``gate`` [B] the picture branches are weighed by it."""
        content = m3el
        weights = self.branch_weights if use_branches else torch.zeros_like(self.branch_weights)
        if use_branches and self.branches:
            content = content + branches @ weights
        if gate is not None and self.branches:
            per_branch = (1.0 / len(self.branches) + weights) * self.picture_branches.to(weights.dtype)
            picture = branches @ per_branch
            text = content - picture
            distrust = (1.0 - gate)[:, None]
            content = text * (1.0 + self.text_boost * distrust) + gate[:, None] * picture
        return self.scale * content + lexical @ self.lexical_weights(feature_mask)

    def nil_logits(self, nil_features: torch.Tensor, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B] the NIL option's logit from per-mention features [B, 3]
        (bias, no alias candidate, no image) and the picture ``gate`` [B]."""
        base = nil_features @ self.nil_weights[: nil_features.shape[1]]
        if gate is None:
            return base
        distrusted = nil_features[:, NIL_FEATURES.index("no_image")].le(0.5).to(gate.dtype) * (1.0 - gate)
        return base + distrusted * self.nil_weights[NIL_FEATURES.index("distrusted_picture")]

    def probabilities(
        self, candidate_logits: torch.Tensor, valid: torch.Tensor, nil_logits: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Softmax over the valid candidates plus NIL: ([B, K], [B])."""
        masked = candidate_logits.masked_fill(~valid, float("-inf"))
        joint = torch.cat([masked, nil_logits[:, None]], dim=1).log_softmax(dim=1).exp()
        return joint[:, :-1], joint[:, -1]

    def training_loss(
        self, scores: Dict[str, torch.Tensor], lexical: torch.Tensor, labels: torch.Tensor, *,
        feature_mask: torch.Tensor, use_branches: bool, has_image: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Cross-entropy of the scorer's logits over in-batch candidates
        (``scores`` from the matcher, [B, E]); gradients reach M3EL too. With
        ``has_image`` [B] the picture gate is trained as well."""
        branches = torch.stack([scores[b] for b in self.branches], dim=-1) if self.branches else \
            scores["score"].new_zeros(scores["score"].shape + (0,))
        branches = branches.float()
        gate = None
        if has_image is not None:
            gate = self.gate(branches, torch.ones_like(scores["score"], dtype=torch.bool), has_image)
        logits = self.logits(scores["score"].float(), branches, lexical.float(),
                             feature_mask=feature_mask, use_branches=use_branches, gate=gate)
        return F.cross_entropy(logits, labels)
