"""Where the time of one document goes, and the per-call overheads.

    python benchmarks/profile_doc.py   # -> results/profile_doc.json

Needs `spacy project run all` (training/clipart_mel/model-linker). Inputs:
the 264 demo test texts with their pictures, linked one at a time by the
linker (gold spans set, as an upstream NER would), bfloat16 (`auto`):

- ``breakdown_ms_per_doc``: cProfile's cumulative time of the parts of a
  cold call (feature and picture caches emptied before every doc), per doc;
  cProfile adds its own overhead, so read the shares, not the sum;
- ``text_tower_ms``: one demo text at a time under autocast, the text model
  with float32 weights (autocast casts every Linear weight at every call:
  the route before) against the copy whose Linear weights are kept in the
  autocast dtype (now), with the largest difference of their outputs;
- ``module_walk_ms``: one walk over every module of the network (the check
  every call made before, instead of the root module's mode).
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

from spacy_m3el.data.images import DECODED_IMAGES  # noqa: E402
from spacy_m3el.data.readers import create_docbin_reader  # noqa: E402
from spacy_m3el.pipeline.linker import find_linker  # noqa: E402

PIPELINE = ROOT / "training" / "clipart_mel" / "model-linker"
DEMO = ROOT / "assets" / "clipart_mel"
#: (part, file suffix, function name) read from the profile.
PARTS = [("text tower", "minilm_efficientnet.py", "encode_text"),
         ("image tower", "minilm_efficientnet.py", "encode_image"),
         ("picture decoding and preprocessing", "encoders/cache.py", "_decoded"),
         ("mention side (matcher)", "model/m3el.py", "mention_side"),
         ("two-stage search and rerank", "pipeline/linking.py", "two_stage"),
         ("results and candidate scorer", "pipeline/results.py", "ranking_results"),
         ("whole call", "pipeline/linker.py", "predict")]


def per_call_ms(function, repeat: int) -> float:
    for _ in range(5):
        function()
    start = time.perf_counter()
    for _ in range(repeat):
        function()
    return 1000 * (time.perf_counter() - start) / repeat


def main() -> None:
    warnings.simplefilter("ignore")
    nlp = spacy.load(PIPELINE)
    linker = find_linker(nlp)
    docs = [eg.predicted for eg in create_docbin_reader(ROOT / "corpus" / "clipart_mel" / "test.spacy",
                                                         image_dir=DEMO)(nlp)]
    for doc in docs[:20]:
        linker(doc.copy())

    def cold_run():
        for doc in docs:
            linker.network.feature_cache.clear()
            DECODED_IMAGES.clear()
            linker(doc.copy())

    profile = cProfile.Profile()
    profile.enable()
    cold_run()
    profile.disable()
    stats = pstats.Stats(profile).stats
    breakdown = {}
    for part, suffix, name in PARTS:
        total = sum(row[3] for (file, _, function), row in stats.items() if file.endswith(suffix) and function == name)
        breakdown[part] = round(1000 * total / len(docs), 2)

    encoder = linker.network.encoder
    tokens = encoder.tokenize([docs[0].text])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = encoder._autocast_text_model(ids.device)
        before = per_call_ms(lambda: encoder.text_model(input_ids=ids, attention_mask=mask), 200)
        now = per_call_ms(lambda: fast(input_ids=ids, attention_mask=mask), 200)
        difference = float((encoder.text_model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
                            - fast(input_ids=ids, attention_mask=mask).last_hidden_state.float()).abs().max())
    walk = per_call_ms(lambda: any(module.training for module in linker.network.modules()), 200)
    write("profile_doc.json", {
        **run_info(), "docs": len(docs), "tokens_of_the_text": int(ids.shape[1]),
        "inputs": "demo test texts with their pictures and gold spans, one doc at a time, caches emptied per doc",
        "breakdown_ms_per_doc": breakdown,
        "text_tower_ms": {"before": round(before, 2), "now": round(now, 2), "max_abs_difference": difference},
        "module_walk_ms": round(walk, 3),
    })
    print(breakdown, {"before": before, "now": now, "difference": difference, "walk": walk})


if __name__ == "__main__":
    main()
