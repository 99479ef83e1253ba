"""One shared transformer vs two text encoders in a transformer pipeline.

Compares, on the demo (Clipart-MEL) test split:
- shared: `transformer -> ner -> m3el_linker`, the linker reading the
  transformer's output and encoding KB texts with its model (the `trf`
  workflow's pipeline);
- two encoders: the same `transformer` and `ner`, followed by the default
  pipeline's standalone `m3el_linker` (its own MiniLM), as a user would get by
  adding the default linker to a `_trf` pipeline.

Each pipeline runs in its own process (so memory is its own) and reports:
resident memory after loading and after linking, parameters in memory and
how many text encoders hold them, docs/s and CPU ms/doc end to end (raw text +
image in, ner finds the mentions; warm-up on 32 dev docs, then each of the 264
test docs once, batch 32), Hits@1/MRR given the gold mentions and ner's F.

Usage (after `spacy project run all` and `spacy project run trf`):
    python benchmarks/shared_transformer.py
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from common import run_info

RESULTS = Path(__file__).parent / "results" / "shared_transformer.json"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def parameters(nlp) -> Dict[str, Any]:
    """Distinct torch parameters of the pipeline, and the text encoders holding them."""
    from transformers import PreTrainedModel

    from spacy_m3el.pipeline.linker import find_linker

    modules = [nlp.get_pipe(name).model.transformer for name in nlp.pipe_names
               if hasattr(getattr(nlp.get_pipe(name), "model", None), "transformer")]
    linker = find_linker(nlp)
    modules.append(linker.network)
    if linker.shared_encoder is not None:
        modules.append(linker.shared_encoder.text_model().model)
    seen, text_models = {}, {}
    for module in modules:
        for param in module.parameters():
            seen[id(param)] = param.numel()
        for sub in module.modules():
            if isinstance(sub, PreTrainedModel):
                text_models[id(sub)] = sum(p.numel() for p in sub.parameters())
    return {"torch_params": sum(seen.values()), "text_encoders": len(text_models),
            "text_encoder_params": sum(text_models.values())}


def raw_docs(nlp, path: Path, image_dir: Path) -> List:
    from spacy_m3el.extensions import copy_images
    from spacy_m3el.data.readers import MultimodalCorpus

    docs = []
    for eg in MultimodalCorpus(path, image_dir=image_dir)(nlp):
        doc = nlp.make_doc(eg.reference.text)
        copy_images(eg.reference, doc)
        docs.append(doc)
    return docs


def build(kind: str, args) -> Any:
    import spacy

    nlp = spacy.load(args.shared)
    if kind == "two_encoders":
        default = spacy.load(args.default)
        nlp.remove_pipe("m3el_linker")
        nlp.add_pipe("m3el_linker", source=default)
    return nlp


def child(kind: str, args) -> Dict[str, Any]:
    import torch

    from spacy_m3el.evaluation.end_to_end import evaluate_pipeline
    from spacy_m3el.data.readers import MultimodalCorpus

    torch.set_num_threads(args.threads)
    start_rss = rss_mb()
    nlp = build(kind, args)
    loaded_rss = rss_mb()
    report: Dict[str, Any] = {"pipeline": nlp.pipe_names, **parameters(nlp),
                              "rss_mb": {"before_load": round(start_rss, 1), "after_load": round(loaded_rss, 1)}}
    warm = raw_docs(nlp, args.dev, args.data)[:32]
    timed = raw_docs(nlp, args.test, args.data)
    list(nlp.pipe(warm, batch_size=args.batch_size))
    wall, cpu = time.perf_counter(), time.process_time()
    linked = list(nlp.pipe(timed, batch_size=args.batch_size))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    report["rss_mb"]["after_linking"] = round(rss_mb(), 1)
    report["rss_mb"]["peak"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    report["speed"] = {"docs": len(linked), "batch_size": args.batch_size, "threads": args.threads,
                       "wall_s": round(wall, 2), "docs_per_s": round(len(linked) / wall, 2),
                       "cpu_ms_per_doc": round(1000 * cpu / len(linked), 1),
                       "mentions_found": sum(len(doc.ents) for doc in linked)}
    examples = list(MultimodalCorpus(args.test, image_dir=args.data)(nlp))
    result = evaluate_pipeline(nlp, examples)
    report["gold_mentions"] = {k: result[k] for k in ("m3el_hits1", "m3el_mrr", "m3el_accuracy", "m3el_ece",
                                                      "m3el_n_mentions")}
    report["end_to_end"] = result.get("end_to_end")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("training/clipart_mel_trf/model-best"))
    parser.add_argument("--default", type=Path, default=Path("training/clipart_mel/model-best"))
    parser.add_argument("--dev", type=Path, default=Path("corpus/clipart_mel/dev.spacy"))
    parser.add_argument("--test", type=Path, default=Path("corpus/clipart_mel/test.spacy"))
    parser.add_argument("--data", type=Path, default=Path("assets/clipart_mel"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=["shared", "two_encoders"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    for path in (args.shared, args.default):
        if not path.is_dir():
            sys.exit(f"{path} not found: run `python -m spacy project run all` and `... run trf` first")
    runs = {}
    for kind in ("shared", "two_encoders"):
        print(f"[shared_transformer] {kind} ...", flush=True)
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", kind], check=True,
                             capture_output=True, text=True)
        runs[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    shared, two = runs["shared"], runs["two_encoders"]
    ratios = {
        "docs_per_s_shared_over_two": round(shared["speed"]["docs_per_s"] / two["speed"]["docs_per_s"], 3),
        "cpu_per_doc_shared_over_two": round(shared["speed"]["cpu_ms_per_doc"] / two["speed"]["cpu_ms_per_doc"], 3),
        "rss_after_linking_shared_minus_two_mb": round(shared["rss_mb"]["after_linking"]
                                                       - two["rss_mb"]["after_linking"], 1),
        "torch_params_shared_over_two": round(shared["torch_params"] / two["torch_params"], 3),
        "hits1_shared_minus_default_points": round(100 * (shared["gold_mentions"]["m3el_hits1"]
                                                          - two["gold_mentions"]["m3el_hits1"]), 2),
    }
    results = {
        "benchmark": "shared_transformer",
        "inputs": (f"Clipart-MEL: {shared['speed']['docs']} test docs (raw text + mention image, one mention "
                   "each, found by ner), warm-up on 32 dev docs; Hits@1 given the gold mentions of the same docs. "
                   f"shared = {args.shared}; two encoders = its transformer + ner + the linker of {args.default}"),
        "run": run_info(),
        "shared": shared,
        "two_encoders": two,
        "ratios": ratios,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
