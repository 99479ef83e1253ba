"""The ``m3el_linker`` pipeline component."""
import os
import random
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy
import srsly
import torch
from spacy.language import Language
from spacy.pipeline import TrainablePipe
from spacy.tokens import Doc, Span
from spacy.training import Example, validate_examples, validate_get_examples
from spacy.util import SimpleFrozenList, ensure_path
from spacy.vocab import Vocab
from thinc.api import Config, Model, Optimizer

from .architectures import M3ELNetwork, get_network
from .entity_cache import EntityCache, build_cache_arrays, cache_settings
from .extensions import image_ref, register_extensions
from .images import ImageLoadError, ImageRef, load_image
from .kb import NIL, KBError, MultimodalKB, create_empty_kb
from .scoring import score_linking

DEFAULT_CONFIG = """
[model]
@architectures = "spacy-m3el.M3EL.v1"

[model.encoder]
@misc = "spacy-m3el.MiniLMEfficientNetEncoder.v1"
max_text_length = 40
frozen = true
"""

DEFAULT_MODEL = Config().from_str(DEFAULT_CONFIG)["model"]
BRANCH_NAMES = ("text", "image", "t2v", "v2t")


def _nil_result() -> Dict[str, Any]:
    return {"id": NIL, "score": None, "candidates": []}


def _single_thread_after_fork() -> None:
    # torch's intra-op thread pool does not survive fork(): nlp.pipe(n_process=N)
    # children would deadlock in their first parallel op. One thread each is
    # also what N processes on N cores want.
    torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_single_thread_after_fork)


