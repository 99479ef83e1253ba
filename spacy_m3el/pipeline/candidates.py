"""Candidate generators: which KB entities a mention's text proposes, with
their priors, before the dense search adds its top-K. Chosen in the
linker's config (``candidate_generator``), as spaCy's ``entity_linker``
takes ``get_candidates``::

    [components.m3el_linker.candidate_generator]
    @misc = "spacy-m3el.FuzzyAliasCandidates.v1"
    min_similarity = 0.5

A generator is called with the KB and the mention texts and returns, per
mention, ``{entity row: prior}``.
"""
import re
import unicodedata
from collections import defaultdict
from typing import Callable, Dict, List, Sequence, Set, Tuple

from ..kb.aliases import normalize_alias
from ..kb.base import MultimodalKB

CandidateGenerator = Callable[[MultimodalKB, Sequence[str]], List[Dict[int, float]]]


def alias_candidates(kb: MultimodalKB, texts: Sequence[str]) -> List[Dict[int, float]]:
    """The alias table's entities for each text (case, Unicode form and
    white space aside), with their priors."""
    return [dict(kb.alias_rows(text)) for text in texts]


def create_alias_candidates() -> CandidateGenerator:
    """Registered as ``spacy-m3el.AliasCandidates.v1`` (the default)."""
    return alias_candidates


_APOSTROPHES = re.compile("['\u2019\u02bc`]")
_PUNCTUATION = re.compile(r"[^\w\s]|_", re.UNICODE)


def _singular(token: str) -> str:
    """A plural's English singular by suffix rules ("cities" -> "city",
    "boxes" -> "box", "clocks" -> "clock"); other tokens as they are."""
    if len(token) > 4 and token.endswith("ies"):
        return token[:-3] + "y"
    if len(token) > 4 and token.endswith(("sses", "xes", "zes", "ches", "shes")):
        return token[:-2]
    if len(token) > 3 and token.endswith("s") and not token.endswith(("ss", "us", "is")):
        return token[:-1]
    return token


def fuzzy_tokens(text: str) -> Tuple[str, ...]:
    """The text as compared by the fuzzy generator: case-folded, accents
    and punctuation removed, each token made singular."""
    folded = unicodedata.normalize("NFKD", normalize_alias(text))
    plain = "".join(char for char in folded if not unicodedata.combining(char))
    plain = _PUNCTUATION.sub(" ", _APOSTROPHES.sub("", plain))  # "d'Orsay" -> "dorsay", "Spider-Man" -> "spider man"
    return tuple(_singular(token) for token in plain.split())


class FuzzyAliasCandidates:
    """The alias table, matched loosely: a mention proposes the entities of
    every alias with the same fuzzy form (case, accents, punctuation, plural
    aside: "Musée d'Orsay" ~ "musee dorsay", "clocks" ~ "Clock") at their
    prior, and, when it has none, of the aliases that contain all its
    tokens ("learning" -> "Machine Learning") at their prior times the
    share of the alias's tokens it covers, if that is at least
    ``min_similarity``. At most ``max_candidates`` entities per mention."""

    def __init__(self, *, min_similarity: float = 0.5, max_candidates: int = 32) -> None:
        if not 0.0 < min_similarity <= 1.0:
            raise ValueError(f"min_similarity must be in (0, 1], got {min_similarity}")
        if max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
        self.min_similarity = min_similarity
        self.max_candidates = max_candidates
        self._built_for: Tuple[int, int, int] = (0, -1, -1)
        self._by_form: Dict[Tuple[str, ...], List[str]] = {}
        self._by_token: Dict[str, Set[str]] = {}
        self._size: Dict[str, int] = {}  # distinct fuzzy tokens per alias

    def __call__(self, kb: MultimodalKB, texts: Sequence[str]) -> List[Dict[int, float]]:
        self._index(kb)
        return [self._candidates(kb, text) for text in texts]

    def _index(self, kb: MultimodalKB) -> None:
        # Rebuilt when the KB object or its size changes (an added entity or alias).
        key = (id(kb), len(kb), kb.get_size_aliases())
        if key == self._built_for:
            return
        by_form: Dict[Tuple[str, ...], List[str]] = defaultdict(list)
        by_token: Dict[str, Set[str]] = defaultdict(set)
        size: Dict[str, int] = {}
        for alias in kb.get_alias_strings():
            tokens = fuzzy_tokens(alias)
            if tokens:
                by_form[tokens].append(alias)
                size[alias] = len(set(tokens))
                for token in tokens:
                    by_token[token].add(alias)
        self._by_form, self._by_token, self._size, self._built_for = dict(by_form), dict(by_token), size, key

    def _candidates(self, kb: MultimodalKB, text: str) -> Dict[int, float]:
        found: Dict[int, float] = dict(kb.alias_rows(text))
        tokens = fuzzy_tokens(text)
        if not tokens:
            return found
        for alias in self._by_form.get(tokens, ()):
            for row, prior in kb.alias_rows(alias):
                found[row] = max(found.get(row, 0.0), prior)
        if not found:
            containing = set.intersection(*(self._by_token.get(token, set()) for token in set(tokens)))
            for alias in containing:
                similarity = len(set(tokens)) / self._size[alias]
                if similarity >= self.min_similarity:
                    for row, prior in kb.alias_rows(alias):
                        found[row] = max(found.get(row, 0.0), prior * similarity)
        if len(found) > self.max_candidates:
            found = dict(sorted(found.items(), key=lambda item: -item[1])[: self.max_candidates])
        return found


def create_fuzzy_alias_candidates(min_similarity: float = 0.5, max_candidates: int = 32) -> CandidateGenerator:
    """Registered as ``spacy-m3el.FuzzyAliasCandidates.v1``."""
    return FuzzyAliasCandidates(min_similarity=min_similarity, max_candidates=max_candidates)
