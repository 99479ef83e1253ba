"""Training throughput (mentions/s) of the m3el_linker with a CLIP
ViT-B/32-shaped backbone (random weights: throughput does not depend on
them), fp32 against bf16 autocast, end to end through ``nlp.update``
(tokenising, image decoding and preprocessing included).

    python benchmarks/training_throughput.py --device cuda --batch-size 128
    python benchmarks/training_throughput.py --device cpu --batch-size 8 --steps 2   # smoke run

Writes benchmarks/results/training_throughput_<device>.json.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import spacy
import torch
from PIL import Image
from spacy.training import Example

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import clip_linker_config, random_picture, run_info, save_vit_b32  # noqa: E402


def make_examples(nlp, folder: Path, count: int, n_entities: int):
    examples = []
    for i in range(count):
        path = random_picture(folder / f"m{i}.jpg", i, size=(320, 240))
        text = f"Yesterday the entity number {i} was seen near the old harbour with friends."
        doc = nlp.make_doc(text)
        doc.ents = [doc.char_span(14, 20, label="THING", kb_id=f"E{i % n_entities}")]
        doc._.image = str(path)
        predicted = nlp.make_doc(text)
        predicted._.image = str(path)
        examples.append(Example(predicted, doc))
    return examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from spacy_m3el import MultimodalKB

    if args.device.startswith("cuda"):
        spacy.require_gpu()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip_dir = save_vit_b32(tmp / "clip")
        n_entities = args.batch_size * 4
        for precision in args.precisions:
            nlp = spacy.blank("en")
            kb = MultimodalKB(nlp.vocab)
            for i in range(n_entities):
                image = tmp / f"e{i % 64}.png"
                if not image.exists():
                    Image.new("RGB", (224, 224), (i * 3 % 255, 90, 160)).save(image)
                kb.add_entity(f"E{i}", name=f"entity {i}", description="a synthetic entity for timing",
                              images=[str(image)])
            linker = nlp.add_pipe("m3el_linker", config=clip_linker_config(clip_dir, frozen=False))
            linker.set_kb(lambda vocab: kb)
            examples = make_examples(nlp, tmp, args.batch_size * (args.steps + args.warmup), n_entities)
            optimizer = nlp.initialize(lambda: examples[:4])
            optimizer.learn_rate = 1e-5
            autocast = torch.autocast(
                device_type="cuda" if args.device.startswith("cuda") else "cpu",
                dtype=torch.bfloat16,
                enabled=precision == "bf16",
            )
            batches = [examples[i : i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
            with autocast:
                for batch in batches[: args.warmup]:
                    nlp.update(batch, sgd=optimizer)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for batch in batches[args.warmup :]:
                    nlp.update(batch, sgd=optimizer)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
            rows[precision] = {"mentions_per_s": args.batch_size * args.steps / seconds, "seconds": seconds}
            print(precision, json.dumps(rows[precision]), flush=True)
    result = {
        **run_info(args.device),
        "backbone": "CLIP ViT-B/32 shape, random weights, fine-tuned end to end",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "end_to_end": "nlp.update: tokenising, image decoding and preprocessing included",
        "results": rows,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"training_throughput_{args.device.split(':')[0]}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
