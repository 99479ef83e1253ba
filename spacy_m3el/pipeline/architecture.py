"""The registered thinc model: an M3EL network (encoder + matcher) in a
PyTorch shim, serialised with safetensors instead of pickle."""
import contextlib
import hashlib
import os
from typing import Any, ContextManager, Dict, Iterator, List, Optional, Sequence, Union

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from thinc.api import ArgsKwargs, Model, PyTorchGradScaler, get_torch_default_device
from thinc.layers.pytorchwrapper import forward as pytorch_forward
from torch import nn

from ..data.images import ImageRef
from ..encoders import FeatureCache, MultimodalEncoder, SharedTextEncoder, TextFeatures, join_features
from ..encoders.base import PreprocessedImages, float_features, inference_autocast
from ..encoders.openvino_runtime import resolve_runtime
from ..errors import warn
from ..model import CandidateScorer, EncodedItems, M3ELConfig, M3ELMatcher
from ..model.candidate_scorer import LEGACY_KEY, OPTIONAL_STATE
from .averaging import AveragingPyTorchShim


def _single_thread_after_fork() -> None:
    # torch's intra-op thread pool does not survive fork(): nlp.pipe(n_process=N)
    # children would deadlock in their first parallel op. One thread each is
    # also what N processes on N cores want.
    torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_single_thread_after_fork)


#: Mentions per call up to which :meth:`M3ELNetwork.linking_threads` runs torch on one thread.
FEW_MENTIONS = 8


