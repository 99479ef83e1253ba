"""Intra-modal contrastive loss with same-modality negatives."""
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F


def intra_modal_contrastive_loss(
    entity: torch.Tensor,
    mention: torch.Tensor,
    *,
    temperature: float = 0.03,
    inter_weight: float = 1.0,
    intra_weight: float = 0.8,
    labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Contrast B mentions with their B gold entities within one modality.

    Row i of each side is scored against the other side (inter logits, the
    positive is on the diagonal) and against its own side (intra logits, the
    *same-modality negatives*). The diagonal of the intra block is removed
    from the softmax: an item is not its own negative. The paper's code
    multiplies that diagonal by zero instead, leaving a constant logit of 0 in
    every row; we drop it, as the paper's text describes.

    ``labels`` (optional, shape [B]) gives each row's gold entity: rows that
    share a gold entity are not used as each other's negatives, so duplicate
    entities in a batch do not push a mention away from its own entity.
    """
    if entity.shape != mention.shape or entity.dim() != 2:
        raise ValueError(
            f"entity and mention features must both be [B, d]; got {tuple(entity.shape)} "
            f"and {tuple(mention.shape)}"
        )
    size = entity.shape[0]
    entity = F.normalize(entity.float(), dim=-1)
    mention = F.normalize(mention.float(), dim=-1)
    eye = torch.eye(size, dtype=torch.bool, device=entity.device)
    if labels is None:
        same = eye
    else:
        same = labels.view(-1, 1) == labels.view(1, -1)
    # Off-diagonal pairs with the same gold entity are neither positives nor negatives.
    inter_excluded = same & ~eye
    intra_excluded = same
    neg_inf = torch.finfo(entity.dtype).min

    def side_loss(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        inter = inter_weight * (rows @ cols.T) / temperature
        intra = intra_weight * (rows @ rows.T) / temperature
        inter = inter.masked_fill(inter_excluded, neg_inf)
        intra = intra.masked_fill(intra_excluded, neg_inf)
        logits = torch.cat([inter, intra], dim=1)
        log_probs = logits.log_softmax(dim=1)
        return -log_probs[:, :size].diagonal().mean()

    # A temperature of 0.03 needs float32 logits: keep autocast (bf16/fp16) out.
    with torch.autocast(device_type=entity.device.type, enabled=False):
        return (side_loss(entity, mention) + side_loss(mention, entity)) / 2


def branches_contrastive_loss(config: Any, mention_features: Dict[str, torch.Tensor],
                              entity_features: Dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """The mean of :func:`intra_modal_contrastive_loss` over the text and
    image branches ``config`` uses, on the raw global features of each
    mention and its gold entity (``labels``: the gold rows)."""
    losses = []
    for modality in ("text", "image"):
        if modality in config.branches:
            key = f"{modality}_global_raw"
            losses.append(intra_modal_contrastive_loss(
                entity_features[key][labels], mention_features[key], temperature=config.temperature,
                inter_weight=config.inter_weight, intra_weight=config.intra_weight, labels=labels))
    return torch.stack(losses).mean()
