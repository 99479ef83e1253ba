"""Torch modules of M3EL, free of spaCy so they can be used and tested alone."""
from .candidate_scorer import LEXICAL_FEATURES, NIL_FEATURES, CandidateScorer
from .compression import pool_queries
from .config import M3ELConfig
from .contrastive import intra_modal_contrastive_loss
from .layers import CSRAPooling, GatedFusion, MatchLayer
from .m3el import EncodedItems, M3ELMatcher
from .matching import CrossModalMatching, IntraModalMatching

__all__ = [
    "CandidateScorer",
    "LEXICAL_FEATURES",
    "NIL_FEATURES",
    "M3ELConfig",
    "M3ELMatcher",
    "EncodedItems",
    "intra_modal_contrastive_loss",
    "pool_queries",
    "IntraModalMatching",
    "CrossModalMatching",
    "MatchLayer",
    "CSRAPooling",
    "GatedFusion",
]
