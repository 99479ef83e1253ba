"""The paper's exhaustive protocol: every pair scored in full (the reference,
``exhaustive_ranks_in_full``) against the bounded route ``evaluate`` uses
(``exhaustive_ranks``: the decomposable part of every pair in one product,
the late interaction only where its bound leaves a comparison open).

    python benchmarks/exhaustive.py [--entities 10000] [--reference-mentions 48]
    # -> results/exhaustive.json

Needs `spacy project run all` (training/clipart_mel/model-best). Inputs: the
demo KB (300 entities) plus synthetic entities up to ``--entities`` (a
160 x 160 JPEG of coloured discs each, distinct, and a name and description
of their own), its exact entity index built once (not timed); mentions: the
demo test split's gold mentions with their pictures. Both routes run in this
process on the same encoded index and the same mentions: the reference on
the first ``--reference-mentions`` of them (scoring every pair in full is
what takes minutes), the bounded route on those and on all; the ranks and
tops of the two are compared mention for mention. CPU time is this
process's (2 torch threads on the 2-core machine).
"""
import argparse
import sys
import tempfile
from pathlib import Path

import spacy
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import random_picture, run_info  # noqa: E402
from kb_scale import WORK, timed_run as timed, write  # noqa: E402

from spacy_m3el.data.readers import MultimodalCorpus  # noqa: E402
from spacy_m3el.evaluation import exhaustive  # noqa: E402
from spacy_m3el.kb.base import MultimodalKB  # noqa: E402
from spacy_m3el.pipeline.linker import find_linker  # noqa: E402

PIPELINE = ROOT / "training" / "clipart_mel" / "model-best"
DEMO = ROOT / "assets" / "clipart_mel"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=10_000)
    parser.add_argument("--reference-mentions", type=int, default=48)
    args = parser.parse_args()
    nlp = spacy.load(PIPELINE)
    linker = find_linker(nlp)
    kb = MultimodalKB(nlp.vocab)
    demo = linker.kb
    for row in range(len(demo)):
        kb.add_entity(demo.entity_id(row), name=demo.name(row), description=demo.description(row),
                      images=demo.images(row), freq=1)
    pictures = WORK / "exhaustive_pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    for i in range(args.entities - len(demo)):
        path = pictures / f"s{i}.jpg"
        kb.add_entity(f"S{i}", name=f"Drawing {i}", description=f"Synthetic drawing number {i} of the set.",
                      images=[str(path) if path.exists() else random_picture(path, seed=70_000 + i)], freq=1)
    linker.set_kb(lambda vocab: kb)
    linker.configure(build_processes=2)
    with tempfile.TemporaryDirectory() as folder:
        _, build = timed(lambda: linker.build_entity_index(progress=True, folder=Path(folder) / "index"))
        examples = list(MultimodalCorpus(ROOT / "corpus" / "clipart_mel" / "test.spacy", image_dir=DEMO)(nlp))
        spans, ids = exhaustive.gold_mentions(examples)
        linker.exact_entity_index()  # built above: exact by default
        few = args.reference_mentions
        torch.set_num_threads(2)
        (full_ranks, full_top), full = timed(
            lambda: exhaustive.exhaustive_ranks_in_full(linker, spans[:few], ids[:few]))
        (bounded_few, bounded_few_top), bounded = timed(
            lambda: exhaustive.exhaustive_ranks(linker, spans[:few], ids[:few]))
        (all_ranks, _), bounded_all = timed(lambda: exhaustive.exhaustive_ranks(linker, spans, ids))
    per_mention = {name: round(row["wall_s"] / count, 4) for name, row, count in
                   (("in_full", full, few), ("bounded", bounded, few), ("bounded_all", bounded_all, len(spans)))}
    result = {
        **run_info(), "entities": len(kb), "mentions": len(spans), "reference_mentions": few,
        "inputs": "demo KB + synthetic entities (distinct 160x160 JPEGs, own names); demo test gold mentions "
                  "with their pictures; exact entity index (every G2L query)",
        "index_build": build,
        "in_full": full, "bounded": bounded, "bounded_all_mentions": bounded_all,
        "wall_s_per_mention": per_mention,
        "speedup_wall": round(full["wall_s"] / bounded["wall_s"], 1),
        "speedup_cpu": round(full["cpu_s"] / bounded["cpu_s"], 1),
        "same_ranks": full_ranks == bounded_few, "same_tops": full_top == bounded_few_top,
        "in_full_extrapolated_to_all_mentions_s": round(full["wall_s"] / few * len(spans), 1),
        "hits1_all": sum(rank == 1 for rank in all_ranks if rank is not None) / len(spans),
    }
    write("exhaustive.json", result)
    print({key: result[key] for key in ("in_full", "bounded", "bounded_all_mentions", "speedup_wall", "same_ranks",
                                        "same_tops")})


if __name__ == "__main__":
    main()
