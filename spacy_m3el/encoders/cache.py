"""Memoised features of a frozen encoder, for fast CPU training and linking."""
import json
import os
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..data.images import ImageRef
from ..data.lru import LRUCache
from ..model import EncodedItems
from .base import ImageFeatures, MultimodalEncoder, TextFeatures, join_features, pad_tokens

Features = Tuple[torch.Tensor, torch.Tensor]


def feature_bytes(features: Features) -> int:
    """Memory held by one item's stored features."""
    return sum(t.numel() * t.element_size() for t in features)


_BACKGROUND: Dict[int, ThreadPoolExecutor] = {}


def _background_thread() -> ThreadPoolExecutor:
    """This process's one thread for decoding pictures beside the text tower
    (keyed by process id: a forked process cannot use its parent's threads)."""
    pid = os.getpid()
    if pid not in _BACKGROUND:
        _BACKGROUND.clear()
        _BACKGROUND[pid] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3el-decode")
    return _BACKGROUND[pid]


# Stores shared by every cache of the same frozen backbone in this process:
# features are a pure function of the weights and the input, so pipelines
# built from one backbone (ablations, reloaded pipelines) encode each item once.
_SHARED_STORES: Dict[Tuple[str, str, int, int], Tuple[LRUCache, LRUCache]] = {}


