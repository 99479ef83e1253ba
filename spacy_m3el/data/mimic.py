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
import re
import unicodedata
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

from ..errors import MIMICFormatError, warn
from ..extensions import register_extensions
from ..fileio import read_json
from ..kb.aliases import AliasPriors
from ..kb.base import NIL, MultimodalKB
from .alignment import AlignmentReport, align_entities
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
    #: Samples skipped because a field is missing or of the wrong type: (where, what is wrong).
    malformed: List[Tuple[str, str]] = field(default_factory=list)
    #: Mentions aligned to the tokens, or skipped because no token holds them.
    alignment: AlignmentReport = field(default_factory=AlignmentReport)

    def problems(self) -> List[str]:
        """One line per kind of problem, with a count and example ids."""
        lines = list(self.alignment.lines())
        if self.malformed:
            lines.append(f"{len(self.malformed)} malformed sample(s) skipped, e.g. {self.malformed[:3]}")
        for items, what in (
            (self.unlocated, "mention(s) not found on word boundaries in their sentence (kept: the mention "
                             "is appended to the sentence, as context)"),
            (self.unknown_answers, "answer(s) not in kb_entity.json (kept as NIL)"),
            (self.missing_mention_images, "mention image(s) missing (linked without an image)"),
        ):
            if items:
                lines.append(f"{len(items)} {what}, e.g. ids {items[:5]}")
        return lines

    def warn(self, where: str) -> None:
        """One warning per kind of problem."""
        for line in self.problems():
            warn(f"{where}: {line}", stacklevel=3)

    def check(self, where: str) -> None:
        """Refuse a split where most samples are malformed, most mentions
        cannot be aligned, or most answers are unknown: the data and the KB
        do not fit (for example ids that need qid2id.json)."""
        samples = len(self.malformed) + self.alignment.mentions
        if self.malformed and len(self.malformed) > samples / 2:
            raise MIMICFormatError(
                f"{where}: {len(self.malformed)} of {samples} samples are malformed, e.g. {self.malformed[:3]}: "
                "each must be an object with the strings 'sentence' and 'mentions' and an 'answer'"
            )
        unaligned = len(self.alignment.unaligned)
        if unaligned and unaligned > self.alignment.mentions / 2:
            raise MIMICFormatError(
                f"{where}: {unaligned} of {self.alignment.mentions} mentions could not be aligned to any token "
                f"of their sentence, e.g. {self.alignment.unaligned[:3]}: check the 'mentions' and 'sentence' fields"
            )
        linkable = self.mentions - self.nil
        if linkable and len(self.unknown_answers) > linkable / 2:
            raise MIMICFormatError(
                f"{where}: {len(self.unknown_answers)} of {linkable} answers are not entities of "
                "kb_entity.json. Answers are QIDs: put the release's qid2id.json (QID -> kb_entity id) "
                "next to kb_entity.json, or use QIDs as kb_entity ids."
            )


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


def _entity_ids(root: Path, records: List[dict]) -> List[str]:
    """Our id for each kb_entity.json record: the QID that qid2id.json maps to
    its ``id`` (as the official loader reads it), else the ``id`` itself."""
    qid_path = root / "qid2id.json"
    if not qid_path.is_file():
        return [str(record["id"]) for record in records]
    qid2id = _read_json(qid_path)
    if not isinstance(qid2id, dict):
        raise MIMICFormatError(f"{qid_path} must hold an object {{QID: kb_entity id}}")
    qid_of = {str(entity_id): str(qid) for qid, entity_id in qid2id.items()}
    return [qid_of.get(str(record["id"]), str(record["id"])) for record in records]


def _kb_records(path: Path) -> List[dict]:
    """The usable entries of ``kb_entity.json``: an entry that is not an
    object or lacks an 'id' or 'entity_name' is skipped with a warning, and
    a file where most entries are so is refused."""
    records = _read_json(path)
    if not isinstance(records, list):
        raise MIMICFormatError(f"{path} must hold a list of entities")
    usable, skipped = [], []
    for position, record in enumerate(records):
        missing = [key for key in ("id", "entity_name") if not isinstance(record, dict) or key not in record]
        if missing:
            skipped.append((f"entry {position}", f"no {' or '.join(repr(key) for key in missing)}"
                            if isinstance(record, dict) else f"not an object but {type(record).__name__}"))
        else:
            usable.append(record)
    if skipped and len(skipped) > len(records) / 2:
        raise MIMICFormatError(f"{path}: {len(skipped)} of {len(records)} entries are malformed, e.g. "
                               f"{skipped[:3]}: each must be an object with an 'id' and an 'entity_name'")
    if skipped:
        warn(f"{path}: {len(skipped)} of {len(records)} malformed record(s) skipped, e.g. {skipped[:3]}")
    return usable


