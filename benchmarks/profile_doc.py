"""Where the time of one document goes, in each backbone runtime.

    python benchmarks/profile_doc.py   # -> results/profile_doc.json

Needs `spacy project run all` (training/clipart_mel/model-linker). Inputs:
the 264 demo test texts with their pictures, linked one at a time by the
linker (gold spans set, as an upstream NER would), bfloat16 (`auto`):

- ``breakdown_ms_per_doc``: per ``inference_runtime`` ("torch", "openvino"),
  cProfile's cumulative time of the parts of a cold call (feature and picture
  caches emptied before every doc), per doc; cProfile adds its own overhead,
  so read the shares, not the sum;
- ``towers_ms``: each tower alone, every torch thread, per runtime, one
  demo doc at a time (its text; its picture, decoded and cut to 224 x 224
  uint8 beforehand: the image tower's time includes the normalisation, in
  torch before the PyTorch tower, inside the graph of the OpenVINO one) and
  per item in batches of 32 docs, as ``nlp.pipe`` runs them; with the
  largest difference of its local features from the float32 PyTorch
  tower's, relative to their largest magnitude, and the lowest cosine of its
  global features to the float32 ones over the docs;
- ``towers_alone_bound_docs_per_s_batch32``: the docs per second of the two
  towers alone at batch 32 (one text per mention that the alias ruler finds
  in the raw texts, as ``demo_speed.py`` links them, one picture per doc):
  a bound that ``nlp.pipe`` cannot exceed on this machine.
"""
import cProfile
import pstats
import sys
import time
import warnings
from pathlib import Path

import spacy
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import run_info  # noqa: E402
from kb_scale import write  # noqa: E402

from spacy_m3el.data.images import DECODED_IMAGES, load_image  # noqa: E402
from spacy_m3el.data.readers import create_docbin_reader  # noqa: E402
from spacy_m3el.pipeline.linker import find_linker  # noqa: E402

PIPELINE = ROOT / "training" / "clipart_mel" / "model-linker"
DEMO = ROOT / "assets" / "clipart_mel"
#: (part, file suffix, function name) read from the profile.
PARTS = [("text tower", "minilm_efficientnet.py", "encode_text"),
         ("image tower", "minilm_efficientnet.py", "encode_pixels"),
         ("picture decoding and preprocessing", "encoders/cache.py", "_decoded"),
         ("mention side (matcher)", "model/m3el.py", "mention_side"),
         ("two-stage search and rerank", "pipeline/linking.py", "two_stage"),
         ("results and candidate scorer", "pipeline/results.py", "ranking_results"),
         ("whole call", "pipeline/linker.py", "predict")]


def profile_runtime(linker, docs, runtime: str) -> dict:
    linker.configure(inference_runtime=runtime)
    for doc in docs[:20]:
        linker(doc.copy())
    profile = cProfile.Profile()
    profile.enable()
    for doc in docs:
        linker.network.feature_cache.clear()
        DECODED_IMAGES.clear()
        linker(doc.copy())
    profile.disable()
    stats = pstats.Stats(profile).stats
    breakdown = {}
    for part, suffix, name in PARTS:
        total = sum(row[3] for (file, _, function), row in stats.items() if file.endswith(suffix) and function == name)
        breakdown[part] = round(1000 * total / len(docs), 2)
    return breakdown


def tower_inputs(encoder, docs):
    texts = [encoder.tokenize([doc.text]) for doc in docs]
    pictures = [encoder.image_pixels([load_image(doc._.image)])[0] for doc in docs if doc._.image]
    return texts, pictures


