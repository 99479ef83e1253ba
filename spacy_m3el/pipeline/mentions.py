"""Mentions into the mention side of M3EL, and the count of the mentions
linked without a picture, said once per call or stream (a
:class:`~spacy_m3el.progress.LinkingRun`)."""
import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch
from spacy.tokens import Span

from ..encoders.shared import SharedTextEncoder
from ..model.matching import Side
from ..progress import LinkingRun
from .inputs import InputBuilder
from .shared_transformer import UpstreamBatch, doc_outputs


class MentionEncoder:
    """Encodes mentions (texts, pictures or an upstream transformer's
    output) for one linker, inside the linking run that counts them."""

    def __init__(self, name: str, network: Any, inputs: InputBuilder, settings: Any) -> None:
        self.name = name
        self.network = network
        self.inputs = inputs
        self.settings = settings
        #: Mentions linked without their image because it could not be loaded.
        self.bad_images = 0
        self._run: Optional[LinkingRun] = None

    def new_run(self) -> LinkingRun:
        return LinkingRun(self.name, warn_missing=self.network.matcher.uses_image)

    def encode(self, spans: Sequence[Span], *, where: Optional[Sequence[str]] = None) -> Side:
        """The mention side of M3EL for these spans. Mentions whose image
        could not be loaded (``on_bad_image = "warn"``) are counted in ``bad_images``."""
        network = self.network
        if network.training:  # train()/eval() set the whole tree: the root says it, without a walk of it
            network.eval()
        texts, refs = self.inputs.mentions(spans, where=where)
        shared = network.encoder if isinstance(network.encoder, SharedTextEncoder) else None
        if shared is not None:
            docs = list({id(span.doc): span.doc for span in spans}.values())
            texts = UpstreamBatch(shared, docs, doc_outputs(docs, shared.upstream), None,
                                  self.settings.context_chars).mention_texts(spans)
        with torch.no_grad():
            items = network.encode(texts, refs)
        self.bad_images += sum(ref is not None and not has for ref, has in zip(refs, items.image_mask.tolist()))
        run = self._run if self._run is not None else self.new_run()
        run.count(mentions=len(refs), without_picture=sum(ref is None for ref in refs))
        if self._run is None:  # called on its own: said now, not at the end of a call
            run.finish()
        return network.matcher.mention_side(items)

    @contextlib.contextmanager
    def linking_run(self) -> Iterator[LinkingRun]:
        """Count the mentions encoded inside the block, and warn once at its
        end about those without a picture (a block inside another is
        counted by the outer one)."""
        if self._run is not None:
            yield self._run
            return
        run = self.new_run()
        with self.counted_by(run):
            yield run
        run.finish()

    @contextlib.contextmanager
    def counted_by(self, run: LinkingRun) -> Iterator[None]:
        """Count the mentions encoded inside the block in ``run``."""
        outer, self._run = self._run, run
        try:
            yield
        finally:
            self._run = outer