@Language.factory(
    "m3el_linker",
    requires=["doc.ents", "token.ent_iob", "token.ent_type"],
    assigns=["token.ent_kb_id"],
    default_config={
        "model": DEFAULT_MODEL,
        "n_candidates": 64,
        "use_alias_candidates": True,
        "threshold": None,
        "labels_discard": [],
        "use_gold_ents": True,
        "hard_negatives": 0,
        "on_bad_image": "raise",
        "allow_image_urls": False,
        "context_chars": 300,
        "entity_batch_size": 64,
        "max_cached_queries": 12,
        "generate_empty_kb": {"@misc": "spacy-m3el.EmptyMultimodalKB.v1"},
        "overwrite": True,
        "scorer": {"@scorers": "spacy-m3el.linking_scorer.v1"},
    },
    default_score_weights={
        "m3el_mrr": 1.0,
        "m3el_hits1": 0.0,
        "nel_micro_f": 0.0,
        "nel_micro_p": None,
        "nel_micro_r": None,
        "m3el_hits3": None,
        "m3el_hits5": None,
        "m3el_hits10": None,
        "m3el_hits20": None,
        "m3el_n_mentions": None,
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
    labels_discard: Iterable[str],
    use_gold_ents: bool,
    hard_negatives: int,
    on_bad_image: str,
    allow_image_urls: bool,
    context_chars: int,
    entity_batch_size: int,
    max_cached_queries: Optional[int],
    generate_empty_kb: Callable[[Vocab, int], MultimodalKB],
    overwrite: bool,
    scorer: Optional[Callable],
) -> "M3ELLinker":
    return M3ELLinker(
        nlp.vocab,
        model,
        name,
        n_candidates=n_candidates,
        use_alias_candidates=use_alias_candidates,
        threshold=threshold,
        labels_discard=labels_discard,
        use_gold_ents=use_gold_ents,
        hard_negatives=hard_negatives,
        on_bad_image=on_bad_image,
        allow_image_urls=allow_image_urls,
        context_chars=context_chars,
        entity_batch_size=entity_batch_size,
        max_cached_queries=max_cached_queries,
        generate_empty_kb=generate_empty_kb,
        overwrite=overwrite,
        scorer=scorer,
    )


def mention_context(span: Span, context_chars: int) -> str:
    """The sentence of the mention when the doc has sentences, else a window
    of about ``context_chars`` characters around it."""
    doc = span.doc
    if doc.has_annotation("SENT_START"):
        return span.sent.text
    if len(doc.text) <= context_chars:
        return doc.text
    half = context_chars // 2
    start = max(0, span.start_char - half)
    return doc.text[start : start + context_chars]


class M3ELLinker(TrainablePipe):
    """Links entity spans to a :class:`MultimodalKB` with M3EL (DESIGN 3):
    candidates = alias table + dense top-K, then the full M3EL rerank.

    ``max_cached_queries`` pools each entity's G2L queries to at most that
    many weighted centroids per modality in the entity cache (about 6 KB
    instead of about 19 KB per entity with the default backbone); ``None``
    caches every query and makes the rerank score exactly the training score.
    """

    def __init__(
        self,
        vocab: Vocab,
        model: Model,
        name: str = "m3el_linker",
        *,
        n_candidates: int = 64,
        use_alias_candidates: bool = True,
        threshold: Optional[float] = None,
        labels_discard: Iterable[str] = (),
        use_gold_ents: bool = True,
        hard_negatives: int = 0,
        on_bad_image: str = "raise",
        allow_image_urls: bool = False,
        context_chars: int = 300,
        entity_batch_size: int = 64,
        max_cached_queries: Optional[int] = 12,
        generate_empty_kb: Callable[[Vocab, int], MultimodalKB] = create_empty_kb(),
        overwrite: bool = True,
        scorer: Optional[Callable] = score_linking,
    ) -> None:
        register_extensions()
        if on_bad_image not in ("raise", "warn"):
            raise ValueError(f"on_bad_image must be 'raise' or 'warn', got {on_bad_image!r}")
        if n_candidates < 0:
            raise ValueError(f"n_candidates must be >= 0 (0 = alias table only), got {n_candidates}")
        if n_candidates == 0 and not use_alias_candidates:
            raise ValueError("m3el_linker has no candidate source: set n_candidates > 0 or use_alias_candidates")
        if max_cached_queries is not None and max_cached_queries < 1:
            raise ValueError(f"max_cached_queries must be >= 1 or null (keep every query), got {max_cached_queries}")
        self.vocab = vocab
        self.model = model
        self.name = name
        self.n_candidates = n_candidates
        self.use_alias_candidates = use_alias_candidates
        self.threshold = threshold
        self.labels_discard = list(labels_discard)
        self.use_gold_ents = use_gold_ents
        self.hard_negatives = hard_negatives
        self.on_bad_image = on_bad_image
        self.allow_image_urls = allow_image_urls
        self.context_chars = context_chars
        self.entity_batch_size = entity_batch_size
        self.max_cached_queries = max_cached_queries
        self.generate_empty_kb = generate_empty_kb
        self.overwrite = overwrite
        self.scorer = scorer
        self.kb: MultimodalKB = generate_empty_kb(vocab, 0)
        self.bad_images = 0
        self._cache: Optional[EntityCache] = None
        self.cfg: Dict[str, Any] = {"overwrite": overwrite}

    # ------------------------------------------------------------------ setup
    @property
    def network(self) -> M3ELNetwork:
        return get_network(self.model)

    def set_kb(self, kb_loader: Callable[[Vocab], MultimodalKB]) -> None:
        if not callable(kb_loader):
            raise ValueError(f"kb_loader must be a callable returning a MultimodalKB, got {kb_loader!r}")
        kb = kb_loader(self.vocab)
        if not isinstance(kb, MultimodalKB):
            raise TypeError(
                f"m3el_linker needs a MultimodalKB (entities with descriptions and images), got "
                f"{type(kb).__name__}. Build one with spacy_m3el.MultimodalKB."
            )
        self.kb = kb
        self._invalidate_cache()

    def initialize(
        self,
        get_examples: Callable[[], Iterable[Example]],
        *,
        nlp: Optional[Language] = None,
        kb_loader: Optional[Callable[[Vocab], MultimodalKB]] = None,
    ) -> None:
        validate_get_examples(get_examples, "M3ELLinker.initialize")
        if kb_loader is not None:
            self.set_kb(kb_loader)
        if len(self.kb) == 0:
            raise ValueError(
                "m3el_linker has an empty KB: pass a kb_loader to initialize() "
                "([initialize.components.m3el_linker.kb_loader] in a config) or call set_kb() first."
            )
        self.model.initialize()

    # ------------------------------------------------------------------ mentions
    def _bad_image(self, err: Exception) -> None:
        if self.on_bad_image == "raise":
            raise err
        self.bad_images += 1
        warnings.warn(f"{err} - linking this mention with text only", stacklevel=3)
        return None

    def _mention_inputs(self, spans: Sequence[Span]) -> Tuple[List[str], List[Optional[ImageRef]]]:
        encoder = self.network.encoder
        texts = [encoder.text_for_mention(s.text, mention_context(s, self.context_chars)) for s in spans]
        refs = [image_ref(s, allow_urls=self.allow_image_urls, on_error=self._bad_image) for s in spans]
        return texts, refs

    def _entity_inputs(self, rows: Sequence[int], *, training: bool) -> Tuple[List[str], List[Optional[ImageRef]]]:
        encoder = self.network.encoder
        texts = [encoder.text_for_entity(self.kb.name(r), self.kb.description(r)) for r in rows]
        refs: List[Optional[ImageRef]] = []
        for row in rows:
            images = self.kb.images(row)
            if not images:
                refs.append(None)
                continue
            path = random.choice(images) if training else images[0]
            refs.append(ImageRef(f"kb:{path}", lambda p=path: self._load_kb_image(p)))
        return texts, refs

    def _load_kb_image(self, path: str):
        try:
            return load_image(path)
        except ImageLoadError as err:
            return self._bad_image(ImageLoadError(path, f"{err.reason} (KB entity image)"))

    def _linkable(self, doc: Doc) -> List[Span]:
        return [ent for ent in doc.ents if ent.label_ not in self.labels_discard]

    # ------------------------------------------------------------------ training
    def update(
        self,
        examples: Iterable[Example],
        *,
        drop: float = 0.0,
        sgd: Optional[Optimizer] = None,
        losses: Optional[Dict[str, float]] = None,
    ) -> Dict[str, float]:
        if losses is None:
            losses = {}
        losses.setdefault(self.name, 0.0)
        examples = list(examples)
        validate_examples(examples, "M3ELLinker.update")
        if len(self.kb) == 0:
            raise ValueError("m3el_linker cannot train without a KB: call initialize() with a kb_loader")
        spans, gold_rows, unknown = [], [], {}
        for eg in examples:
            for gold in eg.reference.ents:
                if gold.label_ in self.labels_discard or not gold.kb_id_ or gold.kb_id_ == NIL:
                    continue
                if gold.kb_id_ not in self.kb:
                    unknown[gold.kb_id_] = unknown.get(gold.kb_id_, 0) + 1
                    continue
                span = eg.predicted.char_span(gold.start_char, gold.end_char, label=gold.label_)
                if span is None or not self.use_gold_ents and span not in eg.predicted.ents:
                    continue
                if gold._.image is not None and span._.image is None:
                    span._.image = gold._.image
                if eg.predicted._.image is None and eg.reference._.image is not None:
                    eg.predicted._.image = eg.reference._.image
                spans.append(span)
                gold_rows.append(self.kb.row(gold.kb_id_))
        if unknown:
            warnings.warn(
                f"m3el_linker: skipped {sum(unknown.values())} gold mention(s) whose entity is "
                f"not in the KB ({len(unknown)} ids, e.g. {sorted(unknown)[:3]})",
                stacklevel=2,
            )
        entity_rows = list(dict.fromkeys(gold_rows))
        if self.hard_negatives > 0:
            entity_rows = self._add_negatives(spans, entity_rows)
        if len(spans) == 0 or len(entity_rows) < 2:
            return losses  # nothing to contrast in this batch
        position = {row: i for i, row in enumerate(entity_rows)}
        labels = torch.tensor([position[r] for r in gold_rows])
        mention_texts, mention_refs = self._mention_inputs(spans)
        entity_texts, entity_refs = self._entity_inputs(entity_rows, training=True)
        inputs = {
            "mention_texts": mention_texts,
            "mention_images": mention_refs,
            "entity_texts": entity_texts,
            "entity_images": entity_refs,
            "labels": labels,
        }
        parts, backprop = self.model.begin_update(inputs)
        loss = float(parts["loss"].detach())
        if not numpy.isfinite(loss):
            detail = {k: float(v.detach()) for k, v in parts.items()}
            raise ValueError(
                f"m3el_linker: the training loss is not finite ({detail}). Lower the learning "
                "rate, check the inputs for NaN, or enable grad scaling with mixed precision."
            )
        backprop(None)
        if sgd is not None:
            self.finish_update(sgd)
        self._invalidate_cache()
        self.kb.clear_entity_cache()  # built by the old weights
        losses[self.name] += loss
        return losses

    def _add_negatives(self, spans: List[Span], entity_rows: List[int]) -> List[int]:
        """Extra in-batch candidates: alias-table confusables first, then random entities."""
        rows = list(entity_rows)
        seen = set(rows)
        wanted = len(rows) + self.hard_negatives
        for span in spans:
            for row, _ in self.kb.alias_rows(span.text):
                if len(rows) >= wanted:
                    break
                if row not in seen:
                    rows.append(row)
                    seen.add(row)
        attempts = 0
        while len(rows) < min(wanted, len(self.kb)) and attempts < 10 * self.hard_negatives:
            row = random.randrange(len(self.kb))
            attempts += 1
            if row not in seen:
                rows.append(row)
                seen.add(row)
        return rows

    def get_loss(self, examples, scores):  # pragma: no cover - the loss lives in the model
        raise NotImplementedError("M3ELLinker computes its loss inside update()")

    # ------------------------------------------------------------------ entity cache
    def _invalidate_cache(self) -> None:
        self._cache = None

    @property
    def entity_cache(self) -> EntityCache:
        """The KB's entity cache for the current weights (built on first use)."""
        self._ensure_cache()
        if self._cache is None:
            raise ValueError("m3el_linker has an empty KB: there is no entity cache")
        return self._cache

    @torch.no_grad()
    def build_entity_cache(self, *, progress: bool = False) -> None:
        """Encode every KB entity once and store the mention-independent part
        of M3EL in the KB (saved with the pipeline; fp16, memory-mapped)."""
        network = self.network
        network.eval()
        rows = list(range(len(self.kb)))
        batches = [rows[i : i + self.entity_batch_size] for i in range(0, len(rows), self.entity_batch_size)]
        if progress or len(rows) > 5000:
            from tqdm import tqdm

            batches = tqdm(batches, desc="Encoding KB entities", unit="batch")

        def sides():
            for batch in batches:
                yield network.matcher.entity_side(network.encode(*self._entity_inputs(batch, training=False)))

        arrays, meta = build_cache_arrays(network.matcher, sides(), max_queries=self.max_cached_queries)
        self.kb.set_entity_cache(arrays, {**meta, "fingerprint": network.fingerprint()})
        self._load_cache()

    def _load_cache(self) -> None:
        device = next(self.network.matcher.parameters()).device
        self._cache = EntityCache(self.kb.entity_cache, self.kb.cache_meta, device=device)

    def _cache_settings_match(self) -> bool:
        meta = self.kb.cache_meta
        return all(meta.get(key) == value for key, value in cache_settings(self.max_cached_queries).items())

    def _cache_is_current(self) -> bool:
        # Settings first: the fingerprint hashes every trainable weight.
        return (
            bool(self.kb.entity_cache)
            and self._cache_settings_match()
            and self.kb.cache_meta.get("fingerprint") == self.network.fingerprint()
        )

    def _ensure_cache(self) -> None:
        if self._cache is not None or len(self.kb) == 0:
            return
        if self._cache_is_current():
            self._load_cache()
        else:
            self.build_entity_cache()

    # ------------------------------------------------------------------ prediction
    def predict(self, docs: Iterable[Doc]) -> List[List[Dict[str, Any]]]:
        per_doc = [self._linkable(doc) for doc in docs]
        spans = [span for doc_spans in per_doc for span in doc_spans]
        if spans and len(self.kb):
            self._ensure_cache()
            results = self._link(spans)
        else:
            results = [_nil_result() for _ in spans]
        out, position = [], 0
        for doc_spans in per_doc:
            out.append(results[position : position + len(doc_spans)])
            position += len(doc_spans)
        return out

    @torch.no_grad()
    def _link(self, spans: List[Span]) -> List[Dict[str, Any]]:
        network = self.network
        network.eval()
        matcher = network.matcher
        texts, refs = self._mention_inputs(spans)
        mention_side = matcher.mention_side(network.encode(texts, refs))
        query = matcher.mention_retrieval_vectors(mention_side)
        cache = self._cache
        k = min(self.n_candidates, len(self.kb))
        if k > 0:
            dense = cache.retrieve(query, k).tolist()
        else:
            dense = [[] for _ in spans]
        priors: List[Dict[int, float]] = []
        candidate_rows: List[List[int]] = []
        for span, top in zip(spans, dense):
            alias = dict(self.kb.alias_rows(span.text)) if self.use_alias_candidates else {}
            priors.append(alias)
            candidate_rows.append(list(dict.fromkeys(list(alias) + top)))
        width = max(len(rows) for rows in candidate_rows)
        if width == 0:
            return [_nil_result() for _ in spans]
        index = torch.tensor([rows + [0] * (width - len(rows)) for rows in candidate_rows])
        scores = matcher.candidate_scores(mention_side, cache.gather(index.to(query.device)))
        results = []
        for i, rows in enumerate(candidate_rows):
            if not rows:
                results.append(_nil_result())
                continue
            final = scores["score"][i, : len(rows)]
            order = torch.argsort(final, descending=True).tolist()
            candidates = []
            for j in order:
                candidates.append(
                    {
                        "id": self.kb.entity_id(rows[j]),
                        "score": float(final[j]),
                        "prior": priors[i].get(rows[j], 0.0),
                        "branches": {b: float(scores[b][i, j]) for b in BRANCH_NAMES if b in scores},
                    }
                )
            best = candidates[0]
            linked = best["id"] if self.threshold is None or best["score"] >= self.threshold else NIL
            results.append({"id": linked, "score": best["score"], "candidates": candidates})
        return results

    def set_annotations(self, docs: Iterable[Doc], predictions: List[List[Dict[str, Any]]]) -> None:
        for doc, doc_results in zip(docs, predictions):
            spans = self._linkable(doc)
            for span, result in zip(spans, doc_results):
                if not self.overwrite and span.kb_id_:
                    continue
                for token in span:
                    token.ent_kb_id_ = result["id"]
            by_offset = {(e.start_char, e.end_char): e for e in doc.ents}
            for span, result in zip(spans, doc_results):
                ent = by_offset[(span.start_char, span.end_char)]
                ent._.m3el_score = result["score"]
                ent._.m3el_candidates = result["candidates"]

    # ------------------------------------------------------------------ scoring
    def score(self, examples: Iterable[Example], **kwargs: Any) -> Dict[str, Any]:
        validate_examples(examples, "M3ELLinker.score")
        return super().score(examples, **kwargs)  # the configured scorer

    # ------------------------------------------------------------------ serialisation
    def to_bytes(self, *, exclude=tuple()):
        self._ensure_cache()
        return srsly.msgpack_dumps(
            {"cfg": srsly.json_dumps(self.cfg), "kb": self.kb.to_bytes(), "model": self.model.to_bytes()}
        )

    def from_bytes(self, bytes_data, *, exclude=tuple()):
        data = srsly.msgpack_loads(bytes_data)
        self.cfg.update(srsly.json_loads(data["cfg"]))
        self.model.from_bytes(data["model"])
        kb = self.generate_empty_kb(self.vocab, 0)
        kb.from_bytes(data["kb"])
        self._set_loaded_kb(kb)
        return self

    def to_disk(self, path: Union[str, Path], *, exclude: Iterable[str] = SimpleFrozenList()) -> None:
        self._ensure_cache()
        path = ensure_path(path)
        path.mkdir(parents=True, exist_ok=True)
        srsly.write_json(path / "cfg", self.cfg)
        self.kb.to_disk(path / "kb")
        (path / "model").write_bytes(self.model.to_bytes())

    def from_disk(self, path: Union[str, Path], *, exclude: Iterable[str] = SimpleFrozenList()) -> "M3ELLinker":
        path = ensure_path(path)
        if (path / "cfg").exists():
            self.cfg.update(srsly.read_json(path / "cfg"))
        model_file = path / "model"
        if not model_file.is_file():
            raise ValueError(f"{path}: the m3el_linker weights file 'model' is missing")
        self.model.from_bytes(model_file.read_bytes())
        kb = self.generate_empty_kb(self.vocab, 0)
        kb.from_disk(path / "kb")
        self._set_loaded_kb(kb)
        return self

    def _set_loaded_kb(self, kb: MultimodalKB) -> None:
        if not isinstance(kb, MultimodalKB):
            raise TypeError(f"generate_empty_kb gave {type(kb).__name__}, not a MultimodalKB")
        self.kb = kb
        self._invalidate_cache()
        if kb.entity_cache:
            if kb.cache_meta.get("fingerprint") != self.network.fingerprint():
                raise KBError(
                    "The entity cache saved with this pipeline was built by a different model "
                    "(fingerprint mismatch). Delete the 'cache' folder of the KB to rebuild it."
                )
            if self._cache_settings_match():
                self._load_cache()
            else:
                # Same weights, other cache settings (max_cached_queries, or an
                # older format): rebuilt from the KB at first use.
                saved = {key: kb.cache_meta.get(key) for key in cache_settings(None)}
                warnings.warn(
                    f"m3el_linker: the saved entity cache was built with other settings ({saved}, "
                    f"now {cache_settings(self.max_cached_queries)}); it will be rebuilt at first use",
                    stacklevel=2,
                )
