"""How far a faster index is from the exact one, measured on KB entities
standing in for mentions: a pooled index's top-1 agreement with the exact
rerank, and an ANN index's recall against exact search."""
from typing import TYPE_CHECKING, Any, Dict, List

import torch
from wasabi import msg

from ..errors import warn
from ..kb.base import MultimodalKB
from ..pipeline import linking
from .ann import AnnIndex
from .entity_index import EntityIndex

if TYPE_CHECKING:  # pragma: no cover
    from .keeper import IndexKeeper

#: KB entities that stand in for mentions when a pooled index is checked.
AGREEMENT_SAMPLE = 64
#: An ANN index whose measured recall@K is below this is reported with a warning.
ANN_RECALL_WARNING = 0.95


def spread_rows(size: int, sample: int) -> List[int]:
    """Every row of a small KB, else ``sample`` rows spread evenly over it."""
    return list(range(size)) if size <= sample else [i * size // sample for i in range(sample)]


@torch.no_grad()
def pooling_agreement(keeper: "IndexKeeper", kb: MultimodalKB, pooled: EntityIndex) -> Dict[str, Any]:
    """Top-1 agreement of the pooled and the exact rerank of the same
    candidates, with KB entities spread over the KB standing in for
    mentions (only the candidates' exact rows are encoded)."""
    matcher = keeper.network.matcher
    mention = keeper.stand_in_mentions(kb, spread_rows(len(kb), AGREEMENT_SAMPLE))
    k = max(keeper.settings.n_candidates, 1)
    candidates = linking.candidate_rows(pooled, matcher.mention_retrieval_vectors(mention), k=k)
    union = sorted({row for found in candidates for row in found})
    position = {row: i for i, row in enumerate(union)}
    exact = keeper.encoding.encode(kb, union, max_queries=None)
    exact_best = linking.rerank(matcher, mention, exact, [[position[r] for r in c] for c in candidates])
    pooled_best = linking.rerank(matcher, mention, pooled, candidates).best_rows().tolist()
    agree = [union[e] == p for e, p in zip(exact_best.best_rows().tolist(), pooled_best)]
    return {"top1": sum(agree) / len(agree), "sample": len(agree), "k": k}


def ann_recall_report(ann: AnnIndex, size: int) -> None:
    """Say the ANN index's measured recall; warn when it is low."""
    recall = ann.meta["recall"]
    choice = ann.meta.get("nprobe_choice")
    chosen = (f", chosen as twice the fewest lists reaching {choice['target']} on them" if choice else "")
    msg.info(f"m3el_linker: ANN index {ann.factory} over {size} entities: recall@{recall['k']} "
             f"{recall['recall']:.3f} against exact search ({recall['queries']} KB entities standing in "
             f"for mentions, nprobe {recall['nprobe']}{chosen}, shortlist {recall['shortlist']})")
    if recall["recall"] < ANN_RECALL_WARNING:
        warn(f"m3el_linker: the ANN index {ann.factory} finds only {recall['recall']:.1%} of exact search's "
             f"top {recall['k']} candidates (KB entities standing in for mentions; real mentions lie further "
             f"from the entities and fare worse). Raise ann_nprobe (now {recall['nprobe']}) or ann_shortlist, "
             f"or keep exact search (ann_index = null), which is fast up to a few 100,000 entities.")