def _image_names(record: dict) -> Tuple[List[str], bool]:
    """The entity's picture file names from 'image_list', and whether it was
    malformed (a single name is read as a list of one; anything else as none)."""
    images = record.get("image_list")
    if images is None:
        return [], False
    if isinstance(images, str):
        return [images], True
    if not isinstance(images, list):
        return [], True
    names = [name for name in images if isinstance(name, str) and name]
    return names, len(names) != len(images)


def load_mimic_kb(
    vocab: Vocab,
    data_dir: Union[str, Path],
    *,
    alias_splits: Iterable[str] = ("train",),
) -> MultimodalKB:
    """A MultimodalKB from ``kb_entity.json`` (+ ``qid2id.json``) and ``kb_image/``.

    Entity ids are QIDs where ``qid2id.json`` gives them, so the splits'
    answers (QIDs) name them. Descriptions come from ``desc`` (or ``attr``).
    Aliases: every entity name, plus the mention surface forms seen in
    ``alias_splits`` with priors from their counts.
    """
    root = Path(data_dir)
    records = _kb_records(root / "kb_entity.json")
    kb = MultimodalKB(vocab)
    image_root = root / KB_IMAGES
    undescribed, duplicates, odd_images = [], [], []
    # One summary warning below instead of one per entity.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for entity_id, record in zip(_entity_ids(root, records), records):
            if entity_id in kb:
                duplicates.append(entity_id)
                continue
            description = str(record.get("desc") or record.get("attr") or "")
            if not description.strip():
                undescribed.append(entity_id)
            names, malformed = _image_names(record)
            if malformed:
                odd_images.append(entity_id)
            kb.add_entity(entity_id, name=unquote(str(record["entity_name"])), description=description,
                          images=[str(image_root / name) for name in names])
    if duplicates:
        warn(f"{root / 'kb_entity.json'}: {len(duplicates)} record(s) repeat an entity id already read, e.g. "
             f"{duplicates[:5]}: the first record of each id is kept")
    if odd_images:
        warn(f"{root / 'kb_entity.json'}: {len(odd_images)} record(s) have an 'image_list' that is not a list of "
             f"file names, e.g. {odd_images[:5]} (a single name is read as one picture; anything else is left out)")
    if undescribed:
        warn(f"{root}: {len(undescribed)} of {len(kb)} entities have no description ('desc' or 'attr'), "
             f"e.g. {undescribed[:5]}: their text is the name alone")
    if kb.missing_images:
        count = sum(len(v) for v in kb.missing_images.values())
        warn(
            f"{root}: {count} entity image(s) of {len(kb.missing_images)} entities are missing "
            f"from {image_root} (see MultimodalKB.missing_images)"
        )
    _add_aliases(kb, root, alias_splits)
    return kb


def _add_aliases(kb: MultimodalKB, root: Path, alias_splits: Iterable[str]) -> None:
    """Entity names, and the splits' mention forms with priors from counts."""
    aliases = AliasPriors()
    for row in range(len(kb)):
        if kb.name(row).strip():
            aliases.add(kb.name(row), kb.entity_id(row))
    for split in alias_splits:
        samples = _read_json(split_file(root, split))
        for sample in samples if isinstance(samples, list) else []:  # the split's reader reports what is wrong
            if _sample_problem(sample) is not None:
                continue
            answer = str(sample["answer"])
            mention = unquote(sample["mentions"])
            if answer.lower() != "nil" and answer in kb and mention.strip():
                aliases.add(mention, answer)
    aliases.add_to(kb)


