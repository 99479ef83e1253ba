"""What the KB knows about a (mention, candidate) pair, as the candidate
scorer's lexical features (see :mod:`spacy_m3el.model.candidate_scorer`)."""
import math
from functools import lru_cache
from typing import Dict, List, Optional, Sequence

import torch

from ..kb.aliases import normalize_alias
from ..model.candidate_scorer import LEXICAL_FEATURES, MIN_LOG_PRIOR


@lru_cache(maxsize=2**16)
def _normalized(text: str) -> str:
    return normalize_alias(text)


def lexical_features(mention: str, name: str, prior: Optional[float]) -> Dict[str, float]:
    """``prior`` is the alias table's P(entity | mention text), None when the
    entity is not among the mention text's aliases."""
    in_alias = prior is not None
    log_prior = max(math.log(prior), MIN_LOG_PRIOR) if in_alias and prior > 0 else (MIN_LOG_PRIOR if in_alias else 0.0)
    return {
        "log_prior": log_prior,
        "from_alias": float(in_alias),
        "name_exact": float(mention.strip() == name.strip()),
        "name_normalized": float(_normalized(mention) == _normalized(name)),
    }


def as_vector(features: Dict[str, float]) -> List[float]:
    return [features[name] for name in LEXICAL_FEATURES]


def in_batch_features(
    mentions: Sequence[str], names: Sequence[str], priors: Sequence[Dict[int, float]], rows: Sequence[int]
) -> torch.Tensor:
    """[B, E, F] features of every mention against every in-batch entity
    (``rows`` with their ``names``; ``priors[i]`` maps row -> prior)."""
    return torch.tensor([
        [as_vector(lexical_features(mention, name, prior.get(row))) for row, name in zip(rows, names)]
        for mention, prior in zip(mentions, priors)
    ], dtype=torch.float32).reshape(len(mentions), len(rows), len(LEXICAL_FEATURES))
