"""The ``m3el_linker`` pipeline component."""
import contextlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy
import srsly
import torch
from spacy import util
from spacy.language import Language
from spacy.pipeline import TrainablePipe
from spacy.tokens import Doc, Span
from spacy.training import Example, validate_examples, validate_get_examples
from spacy.util import SimpleFrozenList
from spacy.vocab import Vocab
from thinc.api import Model, Optimizer

from . import linking
from .architectures import M3ELNetwork, get_network
from .calibration import ScorerOptions, answer_figures, apply_scorer, calibrate_scorer
from .candidates import CandidateGenerator, alias_candidates
from .entity_cache import EntityCache
from .entity_encoding import EntityEncoder
from .errors import warn
from .encoders import SharedTextEncoder
from .exhaustive import evaluate_exhaustive
from .extensions import register_extensions
from .features import in_batch_features
from .images import ImageLoader
from .inputs import InputBuilder, TrainingBatch, training_batch
from .kb import NIL, MultimodalKB, create_empty_kb
from .model.matching import Side
from .pictures import CALIBRATION_MIX, with_pictures
from .progress import LinkingRun, pictures_removed_on_purpose, progress_bar
from .results import annotate, link_result, ranking_results
from .scoring import aligned_mentions, score_linking
from .settings import LinkerSettings
from .shared_transformer import UpstreamBatch, doc_outputs, find_listener, upstream_provider

DEFAULT_MODEL = {
    "@architectures": "spacy-m3el.M3EL.v1",
    "encoder": {"@misc": "spacy-m3el.MiniLMEfficientNetEncoder.v1", "max_text_length": 40, "frozen": True},
}
#: to_bytes warns above this size: a KB with its images belongs on disk.
LARGE_BYTES = 200 * 2**20


@Language.factory(
    "m3el_linker",
    requires=["doc.ents", "token.ent_iob", "token.ent_type"],
    assigns=["token.ent_kb_id"],
    default_config={
        "model": DEFAULT_MODEL,
        **LinkerSettings().to_dict(),
        "generate_empty_kb": {"@misc": "spacy-m3el.EmptyMultimodalKB.v1"},
        "candidate_generator": {"@misc": "spacy-m3el.AliasCandidates.v1"},
        "scorer": {"@scorers": "spacy-m3el.linking_scorer.v1"},
    },
    default_score_weights={
        "m3el_mrr": 1.0, "m3el_hits1": 0.0, "nel_micro_f": 0.0, "nel_micro_p": None, "nel_micro_r": None,
        "m3el_hits3": None, "m3el_hits5": None, "m3el_hits10": None, "m3el_hits20": None,
        "m3el_n_mentions": None, "m3el_accuracy": 0.0, "m3el_ece": 0.0, "m3el_nil_f": 0.0,
        "m3el_nil_p": None, "m3el_nil_r": None, "m3el_n_nil": None,
    },
)
def make_m3el_linker(
    nlp: Language,
    name: str,
    model: Model,
    *,
    n_candidates: int,
    use_alias_candidates: bool,
    threshold: Optional[float],
    incl_prior: bool,
    incl_name_match: bool,
    reweight_branches: bool,
    picture_gate: bool,
    picture_dropout: float,
    picture_mismatch: float,
    calibrate_on_score: bool,
    labels_discard: List[str],
    use_gold_ents: bool,
    hard_negatives: int,
    on_bad_image: str,
    allow_image_urls: bool,
    context_chars: int,
    entity_batch_size: int,
    max_cached_queries: Optional[int],
    inference_precision: str,
    image_workers: int,
    build_processes: int,
    ann_index: Optional[str],
    ann_nprobe: int,
    ann_shortlist: int,
    overwrite: bool,
    score_protocol: str,
    generate_empty_kb: Callable[[Vocab, int], MultimodalKB],
    candidate_generator: CandidateGenerator,
    scorer: Optional[Callable],
) -> "M3ELLinker":
    """The factory: settings as documented on :class:`LinkerSettings`;
    ``candidate_generator`` proposes alias-table candidates for a mention
    text (:mod:`spacy_m3el.candidates`)."""
    values = locals()
    settings = LinkerSettings(**{key: values[key] for key in LinkerSettings.names()})
    linker = M3ELLinker(nlp.vocab, model, name, settings=settings, generate_empty_kb=generate_empty_kb,
                        candidate_generator=candidate_generator, scorer=scorer)
    linker.attach_to_pipeline(nlp)
    return linker


