"""Small masked building blocks shared by the matching modules."""
from typing import Optional, Sequence

import torch
from torch import nn


def masked_softmax(scores: torch.Tensor, mask: Optional[torch.Tensor], dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` ignoring positions where ``mask`` is False.

    A row whose positions are all masked gives all-zero weights instead of
    NaN, so an absent image simply contributes nothing.
    """
    if mask is None:
        return scores.softmax(dim=dim)
    mask = mask.to(torch.bool)
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = filled.softmax(dim=dim)
    return probs * mask.to(probs.dtype)


def masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor], dim: int) -> torch.Tensor:
    """Mean of ``values`` over ``dim`` counting only positions where ``mask`` is True.

    A float ``mask`` acts as per-position weights (a weighted mean).
    """
    if mask is None:
        return values.mean(dim=dim)
    weights = mask.to(values.dtype).unsqueeze(-1)
    total = (values * weights).sum(dim=dim)
    count = weights.sum(dim=dim).clamp(min=1.0)
    return total / count


def masked_max(values: torch.Tensor, mask: Optional[torch.Tensor], dim: int) -> torch.Tensor:
    """Max over ``dim`` among unmasked positions (zero where none is left)."""
    if mask is None:
        return values.max(dim=dim).values
    keep = mask.to(torch.bool).unsqueeze(-1)
    filled = values.masked_fill(~keep, torch.finfo(values.dtype).min)
    best = filled.max(dim=dim).values
    any_kept = keep.any(dim=dim)
    return best * any_kept.to(best.dtype)


class MatchLayer(nn.Module):
    """Attention-and-ReLU match layer of the paper's cross-modal network.

    Each query position attends over the key sequence through a shared linear
    map; the attended vector goes through the same map and a ReLU.
    """

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.transform = nn.Linear(hidden_dim, hidden_dim)

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, key_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        weights = queries @ self.transform(keys).transpose(-1, -2)
        if key_mask is not None:
            key_mask = key_mask.unsqueeze(-2)
        attended = masked_softmax(weights, key_mask) @ keys
        return torch.relu(self.transform(attended))


class CSRAPooling(nn.Module):
    """Multi-head class-specific residual attention pooling over a sequence.

    Per head: mean over the sequence + lambda * (softmax(T * x)-weighted sum),
    with T = inf meaning a max over the sequence; heads are averaged.
    """

    def __init__(self, temperatures: Sequence[float], lam: float = 1.0) -> None:
        super().__init__()
        self.temperatures = tuple(float(t) for t in temperatures)
        self.lam = float(lam)

    def forward(self, sequence: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        base = masked_mean(sequence, mask, dim=-2)
        seq_mask = None if mask is None else mask.unsqueeze(-1)
        pooled = torch.zeros_like(base)
        for temperature in self.temperatures:
            if temperature == float("inf"):
                attended = masked_max(sequence, mask, dim=-2)
            else:
                weights = masked_softmax(sequence * temperature, seq_mask, dim=-2)
                attended = (sequence * weights).sum(dim=-2)
            pooled = pooled + base + self.lam * attended
        return pooled / len(self.temperatures)


class GatedFusion(nn.Module):
    """Sigmoid-gated mix of two vectors (the unidirectional variant's fusion)."""

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.linear(first) + self.linear(second))
        return first * gate + second * (1 - gate)