def towers_ms(encoder, docs) -> dict:
    texts, pictures = tower_inputs(encoder, docs)

    def run(runtime, dtype):
        autocast = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
        with torch.inference_mode(), autocast, encoder.inference_runtime_scope(runtime):
            text = [encoder.encode_text(t["input_ids"], t["attention_mask"]) for t in texts]
            image = [encoder.encode_pixels(pixels) for pixels in pictures]
        return text, image

    def per_doc_ms(runtime, dtype, which):
        autocast = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
        with torch.inference_mode(), autocast, encoder.inference_runtime_scope(runtime):
            if which == "text":
                calls = [lambda t=t: encoder.encode_text(t["input_ids"], t["attention_mask"]) for t in texts]
            else:
                calls = [lambda p=p: encoder.encode_pixels(p) for p in pictures]
            for call in calls[:10]:
                call()
            start = time.perf_counter()
            for call in calls:
                call()
            return 1000 * (time.perf_counter() - start) / len(calls)

    def largest_relative_difference(got, want):  # of the local features
        return max(float((a[1].float() - b[1].float()).abs().max() / b[1].float().abs().max())
                   for a, b in zip(got, want))

    def lowest_global_cosine(got, want):
        return min(float(torch.nn.functional.cosine_similarity(a[0].float(), b[0].float(), dim=-1).min())
                   for a, b in zip(got, want))

    def batched_ms(runtime, which, batch=32):  # per item, in batches as nlp.pipe runs them
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), \
                encoder.inference_runtime_scope(runtime):
            if which == "text":
                chunks = [encoder.tokenize([doc.text for doc in docs[i : i + batch]])
                          for i in range(0, len(docs), batch)]
                calls = [lambda t=t: encoder.encode_text(t["input_ids"], t["attention_mask"]) for t in chunks]
            else:
                chunks = [torch.cat(pictures[i : i + batch]) for i in range(0, len(pictures), batch)]
                calls = [lambda p=p: encoder.encode_pixels(p) for p in chunks]
            calls[0]()
            start = time.perf_counter()
            for call in calls:
                call()
            return 1000 * (time.perf_counter() - start) / (len(docs) if which == "text" else len(pictures))

    reference = run("torch", None)
    result = {}
    for runtime in ("torch", "openvino"):
        features = run(runtime, torch.bfloat16)
        result[runtime] = {
            "text_ms": round(per_doc_ms(runtime, torch.bfloat16, "text"), 2),
            "image_ms": round(per_doc_ms(runtime, torch.bfloat16, "image"), 2),
            "text_ms_per_item_batch32": round(batched_ms(runtime, "text"), 2),
            "image_ms_per_item_batch32": round(batched_ms(runtime, "image"), 2),
            "text_relative_difference_to_float32": round(largest_relative_difference(features[0], reference[0]), 4),
            "image_relative_difference_to_float32": round(largest_relative_difference(features[1], reference[1]), 4),
            "text_global_lowest_cosine_to_float32": round(lowest_global_cosine(features[0], reference[0]), 5),
            "image_global_lowest_cosine_to_float32": round(lowest_global_cosine(features[1], reference[1]), 5),
        }
    return result


def main() -> None:
    warnings.simplefilter("ignore")
    nlp = spacy.load(PIPELINE)
    linker = find_linker(nlp)
    docs = [eg.predicted for eg in create_docbin_reader(ROOT / "corpus" / "clipart_mel" / "test.spacy",
                                                         image_dir=DEMO)(nlp)]
    breakdown = {runtime: profile_runtime(linker, docs, runtime) for runtime in ("torch", "openvino")}
    linker.configure(inference_runtime="auto")
    towers = towers_ms(linker.network.encoder, docs)
    # The mentions that demo_speed.py links: those the pipeline's alias ruler finds in the raw texts.
    mentions = sum(len(doc.ents) for doc in nlp.pipe([doc.text for doc in docs], disable=[linker.name]))
    pictured = sum(1 for doc in docs if doc._.image)
    write("profile_doc.json", {
        **run_info(), "docs": len(docs),
        "inputs": "demo test texts with their pictures and gold spans, one doc at a time, caches emptied per doc",
        "breakdown_ms_per_doc": breakdown,
        "towers_ms": towers,
        "tower_speedup": {which: round(towers["torch"][f"{which}_ms"] / towers["openvino"][f"{which}_ms"], 2)
                          for which in ("text", "image")},
        # nlp.pipe cannot beat the towers alone: one text per mention, one picture per doc.
        "ruler_mentions_per_doc": round(mentions / len(docs), 3),
        "pictures_per_doc": round(pictured / len(docs), 3),
        "towers_alone_bound_docs_per_s_batch32": {
            runtime: round(1000 / (row["text_ms_per_item_batch32"] * mentions / len(docs)
                                   + row["image_ms_per_item_batch32"] * pictured / len(docs)), 1)
            for runtime, row in towers.items()},
    })
    print(breakdown, towers)


if __name__ == "__main__":
    main()
