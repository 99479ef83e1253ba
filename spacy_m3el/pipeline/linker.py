"""The ``m3el_linker`` pipeline component.

The component holds a :class:`MultimodalKB` and the entity index built from
it for its weights (:class:`~spacy_m3el.index.keeper.IndexKeeper`), links
mentions with them (:mod:`.linking`, :mod:`.calibration`), and hands
training (:mod:`.training`), calibration on held-out data
(:mod:`.held_out`) and saving (:mod:`.storage`) to their own modules.
"""
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Union

from spacy import util
from spacy.language import Language
from spacy.pipeline import TrainablePipe
from spacy.tokens import Doc, Span
from spacy.training import Example, validate_get_examples
from spacy.util import SimpleFrozenList
from spacy.vocab import Vocab
from thinc.api import Model, Optimizer

from ..data.images import ImageLoader
from ..encoders import SharedTextEncoder
from ..evaluation.scoring import score_linking
from ..extensions import register_extensions
from ..index.encoding import EntityEncoding
from ..index.entity_index import EntityIndex
from ..index.keeper import IndexKeeper
from ..kb.base import MultimodalKB, create_empty_kb
from . import linking, storage
from .architecture import M3ELNetwork, get_network
from .averaging import AveragedWeights
from .calibration import ScorerOptions, apply_scorer
from .candidates import CandidateGenerator, alias_candidates
from .held_out import calibrate_linker, score_linker
from .inputs import InputBuilder
from .mentions import MentionEncoder
from .results import annotate, link_result, ranking_results
from .settings import LinkerSettings
from .shared_transformer import upstream_provider
from .training import training_step

DEFAULT_MODEL = {
    "@architectures": "spacy-m3el.M3EL.v1",
    "encoder": {"@misc": "spacy-m3el.MiniLMEfficientNetEncoder.v1", "max_text_length": 40, "frozen": True},
}


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
    calibration_pictures: Dict[str, float],
    labels_discard: List[str],
    use_gold_ents: bool,
    hard_negatives: int,
    on_bad_image: str,
    allow_image_urls: bool,
    context_chars: int,
    entity_batch_size: int,
    max_cached_queries: Optional[int],
    inference_precision: str,
    inference_runtime: str,
    image_workers: int,
    build_processes: int,
    ann_index: Optional[str],
    ann_nprobe: Optional[int],
    ann_target_recall: float,
    ann_shortlist: int,
    overwrite: bool,
    score_protocol: str,
    generate_empty_kb: Callable[[Vocab, int], MultimodalKB],
    candidate_generator: CandidateGenerator,
    scorer: Optional[Callable],
) -> "M3ELLinker":
    """The factory: settings as documented on :class:`LinkerSettings`;
    ``candidate_generator`` proposes alias-table candidates for a mention
    text (:mod:`spacy_m3el.pipeline.candidates`)."""
    values = locals()
    settings = LinkerSettings(**{key: values[key] for key in LinkerSettings.names()})
    linker = M3ELLinker(nlp.vocab, model, name, settings=settings, generate_empty_kb=generate_empty_kb,
                        candidate_generator=candidate_generator, scorer=scorer)
    linker.attach_to_pipeline(nlp)
    return linker


