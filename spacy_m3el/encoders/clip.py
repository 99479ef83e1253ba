"""The paper's backbone: CLIP (``transformers.CLIPModel``) from a local
directory or a name already in the local Hugging Face cache (never downloaded)."""
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple, Union

import torch

from .base import MultimodalEncoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPEncoder(MultimodalEncoder):
    """Text global = projected pooled text embedding; text tokens = the text
    tower's last hidden states (projected too when the widths differ). Image
    global = projected image embedding; patches = the vision tower's last
    hidden states (50 x 768 for ViT-B/32), projected later by the matcher."""

    image_mean = CLIP_MEAN
    image_std = CLIP_STD

    def __init__(
        self,
        *,
        name_or_path: Union[str, Path] = "openai/clip-vit-base-patch32",
        max_text_length: int = 40,
        frozen: bool = False,
    ) -> None:
        super().__init__(max_text_length=max_text_length, frozen=frozen)
        from transformers import AutoTokenizer, CLIPModel

        self.name_or_path = str(name_or_path)
        try:
            self.clip = CLIPModel.from_pretrained(self.name_or_path, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(self.name_or_path, local_files_only=True)
        except (OSError, ValueError) as err:  # ValueError: HF's repo-id validation
            raise OSError(
                f"Cannot load CLIP from '{self.name_or_path}' without network access. Pass a "
                "local directory holding the model and tokenizer (save_pretrained), or a name "
                "already in the local Hugging Face cache."
            ) from err
        config = self.clip.config
        self.text_dim = int(config.projection_dim)
        self._project_text_tokens = config.text_config.hidden_size != config.projection_dim
        self.image_global_dim = int(config.projection_dim)
        self.image_token_dim = int(config.vision_config.hidden_size)
        self.image_size = int(config.vision_config.image_size)
        self._patches = (self.image_size // int(config.vision_config.patch_size)) ** 2 + 1
        self._finish_init()

    def describe(self) -> Dict[str, Any]:
        return {
            "backbone": "clip",
            "name_or_path": self.name_or_path,
            "max_text_length": self.max_text_length,
        }

    def tokenize(self, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
        limit = min(self.max_text_length, int(self.clip.config.text_config.max_position_embeddings))
        encoded = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=limit, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        output = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        text_global = self.clip.text_projection(output.pooler_output)
        tokens = output.last_hidden_state
        if self._project_text_tokens:
            tokens = self.clip.text_projection(tokens)
        return text_global, tokens

    def encode_image(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        output = self.clip.vision_model(pixel_values=pixels)
        return self.clip.visual_projection(output.pooler_output), output.last_hidden_state

    def image_output_shapes(self) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        return (self.image_global_dim,), (self._patches, self.image_token_dim)
