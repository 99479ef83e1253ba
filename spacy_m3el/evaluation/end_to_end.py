"""Evaluating a pipeline: linking given the gold mentions (two-stage and the
paper's exhaustive protocol, :mod:`spacy_m3el.evaluation.exhaustive`), under each
picture condition, and end to end from the raw text."""
from typing import Any, Dict, List, Sequence

from spacy.language import Language
from spacy.scorer import PRFScore, Scorer
from spacy.training import Example
from wasabi import msg

from ..data.pictures import CONDITIONS, check_condition, examples_with_pictures
from ..errors import warn
from ..extensions import copy_images
from ..pipeline.linker import find_linker
from ..progress import pictures_removed_on_purpose, progress_bar
from .exhaustive import evaluate_exhaustive
from .scoring import HITS_AT

PROTOCOLS = ("two-stage", "exhaustive", "both")


def mention_finders(nlp: Language, linker_name: str) -> List[str]:
    """Enabled components that set ``doc.ents`` (ner, entity_ruler, ...), the linker aside."""
    return [name for name in nlp.pipe_names
            if name != linker_name and "doc.ents" in nlp.get_pipe_meta(name).assigns]


def end_to_end_scores(nlp: Language, examples: Sequence[Example], keys: Sequence[str], *,
                      progress: bool = False) -> Dict[str, Any]:
    """The pipeline finds the mentions itself, from the raw text and image:
    ``mentions_p/r/f`` of its mentions by their offsets (whatever their
    labels), ``ents_p/r/f`` by offsets and label where the pipeline's labels
    are the gold ones (a warning, and None, where they are not), and the
    linking scores ``keys`` over its mentions."""
    raw = []
    for eg in examples:
        doc = nlp.make_doc(eg.reference.text)
        copy_images(eg.reference, doc)
        raw.append(Example(doc, eg.reference))
    linked = _pipe(nlp, [eg.predicted for eg in raw], progress=progress, desc="End to end: linking raw texts")
    for eg, doc in zip(raw, linked):
        eg.predicted = doc
    scores = Scorer(nlp=nlp).score(raw)
    result = {**mention_scores(raw), **{key: scores.get(key) for key in ["ents_p", "ents_r", "ents_f", *keys]}}
    predicted = {ent.label_ for eg in raw for ent in eg.predicted.ents}
    gold = {ent.label_ for eg in raw for ent in eg.reference.ents}
    if predicted and gold and predicted != gold:
        shared = predicted & gold
        warn(f"end to end: the pipeline labels its mentions {sorted(predicted)}, the gold mentions are labelled "
             f"{sorted(gold)}: mentions_p/r/f score the offsets alone"
             + (f"; ents_p/r/f score the offsets and the labels {sorted(shared)}" if shared else
                "; ents_p/r/f (offsets and label) are left out, as no label is shared"), stacklevel=3)
        if not shared:
            result.update(ents_p=None, ents_r=None, ents_f=None)
    return result


def mention_scores(examples: Sequence[Example]) -> Dict[str, float]:
    """Precision, recall and F of the predicted mentions against the gold
    ones by character offsets, labels aside."""
    prf = PRFScore()
    for eg in examples:
        prf.score_set({(ent.start_char, ent.end_char) for ent in eg.predicted.ents},
                      {(ent.start_char, ent.end_char) for ent in eg.reference.ents})
    return {"mentions_p": prf.precision, "mentions_r": prf.recall, "mentions_f": prf.fscore}


def link_gold_mentions(nlp: Language, linker, examples: Sequence[Example], *, progress: bool = False) -> List[str]:
    """Run the pipeline on the examples' predicted docs without the
    components that find mentions (the gold ones are linked), as
    ``nlp.evaluate`` does but keeping the linked docs on the examples;
    returns the names of the components left out."""
    finders = mention_finders(nlp, linker.name)
    with nlp.select_pipes(disable=finders):
        linked = _pipe(nlp, [eg.predicted for eg in examples], progress=progress, desc="Linking the gold mentions")
    for eg, doc in zip(examples, linked):
        eg.predicted = doc
    return finders