class M3ELLinker(TrainablePipe):
    """Links entity spans to a :class:`MultimodalKB` with M3EL: candidates
    from the alias table and a dense top-K search, reranked by the full
    M3EL score (:mod:`.linking`), then scored with the KB's features into
    probabilities over the candidates and NIL (:mod:`.calibration`). The KB
    owns the entity cache; the linker builds it for its current weights
    when it is missing or stale.
    """

    def __init__(
        self,
        vocab: Vocab,
        model: Model,
        name: str = "m3el_linker",
        *,
        settings: Optional[LinkerSettings] = None,
        generate_empty_kb: Callable[[Vocab, int], MultimodalKB] = create_empty_kb(),
        candidate_generator: CandidateGenerator = alias_candidates,
        scorer: Optional[Callable] = score_linking,
    ) -> None:
        register_extensions()
        self.vocab = vocab
        self.model = model
        self.name = name
        self.settings = settings if settings is not None else LinkerSettings()
        self.generate_empty_kb = generate_empty_kb
        self.candidate_generator = candidate_generator
        self.scorer = scorer
        self.kb: MultimodalKB = generate_empty_kb(vocab, 0)
        #: Mentions linked without their image because it could not be loaded.
        self.bad_images = 0
        #: True once training updates changed the weights since the last calibration.
        self.calibration_stale = False
        #: Training updates the weights have had (saved with the pipeline; None: not known, as
        #: for pipelines saved before it was recorded).
        self.updates: Optional[int] = 0
        # Said once, on the first call after loading: an untrained or uncalibrated linker.
        self._state_warning: Optional[str] = None
        self._run: Optional[LinkingRun] = None
        self._told_about_nil = False
        self.network.settings = self.settings
        self.inputs = InputBuilder(self.network.encoder, ImageLoader(self.settings), self.settings)
        self.entity_encoder = EntityEncoder(self.network, self.inputs, self.settings)

    def configure(self, **changes: Any) -> Dict[str, Any]:
        """Change settings of a running linker (``linker.configure(threshold=0.4,
        on_bad_image="warn")``): checked together first, then applied; what
        depends on them follows at first use (the entity cache is rebuilt for
        another ``max_cached_queries``, the ANN index for another
        ``ann_index``). Returns the old values."""
        return self.settings.update(**changes)

    @property
    def cfg(self) -> Dict[str, Any]:
        """The settings, as spaCy components expose their ``cfg``."""
        return self.settings.to_dict()

    @property
    def scorer_options(self) -> ScorerOptions:
        """The candidate scorer's feature groups, from the settings."""
        settings = self.settings
        return ScorerOptions(prior=settings.incl_prior, name=settings.incl_name_match,
                             branches=settings.reweight_branches,
                             gate=settings.picture_gate and self.network.matcher.uses_image)

    @property
    def network(self) -> M3ELNetwork:
        """The torch module (backbone + matcher) inside the thinc model."""
        return get_network(self.model)

    @property
    def shared_encoder(self) -> Optional[SharedTextEncoder]:
        """The encoder when it borrows an upstream transformer, else None."""
        encoder = self.network.encoder
        return encoder if isinstance(encoder, SharedTextEncoder) else None

    def attach_to_pipeline(self, nlp: Language) -> None:
        """Borrow the text model of the upstream transformer component named
        in the encoder's config (a no-op for a standalone encoder)."""
        shared = self.shared_encoder
        if shared is not None:
            shared.attach(upstream_provider(nlp, shared.upstream))

    # ------------------------------------------------------------------ setup
    def set_kb(self, kb_loader: Callable[[Vocab], MultimodalKB]) -> None:
        """Use the KB that ``kb_loader(vocab)`` returns."""
        if not callable(kb_loader):
            raise ValueError(f"kb_loader must be a callable returning a MultimodalKB, got {kb_loader!r}")
        self._use_kb(kb_loader(self.vocab))

    def _use_kb(self, kb: Any) -> None:
        if not isinstance(kb, MultimodalKB):
            raise TypeError(
                f"m3el_linker needs a MultimodalKB (entities with descriptions and images), got "
                f"{type(kb).__name__}. Build one with spacy_m3el.MultimodalKB."
            )
        self.kb = kb

    def initialize(
        self,
        get_examples: Callable[[], Iterable[Example]],
        *,
        nlp: Optional[Language] = None,
        kb_loader: Optional[Callable[[Vocab], MultimodalKB]] = None,
    ) -> None:
        """Set the KB (from ``kb_loader`` or an earlier :meth:`set_kb`) and
        initialise the model."""
        validate_get_examples(get_examples, "M3ELLinker.initialize")
        if kb_loader is not None:
            self.set_kb(kb_loader)
        if nlp is not None:
            self.attach_to_pipeline(nlp)
        if len(self.kb) == 0:
            raise ValueError(
                "m3el_linker has an empty KB: pass a kb_loader to initialize() "
                "([initialize.components.m3el_linker.kb_loader] in a config) or call set_kb() first."
            )
        self.model.initialize()
        self.calibration_stale = True
        self.updates = 0

    # ------------------------------------------------------------------ training
    def update(
        self,
        examples: Iterable[Example],
        *,
        drop: float = 0.0,
        sgd: Optional[Optimizer] = None,
        losses: Optional[Dict[str, float]] = None,
    ) -> Dict[str, float]:
        """One step on the batch's gold mentions, with the batch's gold
        entities (plus ``hard_negatives``) as every mention's candidates."""
        losses = {} if losses is None else losses
        losses.setdefault(self.name, 0.0)
        examples = list(examples)
        validate_examples(examples, "M3ELLinker.update")
        if len(self.kb) == 0:
            raise ValueError("m3el_linker cannot train without a KB: call initialize() with a kb_loader")
        settings = self.settings
        self._tell_about_nil(examples)
        upstream = self._upstream_outputs(examples)
        batch = training_batch(examples, self.kb, labels_discard=settings.labels_discard,
                               use_gold_ents=settings.use_gold_ents, hard_negatives=settings.hard_negatives)
        if batch is None:
            if upstream is not None:  # the upstream's step waits for every listener's gradient
                upstream.send_gradients()
            return losses  # nothing to contrast in this batch
        scorer_inputs = self._scorer_inputs(batch)
        varied = scorer_inputs.get("use_gate", False)
        inputs = {**batch.model_inputs(self.inputs, self.kb, picture_dropout=settings.picture_dropout if varied else 0.0,
                                       picture_mismatch=settings.picture_mismatch if varied else 0.0),
                  **scorer_inputs}
        if upstream is not None:
            inputs["mention_texts"] = upstream.mention_texts(batch.spans)
        with upstream.training() if upstream is not None else contextlib.nullcontext():
            parts, backprop = self.model.begin_update(inputs)
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
            self.finish_update(sgd)
        self.kb.clear_entity_cache()  # built by the old weights
        self.calibration_stale = True
        self.updates = (self.updates or 0) + 1
        losses[self.name] += loss
        return losses

    def _upstream_outputs(self, examples: List[Example]) -> Optional[UpstreamBatch]:
        """With a shared transformer: its output for the batch's docs, as
        handed to the listener (or read from the docs when it is frozen)."""
        shared = self.shared_encoder
        if shared is None:
            return None
        listener = find_listener(self.model)
        live = listener._batch_id is not None  # the upstream trains in this step and waits for our gradient
        docs = [eg.predicted for eg in examples]
        outputs, send = listener(docs, is_train=True)
        return UpstreamBatch(shared, docs, outputs, send if live else None, self.settings.context_chars)

    def _scorer_inputs(self, batch: TrainingBatch) -> Dict[str, Any]:
        """The candidate scorer's training inputs: lexical features of every
        mention against the in-batch entities (none for the paper's score)."""
        options = self.scorer_options
        if not (options.prior or options.name or options.branches or options.gate):
            return {}
        names = [self.kb.name(row) for row in batch.entity_rows]
        priors = [dict(self.kb.alias_rows(span.text)) for span in batch.spans]
        lexical = in_batch_features([span.text for span in batch.spans], names, priors, batch.entity_rows)
        mask = self.network.scorer.feature_mask(prior=options.prior, name=options.name)
        return {"lexical": lexical, "feature_mask": mask, "use_branches": options.branches,
                "use_gate": options.gate}

    def _tell_about_nil(self, examples: List[Example]) -> None:
        if self._told_about_nil:
            return
        nil = sum(1 for eg in examples for ent in eg.reference.ents if ent.kb_id_ == NIL)
        if nil:
            self._told_about_nil = True
            warn(f"m3el_linker: {nil} NIL mention(s) in a training batch have no entity to contrast, so "
                 "M3EL's losses leave them out; the NIL option is fitted on held-out data instead "
                 "(calibrate_on_score, or M3ELLinker.calibrate)", stacklevel=4)

    def get_loss(self, examples, scores):  # pragma: no cover - the loss lives in the model
        """Not used: M3EL's losses are computed by the network in :meth:`update`."""
        raise NotImplementedError("M3ELLinker computes its loss inside update()")

    # ------------------------------------------------------------------ entity cache
    @property
    def entity_cache(self) -> EntityCache:
        """The KB's entity cache for the current weights (built on first use)."""
        if len(self.kb) == 0:
            raise ValueError("m3el_linker has an empty KB: there is no entity cache")
        return self.entity_encoder.current(self.kb)

    def build_entity_cache(
        self, *, progress: bool = False, folder: Optional[Union[str, Path]] = None
    ) -> EntityCache:
        """Encode every KB entity once and store the mention-independent part
        of M3EL in the KB (saved with the pipeline; fp16, memory-mapped). A
        pooled cache (``max_cached_queries``) records, in its meta and on the
        console, how often its top-1 agrees with the exact score's. With a
        ``folder`` (and for large KBs) the build is streamed to disk there and
        resumes after a kill; an ``ann_index`` is built with the cache."""
        cache = self.entity_encoder.build(self.kb, progress=progress, folder=folder)
        return self.entity_encoder.configure_search(self.kb, cache, progress=progress)

    def exact_entity_cache(self) -> EntityCache:
        """An entity cache with every G2L query, so reranking gives the exact
        training score: the KB's own when it is exact, else one built apart
        (not stored). For the paper's exhaustive protocol."""
        cache = self.entity_encoder.current(self.kb)
        return cache if cache.meta.get("max_queries") is None else self.entity_encoder.encode(self.kb, None)

    # ------------------------------------------------------------------ prediction
    def encode_mentions(self, spans: Sequence[Span], *, where: Optional[Sequence[str]] = None) -> Side:
        """The mention side of M3EL for these spans (texts and images
        encoded). Mentions whose image could not be loaded (``on_bad_image =
        "warn"``) are counted in ``bad_images``."""
        network = self.network
        if any(module.training for module in network.modules()):
            network.eval()  # its module walk costs ~1 ms per call: felt at batch 1
        texts, refs = self.inputs.mentions(spans, where=where)
        shared = self.shared_encoder
        if shared is not None:
            docs = list({id(span.doc): span.doc for span in spans}.values())
            texts = UpstreamBatch(shared, docs, doc_outputs(docs, shared.upstream), None,
                                  self.settings.context_chars).mention_texts(spans)
        with torch.no_grad():
            items = network.encode(texts, refs)
        self.bad_images += sum(ref is not None and not has for ref, has in zip(refs, items.image_mask.tolist()))
        run = self._run if self._run is not None else LinkingRun(self.name, warn_missing=network.matcher.uses_image)
        run.count(mentions=len(refs), without_picture=sum(ref is None for ref in refs))
        if self._run is None:  # called on its own: said now, not at the end of a call
            run.finish()
        return network.matcher.mention_side(items)

    def __call__(self, doc: Doc) -> Doc:
        """Link one doc (one warning for its mentions without a picture)."""
        with self.linking_run() as run:
            doc = super().__call__(doc)
            run.doc_done()
        return doc

    def pipe(self, stream: Iterable[Doc], *, batch_size: int = 128) -> Iterator[Doc]:
        """Link a stream of docs in batches: one warning when the stream
        ends for all its mentions linked without a picture, and progress
        lines on long streams."""
        run = LinkingRun(self.name, warn_missing=self.network.matcher.uses_image)
        error_handler = self.get_error_handler()
        try:
            for docs in util.minibatch(stream, size=batch_size):
                try:
                    with self._counted_by(run):  # only while linking: the stream may wait between batches
                        self.set_annotations(docs, self.predict(docs))
                except Exception as error:
                    error_handler(self.name, self, docs, error)
                    continue
                for doc in docs:
                    run.doc_done()
                    yield doc
        finally:
            run.finish()

    @contextlib.contextmanager
    def linking_run(self) -> Iterator[LinkingRun]:
        """Count the mentions linked inside the block, and warn once at its
        end about those without a picture (a block inside another is
        counted by the outer one)."""
        if self._run is not None:
            yield self._run
            return
        run = LinkingRun(self.name, warn_missing=self.network.matcher.uses_image)
        with self._counted_by(run):
            yield run
        run.finish()

    @contextlib.contextmanager
    def _counted_by(self, run: LinkingRun) -> Iterator[None]:
        outer, self._run = self._run, run
        try:
            yield
        finally:
            self._run = outer

    def predict(self, docs: Iterable[Doc]) -> List[List[Dict[str, Any]]]:
        """Per doc, per linkable entity: ``{"id", "score", "candidates", "modalities"}``."""
        if self._state_warning is not None:
            warn(self._state_warning, stacklevel=3)
            self._state_warning = None
        docs = list(docs)
        per_doc = [self._linkable(doc) for doc in docs]
        spans = [span for doc_spans in per_doc for span in doc_spans]
        where = [f"doc {i} of the batch, {doc.text[:40]!r}" for i, doc in enumerate(docs) for _ in per_doc[i]]
        if spans and len(self.kb):
            results = self._link(spans, where)
        else:  # nothing to link to: NIL, with certainty
            results = [link_result([], []) for _ in spans]
            apply_scorer(self.network.scorer, results, options=self.scorer_options, threshold=self.settings.threshold)
        out, position = [], 0
        for doc_spans in per_doc:
            out.append(results[position : position + len(doc_spans)])
            position += len(doc_spans)
        return out

    def _linkable(self, doc: Doc) -> List[Span]:
        return [ent for ent in doc.ents if ent.label_ not in self.settings.labels_discard]

    def _link(self, spans: List[Span], where: List[str]) -> List[Dict[str, Any]]:
        cache = self.entity_encoder.current(self.kb)
        texts = [span.text for span in spans]
        alias = self.candidate_generator(self.kb, texts) if self.settings.use_alias_candidates else [{} for _ in spans]
        mention = self.encode_mentions(spans, where=where)
        ranking = linking.two_stage(self.network.matcher, mention, cache, k=self.settings.n_candidates,
                                    alias_rows=[list(a) for a in alias])
        has_image = mention["has_image"].tolist() if "has_image" in mention else [False] * len(spans)
        modalities = [["text", "image"] if image else ["text"] for image in has_image]
        results = ranking_results(ranking, self.kb, alias, [s.text for s in spans], modalities)
        apply_scorer(self.network.scorer, results, options=self.scorer_options, threshold=self.settings.threshold)
        return results

    def set_annotations(self, docs: Iterable[Doc], predictions: List[List[Dict[str, Any]]]) -> None:
        """Write KB ids to the tokens and score/candidates/modalities to ``ent._``."""
        for doc, results in zip(docs, predictions):
            annotate(doc, self._linkable(doc), results, overwrite=self.settings.overwrite)

    # ------------------------------------------------------------------ calibration
    def calibrate(self, examples: Iterable[Example], *, progress: bool = False) -> Dict[str, Any]:
        """Fit the candidate scorer (temperature, feature and branch weights,
        picture gate, NIL option) and the NIL threshold on held-out examples
        with gold links (NIL included), each mention with its picture,
        without one and with another mention's picture (seeded), so that
        none of these gets answers fitted to the other. The fit is
        cross-validated: the threshold is chosen, and the report's
        ``out_of_fold`` figures computed, on probabilities from fits that
        did not see the mention; the predicted docs are annotated with those
        out-of-fold answers, so scores computed on them are out of sample.
        ``progress``: progress lines for the linking and the fits."""
        examples = list(examples)
        validate_examples(examples, "M3ELLinker.calibrate")
        docs = [eg.predicted for eg in examples]
        if any(ent._.m3el_candidates is None for doc in docs for ent in self._linkable(doc)):
            self._annotate(docs)
        pairs = []  # (gold, span) of every gold-linked mention the linker linked
        for reference, span in aligned_mentions(examples):
            if reference.kb_id_ and span is not None and span.label_ not in self.settings.labels_discard \
                    and span._.m3el_candidates is not None:
                pairs.append((reference.kb_id_, span))
        if not pairs:
            raise ValueError("M3ELLinker.calibrate: none of the examples has a gold-linked mention (a KB id or "
                             f"'{NIL}') among the predicted entities: pass held-out examples whose reference "
                             "entities carry kb_id and whose predicted docs have the same entity spans (the "
                             "spacy-m3el.Corpus.v1 reader with gold_ents = true gives both)")
        results, gold, groups, conditions = [], [], [], []
        mix = CALIBRATION_MIX if self.network.matcher.uses_image else ("given",)
        for condition in progress_bar(mix, desc=f"Calibration: linking {len(docs)} docs under each picture condition",
                                      unit="condition", disable=not progress):
            linked = self._linked_under(docs, condition)
            for group, (kb_id, span) in enumerate(pairs):
                doc = linked[id(span.doc)]
                ent = doc.char_span(span.start_char, span.end_char)
                results.append(self._result_of(ent))
                gold.append(kb_id)
                groups.append(group)
                conditions.append(condition)
        report, held_out = calibrate_scorer(self.network.scorer, results, gold, groups, options=self.scorer_options,
                                            progress=progress)
        # Mentions, not (mention, picture condition) pairs; fitted_on counts the pairs.
        report["mentions"] = len(pairs)
        report["nil_mentions"] = sum(kb_id == NIL for kb_id, _ in pairs)
        report["conditions"] = {
            condition: answer_figures([r for r, c in zip(held_out, conditions) if c == condition],
                                      [g for g, c in zip(gold, conditions) if c == condition])
            for condition in dict.fromkeys(conditions)
        }
        everything = [self._result_of(ent) for doc in docs for ent in self._linkable(doc)]
        apply_scorer(self.network.scorer, everything, options=self.scorer_options, threshold=self.settings.threshold)
        position = 0
        for doc in docs:
            spans = self._linkable(doc)
            annotate(doc, spans, everything[position : position + len(spans)], overwrite=True)
            position += len(spans)
        for (_, span), result in zip(pairs, held_out):  # the given condition comes first
            annotate(span.doc, [span], [result], overwrite=True)
        self.calibration_stale = False
        return report

    def _linked_under(self, docs: List[Doc], condition: str) -> Dict[int, Doc]:
        """The docs (by id) linked with their pictures under ``condition``."""
        if condition == "given":
            return {id(doc): doc for doc in docs}
        copies = with_pictures(docs, condition, seed=0)
        with pictures_removed_on_purpose():
            self._annotate(copies)
        return {id(doc): copy for doc, copy in zip(docs, copies)}

    def _annotate(self, docs: List[Doc]) -> None:
        # One call for all docs: its figures do not depend on how the docs would be batched.
        with self.linking_run():
            self.set_annotations(docs, self.predict(docs))

    @staticmethod
    def _result_of(ent: Span) -> Dict[str, Any]:
        return {"id": ent.kb_id_, "score": ent._.m3el_score, "nil_prob": ent._.m3el_nil_prob,
                "candidates": [dict(c) for c in ent._.m3el_candidates or []],
                "modalities": list(ent._.m3el_modalities or [])}

    def score(self, examples: Iterable[Example], **kwargs: Any) -> Dict[str, Any]:
        """Hits@k, MRR, nel_micro_p/r/f, calibration error and NIL
        precision/recall with the configured scorer; with ``score_protocol
        = "exhaustive"`` Hits@k and MRR are the paper's (every KB entity
        ranked by the exact score), plus ``m3el_top1_agreement``. After
        training updates (``calibrate_on_score``) the examples first serve
        to :meth:`calibrate` the linker."""
        examples = list(examples)
        validate_examples(examples, "M3ELLinker.score")
        if self.calibration_stale and self.settings.calibrate_on_score and len(self.kb):
            try:
                self.calibrate(examples, progress=True)
            except ValueError as error:  # e.g. no gold entity among any candidates yet
                warn(f"m3el_linker: not calibrated on these examples: {error}", stacklevel=3)
        scores = super().score(examples, **kwargs)
        if self.settings.score_protocol == "exhaustive" and len(self.kb):
            exhaustive = evaluate_exhaustive(self, examples, progress=True)
            scores.update({key: value for key, value in exhaustive.items() if key.startswith("m3el_")})
            scores["m3el_top1_agreement"] = exhaustive["top1_agreement"]
        return scores

    # ------------------------------------------------------------------ serialisation
    def to_bytes(self, *, exclude: Iterable[str] = SimpleFrozenList()) -> bytes:
        """The weights and the KB (images and, when it is valid for the
        weights, the entity cache: saving never encodes) as bytes; prefer
        :meth:`to_disk` for large KBs."""
        data = util.to_bytes({"model": self.model.to_bytes,
                              "kb": lambda: self.kb.to_bytes(exclude=self._stale_cache()),
                              "state": lambda: srsly.json_dumps(self._state())}, exclude)
        if len(data) > LARGE_BYTES:
            warn(f"m3el_linker.to_bytes: {len(data) / 2**20:.0f} MB, mostly the KB's images and "
                 "entity cache; use to_disk (memory-mapped) or exclude=['kb']")
        return data

    def from_bytes(self, bytes_data: bytes, *, exclude: Iterable[str] = SimpleFrozenList()) -> "M3ELLinker":
        """Load what :meth:`to_bytes` wrote (parts in ``exclude`` are kept)."""
        util.from_bytes(bytes_data, {"model": self.model.from_bytes, "kb": self._kb_from_bytes,
                                     "state": lambda b: self._use_state(srsly.json_loads(b))}, exclude)
        self.entity_encoder.adopt_loaded(self.kb)
        return self

    def to_disk(self, path: Union[str, Path], *, exclude: Iterable[str] = SimpleFrozenList()) -> None:
        """Write ``model`` (safetensors) and ``kb/`` (images, and the fp16
        entity cache when it is valid for the weights: saving never encodes;
        a pipeline saved without one builds it at first use, or with
        ``build-cache``)."""
        util.to_disk(path, {
            "model": lambda p: p.write_bytes(self.model.to_bytes()),
            "kb": lambda p: self.kb.to_disk(p, exclude=self._stale_cache()),
            "state.json": lambda p: srsly.write_json(p, self._state()),
        }, exclude)

    def from_disk(self, path: Union[str, Path], *, exclude: Iterable[str] = SimpleFrozenList()) -> "M3ELLinker":
        """Load what :meth:`to_disk` wrote (parts in ``exclude`` are kept)."""
        util.from_disk(path, {"model": self._model_from_file, "kb": self._kb_from_disk,
                              "state.json": self._state_from_file}, exclude)
        self.entity_encoder.adopt_loaded(self.kb)
        return self

    def _stale_cache(self) -> List[str]:
        """["cache"] when the KB's entity cache is missing or not valid for the weights."""
        return [] if len(self.kb) and self.entity_encoder.is_current(self.kb) else ["cache"]

    def _state(self) -> Dict[str, Any]:
        return {"updates": self.updates, "calibrated": not self.calibration_stale}

    def _state_from_file(self, file: Path) -> None:
        # Pipelines saved before the state was written have none: taken as trained and calibrated.
        self._use_state(srsly.read_json(file) if file.is_file() else {"updates": None, "calibrated": True})

    def _use_state(self, state: Dict[str, Any]) -> None:
        self.updates = state.get("updates")
        self.calibration_stale = not state.get("calibrated", True)
        if state.get("updates") == 0:
            self._state_warning = (
                f"{self.name}: this linker has not been trained (0 updates): its links come from untrained "
                "matching layers. Train it (spacy train) before relying on them.")
        elif self.calibration_stale:
            self._state_warning = (
                f"{self.name}: this linker was trained after its last calibration: its probabilities and NIL "
                "answers are not calibrated for its weights. Run `python -m spacy_m3el calibrate` on held-out "
                "data (or train with calibrate_on_score = true).")
        else:
            self._state_warning = None

    def _model_from_file(self, file: Path) -> None:
        if not file.is_file():
            raise ValueError(f"{file.parent}: the m3el_linker weights file 'model' is missing")
        self.model.from_bytes(file.read_bytes())

    def _kb_from_disk(self, path: Path) -> None:
        self._use_kb(self.generate_empty_kb(self.vocab, 0).from_disk(path))

    def _kb_from_bytes(self, data: bytes) -> None:
        self._use_kb(self.generate_empty_kb(self.vocab, 0).from_bytes(data))


def find_linker(nlp: Language) -> "M3ELLinker":
    """The pipeline's ``m3el_linker`` (whatever its name)."""
    for _, pipe in nlp.pipeline:
        if isinstance(pipe, M3ELLinker):
            return pipe
    raise ValueError(f"The pipeline {nlp.pipe_names} has no m3el_linker")
