"""Rebuilding the entity index after training with a frozen backbone: the
KB's backbone features kept on disk (``EntityFeatureStore``, now) against
the route before it (the network's 1 GB feature cache, shared with the
mentions), in one run.

    python benchmarks/reencode.py [--entities 17000] [--mentions 20000]
    # -> results/reencode.json
    python benchmarks/reencode.py --pictures   # -> results/reencode_pictures.json

Needs `spacy project run all` (training/clipart_mel/model-best, frozen
default backbone, bfloat16 on this CPU). Inputs, WikiMEL-sized: 17,000
text-only entities (a name and a 30-word description each, all different)
and 20,000 mention texts (a mention and a 25-word sentence). For each route,
on the same inputs: the first build of the index (the backbone runs; timed),
then what training does between two dev evaluations (the mention texts
encoded through the feature cache, as training batches are, and the
matcher's weights changed, as an update does; not timed), then the rebuild
(timed: the figure this benchmark is for). CPU time is this process's; both
rebuilt indexes are compared array for array. With ``--pictures`` every
entity also has a picture of its own (a distinct 160 x 160 JPEG): 125 KB of
image features each, which the 1 GB feature cache cannot hold for 17,000.
"""
import argparse
import random
import sys
from pathlib import Path

import numpy
import spacy
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import random_picture, run_info  # noqa: E402
from kb_scale import WORK, timed_run as timed, write  # noqa: E402

from spacy_m3el.kb.base import MultimodalKB  # noqa: E402
from spacy_m3el.pipeline.linker import find_linker  # noqa: E402

PIPELINE = ROOT / "training" / "clipart_mel" / "model-best"
WORDS = ("river old city museum painting bridge famous northern station music player football club novel author "
         "island mountain church school science history village company market garden king queen war film actor "
         "season league album singer tower castle harbour railway valley lake festival university").split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=17_000)
    parser.add_argument("--mentions", type=int, default=20_000)
    parser.add_argument("--pictures", action="store_true", help="give every entity a picture of its own")
    args = parser.parse_args()
    pictures = WORK / "reencode_pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    nlp = spacy.load(PIPELINE)
    linker = find_linker(nlp)
    rng = random.Random(0)
    kb = MultimodalKB(nlp.vocab)
    for i in range(args.entities):
        image = pictures / f"q{i}.jpg"
        images = [image if image.exists() else random_picture(image, seed=90_000 + i)] if args.pictures else []
        kb.add_entity(f"Q{i}", name=f"{rng.choice(WORDS).title()} {rng.choice(WORDS)} {i}",
                      description=sentence(rng, 30), images=images, freq=1)
    mention_texts = [f"{rng.choice(WORDS)} {i} [SEP] {sentence(rng, 25)}" for i in range(args.mentions)]
    linker.set_kb(lambda vocab: kb)
    network, encoding = linker.network, linker.index_keeper.encoding
    initial = {name: value.clone() for name, value in network.matcher.state_dict().items()}
    rows, rebuilt = {}, {}
    for route in ("before", "now"):
        network.matcher.load_state_dict(initial)
        network.feature_cache.clear()
        encoding._store = None
        if route == "before":
            encoding.feature_store = lambda kb: None  # the feature cache only, as before
        else:
            del encoding.feature_store
        _, first = timed(lambda: encoding.encode(kb, max_queries=None, progress=True))
        with torch.no_grad():
            for start in range(0, len(mention_texts), 64):  # a training epoch's mention features
                network.encode(mention_texts[start : start + 64], [None] * len(mention_texts[start : start + 64]))
            generator = torch.Generator().manual_seed(1)
            for parameter in network.matcher.parameters():  # an update: the matcher changes, the backbone not
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
        index, again = timed(lambda: encoding.encode(kb, max_queries=None, progress=True))
        rebuilt[route] = index
        rows[route] = {"first_build": first, "rebuild_after_training": again,
                       "rebuild_cpu_ms_per_entity": round(1000 * again["cpu_s"] / len(kb), 3),
                       "first_build_cpu_ms_per_entity": round(1000 * first["cpu_s"] / len(kb), 3)}
        print(route, rows[route], flush=True)
    same = all(numpy.array_equal(numpy.asarray(rebuilt["before"].arrays[name]), numpy.asarray(array))
               for name, array in rebuilt["now"].arrays.items())
    write("reencode_pictures.json" if args.pictures else "reencode.json", {
        **run_info(), "entities": len(kb), "mention_texts": len(mention_texts),
        "inputs": ("entities with a distinct 160x160 JPEG each and " if args.pictures else "text-only entities ")
        + "(name + 30-word description), mention texts (mention + 25-word sentence), "
                  "frozen default backbone in bfloat16, exact index; between the builds: the mention texts through "
                  "the feature cache and the matcher's weights changed",
        "inference_precision": linker.settings.inference_precision, **rows,
        "rebuild_speedup_cpu": round(rows["before"]["rebuild_after_training"]["cpu_s"]
                                     / rows["now"]["rebuild_after_training"]["cpu_s"], 1),
        "same_index": same,
    })


if __name__ == "__main__":
    main()
