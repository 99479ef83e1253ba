"""The MIMIC data format of WikiMEL, RichpediaMEL and WikiDiverse.

A dataset directory holds::

    <PREFIX>_train.json, <PREFIX>_dev.json, <PREFIX>_test.json
        lists of {id, sentence, mentions, entities, answer, imgPath}
    kb_entity.json   list of {id, entity_name, desc, image_list, type}
    qid2id.json      {qid: row}            (optional here)
    mention_image/   mention images        kb_image/   entity images

``answer == "nil"`` means no gold entity: kept, linked to NIL. Mention and
entity names may be URL-quoted, as in the original releases.
"""
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Tuple, Union
from urllib.parse import unquote

from spacy.language import Language
from spacy.tokens import Doc
from spacy.training import Example
from spacy.vocab import Vocab

from .aliases import AliasPriors
from .errors import MIMICFormatError, warn
from .extensions import register_extensions
from .fileio import read_json
from .kb import NIL, MultimodalKB
from .readers import example_with_images

SPLITS = ("train", "dev", "test")
MENTION_IMAGES = "mention_image"
KB_IMAGES = "kb_image"


@dataclass
class ConversionReport:
    """What a conversion kept, and what it could not use (never silently)."""

    mentions: int = 0
    nil: int = 0
    unlocated: List[str] = field(default_factory=list)
    missing_mention_images: List[str] = field(default_factory=list)
    unknown_answers: List[str] = field(default_factory=list)

    def warn(self, where: str) -> None:
        for name, items, what in (
            ("unlocated", self.unlocated, "mention(s) not found in their sentence (skipped)"),
            ("unknown_answers", self.unknown_answers, "answer(s) not in kb_entity.json (kept as NIL)"),
            ("missing_mention_images", self.missing_mention_images, "mention image(s) missing (linked text-only)"),
        ):
            if items:
                warn(f"{where}: {len(items)} {what}, e.g. ids {items[:5]}", stacklevel=3)


_read_json = partial(read_json, error=MIMICFormatError)


