"""The m3el_linker's settings: one place for their defaults, checks and meaning.

The factory's ``default_config`` is generated from :class:`LinkerSettings`,
and the README's option table is checked against ``describe()``.
"""
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Dict, List, Optional

from ..data.pictures import CONDITIONS
from ..encoders.base import PRECISIONS
from ..encoders.openvino_runtime import RUNTIMES

ON_BAD_IMAGE = ("raise", "warn")
SCORE_PROTOCOLS = ("two-stage", "exhaustive")


def _option(default: Any, meaning: str, **kwargs: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"meaning": meaning}, **kwargs)
    return field(default=default, metadata={"meaning": meaning}, **kwargs)


def _check_picture_shares(shares: Any) -> None:
    if not isinstance(shares, dict) or not shares:
        raise ValueError(f"calibration_pictures must map picture conditions {CONDITIONS} to shares, got {shares!r}")
    unknown = sorted(set(shares) - set(CONDITIONS))
    if unknown:
        raise ValueError(f"calibration_pictures: unknown picture condition(s) {unknown}; use {CONDITIONS}")
    for condition, share in shares.items():
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not share >= 0:
            raise ValueError(f"calibration_pictures[{condition!r}] must be a number >= 0, got {share!r}")
    if not sum(shares.values()) > 0:
        raise ValueError("calibration_pictures: the shares must not all be 0")