class FeatureCache:
    """Encodes texts and images item by item, remembering what it has seen.

    Only valid for a frozen encoder: a trainable one changes its outputs at
    every update. Features are stored on the CPU in ``dtype`` (fp16 halves the
    memory) and cast back to float32 on the way out; each store (texts,
    images) keeps at most ``max_items`` items and ``max_bytes`` bytes, least
    recently used first out. With ``shared=True`` the
    store is shared with other caches of an identical backbone (same
    ``cache_identity()``) in this process.
    """

    def __init__(
        self,
        encoder: MultimodalEncoder,
        *,
        max_items: int = 200_000,
        max_bytes: int = 2**30,
        batch_size: int = 32,
        dtype: torch.dtype = torch.float16,
        shared: bool = False,
    ) -> None:
        if not encoder.frozen:
            raise ValueError("FeatureCache needs a frozen encoder (freeze() it first)")
        self.encoder = encoder
        self.batch_size = batch_size
        self.dtype = dtype
        def store() -> LRUCache:
            return LRUCache(max_items, max_bytes=max_bytes, sizeof=feature_bytes)

        if shared:
            key = (json.dumps(encoder.cache_identity(), sort_keys=True), str(dtype), max_items, max_bytes)
            if key not in _SHARED_STORES:
                _SHARED_STORES[key] = (store(), store())
            self.texts, self.images = _SHARED_STORES[key]
        else:
            self.texts, self.images = store(), store()

    def __len__(self) -> int:
        return len(self.texts) + len(self.images)

    def clear(self) -> None:
        """Forget every stored feature (of a shared store too)."""
        self.texts.clear()
        self.images.clear()

    def _store(self, features: Features) -> Features:
        return tuple(t.detach().to("cpu", self.dtype).contiguous() for t in features)  # type: ignore

    def _precision_key(self) -> str:
        """Prefix of the store keys: features computed under autocast (in
        bf16/fp16) or by the OpenVINO runtime are kept apart from PyTorch's
        float32 ones."""
        device = self.encoder.device.type
        runtime = "openvino:" if self.encoder.inference_runtime == "openvino" and device == "cpu" else ""
        if not torch.is_autocast_enabled(device):
            return runtime
        return f"{runtime}{torch.get_autocast_dtype(device)}:"

    @torch.no_grad()
    def _encode_texts(self, texts: Sequence[str], make_room: bool = True) -> Dict[str, Features]:
        found: Dict[str, Features] = {}
        missing = []
        mode = self._precision_key()
        for text in dict.fromkeys(texts):
            cached = self.texts.get(mode + text)
            if cached is None:
                missing.append(text)
            else:
                found[text] = cached
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            tokens = {k: v.to(self.encoder.device) for k, v in self.encoder.tokenize(chunk).items()}
            text_global, text_tokens = self.encoder.encode_text(tokens["input_ids"], tokens["attention_mask"])
            lengths = tokens["attention_mask"].sum(dim=1).tolist()
            for i, text in enumerate(chunk):
                found[text] = self._store((text_global[i], text_tokens[i, : lengths[i]]))
                self.texts.put(mode + text, found[text], evict=make_room)
        return found

    def _missing_images(self, refs: Sequence[Optional[ImageRef]], mode: str) -> List[ImageRef]:
        """The distinct pictures of ``refs`` that the store does not hold (under ``mode``'s keys)."""
        unique = {ref.key: ref for ref in refs if ref is not None}
        return [ref for key, ref in unique.items() if mode + key not in self.images]

    @torch.no_grad()
    def _encode_images(self, refs: Sequence[Optional[ImageRef]], make_room: bool = True,
                       decoded: Optional[Dict[str, Optional[torch.Tensor]]] = None) -> Dict[str, Optional[Features]]:
        found: Dict[str, Optional[Features]] = {}
        missing: List[ImageRef] = []
        mode = self._precision_key()
        for ref in refs:
            if ref is None or ref.key in found:
                continue
            found[ref.key] = cached = self.images.get(mode + ref.key)
            if cached is None:
                missing.append(ref)
        decoded = dict(decoded or {})
        undecoded = [ref for ref in missing if ref.key not in decoded]
        if undecoded:
            decoded.update(zip((ref.key for ref in undecoded), self._decoded(undecoded)))
        pending = [(ref.key, decoded[ref.key]) for ref in missing
                   if decoded[ref.key] is not None]  # an unreadable, tolerated image: not cached, retried next time
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start : start + self.batch_size]
            pixels = torch.stack([pixels for _, pixels in chunk])
            image_global, image_tokens = self.encoder.encode_pixels(pixels)
            for i, (key, _) in enumerate(chunk):
                features = self._store((image_global[i], image_tokens[i]))
                self.images.put(mode + key, features, evict=make_room)
                found[key] = features
        return found

    def _decoded(self, refs: Sequence[ImageRef]) -> List[Optional[torch.Tensor]]:
        """Each image decoded and cut to the tower's input (uint8 [S, S, 3];
        None when unreadable), on a few threads: Pillow releases the GIL
        while it decodes and resizes."""
        def prepare(ref: ImageRef) -> Optional[torch.Tensor]:
            image = ref.load()
            return None if image is None else self.encoder.image_pixels([image])[0][0]

        threads = min(len(refs), torch.get_num_threads())
        if threads <= 1:
            return [prepare(ref) for ref in refs]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(prepare, refs))

    def encode_texts(self, texts: Sequence[str], *, make_room: bool = True) -> TextFeatures:
        """Features of N texts, as a padded batch. Texts of an encoder whose
        text model may change under it (``caches_text`` False) are encoded
        anew, with gradients when it is training. ``make_room=False``: new
        features are kept only where they fit without evicting others (for
        features kept elsewhere too, which must not crowd out the rest);
        either way they come in the store's precision."""
        if not self.encoder.caches_text:
            return self.encoder.encode_texts(texts)
        found = self._encode_texts(texts, make_room)
        globals_, token_rows = zip(*(found[t] for t in texts))
        text_tokens, text_mask = pad_tokens([row.float() for row in token_rows])
        return TextFeatures(torch.stack([g.float() for g in globals_]), text_tokens, text_mask)

    def encode_texts_and_images(self, texts: Sequence[str], images: Sequence[Optional[ImageRef]], *,
                                make_room: bool = True) -> Tuple[TextFeatures, ImageFeatures]:
        """:meth:`encode_texts` and :meth:`encode_images` of one batch. When
        both towers have work and several pictures are missing from the
        store, those are decoded and resized on a thread of their own while
        the text tower runs (Pillow and the towers release the GIL): 1.1-1.3x
        the docs/s of ``nlp.pipe`` on the demo in two runs of
        ``benchmarks/demo_speed.py``. One picture alone is decoded after the
        text: beside the two-thread text tower it gained nothing (0.97x one
        doc at a time)."""
        mode = self._precision_key()
        missing = self._missing_images(images, mode)
        if not (len(missing) > 1 and self.encoder.caches_text
                and any(mode + text not in self.texts for text in texts)):
            return self.encode_texts(texts, make_room=make_room), self.encode_images(images, make_room=make_room)
        decoding = _background_thread().submit(self._decoded, missing)
        try:
            text = self.encode_texts(texts, make_room=make_room)
        except BaseException:
            wait([decoding])  # the text tower's error wins; nothing is left running behind it
            raise
        # A picture's error (on_bad_image = "raise") is raised here, in the caller's thread.
        decoded = {ref.key: value for ref, value in zip(missing, decoding.result())}
        return text, self.encode_images(images, make_room=make_room, decoded=decoded)

    def encode_images(self, images: Sequence[Optional[ImageRef]], *, make_room: bool = True,
                      decoded: Optional[Dict[str, Optional[torch.Tensor]]] = None) -> ImageFeatures:
        """Features of N images (None = no image); ``make_room`` as for texts;
        ``decoded``: pixels of some of them by key, decoded already."""
        found = self._encode_images(images, make_room, decoded)
        global_shape, token_shape = self.encoder.image_output_shapes()
        image_global = torch.zeros((len(images), *global_shape))
        image_tokens = torch.zeros((len(images), *token_shape))
        image_mask = torch.zeros(len(images), dtype=torch.bool)
        for i, ref in enumerate(images):
            features = found.get(ref.key) if ref is not None else None
            if features is not None:
                image_global[i] = features[0].float()
                image_tokens[i] = features[1].float()
                image_mask[i] = True
        return ImageFeatures(image_global, image_tokens, image_mask)

    def encode(self, texts: Sequence[str], images: Sequence[Optional[ImageRef]]) -> EncodedItems:
        """Features for N texts and N images (None = no image), as a padded batch."""
        if len(texts) != len(images):
            raise ValueError(f"Got {len(texts)} texts but {len(images)} images")
        return join_features(*self.encode_texts_and_images(texts, images))
