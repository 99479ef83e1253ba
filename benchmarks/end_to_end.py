"""End-to-end linking speed on CPU with realistic inputs: ``nlp.pipe`` on
docs whose mention image and text are encoded inside the timed run.

    python benchmarks/end_to_end.py   # -> results/end_to_end.json

Run ``python benchmarks/kb_scale.py agreement`` first: the docs are linked
against its KB (the demo's 300 entities + about 8,000 openclipart
distractors) and entity cache. Inputs:
- docs: the demo's dev + test sentences (one mention each, gold span set,
  as an upstream NER would), lengthened to 40+ tokens with a neutral
  sentence; each mention picture pasted on a noisy 500 x 400 gradient and
  saved as a JPEG (quality 90), so every doc has an image of photo size
  that is decoded, resized and encoded in the timed run;
- alias table on, top-64 dense candidates, the full score on the union;
- warm-up: 64 docs of the train split (never timed); the backbone's feature
  cache and the decoded-image cache are emptied before every timed run, so
  no timed doc was seen before;
- the same docs for every row: precision float32 and auto (bfloat16 on CPUs
  that run it natively), ``nlp.pipe`` batch size 1 and 32, and with auto
  also ``n_process`` = the core count (one torch thread per process); CPU
  time includes the child processes.
"""
import os
import sys
import time
from pathlib import Path

import spacy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import run_info  # noqa: E402
from kb_scale import DEMO, PIPELINE, WORK, agreement_kb, cpu_seconds, photo_jpeg, write  # noqa: E402
from spacy_m3el.index.entity_index import EntityIndex  # noqa: E402
from spacy_m3el.data.images import DECODED_IMAGES  # noqa: E402
from spacy_m3el.pipeline.linker import find_linker  # noqa: E402
from spacy_m3el.data.readers import MultimodalCorpus  # noqa: E402

LONGER = (" The picture was shared in the class newsletter last week, next to a short note from the "
          "teacher about the school trip and the spring concert.")


def make_docs(nlp, split: str, folder: Path):
    """The split's docs, lengthened, with photo-sized JPEG images."""
    docs = []
    folder.mkdir(parents=True, exist_ok=True)
    for i, eg in enumerate(MultimodalCorpus(ROOT / "corpus" / "clipart_mel" / f"{split}.spacy", image_dir=DEMO)(nlp)):
        source = eg.reference
        doc = nlp.make_doc(source.text + LONGER)
        doc.ents = [doc.char_span(ent.start_char, ent.end_char, label=ent.label_) for ent in source.ents]
        target = folder / f"{split}{i:04d}.jpg"
        doc._.image = str(target) if target.exists() else photo_jpeg(Path(source._.image), target, seed=10_000 + i)
        docs.append(doc)
    return docs


def main() -> None:
    rows = []
    for precision in ("float32", "auto"):
        nlp = spacy.load(PIPELINE, config={"components": {"m3el_linker": {"inference_precision": precision}}})
        linker = find_linker(nlp)
        kb = agreement_kb(nlp, linker.kb)
        linker.set_kb(lambda vocab: kb)
        linker.index_keeper.adopt(kb, EntityIndex.load(WORK / "kb8k_cache", n_entities=len(kb)))
        timed_docs = make_docs(nlp, "dev", WORK / "mention_photos") + make_docs(nlp, "test", WORK / "mention_photos")
        warm = make_docs(nlp, "train", WORK / "mention_photos")[:64]
        runs = [(1, 1), (32, 1)] + ([(32, os.cpu_count())] if precision == "auto" else [])
        for batch_size, processes in runs:
            list(nlp.pipe([doc.copy() for doc in warm], batch_size=batch_size))
            linker.network.feature_cache.clear()
            DECODED_IMAGES.clear()
            docs = [doc.copy() for doc in timed_docs]
            start_cpu, start = cpu_seconds(), time.perf_counter()
            linked = list(nlp.pipe(docs, batch_size=batch_size, n_process=processes))
            wall, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
            rows.append({"precision": precision, "batch_size": batch_size, "n_process": processes,
                         "docs": len(linked), "docs_per_s": len(linked) / wall,
                         "cpu_ms_per_doc": 1000 * cpu / len(linked),
                         "linked": sum(1 for doc in linked for ent in doc.ents if ent.kb_id_)})
            print(rows[-1], flush=True)
    write("end_to_end.json", {
        **run_info(), "entities": len(kb), "rows": rows,
        "inputs": "demo dev+test sentences lengthened to 40+ tokens (one gold-span mention each), mention "
                  "pictures on 500x400 noisy gradients as JPEG q90, alias table on, K=64; KB: demo + "
                  "openclipart distractors with its prebuilt entity cache; warm-up on 64 train docs; feature "
                  "and image caches emptied before each timed run"})


if __name__ == "__main__":
    main()
