"""Multimodal backbones: one interface, three registered implementations (the
last borrows the text model of an upstream spacy-transformers component)."""
from typing import Optional

from .base import ImageFeatures, MultimodalEncoder, TextFeatures, join_features, pad_tokens
from .cache import FeatureCache
from .clip import CLIPEncoder
from .minilm_efficientnet import MiniLMEfficientNetEncoder
from .shared import SharedTextEncoder, SharedTextModel


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


def create_shared_text_encoder(
    upstream: str = "transformer",
    text_dim: int = 384,
    max_text_length: int = 40,
    grad_factor: float = 1.0,
    image_weights_path: Optional[str] = None,
) -> SharedTextEncoder:
    """Registered as ``spacy-m3el.SharedTransformerEncoder.v1`` (spacy_misc):
    texts by the pipeline's ``upstream`` spacy-transformers component,
    images by EfficientNet-Lite0."""
    return SharedTextEncoder(upstream=upstream, text_dim=text_dim, max_text_length=max_text_length,
                             grad_factor=grad_factor, image_weights_path=image_weights_path)


__all__ = [
    "MultimodalEncoder",
    "MiniLMEfficientNetEncoder",
    "SharedTextEncoder",
    "SharedTextModel",
    "TextFeatures",
    "ImageFeatures",
    "join_features",
    "CLIPEncoder",
    "FeatureCache",
    "pad_tokens",
    "create_minilm_efficientnet_encoder",
    "create_clip_encoder",
    "create_shared_text_encoder",
]
