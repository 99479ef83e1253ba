"""Large-KB benchmarks: entity cache build speed and memory, two-stage vs
exhaustive agreement on a KB of real entities, and top-K retrieval over a
million entities.

    python benchmarks/kb_scale.py build      # -> results/kb_build.json
    python benchmarks/kb_scale.py memory     # -> results/kb_build_memory.json
    python benchmarks/kb_scale.py agreement  # -> results/kb_agreement.json
    python benchmarks/kb_scale.py retrieval  # -> results/retrieval_1m.json (run agreement first)

Inputs (all built here, nothing downloaded):
- ``build`` and ``memory``: entities made from Debian's openclipart PNGs,
  each pasted on a noisy 500 x 400 gradient and saved as a JPEG (quality 90,
  about the size and entropy of a photo), with ``name [SEP] description``
  texts of at least 40 tokens. ``build`` times the in-memory float32 path
  (the linker's behaviour before streamed builds: serial decoding, the
  backbone's feature cache) against the streamed path (image worker
  processes, bfloat16 where the CPU runs it natively), on the same entities
  in one run, CPU time of the process and its workers; and the demo's test
  Hits@1 with each precision. ``memory`` runs a streamed build of
  ``--entities`` entities (cycling through the JPEGs, each entity decoded
  and encoded) in a child process, kills it with SIGKILL once a quarter of
  its shards are written, resumes it, and records both runs' peak RSS.
- ``agreement``: the demo KB (300 entities) plus every other distinct
  openclipart picture and every Adwaita and Tango icon (Debian packages
  openclipart-png, adwaita-icon-theme, tango-icon-theme) as distractor entities (same
  text layout as the demo: title, then keywords and category),
  and the demo's dev + test mentions. Per mention, the top-1 of the paper's
  exhaustive protocol (full score against every entity) against the
  two-stage top-1 (alias table + top-K by the decomposable score, reranked),
  with exact search and with the ANN index.
- ``retrieval``: 1,000,000 synthetic retrieval vectors (fp16, on disk,
  memory-mapped) spread around the agreement KB's real vectors (a point on
  the segment between two real vectors plus Gaussian noise of 0.3 per-dim
  std), queried with the real mentions' vectors; exact chunked scan vs the
  IVF-PQ index with exact rescoring, batch 1 and 32, cold (file pages
  evicted with posix_fadvise) and warm, recall@64 against the exact scan,
  and RAM per entity.
"""
import argparse
import functools
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy
import spacy
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from common import decoding_after_text, run_info  # noqa: E402
from spacy_m3el.pipeline import linking  # noqa: E402
from spacy_m3el.index.entity_index import RETRIEVAL  # noqa: E402
from spacy_m3el.kb.base import MultimodalKB  # noqa: E402
from spacy_m3el.pipeline.linker import find_linker  # noqa: E402
from spacy_m3el.encoders.cache import FeatureCache  # noqa: E402
from spacy_m3el.index.ann import AnnIndex, exact_top_k  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work"
PIPELINE = ROOT / "training" / "clipart_mel" / "model-best"
DEMO = ROOT / "assets" / "clipart_mel"
FILLER = ("It is a free clip art picture from the Open Clip Art Library, drawn as a vector graphic and "
          "shared for any use, often printed on cards, posters and school worksheets.")


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (image workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_run(function):
    """``function()``'s result and its wall and CPU seconds (this process and its reaped children)."""
    start_cpu, start = cpu_seconds(), time.perf_counter()
    result = function()
    return result, {"wall_s": round(time.perf_counter() - start, 2), "cpu_s": round(cpu_seconds() - start_cpu, 2)}


def rss_mb(kind: str = "VmRSS") -> float:
    """This process's resident memory in MB: all of it (VmRSS), anonymous
    memory only (RssAnon) or mapped file pages (RssFile, page cache)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{kind}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@functools.lru_cache(maxsize=1)
def openclipart_items() -> List[Dict[str, Any]]:
    """Every distinct openclipart PNG (up to 16 megapixels) with the title,
    description and keywords of its SVG (the file name when it has none)."""
    import hashlib

    from build_clipart_mel import PNG_ROOT, SVG_ROOT, clean, read_metadata
    from PIL import Image

    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # those are skipped below
    items, seen = [], set()
    for png in sorted(PNG_ROOT.rglob("*.png")):
        relative = png.relative_to(PNG_ROOT)
        try:
            with Image.open(png) as probe:
                if probe.width * probe.height > 16_000_000:
                    continue
        except (OSError, Image.DecompressionBombError):
            continue
        svg = SVG_ROOT / relative.with_suffix(".svg")
        meta = read_metadata(svg) if svg.is_file() else None
        title, _, keywords = meta if meta and meta[0] else (clean(png.stem), "", [])
        # The same picture filed twice under one title is one entity; under two titles, two.
        key = (hashlib.sha1(png.read_bytes()).hexdigest(), title.lower())
        if key in seen:
            continue
        seen.add(key)
        keywords = [k for k in dict.fromkeys(clean(k) for k in keywords) if len(k) > 2]
        items.append({"png": png, "folder": relative.parts[0], "title": title or clean(png.stem),
                      "keywords": keywords})
    return items


@functools.lru_cache(maxsize=1)
def icon_items() -> List[Dict[str, Any]]:
    """One entity per icon of each installed icon theme (Debian's
    adwaita-icon-theme and tango-icon-theme: about 1,850), with its largest
    PNG. Both themes draw many of the same names: homonyms with different
    pictures, as real KBs have."""
    largest: Dict[Tuple[str, str], Path] = {}
    for png in sorted(Path("/usr/share/icons").rglob("*.png")):
        key = (png.parts[4], png.stem)  # /usr/share/icons/<theme>/...
        if key not in largest or png.stat().st_size > largest[key].stat().st_size:
            largest[key] = png
    return [{"png": png, "folder": f"icons ({theme})", "title": name.replace("-", " "),
             "keywords": [word for word in name.split("-") if len(word) > 2]}
            for (theme, name), png in sorted(largest.items())]


def entity_description(item: Dict[str, Any]) -> str:
    keywords = ", ".join(item["keywords"][:6]) or item["title"]
    return f"Keywords: {keywords}. Category: {item['folder']}."


def photo_jpeg(png: Path, target: Path, seed: int) -> str:
    """The picture pasted on a noisy 500 x 400 gradient, saved as a JPEG."""
    from PIL import Image

    rng = numpy.random.default_rng(seed)
    low, high = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
    ramp = numpy.linspace(0, 1, 500)[None, :, None]
    canvas = low + (high - low) * ramp + rng.normal(0, 14, (400, 500, 3))
    image = Image.fromarray(numpy.clip(canvas, 0, 255).astype(numpy.uint8))
    with Image.open(png) as picture:
        picture = picture.convert("RGBA")
        picture.thumbnail((int(rng.integers(200, 380)), int(rng.integers(200, 340))))
        image.paste(picture, (int(rng.integers(0, 500 - picture.width)), int(rng.integers(0, 400 - picture.height))),
                    picture)
    image.save(target, quality=90)
    return str(target)


def photo_kb(nlp, count: int, pictures: int, folder: Path) -> MultimodalKB:
    """``count`` entities with 40+-token texts, cycling through ``pictures``
    photo-like JPEGs made from openclipart."""
    folder.mkdir(parents=True, exist_ok=True)
    items = openclipart_items()[:pictures]
    paths = []
    for i, item in enumerate(items):
        target = folder / f"photo{i:05d}.jpg"
        paths.append(str(target) if target.exists() else photo_jpeg(item["png"], target, seed=i))
    kb = MultimodalKB(nlp.vocab)
    for row in range(count):
        item = items[row % len(items)]
        name = item["title"] if row < len(items) else f"{item['title']} {row // len(items)}"
        kb.add_entity(f"E{row}", name=name, description=f"{entity_description(item)} {FILLER}",
                      images=[paths[row % len(items)]], freq=1)
    return kb


def write(name: str, data: Dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(data, indent=2) + "\n")
    print(f"-> {RESULTS / name}")


# ---------------------------------------------------------------- build
def demo_hits1(precision: str, runtime: str, *, saved_index: bool = False) -> Dict[str, float]:
    """The demo test split's Hits@1 and MRR, mentions encoded in ``precision``
    and ``runtime``, and the entity index too (or, with ``saved_index``, the
    pipeline's saved index as it was built)."""
    from spacy_m3el.evaluation.end_to_end import evaluate_pipeline
    from spacy_m3el.data.readers import MultimodalCorpus

    nlp = spacy.load(PIPELINE, config={"components": {"m3el_linker": {"inference_precision": precision,
                                                                       "inference_runtime": runtime}}})
    if not saved_index:
        find_linker(nlp).index_keeper.drop()
    examples = list(MultimodalCorpus(ROOT / "corpus" / "clipart_mel" / "test.spacy", image_dir=DEMO)(nlp))
    result = evaluate_pipeline(nlp, examples)
    return {"hits1": result["m3el_hits1"], "mrr": result["m3el_mrr"]}


def previous_image_tower(backbone):
    """The image tower as the linker ran it before this change (float32,
    NCHW memory layout, pixels normalised in torch), for the "before" row."""
    import copy

    tower = copy.deepcopy(backbone.image_model).to(memory_format=torch.contiguous_format)

    def encode_pixels(pixels: torch.Tensor):
        tokens = tower.extract_features(backbone.normalize_pixels(pixels).contiguous()).flatten(2).transpose(1, 2)
        return tokens.mean(dim=1), tokens

    return encode_pixels


def bench_build(args) -> None:
    nlp = spacy.load(PIPELINE)
    linker = find_linker(nlp)
    kb = photo_kb(nlp, args.entities, args.entities, WORK / "photos")
    linker.set_kb(lambda vocab: kb)
    keeper = linker.index_keeper
    rows = {}
    linker.configure(inference_precision="float32", inference_runtime="torch")
    linker.network.feature_cache.clear()
    backbone = linker.network.encoder
    backbone.encode_pixels = previous_image_tower(backbone)  # shadows the method for this row only
    beside_the_text_tower = FeatureCache.encode_texts_and_images
    FeatureCache.encode_texts_and_images = decoding_after_text  # serial decoding, as before
    start_cpu, start = cpu_seconds(), time.perf_counter()
    try:
        keeper.encoding.encode(kb, max_queries=None)
    finally:
        FeatureCache.encode_texts_and_images = beside_the_text_tower
        del backbone.encode_pixels
    rows["before"] = {"path": "as before streamed builds: in memory, serial decoding, feature cache, float32, "
                              "PyTorch, NCHW image tower",
                      "cpu_ms_per_entity": 1000 * (cpu_seconds() - start_cpu) / len(kb),
                      "wall_ms_per_entity": 1000 * (time.perf_counter() - start) / len(kb)}
    linker.configure(inference_precision="auto")
    processes = os.cpu_count()
    variants = {f"streamed_workers0_{runtime}": (1, 0, runtime, "0 image workers, all torch threads")
                for runtime in ("torch", "openvino")}
    variants.update({f"streamed_workers1_{runtime}": (1, 1, runtime, "1 image worker process (the default), "
                                                                       "all torch threads")
                     for runtime in ("torch", "openvino")})
    variants.update({f"streamed_processes{processes}_{runtime}": (
        processes, 0, runtime, f"build_processes {processes}, one torch thread each")
        for runtime in ("torch", "openvino")})
    for name, (processes, workers, runtime, what) in variants.items():
        linker.configure(build_processes=processes, image_workers=workers, inference_runtime=runtime)
        with tempfile.TemporaryDirectory() as folder:
            start_cpu, start = cpu_seconds(), time.perf_counter()
            keeper.build_streamed(kb, Path(folder) / "cache", progress=False, shard_size=256)
            rows[name] = {"path": f"streamed to disk, {what}, inference_precision auto, inference_runtime {runtime}",
                          "cpu_ms_per_entity": 1000 * (cpu_seconds() - start_cpu) / len(kb),
                          "wall_ms_per_entity": 1000 * (time.perf_counter() - start) / len(kb)}
        print(name, rows[name], flush=True)
    before = rows["before"]
    for row in rows.values():
        row["cpu_speedup"] = before["cpu_ms_per_entity"] / row["cpu_ms_per_entity"]
        row["wall_speedup"] = before["wall_ms_per_entity"] / row["wall_ms_per_entity"]
    accuracy = {f"{precision}, {runtime}": demo_hits1(precision, runtime)
                for precision, runtime in (("float32", "torch"), ("auto", "torch"), ("auto", "openvino"))}
    saved = json.loads((PIPELINE / "m3el_linker" / "index" / "meta.json").read_text())
    accuracy[f"auto, openvino, the saved index ({saved.get('encode_runtime', 'torch')} "
             f"{saved['encode_precision']})"] = demo_hits1("auto", "openvino", saved_index=True)
    write("kb_build.json", {**run_info(), "entities": len(kb), "inputs": "openclipart pictures on 500x400 noisy "
                            "gradients (JPEG q90), 40+-token texts", "autocast_dtype": str(
                                torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"),
                            "rows": rows, "demo_test": accuracy})
    print(json.dumps(rows, indent=1), json.dumps(accuracy))


# ---------------------------------------------------------------- memory
def child_build(args) -> None:
    nlp = spacy.load(PIPELINE)
    linker = find_linker(nlp)
    kb = photo_kb(nlp, args.entities, args.pictures, WORK / "photos")
    linker.set_kb(lambda vocab: kb)
    linker.configure(build_processes=args.processes)
    start_cpu, start = cpu_seconds(), time.perf_counter()
    cache = linker.index_keeper.build_streamed(kb, Path(args.folder), progress=True,
                                                 shard_size=args.shard_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"entities": len(cache), "peak_rss_mb": peak, "cpu_s": cpu_seconds() - start_cpu,
                      "wall_s": time.perf_counter() - start}), flush=True)


def tree_pss_mb(root: int) -> float:
    """Proportional set size of a process and all its descendants (shared
    pages split between the processes that map them), in MB."""
    total = 0
    for pid in [root] + _descendants(root):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def watch(command: List[str], folder: Path, stop_at_shards: int) -> Dict[str, Any]:
    """Run a build, sampling its process tree's memory every second; kill it
    (SIGKILL) once ``stop_at_shards`` shards are written (0: never)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    start, peak, killed = time.perf_counter(), 0.0, False
    while process.poll() is None:
        time.sleep(1)
        peak = max(peak, tree_pss_mb(process.pid))
        if stop_at_shards and len(list((folder / "shards").glob("*.npz"))) >= stop_at_shards:
            for pid in sorted(_descendants(process.pid), reverse=True):
                os.kill(pid, signal.SIGKILL)
            process.send_signal(signal.SIGKILL)
            killed = True
            break
    output = process.communicate()[0]
    result = {"peak_tree_pss_mb": peak, "wall_s": time.perf_counter() - start, "killed": killed}
    if not killed:
        if process.returncode:
            raise RuntimeError(f"the build failed (exit code {process.returncode})")
        result.update(json.loads(output.strip().splitlines()[-1]))
    return result


def _descendants(root: int) -> List[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == root:
                pid = int(stat.parent.name)
                found += [pid] + _descendants(pid)
        except (OSError, IndexError, ValueError):
            continue
    return found


def bench_memory(args) -> None:
    folder = WORK / f"cache{args.entities}"
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    command = [sys.executable, __file__, "_child", "--entities", str(args.entities), "--pictures",
               str(args.pictures), "--folder", str(folder), "--shard-size", str(args.shard_size),
               "--processes", str(args.processes)]
    shards = -(-args.entities // args.shard_size)
    killed = watch(command, folder, stop_at_shards=max(1, shards // 4))
    killed["shards_kept"] = len(list((folder / "shards").glob("*.npz")))
    killed["shards_total"] = shards
    resumed = watch(command, folder, stop_at_shards=0)
    write("kb_build_memory.json", {
        **run_info(), "entities": args.entities, "pictures": args.pictures, "shard_size": args.shard_size,
        "build_processes": args.processes,
        "inputs": "openclipart pictures on 500x400 noisy gradients (JPEG q90) cycled over the entities, "
                  "40+-token texts; every entity decoded and encoded",
        "memory": "peak over 1 s samples of the summed PSS of the build's process tree (the encoding processes "
                  "included; shared pages split between them); peak_rss_mb: the main process alone",
        "killed_run": killed, "resumed_run": resumed,
        "cache_bytes_on_disk": sum(f.stat().st_size for f in folder.glob("*.npy"))})


# ---------------------------------------------------------------- agreement
def agreement_kb(nlp, demo_kb: MultimodalKB) -> MultimodalKB:
    """The demo KB, then every other openclipart picture as a distractor."""
    kb = MultimodalKB(nlp.vocab)
    names = set()
    for row in range(len(demo_kb)):
        kb.add_entity(demo_kb.entity_id(row), name=demo_kb.name(row), description=demo_kb.description(row),
                      images=demo_kb.images(row), freq=1)
        names.add(demo_kb.name(row).lower())
    for alias, entities, priors in demo_kb.alias_table():
        kb.add_alias(alias, entities, priors)
    for i, item in enumerate(openclipart_items() + icon_items()):
        if item["title"].lower() in names:
            continue
        kb.add_entity(f"D{i:05d}", name=item["title"], description=entity_description(item),
                      images=[str(item["png"])], freq=1)
    return kb


def bench_agreement(args) -> None:
    from spacy_m3el.data.readers import MultimodalCorpus

    nlp = spacy.load(PIPELINE)
    linker = find_linker(nlp)
    kb = agreement_kb(nlp, linker.kb)
    linker.set_kb(lambda vocab: kb)
    folder, timing = WORK / "kb8k_cache", WORK / "kb8k_build.json"
    if not timing.exists():  # else the finished build in the folder is loaded
        start_cpu, start = cpu_seconds(), time.perf_counter()
    cache = linker.index_keeper.build_streamed(kb, folder, progress=True)  # end_to_end.py reuses it
    if not timing.exists():
        timing.write_text(json.dumps({"cpu_ms_per_entity": 1000 * (cpu_seconds() - start_cpu) / len(kb),
                                      "wall_s": time.perf_counter() - start}))
    build = json.loads(timing.read_text())
    linker.index_keeper.adopt(kb, cache)
    spans = []
    for split in ("dev", "test"):
        for eg in MultimodalCorpus(ROOT / "corpus" / "clipart_mel" / f"{split}.spacy", image_dir=DEMO)(nlp):
            spans.extend(ent for ent in eg.reference.ents if ent.kb_id_ in kb)
    matcher, k = linker.network.matcher, linker.settings.n_candidates
    gold = torch.tensor([kb.row(span.kb_id_) for span in spans])
    # The ANN rows: the default nprobe, then 2x and 4x (same index, more lists visited).
    nprobes = [linker.settings.ann_nprobe * factor for factor in (1, 2, 4)]
    ann_names = {nprobe: "two_stage_ann" if nprobe == nprobes[0] else f"two_stage_ann_nprobe{nprobe}"
                 for nprobe in nprobes}
    queries, tops = [], {"exhaustive": [], "two_stage_exact": [], **{name: [] for name in ann_names.values()}}
    ann = AnnIndex.build(cache.arrays[RETRIEVAL], nprobe=linker.settings.ann_nprobe,
                         shortlist=linker.settings.ann_shortlist, recall_k=k)
    for start in range(0, len(spans), 32):
        batch = spans[start : start + 32]
        with torch.no_grad():
            mention = linker.mentions.encode(batch)
        query = matcher.mention_retrieval_vectors(mention)
        queries.append(query)
        alias = [[row for row, _ in kb.alias_rows(span.text)] for span in batch]
        tops["exhaustive"].append(linking.exhaustive_scores(matcher, mention, cache).argmax(dim=1))
        cache.use_ann = False
        tops["two_stage_exact"].append(linking.two_stage(matcher, mention, cache, k=k, alias_rows=alias).best_rows())
        cache.ann, cache.use_ann = ann, True
        for nprobe, name in ann_names.items():
            ann.nprobe = nprobe
            tops[name].append(linking.two_stage(matcher, mention, cache, k=k, alias_rows=alias).best_rows())
        ann.nprobe, cache.use_ann = nprobes[0], False
    top = {name: torch.cat(rows) for name, rows in tops.items()}
    queries = torch.cat(queries).detach()
    recall_by_nprobe = {}
    for nprobe in nprobes:
        ann.nprobe = nprobe
        recall_by_nprobe[nprobe] = ann.recall(cache.arrays[RETRIEVAL], queries, k)
    ann.nprobe, ann.meta["recall"] = nprobes[0], recall_by_nprobe[nprobes[0]]
    WORK.mkdir(parents=True, exist_ok=True)
    numpy.save(WORK / "kb8k_retrieval.npy", numpy.asarray(cache.arrays[RETRIEVAL]))
    numpy.save(WORK / "kb8k_queries.npy", queries.numpy().astype(numpy.float32))
    result = {
        **run_info(), "entities": len(kb), "demo_entities": 300, "mentions": len(spans), "k": k,
        "inputs": "demo KB + every other distinct openclipart picture + every Adwaita and Tango icon (real "
                  "images and names); demo dev+test mentions with a KB entity",
        "build": build, "ann": {"factory": ann.factory, "recall": ann.meta["recall"],
                                "recall_by_nprobe": {str(n): recall_by_nprobe[n]["recall"] for n in nprobes}},
        "hits1": {name: float((rows == gold).float().mean()) for name, rows in top.items()},
        "agreement_with_exhaustive": {name: float((rows == top["exhaustive"]).float().mean())
                                      for name, rows in top.items() if name != "exhaustive"},
    }
    write("kb_agreement.json", result)
    print(json.dumps({key: result[key] for key in ("hits1", "agreement_with_exhaustive", "ann")}, indent=1))


# ---------------------------------------------------------------- retrieval
def synthetic_matrix(path: Path, real: numpy.ndarray, count: int, seed: int = 0) -> numpy.ndarray:
    """``count`` fp16 rows spread around the real ones, written in chunks."""
    rng = numpy.random.default_rng(seed)
    real = real.astype(numpy.float32)
    spread = real.std(axis=0, keepdims=True)
    out = numpy.lib.format.open_memmap(path, mode="w+", dtype=numpy.float16, shape=(count, real.shape[1]))
    for start in range(0, count, 65536):
        size = min(65536, count - start)
        a, b = real[rng.integers(0, len(real), size)], real[rng.integers(0, len(real), size)]
        mix = rng.random((size, 1), dtype=numpy.float32)
        out[start : start + size] = a + mix * (b - a) + 0.3 * spread * rng.standard_normal(
            (size, real.shape[1]), dtype=numpy.float32)
    out.flush()
    del out
    return numpy.load(path, mmap_mode="r")


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (a cold read next time)."""
    with open(path, "rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def timed(search, queries: torch.Tensor, batch: int, limit: int) -> Dict[str, float]:
    start_cpu, start, done = time.process_time(), time.perf_counter(), 0
    for first in range(0, min(limit, len(queries)), batch):
        search(queries[first : first + batch])
        done += len(queries[first : first + batch])
    return {"ms_per_mention": 1000 * (time.perf_counter() - start) / done,
            "cpu_ms_per_mention": 1000 * (time.process_time() - start_cpu) / done, "mentions": done}


def bench_retrieval(args) -> None:
    real = numpy.load(WORK / "kb8k_retrieval.npy")
    queries = torch.from_numpy(numpy.load(WORK / "kb8k_queries.npy"))
    path = WORK / f"synthetic{args.entities}.npy"
    if path.exists() and numpy.load(path, mmap_mode="r").shape[0] == args.entities:
        matrix = numpy.load(path, mmap_mode="r")
    else:
        matrix = synthetic_matrix(path, real, args.entities)
    k = 64
    rss_start = rss_mb()
    start = time.perf_counter()
    exact = torch.cat([exact_top_k(matrix, queries[i : i + 64], k)[1] for i in range(0, len(queries), 64)])
    ground_truth_s = time.perf_counter() - start
    rows: Dict[str, Any] = {}
    evict(path)
    rows["exact_batch32_cold"] = timed(lambda q: exact_top_k(matrix, q, k), queries, 32, 32)
    rows["exact_batch32_warm"] = timed(lambda q: exact_top_k(matrix, q, k), queries, 32, 64)
    rows["exact_batch1_warm"] = timed(lambda q: exact_top_k(matrix, q, k), queries, 1, 4)
    start = time.perf_counter()
    ann = AnnIndex.build(matrix, factory=args.factory, progress=True, queries=queries[:256], recall_k=k)
    build_s = time.perf_counter() - start
    index_file = WORK / "synthetic.faiss"
    import faiss

    faiss.write_index(ann.index, str(index_file))
    sweep = []
    for nprobe in (16, 32, 64):
        for shortlist in (256, 512):
            ann.nprobe, ann.shortlist = nprobe, shortlist
            found = ann.search(matrix, queries, k)
            recall = float(numpy.mean([len(set(e) & set(f)) / k for e, f in zip(exact.tolist(), found.tolist())]))
            evict(path)
            cold = timed(lambda q: ann.search(matrix, q, k), queries, 32, 32)
            sweep.append({"nprobe": nprobe, "shortlist": shortlist, f"recall@{k}": recall,
                          "batch32_cold": cold,
                          "batch32_warm": timed(lambda q: ann.search(matrix, q, k), queries, 32, len(queries)),
                          "batch1_warm": timed(lambda q: ann.search(matrix, q, k), queries, 1, 256)})
            print(sweep[-1], flush=True)
    rss_end = rss_mb()
    child = subprocess.run([sys.executable, __file__, "_ann_rss", "--folder", str(WORK), "--entities",
                            str(args.entities)], check=True, capture_output=True, text=True)
    ann_only = json.loads(child.stdout.strip().splitlines()[-1])
    write("retrieval_1m.json", {
        **run_info(), "entities": args.entities, "dim": int(matrix.shape[1]), "queries": len(queries), "k": k,
        "inputs": "synthetic fp16 vectors around the 8k-entity agreement KB's real retrieval vectors (see the "
                  "script's docstring); queries: the real dev+test mentions' retrieval vectors",
        "exact_ground_truth_s": ground_truth_s, "exact": rows,
        "ann": {"factory": ann.factory, "build_s": build_s, "index_bytes": ann.bytes_in_ram(),
                "index_bytes_per_entity": ann.bytes_in_ram() / args.entities,
                "index_file_bytes": index_file.stat().st_size, "sweep": sweep},
        "retrieval_matrix_bytes_per_entity_on_disk": int(matrix.shape[1]) * 2,
        "ann_only_rss": ann_only,
        "rss_growth_mb": rss_end - rss_start,
        "rss_growth_bytes_per_entity": (rss_end - rss_start) * 2**20 / args.entities,
    })


def ann_rss(args) -> None:
    """In a fresh process: RSS growth from loading the saved index and the
    memory map and answering every query with the default search settings."""
    import faiss

    from spacy_m3el.pipeline.settings import LinkerSettings

    folder = Path(args.folder)
    queries = torch.from_numpy(numpy.load(folder / "kb8k_queries.npy"))
    settings = LinkerSettings()
    before = {kind: rss_mb(kind) for kind in ("VmRSS", "RssAnon", "RssFile")}
    matrix = numpy.load(folder / f"synthetic{args.entities}.npy", mmap_mode="r")
    ann = AnnIndex(faiss.read_index(str(folder / "synthetic.faiss")), {"factory": "saved", "nprobe": settings.ann_nprobe,
                                                                       "shortlist": settings.ann_shortlist})
    for first in range(0, len(queries), 32):
        ann.search(matrix, queries[first : first + 32], 64)
    growth = {kind: rss_mb(kind) - value for kind, value in before.items()}
    print(json.dumps({"rss_growth_mb": growth["VmRSS"], "rss_growth_bytes_per_entity": growth["VmRSS"] * 2**20 / args.entities,
                      "anon_growth_bytes_per_entity": growth["RssAnon"] * 2**20 / args.entities,
                      "file_pages_growth_bytes_per_entity": growth["RssFile"] * 2**20 / args.entities,
                      "nprobe": ann.nprobe, "shortlist": ann.shortlist, "queries": len(queries)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["build", "memory", "agreement", "retrieval", "_child", "_ann_rss"])
    parser.add_argument("--entities", type=int, default=None)
    parser.add_argument("--pictures", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--folder", default=None)
    parser.add_argument("--processes", type=int, default=os.cpu_count(), help="build_processes (memory)")
    parser.add_argument("--factory", default=None, help="faiss index for `retrieval` (default: sized to the KB)")
    args = parser.parse_args()
    defaults = {"build": 2048, "memory": 100_000, "retrieval": 1_000_000, "_child": 1000, "agreement": 0,
                "_ann_rss": 1_000_000}
    args.entities = args.entities or defaults[args.what]
    {"build": bench_build, "memory": bench_memory, "agreement": bench_agreement, "retrieval": bench_retrieval,
     "_child": child_build, "_ann_rss": ann_rss}[args.what](args)


if __name__ == "__main__":
    main()