@dataclass(frozen=True)
class LinkerSettings:
    """Every ``m3el_linker`` option except the model, the KB factory, the
    candidate generator and the scorer. Frozen: a running linker changes
    them through ``M3ELLinker.configure``, which checks them first."""

    n_candidates: int = _option(64, "Dense candidates per mention: top-K entities by the decomposable "
                                    "M3EL score (0 = alias table only).")
    use_alias_candidates: bool = _option(True, "Add the KB alias table's entities for the mention text "
                                               "to the candidates.")
    threshold: Optional[float] = _option(None, "Link to NIL when the best candidate's probability is below "
                                               "this, in [0, 1] (null: the threshold the calibration chose on "
                                               "dev data, where it beat the NIL option alone beyond chance, else "
                                               "0). NIL is also chosen when its own probability is the highest.")
    incl_prior: bool = _option(True, "Candidate scorer: use the alias table's prior and whether the "
                                     "candidate came from the alias table.")
    incl_name_match: bool = _option(True, "Candidate scorer: use whether the mention text is the "
                                          "candidate's name (exactly, or after normalisation).")
    reweight_branches: bool = _option(True, "Candidate scorer: learn a weight per M3EL branch score on "
                                            "top of their mean (with incl_prior, incl_name_match and picture_gate "
                                            "also off: the paper's M3EL score alone, still calibrated).")
    picture_gate: bool = _option(True, "Candidate scorer: mix the probabilities of a picture expert (every "
                                       "branch; fitted on mentions with their own picture) and a text expert (the "
                                       "branches that do not read the mention's picture: not image, T2V, V2T; "
                                       "fitted on mentions without one) per mention by a learned gate, the "
                                       "probability that the picture is the mention's own, from how well picture "
                                       "and text agree over the candidates and how well each matches its best "
                                       "one; a mention without a picture is scored by the text expert alone "
                                       "(off: the picture expert alone, on the branches' mean).")
    picture_dropout: float = _option(0.2, "Training: share of mentions whose picture is removed in the batch "
                                          "copy the candidate scorer trains on (M3EL's own losses see the "
                                          "pictures as given), for mentions without a picture.")
    picture_mismatch: float = _option(0.2, "Training: share of mentions given another batch mention's picture "
                                           "(of another entity) in that copy, so the gate learns when not to "
                                           "trust a picture.")
    calibrate_on_score: bool = _option(True, "After training updates, the next score() first fits the "
                                             "temperature, feature weights, picture gate, NIL option and NIL "
                                             "threshold on its examples (the dev set during spacy train) with "
                                             "their pictures, without and shuffled, and reports out-of-fold figures.")
    calibration_pictures: Dict[str, float] = _option(
        {"given": 0.6, "none": 0.2, "shuffled": 0.2},
        "Calibration: the share of mentions expected with their own picture (given), without one (none) and with "
        "a picture that shows something else (shuffled); the NIL threshold and the confidence map (without "
        "picture_gate, the whole fit) weigh the held-out mentions under each condition by it (the defaults "
        "match picture_dropout and picture_mismatch). A linker without an image "
        "branch fits on the given pictures alone; a condition set to 0 is left out.")
    labels_discard: List[str] = _option([], "Entity labels the linker leaves alone.")
    use_gold_ents: bool = _option(True, "Train on the gold entity spans even where the predicted doc "
                                        "has no such entity.")
    hard_negatives: int = _option(16, "Extra in-batch candidates per training batch: alias-table "
                                      "confusables first, then random entities (0: the paper's in-batch "
                                      "golds only).")
    on_bad_image: str = _option("raise", "What an unreadable mention or KB image does: \"raise\" an "
                                         "ImageLoadError, or \"warn\" and link without that image.")
    allow_image_urls: bool = _option(False, "Fetch http(s) image URLs (off: nothing is downloaded and a URL "
                                            "is a bad image).")
    context_chars: int = _option(300, "Characters of context around the mention when the doc has no "
                                      "sentence boundaries.")
    entity_batch_size: int = _option(64, "Entities encoded per batch when the entity index is built.")
    max_cached_queries: Optional[int] = _option(None, "null: the entity index keeps every G2L query (the "
                                                      "exact score). A number pools each entity's queries per "
                                                      "modality to that many k-means centroids (about 6 KB "
                                                      "instead of 19 KB per entity at 12), and building the "
                                                      "cache measures the top-1 agreement with the exact score.")
    inference_precision: str = _option("auto", "Precision of a frozen backbone where it only infers (mentions, "
                                               "entity index): \"auto\" (bfloat16 on CPUs and GPUs that run it "
                                               "natively, float16 on other GPUs, else float32), \"float32\", "
                                               "\"bfloat16\" or \"float16\".")
    inference_runtime: str = _option("auto", "How a frozen backbone infers on CPU: \"openvino\" (its towers "
                                             "compiled by OpenVINO at first use, in inference_precision: each "
                                             "tower about 2x faster on CPU), \"torch\", or \"auto\" (OpenVINO "
                                             "where the package is installed). GPUs and a backbone that trains "
                                             "always run in PyTorch.")
    image_workers: int = _option(1, "Worker processes that decode and resize KB images while a streamed "
                                    "entity index is built (0: in the main process).")
    build_processes: int = _option(1, "Processes that encode a streamed entity index build, each with one "
                                      "torch thread and its own image decoding (1: this process, with "
                                      "image_workers decoders and all torch threads). On CPU, one per core "
                                      "is the fastest.")
    ann_index: Optional[str] = _option(None, "null: exact top-K search (the fp16 retrieval matrix scanned in "
                                             "chunks). \"auto\" or a faiss index_factory string (e.g. "
                                             "\"IVF1024,SQ8\"): approximate search in an index built with "
                                             "the entity index and saved beside it, its shortlist rescored "
                                             "exactly; its recall@K is measured when built (needs "
                                             "spacy-m3el[ann]). \"auto\" keeps exact search below 50,000 "
                                             "entities, where it is both exact and fast.")
    ann_nprobe: Optional[int] = _option(None, "ANN index: inverted lists visited per mention (more: slower, "
                                              "higher recall). null: chosen when the index is built, twice the "
                                              "fewest lists whose recall@K on KB entities standing in for "
                                              "mentions reaches ann_target_recall, and saved with it.")
    ann_target_recall: float = _option(0.99, "ANN index: the recall@K against exact search that the chosen "
                                             "ann_nprobe must reach on the stand-ins.")
    ann_shortlist: int = _option(256, "ANN index: candidates per mention rescored exactly before the top-K "
                                      "is kept.")
    overwrite: bool = _option(True, "Replace KB ids that the spans already have.")
    score_protocol: str = _option("two-stage", "How scoring (and so dev-set model selection) ranks: "
                                               "\"two-stage\" (the linker's candidates) or \"exhaustive\" "
                                               "(every KB entity by the exact score, as in the paper).")

    def __post_init__(self) -> None:
        if self.on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {self.on_bad_image!r}")
        if self.score_protocol not in SCORE_PROTOCOLS:
            raise ValueError(f"score_protocol must be one of {SCORE_PROTOCOLS}, got {self.score_protocol!r}")
        if self.n_candidates < 0:
            raise ValueError(f"n_candidates must be >= 0 (0 = alias table only), got {self.n_candidates}")
        if self.n_candidates == 0 and not self.use_alias_candidates:
            raise ValueError("m3el_linker has no candidate source: set n_candidates > 0 or use_alias_candidates")
        if self.max_cached_queries is not None and self.max_cached_queries < 1:
            raise ValueError(
                f"max_cached_queries must be >= 1 or null (keep every query), got {self.max_cached_queries}"
            )
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(
                f"threshold is a probability: it must be in [0, 1] or null, got {self.threshold}"
            )
        for name in ("picture_dropout", "picture_mismatch"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a share of the training mentions: it must be in [0, 1], "
                                 f"got {getattr(self, name)}")
        if self.picture_dropout + self.picture_mismatch > 1.0:
            raise ValueError("picture_dropout + picture_mismatch must be at most 1 (shares of the same mentions), "
                             f"got {self.picture_dropout} + {self.picture_mismatch}")
        _check_picture_shares(self.calibration_pictures)
        object.__setattr__(self, "calibration_pictures", {key: float(value) for key, value in
                                                          self.calibration_pictures.items()})
        for name in ("hard_negatives", "context_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.inference_precision not in PRECISIONS:
            raise ValueError(f"inference_precision must be one of {PRECISIONS}, got {self.inference_precision!r}")
        if self.inference_runtime not in RUNTIMES:
            raise ValueError(f"inference_runtime must be one of {RUNTIMES}, got {self.inference_runtime!r}")
        for name, least in (("image_workers", 0), ("build_processes", 1), ("ann_shortlist", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")
        if self.ann_nprobe is not None and self.ann_nprobe < 1:
            raise ValueError(f"ann_nprobe must be >= 1 or null (chosen when the index is built), got {self.ann_nprobe}")
        if not 0.0 < self.ann_target_recall <= 1.0:
            raise ValueError(f"ann_target_recall must be in (0, 1], got {self.ann_target_recall}")
        if self.ann_index is not None and not self.ann_index.strip():
            raise ValueError("ann_index must be null (exact search), \"auto\" or a faiss index_factory string")
        if self.entity_batch_size < 1:
            raise ValueError(f"entity_batch_size must be >= 1, got {self.entity_batch_size}")
        object.__setattr__(self, "labels_discard", list(self.labels_discard))

    def calibration_mix(self) -> Dict[str, float]:
        """The picture conditions calibration links the held-out mentions
        under, "given" first, each with its share (the shares sum to 1)."""
        total = sum(self.calibration_pictures.values())
        mix = {"given": self.calibration_pictures.get("given", 0.0) / total}
        mix.update({c: v / total for c, v in self.calibration_pictures.items() if c != "given" and v > 0})
        return mix

    def update(self, **changes: Any) -> Dict[str, Any]:
        """Apply ``changes`` in place (every holder of these settings sees
        them) once the changed settings pass every check; returns the old
        values. Unknown names and invalid values leave them as they were."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise ValueError(f"Unknown m3el_linker setting(s) {unknown}; the settings are {self.names()}")
        checked = replace(self, **changes)  # runs every check on the whole
        old = {name: getattr(self, name) for name in changes}
        for name in changes:
            object.__setattr__(self, name, getattr(checked, name))
        return old

    @classmethod
    def names(cls) -> List[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def describe(cls) -> List[Dict[str, Any]]:
        """name, default and meaning of every option (for docs)."""
        defaults = asdict(cls())
        return [{"name": f.name, "default": defaults[f.name], "meaning": f.metadata["meaning"]} for f in fields(cls)]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)
