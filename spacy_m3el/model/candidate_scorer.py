"""The candidate scorer on top of M3EL: the learned score plus what a KB
already knows about a (mention, candidate) pair, and a NIL option.

M3EL's score ranks by content alone; production linkers also use the alias
prior ("Paris" is usually the city) and whether the mention names the
entity. The scorer's logit for candidate j of a mention is

    scale * (m3el_j + sum_b w_b * branch_b,j) + sum_f v_f * feature_f,j

and the NIL option's logit is ``u . nil_features`` (a bias, "the mention has
no alias-table candidate", "the mention has no image"). A softmax over the
candidates plus NIL gives probabilities; ``scale`` is the inverse
temperature. Disabled feature groups are masked, so the paper's M3EL score
alone is ``scale * m3el``: same ranking, still calibrated.
"""
import math
from typing import Dict, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

#: Per (mention, candidate): log alias prior (0 when not in the alias table),
#: in the alias table, name equal to the mention, normalised name equal.
LEXICAL_FEATURES = ("log_prior", "from_alias", "name_exact", "name_normalized")
#: Which feature group (component setting) each lexical feature belongs to.
FEATURE_GROUPS = {"log_prior": "prior", "from_alias": "prior", "name_exact": "name", "name_normalized": "name"}
#: Per mention, for the NIL option.
NIL_FEATURES = ("bias", "no_alias_candidates", "no_image")
#: The NIL logit before any fit: NIL is never chosen until data says otherwise.
NIL_OFF = -50.0
#: Floor of the log prior of a candidate that is in the alias table.
MIN_LOG_PRIOR = math.log(1e-4)


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
        # Set by a calibration fit: the NIL threshold on the best candidate's
        # probability chosen on held-out data (NaN: never fitted).
        self.register_buffer("fitted_threshold", torch.tensor(float("nan")))

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def feature_mask(self, *, prior: bool, name: bool) -> torch.Tensor:
        """[F] 1 for the lexical features of the enabled groups."""
        enabled = {"prior": prior, "name": name}
        return torch.tensor([float(enabled[FEATURE_GROUPS[f]]) for f in LEXICAL_FEATURES],
                            device=self.feature_weights.device)

    def logits(
        self,
        m3el: torch.Tensor,
        branches: torch.Tensor,
        lexical: torch.Tensor,
        *,
        feature_mask: torch.Tensor,
        use_branches: bool,
    ) -> torch.Tensor:
        """[B, K] candidate logits from the M3EL score [B, K], the branch
        scores [B, K, n_branches] and the lexical features [B, K, F]."""
        content = m3el
        if use_branches and self.branches:
            content = content + branches @ self.branch_weights
        weights = self.feature_weights * feature_mask
        return self.scale * content + lexical @ weights

    def nil_logits(self, nil_features: torch.Tensor) -> torch.Tensor:
        """[B] the NIL option's logit from per-mention features [B, len(NIL_FEATURES)]."""
        return nil_features @ self.nil_weights

    def probabilities(
        self, candidate_logits: torch.Tensor, valid: torch.Tensor, nil_logits: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Softmax over the valid candidates plus NIL: ([B, K], [B])."""
        masked = candidate_logits.masked_fill(~valid, float("-inf"))
        joint = torch.cat([masked, nil_logits[:, None]], dim=1).log_softmax(dim=1).exp()
        return joint[:, :-1], joint[:, -1]

    def training_loss(
        self, scores: Dict[str, torch.Tensor], lexical: torch.Tensor, labels: torch.Tensor, *,
        feature_mask: torch.Tensor, use_branches: bool,
    ) -> torch.Tensor:
        """Cross-entropy of the scorer's logits over in-batch candidates
        (``scores`` from the matcher, [B, E]); gradients reach M3EL too."""
        branches = torch.stack([scores[b] for b in self.branches], dim=-1) if self.branches else \
            scores["score"].new_zeros(scores["score"].shape + (0,))
        logits = self.logits(scores["score"].float(), branches.float(), lexical.float(),
                             feature_mask=feature_mask, use_branches=use_branches)
        return F.cross_entropy(logits, labels)