class M3ELLinker(TrainablePipe):
    """Links entity spans to a :class:`MultimodalKB` with M3EL: candidates
    from the alias table and a dense top-K search of the entity index,
    reranked by the full M3EL score (:mod:`.linking`), then scored with the
    KB's features into probabilities over the candidates and NIL
    (:mod:`.calibration`). The index is built for the current weights when
    it is missing or stale, never when saving.
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
        #: Training updates and calibration (saved as state.json).
        self.state = storage.LinkerState(name)
        self.network.settings = self.settings
        self.inputs = InputBuilder(self.network.encoder, ImageLoader(self.settings), self.settings)
        self.mentions = MentionEncoder(name, self.network, self.inputs, self.settings)
        #: The entity index of the KB for the current weights.
        self.index_keeper = IndexKeeper(self.network, EntityEncoding(self.network, self.settings,
                                                                     self.inputs.kb_images), self.settings)
        #: The entity index and calibration of the optimizer's parameter averages.
        self.averages = AveragedWeights(self)

    def configure(self, **changes: Any) -> Dict[str, Any]:
        """Change settings of a running linker (``linker.configure(threshold=0.4,
        on_bad_image="warn")``): checked together first, then applied; what
        depends on them follows at first use (the entity index is rebuilt for
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
        return ScorerOptions.of(self.settings, uses_image=self.network.matcher.uses_image)

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
        """Use the KB that ``kb_loader(vocab)`` returns (its entity index is built at first use)."""
        if not callable(kb_loader):
            raise ValueError(f"kb_loader must be a callable returning a MultimodalKB, got {kb_loader!r}")
        kb = kb_loader(self.vocab)
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
        self.index_keeper.drop()
        self.state.calibration_stale, self.state.updates = True, 0

    def update(self, examples: Iterable[Example], *, drop: float = 0.0, sgd: Optional[Optimizer] = None,
               losses: Optional[Dict[str, float]] = None) -> Dict[str, float]:
        """One step on the batch's gold mentions, with the batch's gold
        entities (plus ``hard_negatives``) as every mention's candidates."""
        return training_step(self, examples, sgd=sgd, losses=losses)

    def use_params(self, params: Dict[Any, Any]) -> Iterator[None]:
        """Parameter averages in place (:mod:`.averaging`); a generator, as spaCy's pipes' are."""
        yield from self.averages.use_params(params)

    def get_loss(self, examples, scores):  # pragma: no cover - the loss lives in the model
        """Not used: M3EL's losses are computed by the network in :meth:`update`."""
        raise NotImplementedError("M3ELLinker computes its loss inside update()")

    # ------------------------------------------------------------------ entity index
    @property
    def entity_index(self) -> EntityIndex:
        """The KB's entity index for the current weights (built on first use)."""
        if len(self.kb) == 0:
            raise ValueError("m3el_linker has an empty KB: there is no entity index")
        return self.index_keeper.current(self.kb)

    def build_entity_index(self, *, progress: bool = False, folder: Optional[Union[str, Path]] = None) -> EntityIndex:
        """Encode every KB entity once (saved with the pipeline; fp16,
        memory-mapped); with a ``folder`` (and for large KBs) streamed to
        disk there, resuming after a kill; with the ``ann_index`` asked for."""
        index = self.index_keeper.build(self.kb, progress=progress, folder=folder)
        return self.index_keeper.configure_search(self.kb, index, progress=progress)

    def exact_entity_index(self) -> EntityIndex:
        """An index with every G2L query (for the paper's exhaustive protocol)."""
        return self.index_keeper.exact(self.kb)

    # ------------------------------------------------------------------ prediction
    def __call__(self, doc: Doc) -> Doc:
        """Link one doc (one warning for its mentions without a picture)."""
        with self.mentions.linking_run() as run:
            doc = super().__call__(doc)
            run.doc_done()
        return doc

    def pipe(self, stream: Iterable[Doc], *, batch_size: int = 128) -> Iterator[Doc]:
        """Link a stream of docs in batches: one warning when the stream
        ends for all its mentions linked without a picture, and progress
        lines on long streams."""
        run = self.mentions.new_run()
        error_handler = self.get_error_handler()
        try:
            for docs in util.minibatch(stream, size=batch_size):
                try:
                    with self.mentions.counted_by(run):  # only while linking: the stream may wait between batches
                        self.set_annotations(docs, self.predict(docs))
                except Exception as error:
                    error_handler(self.name, self, docs, error)
                    continue
                for doc in docs:
                    run.doc_done()
                    yield doc
        finally:
            run.finish()

    def predict(self, docs: Iterable[Doc]) -> List[List[Dict[str, Any]]]:
        """Per doc, per linkable entity: ``{"id", "score", "candidates", "modalities"}``."""
        self.state.say_once()
        docs = list(docs)
        per_doc = [self.linkable(doc) for doc in docs]
        spans = [span for doc_spans in per_doc for span in doc_spans]
        where = [f"doc {i} of the batch, {doc.text[:40]!r}" for i, doc in enumerate(docs) for _ in per_doc[i]]
        if spans and len(self.kb):
            with self.network.linking_threads(len(spans)):
                results = self._link(spans, where)
        else:  # nothing to link to: NIL, with certainty
            results = [link_result([], []) for _ in spans]
            apply_scorer(self.network.scorer, results, options=self.scorer_options, threshold=self.settings.threshold)
        out, position = [], 0
        for doc_spans in per_doc:
            out.append(results[position : position + len(doc_spans)])
            position += len(doc_spans)
        return out

    def linkable(self, doc: Doc) -> List[Span]:
        """The doc's entities this linker links (labels_discard left out)."""
        return [ent for ent in doc.ents if ent.label_ not in self.settings.labels_discard]

    def _link(self, spans: List[Span], where: List[str]) -> List[Dict[str, Any]]:
        index = self.index_keeper.current(self.kb)
        texts = [span.text for span in spans]
        alias = self.candidate_generator(self.kb, texts) if self.settings.use_alias_candidates else [{} for _ in spans]
        mention = self.mentions.encode(spans, where=where)
        ranking = linking.two_stage(self.network.matcher, mention, index, k=self.settings.n_candidates,
                                    alias_rows=[list(a) for a in alias])
        has_image = mention["has_image"].tolist() if "has_image" in mention else [False] * len(spans)
        modalities = [["text", "image"] if image else ["text"] for image in has_image]
        results = ranking_results(ranking, self.kb, alias, texts, modalities)
        apply_scorer(self.network.scorer, results, options=self.scorer_options, threshold=self.settings.threshold)
        return results

    def set_annotations(self, docs: Iterable[Doc], predictions: List[List[Dict[str, Any]]]) -> None:
        """Write KB ids to the tokens and score/candidates/modalities to ``ent._``."""
        for doc, results in zip(docs, predictions):
            annotate(doc, self.linkable(doc), results, overwrite=self.settings.overwrite)

    # ------------------------------------------------------------------ calibration and scores
    def calibrate(self, examples: Iterable[Example], *, progress: bool = False) -> Dict[str, Any]:
        """Fit the candidate scorer and the NIL threshold on held-out
        examples (see :func:`.held_out.calibrate_linker`)."""
        return calibrate_linker(self, examples, progress=progress)

    def score(self, examples: Iterable[Example], **kwargs: Any) -> Dict[str, Any]:
        """Hits@k, MRR, nel_micro_p/r/f, calibration error and NIL
        precision/recall (see :func:`.held_out.score_linker`: calibrated
        first after training updates when ``calibrate_on_score``; the
        paper's exhaustive ranking with ``score_protocol = "exhaustive"``)."""
        return score_linker(self, examples, lambda egs: super(M3ELLinker, self).score(egs, **kwargs))

    # ------------------------------------------------------------------ serialisation
    def to_bytes(self, *, exclude: Iterable[str] = SimpleFrozenList()) -> bytes:
        """The weights, the KB (with its images) and the entity index when
        it is valid for the weights (saving never encodes); prefer
        :meth:`to_disk` for large KBs."""
        return storage.to_bytes(self, exclude)

    def from_bytes(self, bytes_data: bytes, *, exclude: Iterable[str] = SimpleFrozenList()) -> "M3ELLinker":
        """Load what :meth:`to_bytes` wrote (parts in ``exclude`` are kept)."""
        storage.from_bytes(self, bytes_data, exclude)
        return self

    def to_disk(self, path: Union[str, Path], *, exclude: Iterable[str] = SimpleFrozenList()) -> None:
        """Write ``model`` (safetensors), ``kb/``, ``index/`` (when valid for
        the weights: saving never encodes; a pipeline saved without one
        builds it at first use, or with ``build-cache``) and ``state.json``."""
        storage.to_disk(self, util.ensure_path(path), exclude)

    def from_disk(self, path: Union[str, Path], *, exclude: Iterable[str] = SimpleFrozenList()) -> "M3ELLinker":
        """Load what :meth:`to_disk` wrote (parts in ``exclude`` are kept)."""
        storage.from_disk(self, util.ensure_path(path), exclude)
        return self


def find_linker(nlp: Language) -> "M3ELLinker":
    """The pipeline's ``m3el_linker`` (whatever its name)."""
    for _, pipe in nlp.pipeline:
        if isinstance(pipe, M3ELLinker):
            return pipe
    raise ValueError(f"The pipeline {nlp.pipe_names} has no m3el_linker")
