"""Encoding KB entities into an :class:`~spacy_m3el.entity_cache.EntityCache`:
batched, with a progress bar on large KBs, counting unreadable KB images,
measuring how far a pooled cache's ranking is from the exact one, and
keeping the cache's search (exact or ANN) as the settings ask."""
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from wasabi import msg

from . import linking
from .cache_build import StreamedCacheBuild
from .entity_cache import RETRIEVAL, EntityCache
from .errors import KBError, warn
from .inputs import InputBuilder
from .kb import MultimodalKB
from .progress import progress_bar
from .retrieval import AnnIndex

#: KB entities that stand in for mentions when a pooled cache is checked.
AGREEMENT_SAMPLE = 64
#: ... and when an ANN index's recall is measured.
RECALL_SAMPLE = 256
#: An ANN index whose measured recall@K is below this is reported with a warning.
ANN_RECALL_WARNING = 0.95
#: KBs above this size are streamed to disk when their cache is built: their
#: backbone features would not stay in the feature cache anyway.
STREAM_ABOVE = 20_000


class EntityEncoder:
    """Builds entity caches for one network (backbone + matcher), and keeps
    the KB's cache valid for the network's current weights."""

    def __init__(self, network, inputs: InputBuilder, settings: Any) -> None:
        self.network = network
        self.inputs = inputs
        self.settings = settings
        # The cache object last checked against the current weights: checking
        # hashes every weight, so it is done once per cache object.
        self.verified: Optional[EntityCache] = None
        # ... and the borrowed text model's weights it was checked against.
        self.verified_digest: Optional[str] = None

    def current(self, kb: MultimodalKB) -> EntityCache:
        """The KB's cache if it is valid for the current weights and
        settings, else a new one, built and stored in the KB; searched as
        the settings ask (exact, or an ANN index built on first need)."""
        return self.configure_search(kb, self._current(kb))

    def _current(self, kb: MultimodalKB) -> EntityCache:
        return kb.entity_cache if self.is_current(kb) else self.build(kb)

    def is_current(self, kb: MultimodalKB) -> bool:
        """Does the KB hold a cache valid for the current weights and
        settings? (Nothing is built.)"""
        cache = kb.entity_cache
        if cache is None:
            return False
        if cache is self.verified and self.network.encoder.weights_digest() == self.verified_digest:
            return True
        if cache.is_valid_for(n_entities=len(kb), max_queries=self.settings.max_cached_queries,
                              fingerprint=self.network.fingerprint()):
            self._verify(cache)
            return True
        return False

    def configure_search(self, kb: MultimodalKB, cache: EntityCache, *, progress: bool = False) -> EntityCache:
        """Exact search when ``ann_index`` is null; else the cache's ANN
        index, built (and its recall measured) when it has none of that kind."""
        wanted = self.settings.ann_index
        cache.use_ann = wanted is not None
        if wanted is None:
            return cache
        ann = cache.ann_index()
        if ann is None or ann.meta.get("requested") != wanted:
            ann = self.build_ann(kb, cache, progress=progress)
        ann.nprobe, ann.shortlist = self.settings.ann_nprobe, self.settings.ann_shortlist
        return cache

    @torch.no_grad()
    def build_ann(self, kb: MultimodalKB, cache: EntityCache, *, progress: bool = False) -> AnnIndex:
        """Build the ``ann_index`` of ``cache``, with its recall@K measured
        on KB entities standing in for mentions, and attach it."""
        wanted = self.settings.ann_index
        size = len(kb)
        rows = list(range(size)) if size <= RECALL_SAMPLE else [i * size // RECALL_SAMPLE
                                                                 for i in range(RECALL_SAMPLE)]
        queries = self.network.matcher.mention_retrieval_vectors(self._stand_in_mentions(kb, rows))
        ann = AnnIndex.build(cache.arrays[RETRIEVAL], factory=None if wanted == "auto" else wanted,
                             nprobe=self.settings.ann_nprobe, shortlist=self.settings.ann_shortlist,
                             queries=queries, recall_k=max(self.settings.n_candidates, 1), progress=progress)
        ann.meta["requested"] = wanted
        recall = ann.meta["recall"]
        msg.info(f"m3el_linker: ANN index {ann.factory} over {size} entities: recall@{recall['k']} "
                 f"{recall['recall']:.3f} against exact search ({recall['queries']} KB entities standing in "
                 f"for mentions, nprobe {recall['nprobe']}, shortlist {recall['shortlist']})")
        if recall["recall"] < ANN_RECALL_WARNING:
            warn(f"m3el_linker: the ANN index {ann.factory} finds only {recall['recall']:.1%} of exact search's "
                 f"top {recall['k']} candidates (KB entities standing in for mentions; real mentions lie further "
                 f"from the entities and fare worse). Raise ann_nprobe (now {recall['nprobe']}) or ann_shortlist, "
                 f"or keep exact search (ann_index = null), which is fast up to a few 100,000 entities.")
        cache.ann = ann
        return ann

    def _stand_in_mentions(self, kb: MultimodalKB, rows: Sequence[int]) -> Dict[str, torch.Tensor]:
        """The mention side of KB entities encoded as if they were mentions
        (to check a pooled cache or an ANN index without real mentions)."""
        network = self.network
        network.eval()
        return network.matcher.mention_side(network.encode(*self.inputs.entities(kb, rows, training=False)))

    def _verify(self, cache: EntityCache) -> None:
        self.verified = cache
        self.verified_digest = self.network.encoder.weights_digest()

    def build(
        self, kb: MultimodalKB, *, progress: bool = False, folder: Optional[Union[str, Path]] = None
    ) -> EntityCache:
        """Encode every entity of ``kb`` and store the cache in it. With a
        ``folder``, or for a KB of more than :data:`STREAM_ABOVE` entities,
        the build is streamed to disk (parallel image decoding, bounded
        memory; in ``folder`` it resumes after a kill), else it is held in
        memory and goes through the backbone's feature cache."""
        if folder is not None or len(kb) > STREAM_ABOVE:
            cache = self.build_streamed(kb, folder, progress=progress or len(kb) > 5000)
        else:
            cache = self.encode(kb, self.settings.max_cached_queries, progress=progress)
        kb.set_entity_cache(cache)
        self._verify(cache)
        return cache

    def build_streamed(
        self, kb: MultimodalKB, folder: Optional[Union[str, Path]], *, progress: bool = True, **options: Any
    ) -> EntityCache:
        """The whole KB's cache by :class:`StreamedCacheBuild`, memory-mapped
        from ``folder`` (None: a temporary folder removed with the cache)."""
        temporary = folder is None
        folder = Path(tempfile.mkdtemp(prefix="m3el-cache-")) if temporary else Path(folder)
        build = StreamedCacheBuild(self.network, kb, self.settings, folder, progress=progress, **options)
        cache = build.run()
        if temporary:
            weakref.finalize(cache, shutil.rmtree, folder, True)
        for entity_id, reason in build.unreadable:
            self.inputs.kb_images.failures[f"KB entity {entity_id}"] = reason
        self._report(kb, cache, None if build.loaded else [entity_id for entity_id, _ in build.unreadable])
        return cache

    def _report(self, kb: MultimodalKB, cache: EntityCache, unreadable: Optional[List[str]]) -> None:
        """Warn about KB entities encoded without their image (None: a saved
        cache, whose meta already counts them); measure a pooled cache's
        agreement with the exact score."""
        if unreadable is not None:
            cache.meta["unreadable_kb_images"] = {"count": len(unreadable), "ids": unreadable[:20]}
        if unreadable:
            warn(f"m3el_linker: {len(unreadable)} KB entities are linked without their image, which could not "
                 f"be read, e.g. {unreadable[:5]} (details: linker.inputs.kb_images.failures)", stacklevel=5)
        max_queries = cache.meta.get("max_queries")
        if max_queries is not None:
            cache.meta["pooling_agreement"] = self.pooling_agreement(kb, cache)
            agreement = cache.meta["pooling_agreement"]
            msg.info(f"m3el_linker: entity cache with G2L queries pooled to {max_queries}: top-1 agrees with "
                     f"the exact score for {agreement['top1']:.1%} of {agreement['sample']} KB entities "
                     "standing in for mentions")

    def adopt_loaded(self, kb: MultimodalKB) -> None:
        """Check a cache loaded with a pipeline against its weights, once:
        another model's cache is an error, a cache built with other settings
        is dropped (rebuilt at first use) with a warning."""
        cache = kb.entity_cache
        if cache is None:
            return
        if getattr(self.network.encoder, "attached", True) is False:
            return  # a borrowed text model not yet reachable: checked at first use instead
        if cache.meta.get("fingerprint") != self.network.fingerprint():
            raise KBError(
                "The entity cache saved with this pipeline was built by a different model "
                "(fingerprint mismatch). Delete the 'cache' folder of the KB to rebuild it."
            )
        if cache.settings_match(self.settings.max_cached_queries):
            cache.require([RETRIEVAL, *self.network.matcher.cached_entity_keys()], "the KB's cache/meta.json")
            self._verify(cache)
            return
        saved = {key: cache.meta.get(key) for key in ("format", "max_queries")}
        warn(f"m3el_linker: the saved entity cache was built with other settings ({saved}, now "
             f"max_queries={self.settings.max_cached_queries}); it will be rebuilt at first use", stacklevel=4)
        kb.clear_entity_cache()

    @torch.no_grad()
    def encode(
        self,
        kb: MultimodalKB,
        max_queries: Optional[int],
        *,
        rows: Optional[Sequence[int]] = None,
        progress: bool = False,
    ) -> EntityCache:
        """The cache of ``rows`` (default: every entity, in KB order). KB
        entities whose image cannot be read are encoded without it; for the
        whole KB they are counted in the meta (``unreadable_kb_images``) and
        named in one warning, and a pooled cache's agreement is measured."""
        network = self.network
        network.eval()
        size = self.settings.entity_batch_size
        whole = rows is None  # the KB's own cache: report on it (a part is only a helper)
        rows = list(range(len(kb))) if rows is None else list(rows)
        batches = [rows[i : i + size] for i in range(0, len(rows), size)]
        if progress or len(rows) > 5000:
            batches = progress_bar(batches, desc=f"Encoding {len(rows)} KB entities", unit="batch")
        unreadable: List[str] = []

        def sides():
            for batch in batches:
                texts, refs = self.inputs.entities(kb, batch, training=False)
                items = network.encode(texts, refs)
                unreadable.extend(kb.entity_id(row) for row, ref, has in
                                  zip(batch, refs, items.image_mask.tolist()) if ref is not None and not has)
                yield network.matcher.entity_side(items)

        cache = EntityCache.build(network.matcher, sides(), max_queries=max_queries,
                                  fingerprint=network.fingerprint())
        cache.meta["encode_precision"] = self.settings.inference_precision
        if whole:
            self._report(kb, cache, unreadable)
        return cache

    @torch.no_grad()
    def pooling_agreement(self, kb: MultimodalKB, pooled: EntityCache) -> Dict[str, Any]:
        """Top-1 agreement of the pooled and the exact rerank of the same
        candidates, with KB entities spread over the KB standing in for
        mentions (only the candidates' exact rows are encoded)."""
        matcher = self.network.matcher
        size = len(kb)
        rows = list(range(size)) if size <= AGREEMENT_SAMPLE else [
            i * size // AGREEMENT_SAMPLE for i in range(AGREEMENT_SAMPLE)]
        mention = self._stand_in_mentions(kb, rows)
        k = max(self.settings.n_candidates, 1)
        candidates = linking.candidate_rows(pooled, matcher.mention_retrieval_vectors(mention), k=k)
        union = sorted({row for found in candidates for row in found})
        position = {row: i for i, row in enumerate(union)}
        exact = self.encode(kb, None, rows=union)
        exact_best = linking.rerank(matcher, mention, exact, [[position[r] for r in c] for c in candidates])
        pooled_best = linking.rerank(matcher, mention, pooled, candidates).best_rows().tolist()
        agree = [union[e] == p for e, p in zip(exact_best.best_rows().tolist(), pooled_best)]
        return {"top1": sum(agree) / len(agree), "sample": len(agree), "k": k}
