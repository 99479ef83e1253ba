"""One training step of an ``m3el_linker``: the batch's gold mentions
against its gold entities (plus hard negatives), M3EL's losses and, beside
them, the candidate scorer's on the KB's lexical features."""
import contextlib
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional

import numpy
from spacy.training import Example, validate_examples
from thinc.api import Optimizer

from ..errors import warn
from ..index.memory import release_freed_memory
from ..kb.base import NIL
from .features import in_batch_features
from .inputs import TrainingBatch, training_batch
from .shared_transformer import UpstreamBatch, find_listener

if TYPE_CHECKING:  # pragma: no cover
    from .linker import M3ELLinker

#: Updates between two hand-backs of freed memory to the OS (see :mod:`spacy_m3el.index.memory`).
RELEASE_EVERY = 50


def training_step(linker: "M3ELLinker", examples: Iterable[Example], *, sgd: Optional[Optimizer],
                  losses: Optional[Dict[str, float]]) -> Dict[str, float]:
    """Update ``linker`` on ``examples``; adds the step's loss to ``losses[linker.name]``."""
    losses = {} if losses is None else losses
    losses.setdefault(linker.name, 0.0)
    examples = list(examples)
    validate_examples(examples, "M3ELLinker.update")
    if len(linker.kb) == 0:
        raise ValueError("m3el_linker cannot train without a KB: call initialize() with a kb_loader")
    settings = linker.settings
    _tell_about_nil(linker, examples)
    upstream = _upstream_outputs(linker, examples)
    batch = training_batch(examples, linker.kb, labels_discard=settings.labels_discard,
                           use_gold_ents=settings.use_gold_ents, hard_negatives=settings.hard_negatives)
    if batch is None:
        if upstream is not None:  # the upstream's step waits for every listener's gradient
            upstream.send_gradients()
        return losses  # nothing to contrast in this batch
    scorer_inputs = _scorer_inputs(linker, batch)
    varied = scorer_inputs.get("use_gate", False)
    inputs = {**batch.model_inputs(linker.inputs, linker.kb,
                                   picture_dropout=settings.picture_dropout if varied else 0.0,
                                   picture_mismatch=settings.picture_mismatch if varied else 0.0),
              **scorer_inputs}
    if upstream is not None:
        inputs["mention_texts"] = upstream.mention_texts(batch.spans)
    with upstream.training() if upstream is not None else contextlib.nullcontext():
        parts, backprop = linker.model.begin_update(inputs)
        loss = float(parts["loss"].detach())
        if not numpy.isfinite(loss):
            detail = {k: float(v.detach()) for k, v in parts.items()}
            raise ValueError(
                f"m3el_linker: the training loss is not finite ({detail}). Lower the learning "
                "rate, check the inputs for NaN, or enable grad scaling with mixed precision."
            )
        backprop(None)
    if upstream is not None:
        upstream.send_gradients()
    if sgd is not None:
        linker.finish_update(sgd)
    linker.index_keeper.drop()  # built by the old weights
    linker.averages.forget()  # the averaged weights' too: the averages moved
    linker.state.calibration_stale = True
    linker.state.updates = (linker.state.updates or 0) + 1
    if linker.state.updates % RELEASE_EVERY == 0:
        release_freed_memory()  # the batches' freed tensors, pinned in the C heap by what training keeps
    losses[linker.name] += loss
    return losses


def _upstream_outputs(linker: "M3ELLinker", examples: List[Example]) -> Optional[UpstreamBatch]:
    """With a shared transformer: its output for the batch's docs, as
    handed to the listener (or read from the docs when it is frozen)."""
    shared = linker.shared_encoder
    if shared is None:
        return None
    listener = find_listener(linker.model)
    live = listener._batch_id is not None  # the upstream trains in this step and waits for our gradient
    docs = [eg.predicted for eg in examples]
    outputs, send = listener(docs, is_train=True)
    return UpstreamBatch(shared, docs, outputs, send if live else None, linker.settings.context_chars)


def _scorer_inputs(linker: "M3ELLinker", batch: TrainingBatch) -> Dict[str, Any]:
    """The candidate scorer's training inputs: lexical features of every
    mention against the in-batch entities (none for the paper's score)."""
    options = linker.scorer_options
    if not (options.prior or options.name or options.branches or options.gate):
        return {}
    kb = linker.kb
    names = [kb.name(row) for row in batch.entity_rows]
    priors = [dict(kb.alias_rows(span.text)) for span in batch.spans]
    lexical = in_batch_features([span.text for span in batch.spans], names, priors, batch.entity_rows)
    mask = linker.network.scorer.feature_mask(prior=options.prior, name=options.name)
    return {"lexical": lexical, "feature_mask": mask, "use_branches": options.branches, "use_gate": options.gate}


def _tell_about_nil(linker: "M3ELLinker", examples: List[Example]) -> None:
    if linker.state.told_about_nil:
        return
    nil = sum(1 for eg in examples for ent in eg.reference.ents if ent.kb_id_ == NIL)
    if nil:
        linker.state.told_about_nil = True
        warn(f"m3el_linker: {nil} NIL mention(s) in a training batch have no entity to contrast, so "
             "M3EL's losses leave them out; the NIL option is fitted on held-out data instead "
             "(calibrate_on_score, or M3ELLinker.calibrate)", stacklevel=5)