def split_file(data_dir: Union[str, Path], split: str) -> Path:
    """``<PREFIX>_<split>.json`` in ``data_dir`` (exactly one must exist)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    matches = sorted(Path(data_dir).glob(f"*_{split}.json"))
    if len(matches) != 1:
        raise MIMICFormatError(
            f"Expected one '*_{split}.json' file in {data_dir}, found {[m.name for m in matches]}"
        )
    return matches[0]


def load_mimic_kb(
    vocab: Vocab,
    data_dir: Union[str, Path],
    *,
    alias_splits: Iterable[str] = ("train",),
) -> MultimodalKB:
    """A MultimodalKB from ``kb_entity.json`` and ``kb_image/``.

    Aliases: every entity name, plus the mention surface forms seen in
    ``alias_splits`` with priors from their counts (the alias table a linker
    would have in production; evaluation still ranks with the dense search).
    """
    root = Path(data_dir)
    records = _read_json(root / "kb_entity.json")
    if not isinstance(records, list):
        raise MIMICFormatError(f"{root / 'kb_entity.json'} must hold a list of entities")
    kb = MultimodalKB(vocab)
    image_root = root / KB_IMAGES
    # One summary warning below instead of one per entity.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for position, record in enumerate(records):
            for key in ("id", "entity_name"):
                if key not in record:
                    raise MIMICFormatError(f"kb_entity.json entry {position} has no '{key}'")
            images = [str(image_root / name) for name in record.get("image_list") or []]
            kb.add_entity(
                str(record["id"]),
                name=unquote(str(record["entity_name"])),
                description=str(record.get("desc") or ""),
                images=images,
            )
    if kb.missing_images:
        count = sum(len(v) for v in kb.missing_images.values())
        warn(
            f"{root}: {count} entity image(s) of {len(kb.missing_images)} entities are missing "
            f"from {image_root} (see MultimodalKB.missing_images)"
        )
    aliases = AliasPriors()
    for row in range(len(kb)):
        if kb.name(row).strip():
            aliases.add(kb.name(row), kb.entity_id(row))
    for split in alias_splits:
        for sample in _read_json(split_file(root, split)):
            answer = str(sample.get("answer", "nil"))
            mention = unquote(str(sample.get("mentions", "")))
            if answer.lower() != "nil" and answer in kb and mention.strip():
                aliases.add(mention, answer)
    aliases.add_to(kb)
    return kb


def _locate(sentence: str, mention: str) -> Optional[Tuple[int, int]]:
    start = sentence.find(mention)
    if start < 0:
        start = sentence.casefold().find(mention.casefold())
    return None if start < 0 or not mention else (start, start + len(mention))


def _mention_image(root: Path, image_path: str) -> Optional[str]:
    """Relative path of the mention image; the MIMIC releases converted every
    mention image to .jpg, so the stem + .jpg is tried as well."""
    if not image_path:
        return None
    name = image_path.split("/")[-1]
    for candidate in (name, name.rsplit(".", 1)[0] + ".jpg"):
        if (root / MENTION_IMAGES / candidate).is_file():
            return f"{MENTION_IMAGES}/{candidate}"
    return ""


def read_mimic_docs(
    nlp: Language,
    data_dir: Union[str, Path],
    split: str,
    *,
    known_entities: Optional[Iterable[str]] = None,
    report: Optional[ConversionReport] = None,
) -> Iterator[Doc]:
    """Docs with one gold entity each (``kb_id`` = QID or NIL) and
    ``doc._.image`` = the image path *relative to* ``data_dir``."""
    register_extensions()
    root = Path(data_dir)
    path = split_file(root, split)
    report = report if report is not None else ConversionReport()
    known = set(known_entities) if known_entities is not None else None
    samples = _read_json(path)
    if not isinstance(samples, list):
        raise MIMICFormatError(f"{path} must hold a list of samples")
    for position, sample in enumerate(samples):
        sample_id = str(sample.get("id", position))
        for key in ("sentence", "mentions", "answer"):
            if key not in sample:
                raise MIMICFormatError(f"{path}: sample '{sample_id}' has no '{key}'")
        sentence = str(sample["sentence"])
        mention = unquote(str(sample["mentions"]))
        offsets = _locate(sentence, mention)
        if offsets is None:
            report.unlocated.append(sample_id)
            continue
        doc = nlp.make_doc(sentence)
        span = doc.char_span(*offsets, label="MENTION", alignment_mode="expand")
        if span is None:
            report.unlocated.append(sample_id)
            continue
        answer = str(sample["answer"])
        if answer.lower() == "nil":
            answer = NIL
            report.nil += 1
        elif known is not None and answer not in known:
            report.unknown_answers.append(sample_id)
            answer = NIL
        doc.ents = [doc.char_span(span.start_char, span.end_char, label="MENTION", kb_id=answer)]
        image = _mention_image(root, str(sample.get("imgPath") or ""))
        if image == "":
            report.missing_mention_images.append(sample_id)
            image = None
        doc._.image = image
        doc.user_data["mimic_id"] = sample_id
        report.mentions += 1
        yield doc


class MIMICCorpus:
    """Reads a MIMIC split directly (no DocBin) as training/evaluation examples."""

    def __init__(self, data_dir: Union[str, Path], split: str, *, limit: int = 0) -> None:
        self.data_dir = Path(data_dir)
        self.split = split
        self.limit = limit
        split_file(self.data_dir, split)  # fail early with a clear message

    def __call__(self, nlp: Language) -> Iterator[Example]:
        report = ConversionReport()
        for count, reference in enumerate(read_mimic_docs(nlp, self.data_dir, self.split, report=report)):
            if self.limit and count >= self.limit:
                break
            yield example_with_images(nlp, reference, image_dir=self.data_dir)
        report.warn(f"{self.data_dir} ({self.split})")


def create_mimic_reader(data_dir: str, split: str, limit: int = 0) -> Callable[[Language], Iterable[Example]]:
    """Registered as ``spacy-m3el.MIMICCorpus.v1`` (spacy_readers)."""
    return MIMICCorpus(data_dir, split, limit=limit)


def create_mimic_kb_loader(data_dir: str) -> Callable[[Vocab], MultimodalKB]:
    """Registered as ``spacy-m3el.MIMICKB.v1``: the KB of a MIMIC dataset."""
    return lambda vocab: load_mimic_kb(vocab, data_dir)
