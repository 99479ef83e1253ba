"""The linker's entity index, kept valid for its KB and its weights.

:class:`IndexKeeper` holds the one :class:`~.entity_index.EntityIndex` a
linker searches: it answers whether it is valid (one check, on the index's
identity), builds it through :class:`~.encoding.EntityEncoding` when it is
not (in memory, or streamed to disk for large KBs), adopts one loaded from
disk or updated by ``update-kb``, and searches it as the settings ask
(exact, or an ANN index built and measured on first need).
"""
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from wasabi import msg

from ..errors import KBError, warn
from ..kb.base import MultimodalKB
from .ann import AnnIndex
from .encoding import EntityEncoding
from .entity_index import RETRIEVAL, EntityIndex
from .quality import ann_recall_report, pooling_agreement, spread_rows
from .streamed import StreamedBuild

#: KB entities that stand in for mentions when an ANN index's recall is measured.
RECALL_SAMPLE = 256
#: ``ann_index = "auto"`` keeps exact search below this many entities: exact, and fast enough.
AUTO_EXACT_BELOW = 50_000
#: KBs above this size are streamed to disk when their index is built: their
#: backbone features would not stay in the feature cache anyway.
STREAM_ABOVE = 20_000


class IndexKeeper:
    """The entity index of one network (backbone + matcher) for the linker's KB."""

    def __init__(self, network: Any, encoding: EntityEncoding, settings: Any) -> None:
        self.network = network
        self.encoding = encoding
        self.settings = settings
        self.index: Optional[EntityIndex] = None
        # (index, KB, KB revision, pooling, borrowed weights) last found valid: the check
        # hashes every weight, so it is done once per state.
        self._verified: Optional[Tuple[Any, ...]] = None
        self._told_exact: Optional[int] = None

    # ------------------------------------------------------------ validity
    def identity(self, kb: MultimodalKB) -> Dict[str, Any]:
        return self.encoding.identity(kb, max_queries=self.settings.max_cached_queries)

    def _state(self, kb: MultimodalKB) -> Tuple[Any, ...]:
        return (id(self.index), id(kb), kb.revision, self.settings.max_cached_queries,
                self.network.encoder.weights_digest())

    def is_current(self, kb: MultimodalKB) -> bool:
        """Is the index valid for ``kb``, the current weights and settings? (Nothing is built.)"""
        if self.index is None:
            return False
        if self._verified == self._state(kb):
            return True
        if self.index.mismatch(self.identity(kb)):
            return False
        self._verified = self._state(kb)
        return True

    def drop(self) -> None:
        """Forget the index (the weights it was built by changed)."""
        self.index, self._verified = None, None

    def exchange(self, index: Optional[EntityIndex]) -> Optional[EntityIndex]:
        """Hold ``index`` (another set of weights', e.g. the parameter
        averages'; checked against the weights at its first use) instead of
        the one held; returns that one."""
        held = self.index
        self.index, self._verified = index, None
        return held

    def current(self, kb: MultimodalKB) -> EntityIndex:
        """The index if it is valid, else a new one built; searched as the settings ask."""
        index = self.index if self.is_current(kb) else self.build(kb)
        return self.configure_search(kb, index)

    def adopt(self, kb: MultimodalKB, index: Optional[EntityIndex], *, where: str = "the saved entity index") -> None:
        """Use an index loaded from disk (or updated) for ``kb``: another
        model's or KB's index is an error, one built with other settings is
        dropped (rebuilt at first use) with a warning. None (nothing was
        saved): the index held so far is kept, but checked again at its next
        use (the weights or the KB may have been loaded under it)."""
        if index is None:
            self._verified = None
            return
        self.drop()
        if getattr(self.network.encoder, "attached", True) is False:
            self.index = index  # a borrowed text model not yet reachable: checked at first use instead
            return
        wrong = index.mismatch(self.identity(kb))
        if "fingerprint" in wrong:
            raise KBError(f"{where} was built by a different model (fingerprint mismatch): delete it to rebuild it")
        if {"kb", "n_entities"} & set(wrong):
            raise KBError(f"{where} was built for another KB (its entities or their order differ): delete it to "
                          "rebuild it")
        if wrong:
            saved = {key: index.meta.get(key) for key in wrong}
            warn(f"m3el_linker: {where} was built with other settings ({saved}, now "
                 f"max_queries={self.settings.max_cached_queries}); it will be rebuilt at first use", stacklevel=4)
            return
        index.require([RETRIEVAL, *self.network.matcher.cached_entity_keys()], where)
        self.index = index
        self._verified = self._state(kb)

    # ------------------------------------------------------------ building
    def build(self, kb: MultimodalKB, *, progress: bool = False,
              folder: Optional[Union[str, Path]] = None) -> EntityIndex:
        """Encode every entity of ``kb`` and keep the index. With a
        ``folder``, or for a KB of more than :data:`STREAM_ABOVE` entities,
        the build is streamed to disk (parallel image decoding, bounded
        memory; in ``folder`` it resumes after a kill), else it is held in
        memory and goes through the backbone's feature cache."""
        self.drop()
        if folder is not None or len(kb) > STREAM_ABOVE:
            index = self.build_streamed(kb, folder, progress=progress or len(kb) > 5000)
        else:
            index = self.encoding.encode(kb, max_queries=self.settings.max_cached_queries, progress=progress)
            self.report(kb, index, index.meta["unreadable_kb_images"]["ids"])
        self.index = index
        self._verified = self._state(kb)
        return index

    def build_streamed(self, kb: MultimodalKB, folder: Optional[Union[str, Path]], *, progress: bool = True,
                       **options: Any) -> EntityIndex:
        """The whole KB's index by :class:`StreamedBuild`, memory-mapped
        from ``folder`` (None: a temporary folder removed with the index)."""
        temporary = folder is None
        folder = Path(tempfile.mkdtemp(prefix="m3el-index-")) if temporary else Path(folder)
        build = StreamedBuild(self.encoding, kb, folder, progress=progress, **options)
        index = build.run()
        if temporary:
            weakref.finalize(index, shutil.rmtree, folder, True)
        for entity_id, reason in build.unreadable:
            self.encoding.images.failures[f"KB entity {entity_id}"] = reason
        self.report(kb, index, None if build.loaded else [entity_id for entity_id, _ in build.unreadable])
        return index

    def report(self, kb: MultimodalKB, index: EntityIndex, unreadable: Optional[List[str]]) -> None:
        """Warn about KB entities encoded without their image (None: a saved
        index, whose meta already counts them); measure a pooled index's
        agreement with the exact score."""
        if unreadable:
            warn(f"m3el_linker: {len(unreadable)} KB entities are linked without their image, which could not "
                 f"be read, e.g. {unreadable[:5]} (details: linker.inputs.kb_images.failures)", stacklevel=5)
        max_queries = index.meta.get("max_queries")
        if max_queries is not None:
            index.meta["pooling_agreement"] = agreement = pooling_agreement(self, kb, index)
            msg.info(f"m3el_linker: entity index with G2L queries pooled to {max_queries}: top-1 agrees with "
                     f"the exact score for {agreement['top1']:.1%} of {agreement['sample']} KB entities "
                     "standing in for mentions")

    def exact(self, kb: MultimodalKB) -> EntityIndex:
        """An index with every G2L query (reranking gives the exact training
        score): the kept one when it is exact, else one built apart (not kept)."""
        index = self.current(kb)
        if index.meta.get("max_queries") is None:
            return index
        return self.encoding.encode(kb, max_queries=None)

    # ------------------------------------------------------------ search
    def configure_search(self, kb: MultimodalKB, index: EntityIndex, *, progress: bool = False) -> EntityIndex:
        """Exact search when ``ann_index`` is null; else the index's ANN
        index, built (and its recall measured) when it has none of that kind."""
        wanted = self.settings.ann_index
        index.use_ann = wanted is not None and not (wanted == "auto" and len(index) < AUTO_EXACT_BELOW)
        if not index.use_ann:
            if wanted is not None and self._told_exact != len(index):
                self._told_exact = len(index)
                msg.info(f"m3el_linker: ann_index \"auto\" over {len(index)} entities: exact search (below "
                         f"{AUTO_EXACT_BELOW:,} entities it is exact and fast)")
            return index
        ann = index.ann_index()
        if ann is None or ann.meta.get("requested") != wanted:
            ann = self.build_ann(kb, index, progress=progress)
        ann.nprobe = self.settings.ann_nprobe if self.settings.ann_nprobe is not None else int(ann.meta["nprobe"])
        ann.shortlist = self.settings.ann_shortlist
        return index

    @torch.no_grad()
    def build_ann(self, kb: MultimodalKB, index: EntityIndex, *, progress: bool = False) -> AnnIndex:
        """Build the ``ann_index`` of ``index``, with its recall@K measured
        on KB entities standing in for mentions, and attach it."""
        wanted = self.settings.ann_index
        queries = self.network.matcher.mention_retrieval_vectors(
            self.stand_in_mentions(kb, spread_rows(len(kb), RECALL_SAMPLE)))
        ann = AnnIndex.build(index.arrays[RETRIEVAL], factory=None if wanted == "auto" else wanted,
                             nprobe=self.settings.ann_nprobe, shortlist=self.settings.ann_shortlist,
                             queries=queries, recall_k=max(self.settings.n_candidates, 1),
                             target_recall=self.settings.ann_target_recall, progress=progress)
        ann.meta["requested"] = wanted
        ann_recall_report(ann, len(kb))
        index.ann = ann
        return ann

    def stand_in_mentions(self, kb: MultimodalKB, rows: Sequence[int]) -> Dict[str, torch.Tensor]:
        """The mention side of KB entities encoded as if they were mentions
        (to check a pooled index or an ANN index without real mentions)."""
        network = self.network
        network.eval()
        batch = self.encoding.rows(kb, rows)
        with torch.no_grad():
            return network.matcher.mention_side(network.encode(batch.texts, batch.images))
