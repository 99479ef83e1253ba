"""Linking cost against KB size: the paper's protocol (every mention scored
against the whole KB with the full model) vs the two-stage path (retrieve
top-K by the decomposable score, rerank with the full score), plus Hits@1
agreement between them on Clipart-MEL and end-to-end ``nlp.pipe`` docs/s.

    python benchmarks/speed.py [--sizes 1000 10000 100000 1000000]

Writes benchmarks/results/speed.json. Large KBs use synthetic entity features
with the real shapes of the default backbone (40 text tokens, 49 image
patches, hidden 96): timings do not depend on the values. The two-stage path
reads its rerank rows from a memory-mapped cache on disk, as a saved pipeline
does, with G2L queries pooled as the linker does (``--max-cached-queries``);
the Clipart-MEL check compares several cache settings against the exact
exhaustive ranking. Runs on CPU or GPU (``--device cuda``).
"""
import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy
import spacy
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import clip_linker_config, random_picture, run_info, save_vit_b32  # noqa: E402
from spacy_m3el import linking  # noqa: E402
from spacy_m3el.entity_cache import EntityCache, build_cache_arrays  # noqa: E402
from spacy_m3el.model import EncodedItems, M3ELConfig, M3ELMatcher  # noqa: E402

TEXT_DIM, IMAGE_DIM, TEXT_TOKENS, PATCHES = 384, 1280, 40, 49  # the default backbone's
PAPER_CHUNK = 6000  # the published code moves entity features in chunks of 6,000
BLOCK = 2000  # synthetic entities really encoded; larger KBs tile them


def synthetic_items(n: int, generator: torch.Generator, device, config: M3ELConfig) -> EncodedItems:
    """Encoder outputs of the right widths (40 text tokens, 49 patches)."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    return EncodedItems(
        text_global=randn(n, config.text_dim),
        text_tokens=randn(n, TEXT_TOKENS, config.text_dim),
        text_mask=torch.ones(n, TEXT_TOKENS, dtype=torch.bool, device=device),
        image_global=randn(n, config.image_global_dim),
        image_tokens=randn(n, PATCHES, config.image_token_dim),
        image_mask=torch.ones(n, dtype=torch.bool, device=device),
    )


def synthetic_block(matcher, device, size: int) -> dict:
    """Entity side of min(BLOCK, size) synthetic entities."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return matcher.entity_side(synthetic_items(min(BLOCK, size), generator, device, matcher.config))


