"""KB-side linking cost against KB size: the paper's protocol (every
mention scored against the whole KB with the full model) vs the two-stage
path (top-K by the decomposable score, then the full score on those K).

    python benchmarks/speed.py [--sizes 1000 10000 100000]

Writes benchmarks/results/speed.json. Like with like, in one run: the same
mentions, the two-stage path at batch 1 (the paper protocol's batch) and at
batch 32, each timed once cold (the cache files' pages evicted with
posix_fadvise) and once warm; the paper protocol once, at batch 1. Entity
features are synthetic with the default backbone's shapes (40 text tokens, 49
image patches, hidden 96; 2,000 entities encoded, tiled to the KB size: the
timings do not depend on the values), in the exact (default) memory-mapped
cache. Mention encoding is excluded here (see end_to_end.py); agreement on
real entities is kb_scale.py's. Runs on CPU or GPU (``--device cuda``).
"""
import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import run_info  # noqa: E402
from spacy_m3el.pipeline import linking  # noqa: E402
from spacy_m3el.index.encoding import index_arrays  # noqa: E402
from spacy_m3el.index.entity_index import INDEX_FORMAT, EntityIndex  # noqa: E402
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
    arrays, layout = index_arrays(matcher, [block], max_queries=max_queries)
    meta = {"format": INDEX_FORMAT, "max_queries": max_queries, "retrieval_parts": layout}
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
def two_stage(matcher, mention, cache: EntityIndex, k: int) -> torch.Tensor:
    """Best entity per mention: exact top-k, then the rerank on the cache's
    rows (read from its memory map on CPU)."""
    return linking.two_stage(matcher, mention, cache, k=k).best_rows()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def evict(folder: Path) -> None:
    """Drop the cache files' pages from the page cache: the next read is cold."""
    for path in folder.glob("*.npy"):
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def scaling(sizes, k: int, device, paper_max: int, batches=(1, 32)) -> list:
    torch.manual_seed(0)
    matcher = M3ELMatcher(M3ELConfig(text_dim=TEXT_DIM, image_global_dim=IMAGE_DIM, image_token_dim=IMAGE_DIM)).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    block = synthetic_block(matcher, device, max(sizes))
    with torch.no_grad():
        mentions = matcher.mention_side(synthetic_items(max(batches), generator, device, matcher.config))
    rows = []
    for size in sizes:
        arrays, meta, _ = synthetic_cache_arrays(matcher, block, size, None)
        with tempfile.TemporaryDirectory() as tmp:
            cache = EntityIndex(memory_mapped(arrays, Path(tmp)) if device == "cpu" else arrays, meta)
            del arrays
            row = {"entities": size, "k": k, "cache_bytes_per_entity_fp16": cache.bytes_per_entity}
            for batch in batches:
                mention = {key: value[:batch] for key, value in mentions.items()}
                evict(Path(tmp))
                cold = timed(lambda: two_stage(matcher, mention, cache, k), device)
                warm = timed(lambda: two_stage(matcher, mention, cache, k), device)
                row[f"two_stage_batch{batch}"] = {"cold_s_per_mention": cold / batch,
                                                  "warm_s_per_mention": warm / batch}
            if size <= paper_max:
                entity = {key: tile(value, size) for key, value in block.items()}
                single = {key: value[:1] for key, value in mentions.items()}
                row["paper_batch1_s_per_mention"] = timed(lambda: paper_protocol(matcher, single, entity, device),
                                                          device)
                row["speedup_batch1_warm"] = (row["paper_batch1_s_per_mention"]
                                              / row["two_stage_batch1"]["warm_s_per_mention"])
                entity = None
            else:
                row["paper_batch1_s_per_mention"] = None  # not run: hours on this machine
            print(json.dumps(row), flush=True)
            rows.append(row)
            cache = None  # release the memory map before the folder goes
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--paper-max", type=int, default=100_000, help="largest KB for the paper protocol")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speed.json")
    args = parser.parse_args()
    result = {**run_info(args.device), "scaling": scaling(args.sizes, args.k, args.device, args.paper_max)}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