class M3ELNetwork(nn.Module):
    """A backbone, the M3EL matcher and the candidate scorer on top of it,
    with a feature cache when the backbone is frozen."""

    def __init__(
        self, encoder: MultimodalEncoder, matcher: M3ELMatcher, *, feature_cache_bytes: int = 256 * 2**20
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.matcher = matcher
        self.scorer = CandidateScorer(matcher.config.branches)
        self.feature_cache: Optional[FeatureCache] = (
            FeatureCache(encoder, shared=True, max_bytes=feature_cache_bytes) if encoder.frozen else None
        )
        #: The linker's settings (set by the linker): where ``inference_precision`` comes from.
        self.settings: Optional[Any] = None
        #: Threads of the compiled backbone towers while :meth:`linking_threads` lowers torch's.
        self._tower_threads: Optional[int] = None

    def encode(
        self, texts: Union[Sequence[str], TextFeatures],
        images: Union[Sequence[Optional[ImageRef]], PreprocessedImages], *, use_feature_cache: bool = True,
        make_room: bool = True,
    ) -> EncodedItems:
        """Model inputs for N items: texts (or text features computed
        elsewhere, e.g. by an upstream transformer) and images (references,
        decoded when needed, or preprocessed already). Through the feature
        cache of a frozen backbone unless ``use_feature_cache`` is False
        (preprocessed images never go through it); ``make_room=False`` adds
        new features to the cache only where they fit without evicting others
        (features kept elsewhere too)."""
        device = next(self.matcher.parameters()).device
        cache = self.feature_cache if use_feature_cache else None
        given_text, given_image = isinstance(texts, TextFeatures), isinstance(images, PreprocessedImages)
        with self.backbone_autocast():
            if cache is not None and not given_text and not given_image:
                text, image = cache.encode_texts_and_images(texts, images, make_room=make_room)
            else:
                text = texts if given_text else (cache.encode_texts(texts, make_room=make_room) if cache is not None
                                                 else self.encoder.encode_texts(texts))
                image = (self.encoder.encode_preprocessed(images) if given_image
                         else cache.encode_images(images, make_room=make_room) if cache is not None
                         else self.encoder.encode_images([ref.load() if ref is not None else None for ref in images]))
        items = join_features(text, image).to(device)
        return EncodedItems(**dict(zip(vars(items), float_features(*vars(items).values()))))

    @property
    def inference_precision(self) -> str:
        """Backbone precision where it only infers: the linker's setting (float32 without a linker)."""
        return self.settings.inference_precision if self.settings is not None else "float32"

    @property
    def inference_runtime(self) -> str:
        """How a frozen backbone infers on its device: the linker's setting,
        resolved ("torch" without a linker)."""
        runtime = self.settings.inference_runtime if self.settings is not None else "torch"
        return resolve_runtime(runtime, self.encoder.device)

    def backbone_autocast(self) -> ContextManager:
        """Autocast in ``inference_precision`` for the backbone where it only
        infers (frozen, or no gradient wanted), float32 where it trains; a
        frozen backbone's CPU towers run in ``inference_runtime``."""
        scope = contextlib.ExitStack()
        scope.enter_context(self.encoder.inference_runtime_scope(self.inference_runtime, threads=self._tower_threads))
        if self.encoder.frozen or not torch.is_grad_enabled():
            scope.enter_context(inference_autocast(self.inference_precision, self.encoder.device))
        return scope

    @contextlib.contextmanager
    def linking_threads(self, mentions: int) -> Iterator[None]:
        """Linking a few mentions (``nlp(doc)``) with OpenVINO towers: torch's
        own ops run on one thread. Their tensors are too small to gain from
        more, and an idle OpenMP thread spin-waits for a while after each
        parallel op, taking a core from the towers that run next
        (``benchmarks/demo_speed.py``: ``openvino_batch1`` against
        ``openvino_all_threads_batch1``). Larger calls keep every thread."""
        threads = torch.get_num_threads()
        if mentions > FEW_MENTIONS or threads == 1 or self.inference_runtime != "openvino" or not self.encoder.frozen:
            yield
            return
        self._tower_threads = threads
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            self._tower_threads = None

    def forward(
        self,
        mention_texts: Union[List[str], TextFeatures],
        mention_images: List[Optional[ImageRef]],
        entity_texts: List[str],
        entity_images: List[Optional[ImageRef]],
        labels: torch.Tensor,
        lexical: Optional[torch.Tensor] = None,
        feature_mask: Optional[torch.Tensor] = None,
        use_branches: bool = False,
        use_gate: bool = False,
        varied_mention_images: Optional[List[Optional[ImageRef]]] = None,
    ) -> Dict[str, torch.Tensor]:
        """M3EL's losses; with ``lexical`` ([B, E, F] candidate features) also
        the candidate scorer's, so M3EL learns beside the KB's features (and,
        with ``use_gate``, the picture gate learns which pictures to trust,
        from the varied copy).

        ``varied_mention_images`` (some removed, some another mention's) train
        the candidate scorer only, on scores computed without gradients: a
        mismatched picture must teach the gate to distrust it, not teach
        the image branches a wrong label."""
        mentions = self.encode(mention_texts, mention_images)
        entities = self.encode(entity_texts, entity_images)
        device = mentions.text_global.device
        labels = labels.to(device)
        losses, scores = self.matcher.loss_and_scores(mentions, entities, labels)
        if lexical is not None:
            mask = feature_mask.to(device) if feature_mask is not None else torch.ones(lexical.shape[-1], device=device)
            has_image = mentions.image_mask.to(device) if use_gate else None
            # The batch's pictures are the mentions' own, so right: the gate learns from the varied copy
            # below and does not weigh them here, so it never turns down M3EL's gradient for a right picture.
            losses["scorer"] = self.scorer.training_loss(scores, lexical.to(device), labels,
                                                         feature_mask=mask, use_branches=use_branches,
                                                         has_image=has_image, pictures_are_own=True)
            losses["loss"] = losses["loss"] + losses["scorer"]
            if use_gate and varied_mention_images is not None:
                with torch.no_grad():
                    varied = self.encode(mention_texts, varied_mention_images)
                    varied_scores = self.matcher.pair_scores(varied, entities)
                losses["scorer_varied"] = self.scorer.training_loss(
                    varied_scores, lexical.to(device), labels, feature_mask=mask, use_branches=use_branches,
                    has_image=varied.image_mask.to(device))
                losses["loss"] = losses["loss"] + losses["scorer_varied"]
        return losses

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        """Everything that must be saved: a frozen backbone is reloaded from
        its own package instead of being copied into every pipeline."""
        state = self.state_dict()
        if self.encoder.frozen:
            state = {k: v for k, v in state.items() if not k.startswith("encoder.")}
        return state

    def fingerprint(self) -> str:
        """Identifies the weights the entity index depends on (not the
        scorer's, so a calibration keeps the cache), so a stale cache is detected."""
        digest = hashlib.sha1(repr(self.encoder.describe()).encode())
        digest.update(repr(self.matcher.config.to_dict()).encode())
        borrowed = self.encoder.weights_digest()
        if borrowed is not None:
            digest.update(borrowed.encode())
        for name, tensor in sorted(self.trainable_state().items()):
            if name.startswith("scorer."):
                continue
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()


def _serialize(network: M3ELNetwork) -> bytes:
    state = {k: v.detach().contiguous().cpu() for k, v in network.trainable_state().items()}
    return save_safetensors(state)


def _deserialize(network: M3ELNetwork, data: bytes, device: torch.device) -> M3ELNetwork:
    state = load_safetensors(data)
    if f"scorer.{LEGACY_KEY}" in state:
        scorer_state = {k[len("scorer."):]: v for k, v in state.items() if k.startswith("scorer.")}
        state = {k: v for k, v in state.items() if not k.startswith("scorer.")}
        state.update({f"scorer.{k}": v for k, v in network.scorer.upgrade_legacy_state(scorer_state).items()})
        warn("These M3EL weights were saved before the candidate scorer had a text expert: its weights were "
             "carried over, but mentions whose picture it distrusts now score differently. Refit it with "
             "`python -m spacy_m3el calibrate`.")
    scorer_state = {k[len("scorer."):]: v for k, v in state.items() if k.startswith("scorer.")}
    if network.scorer.upgrade_input_sizes(scorer_state):
        state.update({f"scorer.{k}": v for k, v in scorer_state.items()})
        warn("These M3EL weights were saved before the candidate scorer mixed its experts' probabilities and its "
             "picture gate and NIL options read how well the picture and the text match their best candidates: "
             "its weights were carried over, but mentions with a picture now score differently. Refit it with "
             "`python -m spacy_m3el calibrate`.")
    missing, unexpected = network.load_state_dict(state, strict=False)
    if network.encoder.frozen:
        missing = [k for k in missing if not k.startswith("encoder.")]
    missing = [k for k in missing if k not in {f"scorer.{name}" for name in OPTIONAL_STATE}]
    if missing or unexpected:
        raise ValueError(
            "The saved M3EL weights do not fit this model's configuration: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}. Was the pipeline saved "
            "with a different backbone or different switches?"
        )
    network.to(device)
    return network


def _convert_inputs(model: Model, inputs: Dict[str, Any], is_train: bool):
    return ArgsKwargs(args=(), kwargs=inputs), lambda d_inputs: []


def _convert_outputs(model: Model, inputs_outputs, is_train: bool):
    _, losses = inputs_outputs

    def backprop(d_loss: Any) -> ArgsKwargs:
        loss = losses["loss"]
        return ArgsKwargs(args=([loss],), kwargs={"grad_tensors": [torch.ones_like(loss)]})

    return losses, backprop


_DEFAULT = M3ELConfig.defaults()


def build_m3el_model(
    encoder: MultimodalEncoder,
    hidden_dim: int = _DEFAULT["hidden_dim"],
    image_dim: int = _DEFAULT["image_dim"],
    temperature: float = _DEFAULT["temperature"],
    inter_weight: float = _DEFAULT["inter_weight"],
    intra_weight: float = _DEFAULT["intra_weight"],
    csra_temperatures: List[Union[float, str]] = _DEFAULT["csra_temperatures"],
    csra_lambda: float = _DEFAULT["csra_lambda"],
    use_contrastive: bool = _DEFAULT["use_contrastive"],
    use_g2g: bool = _DEFAULT["use_g2g"],
    use_g2l: bool = _DEFAULT["use_g2l"],
    use_text: bool = _DEFAULT["use_text"],
    use_image: bool = _DEFAULT["use_image"],
    use_t2v: bool = _DEFAULT["use_t2v"],
    use_v2t: bool = _DEFAULT["use_v2t"],
    cross_modal: str = _DEFAULT["cross_modal"],
    mixed_precision: bool = False,
    grad_scaler_config: Optional[Dict[str, Any]] = None,
    feature_cache_mb: int = 256,
) -> Model:
    """Registered as ``spacy-m3el.M3EL.v1`` (spacy_architectures): the
    backbone and the matcher in a PyTorch shim. Every matcher option is a
    field of :class:`M3ELConfig`, whose defaults these are.
    ``feature_cache_mb`` bounds each store (texts, images) of a frozen
    backbone's feature cache."""
    options = dict(locals())
    for name in ("encoder", "mixed_precision", "grad_scaler_config", "feature_cache_mb"):
        del options[name]
    options["csra_temperatures"] = tuple(float(t) for t in csra_temperatures)
    config = M3ELConfig(
        text_dim=encoder.text_dim,
        image_global_dim=encoder.image_global_dim,
        image_token_dim=encoder.image_token_dim,
        **options,
    )
    network = M3ELNetwork(encoder, M3ELMatcher(config), feature_cache_bytes=feature_cache_mb * 2**20)
    network.to(get_torch_default_device())
    scaler = PyTorchGradScaler(**(grad_scaler_config or {"enabled": False}))
    # What thinc's PyTorchWrapper_v3 builds, with a shim whose averages work.
    shim = AveragingPyTorchShim(network, mixed_precision=mixed_precision, grad_scaler=scaler,
                                serialize_model=_serialize, deserialize_model=_deserialize)
    model = Model("pytorch", pytorch_forward, attrs={"convert_inputs": _convert_inputs,
                                                     "convert_outputs": _convert_outputs},
                  shims=[shim], dims={"nI": None, "nO": None})
    model.attrs["m3el_config"] = config.to_dict()
    if isinstance(encoder, SharedTextEncoder):
        from .shared_transformer import new_listener

        # In the model's tree so that the upstream component finds it (spaCy
        # links listeners by walking each downstream component's model).
        model.layers.append(new_listener(encoder.upstream))
    return model


def get_network(model: Model) -> M3ELNetwork:
    """The torch module inside a ``spacy-m3el.M3EL.v1`` model."""
    return model.shims[0]._model
