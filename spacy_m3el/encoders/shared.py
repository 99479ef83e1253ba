"""A backbone whose text model belongs to someone else.

In a pipeline like spaCy's ``_trf`` ones (``transformer`` -> ``ner`` -> ...),
the Hugging Face text model already lives in the upstream ``transformer``
component. This encoder borrows it instead of loading a second copy: KB texts
are encoded by that very model object (gradients reach it when the upstream
is being trained), mention texts come from the upstream's output for the doc
(see :mod:`spacy_m3el.pipeline.shared_transformer`). The image side is
EfficientNet-Lite0, frozen, as in the default backbone. The module knows
nothing of spaCy: whoever owns the text model hands it over with
:meth:`SharedTextEncoder.attach`.
"""
import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .base import MultimodalEncoder
from .minilm_efficientnet import (
    EFFICIENTNET_NAME,
    EfficientNetLite0Images,
    default_image_weights_path,
    load_efficientnet_lite0,
    mean_pool,
)


@dataclass
class SharedTextModel:
    """What the owner of the text model hands over."""

    model: nn.Module  # a Hugging Face model: ``model(input_ids=, attention_mask=).last_hidden_state``
    tokenizer: Any  # its Hugging Face tokenizer
    mixed_precision: bool = False  # the owner's setting: autocast on CUDA, as its own forward does


#: Elements per weight tensor that the weights digest reads (spread evenly):
#: any training step moves them, and reading them costs milliseconds.
DIGEST_SAMPLE = 4096


def scale_gradient(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """The same values, with gradients multiplied by ``factor`` on the way back."""
    if factor == 1.0:
        return tensor
    return tensor * factor + tensor.detach() * (1.0 - factor)


class SharedTextEncoder(EfficientNetLite0Images, MultimodalEncoder):
    """Text: the borrowed model's token states, global = their masked mean;
    image: EfficientNet-Lite0 (always frozen).

    ``text_dim`` must be the borrowed model's hidden size (checked when it
    is first used); it is a setting because the matcher is built before the
    upstream component has loaded its model. ``grad_factor`` scales the
    gradients sent to the borrowed model (0 keeps it as it is), like
    spacy-transformers' listener setting of the same name.
    """

    #: KB texts are encoded anew at each update (the borrowed model may be training).
    caches_text = False

    def __init__(
        self,
        *,
        upstream: str = "transformer",
        text_dim: int = 384,
        max_text_length: int = 40,
        grad_factor: float = 1.0,
        image_weights_path: Optional[Union[str, Path]] = None,
    ) -> None:
        super().__init__(max_text_length=max_text_length, frozen=True)
        if text_dim < 1:
            raise ValueError(f"text_dim must be positive, got {text_dim}")
        if grad_factor < 0:
            raise ValueError(f"grad_factor must be >= 0, got {grad_factor}")
        self.upstream = upstream
        self.text_dim = text_dim
        self.grad_factor = float(grad_factor)
        #: True while the owner trains the text model in this step: KB texts are
        #: then encoded with gradients (scaled by ``grad_factor``).
        self.text_training = False
        self._provider: Optional[Callable[[], SharedTextModel]] = None
        self.image_weights_path = Path(image_weights_path) if image_weights_path else default_image_weights_path()
        self.image_model = load_efficientnet_lite0(self.image_weights_path)
        self._finish_init()

    # ------------------------------------------------------------------ the borrowed model
    def attach(self, provider: Callable[[], SharedTextModel]) -> None:
        """Borrow the text model that ``provider()`` returns at each use (a
        callable, because the owner may replace its model, e.g. on loading)."""
        self._provider = provider

    @property
    def attached(self) -> bool:
        return self._provider is not None

    def text_model(self) -> SharedTextModel:
        if self._provider is None:
            raise ValueError(
                f"The m3el_linker's text encoder shares the '{self.upstream}' component's transformer but is "
                f"not attached to it: put a spacy-transformers '{self.upstream}' component before the "
                "m3el_linker in the pipeline (see configs/trf_cpu.cfg)"
            )
        shared = self._provider()
        width = int(shared.model.config.hidden_size)
        if width != self.text_dim:
            raise ValueError(
                f"The '{self.upstream}' component's transformer has hidden size {width} but the m3el_linker's "
                f"encoder was configured with text_dim = {self.text_dim}: set "
                f"[components.m3el_linker.model.encoder] text_dim = {width}"
            )
        return shared

    # ------------------------------------------------------------------ identity
    def describe(self) -> Dict[str, Any]:
        return {
            "backbone": "shared-transformer-efficientnet",
            "upstream": self.upstream,
            "text_dim": self.text_dim,
            "image_model": EFFICIENTNET_NAME,
            "max_text_length": self.max_text_length,
        }

    def cache_identity(self) -> Dict[str, Any]:
        return {**self.describe(), "image_weights_path": str(self.image_weights_path)}

    def weights_digest(self) -> Optional[str]:
        """Identifies the borrowed model's current weights (an evenly spread
        sample of every tensor), so that an entity index built before the
        upstream was trained further is recognised as stale."""
        if self._provider is None:
            return None
        digest = hashlib.sha1()
        for name, tensor in self.text_model().model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // DIGEST_SAMPLE)
            digest.update(name.encode())
            digest.update(flat[::step].float().cpu().numpy().tobytes())
        return digest.hexdigest()

    # ------------------------------------------------------------------ encoding
    def tokenize(self, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
        encoded = self.text_model().tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        shared = self.text_model()
        model = shared.model
        device = next(model.parameters()).device
        trains = self.text_training and self.grad_factor > 0 and torch.is_grad_enabled()
        was_training = model.training
        if not trains:
            model.eval()  # no dropout when encoding the KB for linking
        autocast = (torch.autocast("cuda", enabled=True) if shared.mixed_precision and device.type == "cuda"
                    else contextlib.nullcontext())
        try:
            with torch.set_grad_enabled(trains), autocast:
                states = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        finally:
            model.train(was_training)
        states = states.last_hidden_state.float()
        if trains:
            states = scale_gradient(states, self.grad_factor)
        mask = attention_mask.to(states.device)
        return mean_pool(states, mask), states
