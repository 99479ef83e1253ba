"""Multimodal backbones: one interface, two registered implementations."""
from typing import Optional

from .base import MultimodalEncoder, pad_tokens
from .cache import FeatureCache
from .clip import CLIPEncoder
from .minilm_efficientnet import MiniLMEfficientNetEncoder


def create_minilm_efficientnet_encoder(
    max_text_length: int = 40,
    frozen: bool = True,
    text_model_path: Optional[str] = None,
    image_weights_path: Optional[str] = None,
) -> MiniLMEfficientNetEncoder:
    """Registered as ``spacy-m3el.MiniLMEfficientNetEncoder.v1`` (spacy_misc)."""
    return MiniLMEfficientNetEncoder(
        text_model_path=text_model_path,
        image_weights_path=image_weights_path,
        max_text_length=max_text_length,
        frozen=frozen,
    )


def create_clip_encoder(
    name_or_path: str = "openai/clip-vit-base-patch32",
    max_text_length: int = 40,
    frozen: bool = False,
) -> CLIPEncoder:
    """Registered as ``spacy-m3el.CLIPEncoder.v1`` (spacy_misc)."""
    return CLIPEncoder(name_or_path=name_or_path, max_text_length=max_text_length, frozen=frozen)


__all__ = [
    "MultimodalEncoder",
    "MiniLMEfficientNetEncoder",
    "CLIPEncoder",
    "FeatureCache",
    "pad_tokens",
    "create_minilm_efficientnet_encoder",
    "create_clip_encoder",
]
