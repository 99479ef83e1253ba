"""The interface every multimodal backbone implements."""
import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy
import torch
from PIL import Image
from torch import nn

from ..data.images import fit_square
from ..model import EncodedItems
from .openvino_runtime import CompiledTower, CompiledTowers

#: Backbone precisions where it only infers ("auto": bfloat16 where the CPU runs it natively).
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def inference_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for frozen-backbone inference on ``device`` (None:
    float32). "auto" is bfloat16 where the hardware runs it natively (CPUs
    with AVX512-BF16/AMX, recent GPUs), float16 on other GPUs, else float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"inference_precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "float32":
        return None
    if precision != "auto":
        return getattr(torch, precision)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


def inference_autocast(precision: str, device: torch.device) -> ContextManager:
    """Autocast for inference in ``precision`` on ``device`` (a no-op for float32)."""
    dtype = inference_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def float_features(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Backbone outputs computed under autocast, back in float32 for the matcher."""
    return tuple(t.float() if t.is_floating_point() else t for t in tensors)


@dataclass
class TextFeatures:
    """The text half of :class:`EncodedItems` for N items: encoded here, or
    taken from elsewhere (an upstream transformer's output for the doc)."""

    text_global: torch.Tensor  # [N, dt]
    text_tokens: torch.Tensor  # [N, L, dt]
    text_mask: torch.Tensor  # [N, L] bool

    def __len__(self) -> int:
        return self.text_global.shape[0]


@dataclass
class ImageFeatures:
    """The image half of :class:`EncodedItems` for N items."""

    image_global: torch.Tensor  # [N, image_global_dim]
    image_tokens: torch.Tensor  # [N, P, image_token_dim]
    image_mask: torch.Tensor  # [N] bool


@dataclass
class PreprocessedImages:
    """N images decoded and cut to the tower's input size already (in a
    worker): RGB pixels uint8 [N, S, S, 3], not normalised (a quarter of
    float32's bytes between processes; :meth:`MultimodalEncoder.encode_pixels`
    normalises them), and a bool mask of the items that have one."""

    pixels: torch.Tensor
    mask: torch.Tensor


def join_features(text: TextFeatures, image: ImageFeatures) -> EncodedItems:
    """One batch of model inputs from its text and image halves."""
    if len(text) != image.image_mask.shape[0]:
        raise ValueError(f"Got {len(text)} texts but {image.image_mask.shape[0]} images")
    device = text.text_global.device
    return EncodedItems(
        text_global=text.text_global,
        text_tokens=text.text_tokens,
        text_mask=text.text_mask.to(device),
        image_global=image.image_global.to(device),
        image_tokens=image.image_tokens.to(device),
        image_mask=image.image_mask.to(device),
    )


def normalized_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 pixels [N, S, S, 3] as float [N, 3, S, S] normalised by ``mean``
    and ``std`` (of 0-1 values) in one pass, channels-last in memory (the
    layout the CPU towers want). Traceable: compiled towers run it in their graph."""
    shift = torch.tensor(mean, device=pixels.device).mul(255.0).view(1, 3, 1, 1)
    scale = torch.tensor(std, device=pixels.device).mul(255.0).reciprocal().view(1, 3, 1, 1)
    return (pixels.permute(0, 3, 1, 2).float() - shift) * scale


class MultimodalEncoder(nn.Module, ABC):
    """Turns texts and images into M3EL's global and local features.

    Subclasses set the dims and the image normalisation, and implement
    :meth:`tokenize`, :meth:`encode_text` and :meth:`encode_image`. The text
    global and the text tokens share one width (``text_dim``).
    """

    text_dim: int
    image_global_dim: int
    image_token_dim: int
    image_size: int
    image_mean: Tuple[float, float, float]
    image_std: Tuple[float, float, float]
    #: Whether text features are a function of the text alone while the
    #: encoder is frozen (so a feature cache may keep them).
    caches_text = True

    def __init__(self, *, max_text_length: int = 40, frozen: bool = False) -> None:
        super().__init__()
        if max_text_length < 3:
            raise ValueError(f"max_text_length must be at least 3, got {max_text_length}")
        self.max_text_length = max_text_length
        self.frozen = False
        self._frozen_requested = frozen
        #: "torch" or "openvino": how a frozen backbone infers on CPU (see :meth:`inference_runtime_scope`).
        self.inference_runtime = "torch"
        #: Threads of the compiled towers (None: torch's intra-op threads).
        self.inference_threads: Optional[int] = None
        # Inference copies of the towers (compiled graphs, weights in another dtype): not submodules,
        # so never saved, moved or trained; dropped when new weights are loaded.
        self.__dict__["_inference_copies"] = {}
        self.__dict__["_compiled_towers"] = CompiledTowers()
        self.register_load_state_dict_post_hook(lambda module, keys: module.forget_inference_copies())

    def forget_inference_copies(self) -> None:
        """Drop the compiled towers and other inference copies of the weights
        (they are made again from the current weights at the next use)."""
        self.__dict__["_inference_copies"].clear()
        self.__dict__["_compiled_towers"].clear()

    def inference_copy(self, key: Any, make: Callable[[], Any]) -> Any:
        """An inference copy of (part of) the towers under ``key``, made by ``make()`` at first use."""
        copies = self.__dict__["_inference_copies"]
        if key not in copies:
            copies[key] = make()
        return copies[key]

    @contextlib.contextmanager
    def inference_runtime_scope(self, runtime: str, *, threads: Optional[int] = None) -> Iterator[None]:
        """Run a frozen backbone's CPU inference in ``runtime`` ("torch" or
        "openvino", resolved already) within the block, compiled towers on
        ``threads`` threads (None: torch's intra-op threads)."""
        previous = self.inference_runtime, self.inference_threads
        self.inference_runtime, self.inference_threads = runtime, threads
        try:
            yield
        finally:
            self.inference_runtime, self.inference_threads = previous

    def compiled_tower(
        self, name: str, device: torch.device,
        build: Callable[[], Tuple[nn.Module, Tuple[torch.Tensor, ...], Sequence[Sequence[int]]]],
    ) -> Optional[CompiledTower]:
        """The tower ``name`` compiled by OpenVINO, in the autocast dtype
        (float32 without autocast), when this frozen backbone infers on CPU
        in the "openvino" runtime; None otherwise. ``build()`` gives the
        module, example inputs and input shapes (-1 where a size varies)."""
        if not (self.frozen and device.type == "cpu" and self.inference_runtime == "openvino"):
            return None
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        # One process of a multi-process build runs one torch thread: it compiles its own, on one thread.
        threads = self.inference_threads or torch.get_num_threads()
        return self.__dict__["_compiled_towers"].get(name, dtype, threads, build)

    def _finish_init(self) -> None:
        """Call at the end of a subclass __init__, once the towers exist."""
        if self._frozen_requested:
            self.freeze()

    def freeze(self) -> None:
        """Stop training the backbone: no gradients, eval-mode normalisation."""
        self.frozen = True
        for param in self.parameters():
            param.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "MultimodalEncoder":
        return super().train(mode and not self.frozen)

    @property
    def device(self) -> torch.device:
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @abstractmethod
    def describe(self) -> Dict[str, Any]:
        """JSON-serialisable description: which backbone and weights, to check
        that cached features and saved pipelines match."""

    def cache_identity(self) -> Dict[str, Any]:
        """What makes two frozen instances give identical features (for caches
        shared in one process); unlike :meth:`describe` it may hold local paths."""
        return self.describe()

    def weights_digest(self) -> Optional[str]:
        """Identifies weights that change outside this module's own training
        (a borrowed model); None when there are none."""
        return None

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """input_ids and attention_mask, truncated to ``max_text_length``."""

    @abstractmethod
    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(text global [N, dt], text tokens [N, L, dt])."""

    @abstractmethod
    def encode_image(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(image global [N, image_global_dim], patches [N, P, image_token_dim])."""

    def image_pixels(self, images: Sequence[Optional[Image.Image]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Resize (shorter side) and centre-crop RGB images to the tower's
        input: uint8 pixels [N, S, S, 3] (a missing image is all zeros) and
        the bool mask of the items that have one."""
        size = self.image_size
        raw = numpy.zeros((len(images), size, size, 3), dtype=numpy.uint8)
        mask = torch.zeros(len(images), dtype=torch.bool)
        for i, image in enumerate(images):
            if image is None:
                continue
            raw[i] = numpy.asarray(fit_square(image.convert("RGB") if image.mode != "RGB" else image, size))
            mask[i] = True
        return torch.from_numpy(raw), mask

    def normalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [N, S, S, 3] as the towers' float input (:func:`normalized_pixels`)."""
        return normalized_pixels(pixels, self.image_mean, self.image_std)

    def encode_pixels(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_image` of uint8 pixels from :meth:`image_pixels`
        (towers compiled with the normalisation inside their graph override
        it and skip the float copy of the batch)."""
        return self.encode_image(self.normalize_pixels(pixels.to(self.device)))

    def encode_texts(self, texts: Sequence[str]) -> TextFeatures:
        """Tokenize and encode N texts."""
        tokens = {k: v.to(self.device) for k, v in self.tokenize(list(texts)).items()}
        text_global, text_tokens = self.encode_text(tokens["input_ids"], tokens["attention_mask"])
        return TextFeatures(text_global, text_tokens, tokens["attention_mask"].to(text_global.device, torch.bool))

    def encode_images(self, images: Sequence[Optional[Image.Image]]) -> ImageFeatures:
        """Preprocess and encode N images (None = no image)."""
        if all(image is None for image in images):  # nothing to preprocess or run
            global_shape, token_shape = self.image_output_shapes()
            device = self.device
            return ImageFeatures(torch.zeros((len(images), *global_shape), device=device),
                                 torch.zeros((len(images), *token_shape), device=device),
                                 torch.zeros(len(images), dtype=torch.bool, device=device))
        return self.encode_preprocessed(PreprocessedImages(*self.image_pixels(images)))

    def encode_preprocessed(self, images: PreprocessedImages) -> ImageFeatures:
        """Encode N preprocessed images (the tower runs only on those present)."""
        mask = images.mask.to(self.device)
        image_global, image_tokens = self.encode_pixels_masked(images.pixels, mask)
        return ImageFeatures(image_global, image_tokens, mask)

    def encode(
        self, texts: Sequence[str], images: Sequence[Optional[Image.Image]]
    ) -> EncodedItems:
        """Encode N texts and N images (None = no image) into model inputs."""
        if len(texts) != len(images):
            raise ValueError(f"Got {len(texts)} texts but {len(images)} images")
        return join_features(self.encode_texts(texts), self.encode_images(images))

    def encode_pixels_masked(
        self, pixels: torch.Tensor, image_mask: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_pixels` of the items that have an image; zeros elsewhere."""
        count = pixels.shape[0]
        present = image_mask.nonzero(as_tuple=True)[0]
        if len(present) == count:
            return self.encode_pixels(pixels)
        global_shape, token_shape = self.image_output_shapes()
        image_global = torch.zeros((count, *global_shape), device=image_mask.device)
        image_tokens = torch.zeros((count, *token_shape), device=image_mask.device)
        if len(present):
            present_global, present_tokens = self.encode_pixels(pixels[present.to(pixels.device)])
            image_global = image_global.to(present_global.dtype).index_copy(0, present, present_global)
            image_tokens = image_tokens.to(present_tokens.dtype).index_copy(0, present, present_tokens)
        return image_global, image_tokens

    @abstractmethod
    def image_output_shapes(self) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """Shapes of one item's image global and patches, for absent images."""

    def text_for_mention(self, mention: str, sentence: str) -> str:
        return f"{mention} [SEP] {sentence}"

    def text_for_entity(self, name: str, description: str) -> str:
        return f"{name} [SEP] {description}"


def pad_tokens(rows: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length [L_i, d] rows into [N, L, d] plus a bool mask."""
    width = max(row.shape[0] for row in rows)
    dim = rows[0].shape[1]
    out = rows[0].new_zeros((len(rows), width, dim))
    mask = torch.zeros((len(rows), width), dtype=torch.bool, device=rows[0].device)
    for i, row in enumerate(rows):
        out[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = True
    return out, mask
