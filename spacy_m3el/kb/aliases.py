"""Alias tables with prior probabilities, built from surface forms."""
import unicodedata
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Tuple

from ..errors import KBError


def normalize_alias(alias: str) -> str:
    """The form used for alias lookup: Unicode NFKC, case-folded, white space
    collapsed, so "İstanbul", "ISTANBUL" and a decomposed "é" find the same
    aliases as "istanbul" and "é"."""
    folded = unicodedata.normalize("NFKC", alias).casefold()
    # Turkish dotted capital I folds to "i" + a combining dot above.
    folded = unicodedata.normalize("NFC", folded.replace("i\u0307", "i"))
    return " ".join(folded.split())


class AliasPriors:
    """Collects (surface form, entity) pairs and turns them into priors.

    An alias whose every pair came with an explicit ``prior`` keeps those;
    otherwise its priors are proportional to ``weight(entity_id, count)``
    (by default the number of times the pair was seen), uniform when all
    weights are 0.
    """

    def __init__(self) -> None:
        self._forms: Dict[str, str] = {}
        self._counts: Dict[str, Dict[str, int]] = defaultdict(dict)
        self._priors: Dict[str, Dict[str, Optional[float]]] = defaultdict(dict)

    def add(self, form: str, entity_id: str, *, prior: Optional[float] = None) -> None:
        """Record that ``form`` names ``entity_id`` (once more)."""
        key = normalize_alias(str(form))
        if not key:
            raise KBError(f"Empty alias for entity '{entity_id}'")
        self._forms.setdefault(key, str(form))
        counts = self._counts[key]
        counts[entity_id] = counts.get(entity_id, 0) + 1
        self._priors[key].setdefault(entity_id, prior)

    def __len__(self) -> int:
        return len(self._forms)

    def tables(
        self, weight: Optional[Callable[[str, int], float]] = None
    ) -> List[Tuple[str, List[str], List[float]]]:
        """``(alias, entity ids, priors)`` per alias, in first-seen order."""
        out = []
        for key, form in self._forms.items():
            ids = list(self._counts[key])
            given = [self._priors[key][e] for e in ids]
            if all(p is not None for p in given):
                priors = [float(p) for p in given]  # type: ignore[arg-type]
            else:
                raw = [weight(e, self._counts[key][e]) if weight else float(self._counts[key][e]) for e in ids]
                total = sum(raw)
                priors = [w / total for w in raw] if total > 0 else [1.0 / len(ids)] * len(ids)
            out.append((form, ids, priors))
        return out

    def add_to(self, kb, weight: Optional[Callable[[str, int], float]] = None) -> None:
        """Add every alias to ``kb`` (a :class:`~spacy_m3el.kb.base.MultimodalKB`)."""
        for form, ids, priors in self.tables(weight):
            kb.add_alias(form, ids, priors)
