"""The one route from KB rows to entity index rows.

Every build of the entity index goes through :class:`EntityEncoding`,
whether it runs in memory (the linker at first use), streamed to disk in
shards, on a pool of forked processes or on Ray workers: those only decide
which rows are encoded where. The route is

1. :meth:`EntityEncoding.rows`: each row's ``name [SEP] description`` and its
   first image, through the linker's KB image loader (a bad image is
   recorded, never fatal); with ``decode`` the images are decoded and
   preprocessed at once (in a DataLoader worker);
2. :meth:`EntityEncoding.side`: the backbone (through the network's feature
   cache unless the images come preprocessed) and the matcher's entity side;
3. :func:`index_arrays`: the side as index arrays (pooled queries,
   retrieval vectors, fp16), and :meth:`EntityEncoding.meta`: what built them.
"""
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy
import torch

from ..data.images import ImageLoader, ImageRef, RecordBadImages
from ..data.lru import LRUCache
from ..encoders.base import PreprocessedImages, inference_dtype
from ..kb.base import MultimodalKB
from ..model import M3ELMatcher
from ..model.matching import Side
from ..progress import progress_bar
from .entity_index import INDEX_FORMAT, RETRIEVAL, EntityIndex
from .features import EntityFeatureStore
from .memory import PeriodicRelease, release_freed_memory
from .store import concatenate

Layout = List[List[Any]]


def kb_digest(kb: MultimodalKB) -> str:
    """Identifies the KB's entities, their order and their texts (name,
    description). Not their image files: a KB's pictures are renamed when it
    is saved (content-addressed), and reading them all would cost a build."""
    digest = hashlib.sha1()
    for row, entity_id in enumerate(kb.entity_ids):
        for part in (entity_id, kb.name(row), kb.description(row)):
            digest.update(part.encode())
            digest.update(b"\0")
    return digest.hexdigest()


@dataclass
class EntityRows:
    """The inputs of a batch of KB rows: texts, and images either as lazily
    decoded references or decoded and preprocessed; ``unreadable`` holds
    (entity id, reason) of the images already found unreadable."""

    rows: List[int]
    texts: List[str]
    images: Union[List[Optional[ImageRef]], PreprocessedImages]
    unreadable: List[Tuple[str, str]]


@torch.no_grad()
def index_arrays(matcher: M3ELMatcher, sides: Iterable[Side], *,
                 max_queries: Optional[int]) -> Tuple[Dict[str, numpy.ndarray], Layout]:
    """Entity sides (batches, in row order) as index arrays, and the layout
    of the retrieval vectors (which part, how wide)."""
    parts = matcher.retrieval_parts()
    collected: Dict[str, List[numpy.ndarray]] = {}
    layout: Layout = []
    for side in sides:
        if max_queries is not None:
            side = matcher.compress_entity_side(side, max_queries)
        side = dict(side)
        if not layout:
            layout = [[key, int(side[key].shape[-1])] for key in parts]
        side[RETRIEVAL] = matcher.entity_retrieval_vectors(side)
        for key in parts:
            del side[key]  # read back from the retrieval columns
        for name, value in side.items():
            if value.dtype == torch.bfloat16:  # numpy has no bfloat16 (encoders under bf16 autocast)
                value = value.float()
            array = value.detach().cpu().numpy()
            if numpy.issubdtype(array.dtype, numpy.floating):
                array = array.astype(numpy.float16)
            collected.setdefault(name, []).append(array)
    return {name: concatenate(chunks) for name, chunks in collected.items()}, layout