def locate_mention(sentence: str, mention: str) -> Optional[Tuple[int, int]]:
    """Character offsets of ``mention`` in ``sentence`` on word boundaries:
    the first exact occurrence, else the first ignoring case (after Unicode
    NFC), else the first that differs only in whitespace (the releases write
    ``Washington,D.C`` for "Washington, D.C."), never inside a longer word.
    Surrounding whitespace of the mention is ignored. None when it is not there."""
    mention = mention.strip()
    if not mention:
        return None
    flexible = r"\s*".join(re.escape(char) for char in mention if not char.isspace())
    for text, target, flags in ((sentence, re.escape(mention), 0), (sentence, re.escape(mention), re.IGNORECASE),
                                (unicodedata.normalize("NFC", sentence),
                                 re.escape(unicodedata.normalize("NFC", mention)), re.IGNORECASE),
                                (sentence, flexible, re.IGNORECASE)):
        if len(text) != len(sentence):
            continue  # normalising moved the offsets
        found = re.search(rf"(?<!\w){target}(?!\w)", text, flags)
        if found:
            return found.span()
    return None


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
        sample_id = str(sample.get("id", position)) if isinstance(sample, dict) else str(position)
        problem = _sample_problem(sample)
        if problem is not None:
            report.malformed.append((f"entry {position}" if not isinstance(sample, dict) or "id" not in sample
                                     else f"id {sample_id}", problem))
            continue
        answer = str(sample["answer"])
        if answer.lower() == "nil":
            answer = NIL
        elif known is not None and answer not in known:
            answer = None
        doc = _sample_doc(nlp, sample, sample_id, answer or NIL, report)
        if doc is None:
            continue  # reported: no token holds the mention
        if answer == NIL:
            report.nil += 1
        elif answer is None:
            report.unknown_answers.append(sample_id)
        image_path = sample.get("imgPath")
        image = _mention_image(root, image_path if isinstance(image_path, str) else "")
        if image_path and not isinstance(image_path, str):
            image = ""  # reported with the missing ones: the mention is linked without a picture
        if image == "":
            report.missing_mention_images.append(sample_id)
            image = None
        doc._.image = image
        doc.user_data["mimic_id"] = sample_id
        report.mentions += 1
        yield doc


def _sample_problem(sample: object) -> Optional[str]:
    """What makes a sample unusable (a field missing or of the wrong type), or None."""
    if not isinstance(sample, dict):
        return f"not an object but {type(sample).__name__}"
    for key in ("sentence", "mentions", "answer"):
        if key not in sample:
            return f"no '{key}'"
    for key in ("sentence", "mentions"):
        if not isinstance(sample[key], str):
            return f"'{key}' is {type(sample[key]).__name__}, not a string"
    if isinstance(sample["answer"], bool) or not isinstance(sample["answer"], (str, int)):
        return f"'answer' is {type(sample['answer']).__name__}, not an entity id"
    return None


def _sample_doc(nlp: Language, sample: dict, sample_id: str, answer: str,
                report: ConversionReport) -> Optional[Doc]:
    """The sample's sentence, tokenised as the pipeline will tokenise it,
    with its mention as the one entity (aligned to the tokens when it cuts
    one). A mention not found in its sentence is kept, as the official code
    keeps it: it is appended to the sentence, so the sentence stays its
    context. None (reported) when the mention is empty."""
    sentence = str(sample["sentence"])
    mention = unquote(str(sample["mentions"])).strip()
    where = f"id {sample_id}"
    if not mention:
        report.alignment.mentions += 1
        report.alignment.unaligned.append((where, "the mention is empty"))
        return None
    offsets = locate_mention(sentence, mention)
    if offsets is None:
        report.unlocated.append(sample_id)
        sentence = f"{sentence} ({mention})"
        offsets = (len(sentence) - len(mention) - 1, len(sentence) - 1)
    doc = nlp.make_doc(sentence)
    spans = align_entities(doc, [(*offsets, "MENTION", answer)], report.alignment, where=where)
    if not spans:
        return None
    doc.ents = spans
    return doc


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
        report.check(f"{self.data_dir} ({self.split})")


def create_mimic_reader(data_dir: str, split: str, limit: int = 0) -> Callable[[Language], Iterable[Example]]:
    """Registered as ``spacy-m3el.MIMICCorpus.v1`` (spacy_readers)."""
    return MIMICCorpus(data_dir, split, limit=limit)


def create_mimic_kb_loader(data_dir: str) -> Callable[[Vocab], MultimodalKB]:
    """Registered as ``spacy-m3el.MIMICKB.v1``: the KB of a MIMIC dataset."""
    return lambda vocab: load_mimic_kb(vocab, data_dir)
