"""Linking speed of the packaged demo pipeline on the demo test texts with
their pictures: one doc at a time (``nlp(doc)``) and ``nlp.pipe`` (batch
32), the frozen backbone in PyTorch (the route before) against OpenVINO
(``inference_runtime``), in one run.

    python benchmarks/demo_speed.py   # -> results/demo_speed.json

Needs `spacy project run all` (training/clipart_mel/model-linker: the alias
ruler and the linker, as packaged). Inputs: the demo test split's texts
(264 docs), each with its mention picture (the demo's own PNGs, decoded in
the timed run); mentions found by the alias ruler from the raw text, as a
user of the package runs it. Warm-up: 32 docs of the train split (never
timed); the backbone's feature cache and the decoded-picture cache are
emptied before every timed pass, so no timed doc was seen before. Rows, each
timed three times (the median is reported) on the same docs:

- ``torch``: ``inference_runtime = "torch"``: the image tower as a frozen
  bfloat16 TorchScript graph, the text tower under autocast with its Linear
  weights in bfloat16, torch's threads throughout;
- ``openvino``: both towers compiled by OpenVINO (bfloat16), and torch's own
  ops on one thread while a call links a few mentions;
- ``openvino_all_threads`` (one doc at a time only): the same towers, torch's
  own ops on every thread (``FEW_MENTIONS`` = 0), to measure that choice;
- ``openvino_decoding_after_text`` (``nlp.pipe`` only: a call with one
  picture to decode always does so): the same towers, but a call's pictures
  decoded after its texts are encoded, as before, not on a thread beside the
  text tower, to measure that choice.

Precision: the pipeline's ``inference_precision`` ("auto": bfloat16 on CPUs
that run it natively, as here). CPU time is this process's. The two routes
round differently (both bfloat16, different kernels): ``same_links`` is the
share of docs whose links agree; the Hits@1 of each route on the gold
mentions comes from ``kb_scale.py build`` (``demo_test``).
"""
import statistics
import sys
import time
from pathlib import Path

import spacy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import decoding_after_text, run_info  # noqa: E402
from kb_scale import cpu_seconds, write  # noqa: E402

from spacy_m3el.data.images import DECODED_IMAGES  # noqa: E402
from spacy_m3el.data.readers import MultimodalCorpus  # noqa: E402
from spacy_m3el.encoders.cache import FeatureCache  # noqa: E402
from spacy_m3el.extensions import make_doc  # noqa: E402
from spacy_m3el.pipeline import architecture  # noqa: E402
from spacy_m3el.pipeline.linker import find_linker  # noqa: E402

PIPELINE = ROOT / "training" / "clipart_mel" / "model-linker"
DEMO = ROOT / "assets" / "clipart_mel"


def raw_docs(nlp, split: str):
    """The split's texts as new docs with their mention picture (no spans: the ruler finds them)."""
    return [make_doc(nlp, eg.reference.text, eg.reference._.image)
            for eg in MultimodalCorpus(ROOT / "corpus" / "clipart_mel" / f"{split}.spacy", image_dir=DEMO)(nlp)]


def timed(nlp, linker, docs, how: str):
    linker.network.feature_cache.clear()
    DECODED_IMAGES.clear()
    copies = [doc.copy() for doc in docs]
    start_cpu, start = cpu_seconds(), time.perf_counter()
    if how == "batch1":
        linked = [nlp(doc) for doc in copies]
    else:
        linked = list(nlp.pipe(copies, batch_size=32))
    wall, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    return {"docs_per_s": len(docs) / wall, "cpu_ms_per_doc": 1000 * cpu / len(docs)}, linked


def main() -> None:
    nlp = spacy.load(PIPELINE)
    linker = find_linker(nlp)
    docs, warm = raw_docs(nlp, "test"), raw_docs(nlp, "train")[:32]
    results, links = {}, {}
    few_mentions = architecture.FEW_MENTIONS
    beside_the_text_tower = FeatureCache.encode_texts_and_images
    for runtime, hows in (("torch", ("batch1", "pipe32")), ("openvino", ("batch1", "pipe32")),
                          ("openvino_all_threads", ("batch1",)),
                          ("openvino_decoding_after_text", ("pipe32",))):
        linker.configure(inference_runtime=runtime.split("_")[0])
        architecture.FEW_MENTIONS = 0 if runtime == "openvino_all_threads" else few_mentions
        FeatureCache.encode_texts_and_images = (decoding_after_text if runtime == "openvino_decoding_after_text"
                                                else beside_the_text_tower)
        list(nlp.pipe([doc.copy() for doc in warm], batch_size=32))
        for how in hows:
            runs = []
            for _ in range(3):
                row, linked = timed(nlp, linker, docs, how)
                runs.append(row)
            links[(runtime, how)] = [[(ent.start_char, ent.end_char, ent.kb_id_) for ent in doc.ents]
                                     for doc in linked]
            results[f"{runtime}_{how}"] = {key: round(statistics.median(run[key] for run in runs), 2)
                                           for key in runs[0]}
            print(runtime, how, results[f"{runtime}_{how}"], flush=True)
    linker.configure(inference_runtime="auto")
    architecture.FEW_MENTIONS = few_mentions
    FeatureCache.encode_texts_and_images = beside_the_text_tower
    same = {how: sum(a == b for a, b in zip(links[("torch", how)], links[("openvino", how)])) / len(docs)
            for how in ("batch1", "pipe32")}
    write("demo_speed.json", {
        **run_info(), "docs": len(docs), "mentions": sum(len(doc) for doc in links[("openvino", "batch1")]),
        "inference_precision": linker.settings.inference_precision,
        "inputs": "demo test texts with their mention pictures (PNG, decoded in the timed run), mentions from the "
                  "packaged alias ruler; feature and picture caches emptied before each timed pass; median of 3",
        **results,
        "batch1_speedup": round(results["openvino_batch1"]["docs_per_s"] / results["torch_batch1"]["docs_per_s"], 2),
        "pipe32_speedup": round(results["openvino_pipe32"]["docs_per_s"] / results["torch_pipe32"]["docs_per_s"], 2),
        "batch1_cpu_ratio": round(results["openvino_batch1"]["cpu_ms_per_doc"]
                                  / results["torch_batch1"]["cpu_ms_per_doc"], 2),
        "pipe32_cpu_ratio": round(results["openvino_pipe32"]["cpu_ms_per_doc"]
                                  / results["torch_pipe32"]["cpu_ms_per_doc"], 2),
        "batch1_one_torch_thread_speedup": round(results["openvino_batch1"]["docs_per_s"]
                                                 / results["openvino_all_threads_batch1"]["docs_per_s"], 2),
        "pipe32_decoding_beside_text_speedup": round(results["openvino_pipe32"]["docs_per_s"]
                                                     / results["openvino_decoding_after_text_pipe32"]["docs_per_s"], 2),
        "same_links": same,
    })


if __name__ == "__main__":
    main()