def tile(value, size: int):
    """Repeat rows (torch or numpy) up to ``size`` rows."""
    repeats = -(-size // value.shape[0])
    if isinstance(value, numpy.ndarray):
        return numpy.concatenate([value] * repeats, axis=0)[:size]
    return value.repeat((repeats,) + (1,) * (value.dim() - 1))[:size].contiguous()


def synthetic_cache_arrays(matcher, block: dict, size: int, max_queries):
    """Cache arrays of ``size`` entities (the block's, tiled) and their meta;
    also the seconds spent pooling the block's queries, per entity."""
    start = time.perf_counter()
    arrays, meta = build_cache_arrays(matcher, [block], max_queries=max_queries)
    build_s = (time.perf_counter() - start) / len(block["has_image"])
    return {name: tile(array, size) for name, array in arrays.items()}, meta, build_s


def memory_mapped(arrays: dict, folder: Path) -> dict:
    """Write the arrays as .npy and map them back, as a saved KB is loaded."""
    mapped = {}
    for name, array in arrays.items():
        numpy.save(folder / f"{name}.npy", array, allow_pickle=False)
        mapped[name] = numpy.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
    return mapped


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def paper_protocol(matcher, mention, entity, device) -> torch.Tensor:
    """Full scores of the mentions against every entity, chunk by chunk."""
    size = entity["text_global"].shape[0]
    chunks = []
    for start in range(0, size, PAPER_CHUNK):
        part = {k: v[start : start + PAPER_CHUNK] for k, v in entity.items()}
        chunks.append(matcher.scores(mention, part)["score"])
    return torch.cat(chunks, dim=1)


@torch.no_grad()
def two_stage(matcher, mention, cache: EntityCache, k: int, retrieval=None) -> torch.Tensor:
    """Best entity per mention: exact top-k by the retrieval vectors, then the
    rerank on the cache's rows (read from its memory map on CPU).

    ``retrieval`` may hold more rows than ``cache`` (the 1M-entity run keeps
    the rerank features of 100k entities and maps candidate rows onto them):
    the rerank gathers K rows either way.
    """
    if retrieval is None:
        return linking.two_stage(matcher, mention, cache, k=k).best_rows()
    query = matcher.mention_retrieval_vectors(mention)
    candidates = (query @ retrieval.T).topk(min(k, retrieval.shape[0]), dim=1).indices
    return linking.rerank(matcher, mention, cache, (candidates % len(cache)).tolist()).best_rows()


def time_call(fn, device, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def scaling(sizes, k: int, device, paper_max: int, max_queries, table_max: int = 100_000) -> list:
    torch.manual_seed(0)
    matcher = M3ELMatcher(M3ELConfig(text_dim=TEXT_DIM, image_global_dim=IMAGE_DIM, image_token_dim=IMAGE_DIM)).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    block = synthetic_block(matcher, device, max(sizes))
    exact_bytes = EntityCache(*build_cache_arrays(matcher, [block], max_queries=None)).bytes_per_entity
    rows = []
    for size in sizes:
        table = min(size, table_max)
        arrays, meta, pool_s = synthetic_cache_arrays(matcher, block, table, max_queries)
        with tempfile.TemporaryDirectory() as tmp:
            cache = EntityCache(memory_mapped(arrays, Path(tmp)) if device == "cpu" else arrays, meta)
            del arrays
            retrieval = tile(cache.retrieval_matrix(torch.device(device)), size) if size > table else None
            batch = 8
            with torch.no_grad():
                mention = matcher.mention_side(synthetic_items(batch, generator, device, matcher.config))
            row = {"entities": size, "k": k, "mentions_per_batch": batch, "rerank_table_rows": table,
                   "max_cached_queries": max_queries}
            two = time_call(lambda: two_stage(matcher, mention, cache, k, retrieval), device)
            row["two_stage_s_per_mention"] = two / batch
            if size <= paper_max:
                entity = {key: tile(value, size) for key, value in block.items()}
                paper_batch = 1 if size >= 50_000 else batch
                single = {kk: v[:paper_batch] for kk, v in mention.items()}
                paper = time_call(lambda: paper_protocol(matcher, single, entity, device), device,
                                  repeats=1 if size >= 50_000 else 2)
                row["paper_s_per_mention"] = paper / paper_batch
                row["speedup"] = row["paper_s_per_mention"] / row["two_stage_s_per_mention"]
                # Tiled synthetic KBs hold exact duplicates, so compare the
                # exact score of the chosen entity with the best exact score
                # (ties between copies are the same answer), not row ids.
                exhaustive = paper_protocol(matcher, single, entity, device)
                fast = two_stage(matcher, single, cache, k)
                best = exhaustive.max(dim=1).values
                chosen = exhaustive.gather(1, fast.unsqueeze(1)).squeeze(1)
                row["agreement_synthetic"] = float(torch.isclose(chosen, best, rtol=1e-4, atol=1e-4).float().mean())
                row["agreement_mentions"] = paper_batch
                entity = None
            else:
                row["paper_s_per_mention"] = None  # not run: hours on this machine
            row["cache_bytes_per_entity_fp16"] = cache.bytes_per_entity
            row["cache_bytes_per_entity_fp16_all_queries"] = exact_bytes
            row["query_pooling_s_per_entity"] = pool_s
            print(json.dumps(row), flush=True)
            rows.append(row)
            cache = retrieval = None  # release the memory map before the folder goes
    return rows


@torch.no_grad()
def agreement_on_demo(pipeline: Path, test_corpus: Path, data: Path, ks, settings) -> dict:
    """Exhaustive ranking with the exact (training) score vs dense two-stage
    on a trained pipeline, for entity caches built with each of ``settings``
    (values of max_cached_queries; None = every query, exact)."""
    from spacy_m3el.readers import MultimodalCorpus

    nlp = spacy.load(pipeline)
    linker = nlp.get_pipe("m3el_linker")
    matcher = linker.network.matcher
    examples = list(MultimodalCorpus(test_corpus, image_dir=data)(nlp))
    spans = [eg.predicted.ents[0] for eg in examples]
    gold = [eg.reference.ents[0].kb_id_ for eg in examples]

    def hits1(rows) -> float:
        return float(numpy.mean([linker.kb.entity_id(int(i)) == g for i, g in zip(rows, gold)]))

    mention = linker.encode_mentions(spans)
    linker.settings.max_cached_queries = None
    linker.build_entity_cache()
    start = time.perf_counter()
    full = linking.exhaustive_scores(matcher, mention, linker.entity_cache).argmax(dim=1)
    out = {"mentions": len(spans), "entities": len(linker.kb),
           "exhaustive_s_per_mention": (time.perf_counter() - start) / len(spans),
           "exhaustive_hits1": hits1(full), "caches": []}
    for max_queries in settings:
        linker.settings.max_cached_queries = max_queries
        linker.build_entity_cache()
        cache = linker.entity_cache
        result = {"max_cached_queries": max_queries, "bytes_per_entity": cache.bytes_per_entity}
        for k in ks:
            start = time.perf_counter()
            fast = two_stage(matcher, mention, cache, k)
            result[f"k{k}"] = {
                "agreement": float((fast == full).float().mean()),
                "hits1": hits1(fast),
                "s_per_mention": (time.perf_counter() - start) / len(spans),
            }
        out["caches"].append(result)
    return out


def pipe_throughput(entities: int, docs: int, device, backbone: str, max_cached_queries=None) -> dict:
    """nlp.pipe docs/s with a real backbone encoding every mention (text +
    image, decoding included) against a KB of ``entities`` whose cache is
    synthetic: end to end, mention encoding + retrieval + rerank.

    ``backbone`` is "default" (MiniLM + EfficientNet-Lite0, shipped weights)
    or "clip-random" (CLIP ViT-B/32 shapes, random weights: the paper's
    backbone cost without downloading it). ``max_cached_queries``: the
    linker's setting (None: the exact cache, the default)."""
    from spacy_m3el import MultimodalKB

    nlp = spacy.blank("en")
    kb = MultimodalKB(nlp.vocab)
    for i in range(entities):
        kb.add_entity(f"E{i}", name=f"entity {i}", description="synthetic")
    config = {}
    if backbone == "clip-random":
        config = clip_linker_config(save_vit_b32(Path(tempfile.mkdtemp()) / "clip"), frozen=True)
    linker = nlp.add_pipe("m3el_linker", config={**config, "max_cached_queries": max_cached_queries})
    linker.set_kb(lambda vocab: kb)
    linker.network.to(device)  # the linker follows its weights' device
    matcher = linker.network.matcher
    arrays, meta, _ = synthetic_cache_arrays(matcher, synthetic_block(matcher, device, entities), entities,
                                             linker.settings.max_cached_queries)
    kb.set_entity_cache(arrays, {**meta, "fingerprint": linker.network.fingerprint()})
    del arrays
    with tempfile.TemporaryDirectory() as tmp:
        batch = []
        for i in range(docs):
            doc = nlp.make_doc(f"Yesterday the entity {i} was seen near the harbor.")
            doc.ents = [doc.char_span(14, 20, label="THING")]
            doc._.image = random_picture(Path(tmp) / f"{i}.jpg", i, size=(200, 160))
            batch.append(doc)
        list(nlp.pipe([d.copy() for d in batch[:8]]))  # load the cache, warm up
        if linker.network.feature_cache is not None:
            # Frozen-backbone features are shared by every pipeline of the process: start cold,
            # so each measurement encodes every timed mention.
            linker.network.feature_cache.clear()
        sync(device)
        start = time.perf_counter()
        linked = list(nlp.pipe(batch, batch_size=32))
        sync(device)
        seconds = time.perf_counter() - start
    assert all(d.ents[0].kb_id_ for d in linked)
    return {"entities": entities, "docs": docs, "docs_per_s": docs / seconds, "device": str(device),
            "backbone": backbone, "s_per_mention": seconds / docs, "max_cached_queries": max_cached_queries,
            "note": f"mention encoding real ({backbone} backbone), entity cache synthetic"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--paper-max", type=int, default=100_000, help="largest KB for the paper protocol")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-cached-queries", type=int, default=12,
                        help="G2L queries per modality kept in the synthetic caches (0 = all)")
    parser.add_argument("--pipeline", type=Path, default=ROOT / "training" / "clipart_mel" / "model-best")
    parser.add_argument("--data", type=Path, default=ROOT / "assets" / "clipart_mel")
    parser.add_argument("--test-corpus", type=Path, default=ROOT / "corpus" / "clipart_mel" / "test.spacy")
    parser.add_argument("--pipe-entities", type=int, default=100_000)
    parser.add_argument("--pipe-docs", type=int, default=200)
    parser.add_argument("--pipe-backbone", choices=["default", "clip-random"], default="default")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speed.json")
    args = parser.parse_args()
    result = {
        **run_info(args.device),
        "scaling": scaling(args.sizes, args.k, args.device, args.paper_max, args.max_cached_queries or None),
    }
    if args.pipeline.exists() and args.test_corpus.exists():
        result["agreement_clipart_mel"] = agreement_on_demo(
            args.pipeline, args.test_corpus, args.data, ks=(4, 8, 16, 64), settings=(None, 16, 12, 8, 4))
        print(json.dumps(result["agreement_clipart_mel"]), flush=True)
    else:
        print(f"No trained pipeline at {args.pipeline} or no {args.test_corpus}: "
              "run `spacy project run all` first for the agreement check")
    if args.pipe_docs:
        # Same docs, same KB, one run: the exact cache (the default) and the pooled one.
        result["pipe_throughput"] = pipe_throughput(args.pipe_entities, args.pipe_docs, args.device, args.pipe_backbone)
        print(json.dumps(result["pipe_throughput"]), flush=True)
        result["pipe_throughput_pooled"] = pipe_throughput(args.pipe_entities, args.pipe_docs, args.device,
                                                           args.pipe_backbone, max_cached_queries=12)
        print(json.dumps(result["pipe_throughput_pooled"]), flush=True)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
