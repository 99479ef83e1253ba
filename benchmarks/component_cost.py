"""CPU cost of the default backbone and the m3el_linker component.

Measures (and writes to benchmarks/results/component_cost.json):
- forward time of the M3EL matcher + default backbone for 32 mentions x 32
  entities (encoders included, no grad);
- docs/s of ``nlp.pipe`` against an N-entity KB (one mention per doc, each
  with its own image; entity cache already built);
- bytes on disk per entity of a saved KB with its entity cache.

Images are drawn with Pillow (no data download). Usage:
    python benchmarks/component_cost.py [--entities 1000] [--docs 200]
"""
import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy
import spacy
import torch
from PIL import Image

from common import random_picture, run_info
from spacy_m3el import MultimodalKB
from spacy_m3el.encoders import MiniLMEfficientNetEncoder
from spacy_m3el.model import M3ELConfig, M3ELMatcher

WORDS = "red blue green river castle engine violin tiger garden harbor lantern comet".split()


def describe(seed: int) -> str:
    rng = numpy.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, 12))


def time_forward(encoder, repeats: int = 3) -> float:
    config = M3ELConfig(text_dim=encoder.text_dim, image_global_dim=encoder.image_global_dim,
                        image_token_dim=encoder.image_token_dim)
    matcher = M3ELMatcher(config).eval()
    images = [Image.new("RGB", (224, 224), (i * 7 % 255, 40, 90)) for i in range(32)]
    texts = [f"mention {i} [SEP] {describe(i)}" for i in range(32)]
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            mentions = encoder.encode(texts, images)
            entities = encoder.encode(texts[::-1], images[::-1])
            matcher.scores(matcher.mention_side(mentions), matcher.entity_side(entities))
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=1000)
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "component_cost.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    encoder = MiniLMEfficientNetEncoder(frozen=True)
    forward_s = time_forward(encoder)
    print(f"forward 32 mentions x 32 entities (encoders included): {forward_s:.3f} s")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nlp = spacy.blank("en")
        kb = MultimodalKB(nlp.vocab)
        for i in range(args.entities):
            kb.add_entity(f"E{i}", name=f"{WORDS[i % len(WORDS)]} {i}", description=describe(i),
                          images=[random_picture(tmp / f"e{i}.jpg", i)])
        kb.add_alias("thing", [f"E{i}" for i in range(min(10, args.entities))], [0.1] * min(10, args.entities))
        linker = nlp.add_pipe("m3el_linker")
        linker.set_kb(lambda vocab: kb)
        start = time.perf_counter()
        linker.build_entity_index(progress=True)
        cache_s = time.perf_counter() - start
        print(f"entity cache for {args.entities} entities: {cache_s:.1f} s")
        docs = []
        for i in range(args.docs):
            doc = nlp.make_doc(f"Yesterday the thing was seen near the {WORDS[i % len(WORDS)]} harbor.")
            doc.ents = [doc.char_span(14, 19, label="THING")]
            doc._.image = random_picture(tmp / f"m{i}.jpg", 10_000 + i)
            docs.append(doc)
        start = time.perf_counter()
        linked = list(nlp.pipe(docs, batch_size=32))
        pipe_s = time.perf_counter() - start
        assert all(d.ents[0].kb_id_ for d in linked)
        print(f"nlp.pipe: {args.docs / pipe_s:.1f} docs/s")
        nlp.to_disk(tmp / "pipeline")
        kb_dir = tmp / "pipeline" / "m3el_linker" / "kb"
        cache_bytes = sum(p.stat().st_size for p in (kb_dir.parent / "index").glob("*.npy"))
        kb_bytes = sum(p.stat().st_size for p in kb_dir.rglob("*") if p.is_file())
        image_bytes = sum(p.stat().st_size for p in (kb_dir / "images").iterdir())

    results = {
        **run_info(),
        "forward_32x32_s": round(forward_s, 4),
        "entities": args.entities,
        "entity_cache_build_s": round(cache_s, 2),
        "pipe_docs": args.docs,
        "pipe_docs_per_s": round(args.docs / pipe_s, 2),
        "cache_bytes_per_entity": round(cache_bytes / args.entities, 1),
        "kb_bytes_per_entity_with_images": round(kb_bytes / args.entities, 1),
        "kb_image_bytes_per_entity": round(image_bytes / args.entities, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
