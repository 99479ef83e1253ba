"""Linking speed of the packaged demo pipeline on the demo test texts with
their pictures: one doc at a time (``nlp(doc)``) and ``nlp.pipe`` (batch
32), the current route against the route before this change, in one run.

    python benchmarks/demo_speed.py   # -> results/demo_speed.json

Needs `spacy project run all` (training/clipart_mel/model-linker: the alias
ruler and the linker, as packaged). Inputs: the demo test split's texts
(264 docs), each with its mention picture (the demo's own PNGs, decoded in
the timed run); mentions found by the alias ruler from the raw text, as a
user of the package runs it. Warm-up: 32 docs of the train split (never
timed); the backbone's feature cache and the decoded-picture cache are
emptied before every timed pass, so no timed doc was seen before. Rows, each
timed three times (the median is reported) on the same docs:

- ``before``: the text tower under autocast with float32 weights (autocast
  casts every Linear weight at every call), and a walk over every module at
  every call to find one in training mode (the route before this change);
- ``now``: the text tower's Linear weights kept in the autocast dtype (the
  same products, not cast again) and the root module's mode checked.

Precision: the pipeline's ``inference_precision`` ("auto": bfloat16 on CPUs
that run it natively, as here). CPU time is this process's.
"""
import statistics
import sys
import time
from pathlib import Path

import spacy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import run_info  # noqa: E402
from kb_scale import cpu_seconds, write  # noqa: E402

from spacy_m3el.data.images import DECODED_IMAGES  # noqa: E402
from spacy_m3el.data.readers import MultimodalCorpus  # noqa: E402
from spacy_m3el.extensions import make_doc  # noqa: E402
from spacy_m3el.pipeline import mentions  # noqa: E402
from spacy_m3el.pipeline.linker import find_linker  # noqa: E402

PIPELINE = ROOT / "training" / "clipart_mel" / "model-linker"
DEMO = ROOT / "assets" / "clipart_mel"


def raw_docs(nlp, split: str):
    """The split's texts as new docs with their mention picture (no spans: the ruler finds them)."""
    return [make_doc(nlp, eg.reference.text, eg.reference._.image)
            for eg in MultimodalCorpus(ROOT / "corpus" / "clipart_mel" / f"{split}.spacy", image_dir=DEMO)(nlp)]


def route(linker, name: str) -> None:
    encoder = linker.network.encoder
    encoder.__dict__.pop("_autocast_text_model", None)
    mentions.MentionEncoder.encode = CURRENT_ENCODE
    if name == "before":
        encoder.__dict__["_autocast_text_model"] = lambda device: None  # the plain model under autocast

        def encode_with_walk(self, spans, *, where=None):
            if any(module.training for module in self.network.modules()):
                self.network.eval()
            return CURRENT_ENCODE(self, spans, where=where)

        mentions.MentionEncoder.encode = encode_with_walk


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


CURRENT_ENCODE = mentions.MentionEncoder.encode


def main() -> None:
    nlp = spacy.load(PIPELINE)
    linker = find_linker(nlp)
    docs, warm = raw_docs(nlp, "test"), raw_docs(nlp, "train")[:32]
    results, links = {}, {}
    for name in ("before", "now"):
        route(linker, name)
        list(nlp.pipe([doc.copy() for doc in warm], batch_size=32))
        for how in ("batch1", "pipe32"):
            runs = []
            for _ in range(3):
                row, linked = timed(nlp, linker, docs, how)
                runs.append(row)
            links[(name, how)] = [[(ent.start_char, ent.end_char, ent.kb_id_) for ent in doc.ents] for doc in linked]
            results[f"{name}_{how}"] = {key: round(statistics.median(run[key] for run in runs), 2) for key in runs[0]}
            print(name, how, results[f"{name}_{how}"], flush=True)
    route(linker, "now")
    same = all(links[("before", how)] == links[("now", how)] for how in ("batch1", "pipe32"))
    write("demo_speed.json", {
        **run_info(), "docs": len(docs), "mentions": sum(len(doc) for doc in links[("now", "batch1")]),
        "inference_precision": linker.settings.inference_precision,
        "inputs": "demo test texts with their mention pictures (PNG, decoded in the timed run), mentions from the "
                  "packaged alias ruler; feature and picture caches emptied before each timed pass; median of 3",
        **results,
        "batch1_speedup": round(results["now_batch1"]["docs_per_s"] / results["before_batch1"]["docs_per_s"], 2),
        "pipe32_speedup": round(results["now_pipe32"]["docs_per_s"] / results["before_pipe32"]["docs_per_s"], 2),
        "same_links": same,
    })


if __name__ == "__main__":
    main()