class EntityEncoding:
    """KB rows -> entity index rows for one network under the linker's settings."""

    def __init__(self, network: Any, settings: Any, images: ImageLoader) -> None:
        self.network = network
        self.settings = settings
        #: The KB image loader: failures are recorded in ``images.failures``.
        self.images = images
        self._digest: Tuple[Any, str] = (None, "")
        self._store: Optional[EntityFeatureStore] = None
        self._release = PeriodicRelease(every=16)  # a build's freed batches, back to the OS as it goes

    def digest(self, kb: MultimodalKB) -> str:
        """:func:`kb_digest`, computed once per KB state."""
        state = (id(kb), kb.revision)
        if self._digest[0] != state:
            self._digest = (state, kb_digest(kb))
        return self._digest[1]

    def feature_store(self, kb: MultimodalKB) -> Optional[EntityFeatureStore]:
        """The store of ``kb``'s backbone features (None: the backbone trains,
        or borrows a text model whose features may change)."""
        network, encoder = self.network, self.network.encoder
        if network.feature_cache is None or not encoder.caches_text:
            return None
        dtype = inference_dtype(self.settings.inference_precision, encoder.device)
        key = json.dumps([self.digest(kb), str(dtype), self.network.inference_runtime, encoder.cache_identity()],
                         sort_keys=True, default=str)
        if self._store is None or self._store.key != key:
            image_global, image_tokens = encoder.image_output_shapes()
            self._store = EntityFeatureStore(len(kb), text_dim=encoder.text_dim, text_length=encoder.max_text_length,
                                             image_global=image_global, image_tokens=image_tokens, key=key)
        return self._store

    # ------------------------------------------------------------ identity
    def identity(self, kb: MultimodalKB, *, max_queries: Optional[int]) -> Dict[str, Any]:
        """What an index must have been built from to be valid for ``kb``
        and the current weights: format, pooling (None: exact), weights, KB entities."""
        return {"format": INDEX_FORMAT, "max_queries": max_queries, "fingerprint": self.network.fingerprint(),
                "kb": self.digest(kb), "n_entities": len(kb)}

    def meta(self, kb: MultimodalKB, layout: Layout, *, max_queries: Optional[int],
             unreadable: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """The meta every index built for ``kb`` carries: its identity, the
        retrieval layout, the precision it was encoded in, and the entities
        encoded without their (unreadable) image."""
        meta = {**self.identity(kb, max_queries=max_queries),
                "retrieval_parts": layout, "encode_precision": self.settings.inference_precision,
                "encode_runtime": self.network.inference_runtime}
        if unreadable is not None:
            meta["unreadable_kb_images"] = {"count": len(unreadable), "ids": list(unreadable[:20])}
        return meta

    # ------------------------------------------------------------ the route
    def rows(self, kb: MultimodalKB, rows: Sequence[int], *, decode: bool = False) -> EntityRows:
        """The inputs of ``rows``: ``name [SEP] description`` and the first image."""
        encoder = self.network.encoder
        texts = [encoder.text_for_entity(kb.name(row), kb.description(row)) for row in rows]
        refs = [self.images.ref((kb.images(row) or [None])[0], context=f"image of KB entity '{kb.entity_id(row)}'")
                for row in rows]
        if not decode:
            return EntityRows(list(rows), texts, refs, [])
        decoded = [ref.load() if ref is not None else None for ref in refs]
        unreadable = [(kb.entity_id(row), self.images.failures.get(ref.key, "unreadable"))
                      for row, ref, image in zip(rows, refs, decoded) if ref is not None and image is None]
        pixels, mask = encoder.image_pixels(decoded)
        return EntityRows(list(rows), texts, PreprocessedImages(pixels, mask), unreadable)

    def side(self, kb: MultimodalKB, batch: EntityRows, *, keep_features: bool = False) -> Side:
        """The matcher's entity side of ``batch``; images that turn out
        unreadable are added to ``batch.unreadable``. With ``keep_features``
        (builds of the whole KB, which training repeats) the backbone
        features of a frozen backbone come from, or go to, the KB's
        :class:`~.features.EntityFeatureStore`. Every 16th call hands the
        memory that the batches freed back to the OS (see :mod:`.memory`)."""
        network = self.network
        preprocessed = isinstance(batch.images, PreprocessedImages)
        store = self.feature_store(kb) if keep_features and not preprocessed else None
        with torch.no_grad():
            if store is not None and store.has(batch.rows):
                items = store.get(batch.rows, next(network.matcher.parameters()).device)
            else:
                # Through the feature cache, in its precision (fp16), so that a later build reads from
                # the store the very features a cache hit would give. The cache keeps them too while it has
                # room: training then scores the same entity features as the index (recomputed in other
                # batches they differ in the last bits, which moved the demo's figures by 2 points), but a
                # large KB does not crowd the mentions out of it.
                items = network.encode(batch.texts, batch.images, use_feature_cache=not preprocessed,
                                       make_room=store is None)
                if store is not None:
                    store.put(batch.rows, items)
            if not preprocessed:
                batch.unreadable.extend(
                    (kb.entity_id(row), self.images.failures.get(ref.key, "unreadable"))
                    for row, ref, has in zip(batch.rows, batch.images, items.image_mask.tolist())
                    if ref is not None and not has)
            side = network.matcher.entity_side(items)
        self._release.step()
        return side

    def encode(self, kb: MultimodalKB, rows: Optional[Sequence[int]] = None, *, max_queries: Optional[int],
               progress: bool = False) -> EntityIndex:
        """The index of ``rows`` (default: every entity, in KB order), in
        memory, through the feature cache (and, for the whole KB, the feature
        store). ``max_queries=None``: exact."""
        self.network.eval()
        whole = rows is None  # a part (update-kb's changed rows, a Ray shard) is encoded once: no store
        rows = list(range(len(kb))) if rows is None else list(rows)
        size = self.settings.entity_batch_size
        batches = [rows[i : i + size] for i in range(0, len(rows), size)]
        if progress or len(rows) > 5000:
            batches = progress_bar(batches, desc=f"Encoding {len(rows)} KB entities", unit="batch")
        unreadable: List[Tuple[str, str]] = []

        def sides():
            for chunk in batches:
                batch = self.rows(kb, chunk)
                yield self.side(kb, batch, keep_features=whole)
                unreadable.extend(batch.unreadable)

        arrays, layout = index_arrays(self.network.matcher, sides(), max_queries=max_queries)
        release_freed_memory()  # the batches' rows, now copied into the index's arrays
        meta = self.meta(kb, layout, max_queries=max_queries, unreadable=[entity_id for entity_id, _ in unreadable])
        if len(rows) != len(kb):  # a part (update-kb, a Ray shard): not an index of this KB
            meta.update(kb=None, n_entities=len(rows))
        return EntityIndex(arrays, meta)


def streaming_loader(settings: Any) -> ImageLoader:
    """A KB image loader for builds that stream through every image: its
    own small LRU, so the shared one of decoded pictures is not churned."""
    return ImageLoader(RecordBadImages(settings), decoded=LRUCache(8))
