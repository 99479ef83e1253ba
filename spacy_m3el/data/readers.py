"""Training corpora that keep images on the predicted docs.

``spacy.Corpus.v1`` rebuilds ``eg.predicted`` with ``nlp.make_doc(text)``, which
drops ``doc._.image``; this reader copies it. Gold mentions that cut a token
of the pipeline's tokenizer are aligned to its tokens and reported once per
corpus, never a crash.
"""
import random
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

from spacy.language import Language
from spacy.tokens import Doc, DocBin
from spacy.training import Example

from ..extensions import copy_images, register_extensions, resolve_images
from .alignment import AlignmentReport, retokenized_reference


def example_with_images(
    nlp: Language,
    reference: Doc,
    *,
    image_dir: Optional[Path] = None,
    gold_ents: bool = True,
    report: Optional[AlignmentReport] = None,
    where: str = "",
) -> Example:
    """An Example whose predicted doc keeps the reference's images (relative
    paths resolved against ``image_dir``) and, with ``gold_ents``, its entity
    spans without their KB ids. Gold mentions that do not fall on the
    pipeline's tokens are aligned to them (counted in ``report``)."""
    report = report if report is not None else AlignmentReport()
    resolve_images(reference, image_dir)
    predicted = nlp.make_doc(reference.text)  # once: it also tells whether the reference needs re-tokenising
    reference = retokenized_reference(predicted, reference, report, where=where or repr(reference.text[:60]))
    if gold_ents:
        predicted.ents = [predicted.char_span(ent.start_char, ent.end_char, label=ent.label_)
                          for ent in reference.ents]
    copy_images(reference, predicted)
    return Example(predicted, reference)


class MultimodalCorpus:
    """Examples from a DocBin with ``doc._.image`` (paths) kept on both sides.

    path: a .spacy file or a folder of them. image_dir: base for relative image
    paths. gold_ents: copy the gold entity spans (without their KB ids) onto
    the predicted docs, to evaluate linking given the mentions, as MEL papers do.
    """

    def __init__(
        self,
        path: Union[str, Path],
        *,
        image_dir: Optional[Union[str, Path]] = None,
        gold_ents: bool = True,
        limit: int = 0,
        shuffle: bool = False,
    ) -> None:
        register_extensions()
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"Corpus not found: {self.path}")
        self.image_dir = Path(image_dir) if image_dir else None
        self.gold_ents = gold_ents
        self.limit = limit
        self.shuffle = shuffle
        #: What the last full pass had to align (see :mod:`spacy_m3el.data.alignment`).
        self.alignment = AlignmentReport()
        self._reported = False

    def _files(self) -> list:
        if self.path.is_dir():
            files = sorted(self.path.rglob("*.spacy"))
            if not files:
                raise FileNotFoundError(f"No .spacy files under {self.path}")
            return files
        return [self.path]

    def __call__(self, nlp: Language) -> Iterator[Example]:
        docs = []
        for file in self._files():
            docs.extend((file, position, doc) for position, doc in
                        enumerate(DocBin().from_disk(file).get_docs(nlp.vocab)))
        if self.shuffle:
            random.shuffle(docs)
        if self.limit:
            docs = docs[: self.limit]
        report = AlignmentReport()
        for file, position, reference in docs:
            where = f"{file.name} doc {position}" + (f" (id {reference.user_data['mimic_id']})"
                                                     if "mimic_id" in reference.user_data else "")
            yield example_with_images(nlp, reference, image_dir=self.image_dir, gold_ents=self.gold_ents,
                                      report=report, where=where)
        self.alignment = report
        if not self._reported:  # once per corpus, not once per epoch
            self._reported = True
            report.warn(str(self.path))


def create_docbin_reader(
    path: str,
    image_dir: Optional[str] = None,
    gold_ents: bool = True,
    limit: int = 0,
    shuffle: bool = False,
) -> Callable[[Language], Iterable[Example]]:
    """Registered as ``spacy-m3el.Corpus.v1`` (spacy_readers)."""
    return MultimodalCorpus(path, image_dir=image_dir, gold_ents=gold_ents, limit=limit, shuffle=shuffle)