def _pipe(nlp: Language, docs: List[Any], *, progress: bool, desc: str) -> List[Any]:
    """``nlp.pipe`` over ``docs``, with a progress bar when asked."""
    bar = progress_bar(total=len(docs), desc=desc, unit="doc", disable=not progress)
    out = []
    with bar:
        for doc in nlp.pipe(docs):
            out.append(doc)
            bar.update(1)
    return out


def evaluate_pipeline(nlp: Language, examples: Sequence[Example], *, protocol: str = "two-stage",
                      progress: bool = False, pictures: str = "given", seed: int = 0) -> Dict[str, Any]:
    """Linking given the gold mentions (components that would replace them
    are left out), by the two-stage and/or the exhaustive protocol; and,
    when the pipeline finds mentions itself, the same end to end
    (``end_to_end``). The examples' predicted docs are replaced by the linked ones.

    ``pictures``: "given" (as the data has them), "none", "half" (a seeded
    half removed), "shuffled" (each mention gets another's picture, seeded),
    or "all": the top-level figures are then those with the pictures given,
    and ``pictures`` holds the two-stage figures of every condition."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    check_condition(pictures, allow_all=True)
    linker = find_linker(nlp)
    examples = list(examples)
    if pictures not in ("given", "all"):
        examples = examples_with_pictures(examples, pictures, seed=seed)
    # Made before linking: linking annotates the docs in place, and a copy of
    # a linked doc would keep its KB ids under overwrite = false.
    varied = {condition: examples_with_pictures(examples, condition, seed=seed)
              for condition in (CONDITIONS[1:] if pictures == "all" else ())}
    with pictures_removed_on_purpose(pictures not in ("given", "all")):
        result = _evaluate_examples(nlp, linker, examples, protocol=protocol, progress=progress)
    if pictures == "all":
        result["pictures"] = {"given": {k: v for k, v in result.items() if not isinstance(v, dict)}}
        for condition, condition_examples in varied.items():
            if progress:
                msg.info(f"Pictures: {condition}")
            with pictures_removed_on_purpose():
                figures = _evaluate_examples(nlp, linker, condition_examples, protocol="two-stage",
                                             progress=progress)
            result["pictures"][condition] = {k: v for k, v in figures.items() if not isinstance(v, dict)}
    else:
        result["pictures_condition"] = pictures
    return result


def _evaluate_examples(nlp: Language, linker, examples: List[Example], *, protocol: str,
                       progress: bool) -> Dict[str, Any]:
    keys = [f"m3el_hits{k}" for k in HITS_AT] + ["m3el_mrr", "m3el_n_mentions"]
    answers = ["m3el_accuracy", "m3el_ece", "m3el_nil_p", "m3el_nil_r", "m3el_nil_f", "m3el_n_nil",
               "m3el_nil_on_linkable"]
    links = ["nel_micro_p", "nel_micro_r", "nel_micro_f"]
    finders = link_gold_mentions(nlp, linker, examples, progress=progress)
    with nlp.select_pipes(disable=finders):
        scores = Scorer(nlp=nlp).score(examples)
    result: Dict[str, Any] = {key: scores.get(key) for key in keys + links + answers}
    if protocol != "two-stage":
        exhaustive = evaluate_exhaustive(linker, examples, progress=progress)
        result = result if protocol == "both" else {}
        result["exhaustive"] = {key: exhaustive[key] for key in keys}
        result["top1_agreement"] = exhaustive["top1_agreement"]
    if finders:
        if progress:
            msg.info(f"End to end, mentions found by {finders}")
        result["end_to_end"] = end_to_end_scores(nlp, examples, links + answers, progress=progress)
    index = linker.index_keeper.index
    unreadable = index.meta.get("unreadable_kb_images") if index is not None else None
    result["unreadable_kb_images"] = unreadable["count"] if unreadable else 0
    return result
