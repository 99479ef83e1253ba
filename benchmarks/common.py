"""Helpers shared by the benchmark scripts: the run description written with
every result, synthetic pictures, and a random-weight CLIP with ViT-B/32's
shapes (throughput needs the paper's backbone shape, not its weights)."""
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict

import numpy
import spacy
import torch
from PIL import Image, ImageDraw


def run_info(device: str = "cpu") -> Dict[str, Any]:
    """Date, machine (GPU model included) and versions, for a results file."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
                    "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None},
        "versions": {"torch": torch.__version__, "spacy": spacy.__version__},
    }


def random_picture(path: Path, seed: int, size=(160, 160)) -> str:
    """A JPEG of a few coloured discs on a coloured background, different per seed."""
    rng = numpy.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(x) for x in rng.integers(0, 255, 3)))
    pen = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = (int(v) for v in rng.integers(0, min(size) - 40, 2))
        pen.ellipse((x0, y0, x0 + 40, y0 + 40), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    image.save(path, quality=90)
    return str(path)


def clip_linker_config(clip_dir: Path, *, frozen: bool) -> Dict[str, Any]:
    """m3el_linker config with the CLIP backbone saved in ``clip_dir``."""
    return {"model": {"@architectures": "spacy-m3el.M3EL.v1",
                      "encoder": {"@misc": "spacy-m3el.CLIPEncoder.v1", "name_or_path": str(clip_dir),
                                  "frozen": frozen, "max_text_length": 40}}}


def byte_level_vocab() -> dict:
    """A CLIP-style byte-level BPE vocabulary without merges (tokens = characters)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    vocab = {}
    chars = [chr(c) for c in codes]
    for token in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    return vocab


def save_vit_b32(directory: Path) -> Path:
    """Random-weight CLIP with ViT-B/32's shapes (text 512 x 12 layers, vision
    768 x 12 layers, patch 32, 224 px, projection 512)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = byte_level_vocab()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt")).save_pretrained(str(directory))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(),
        projection_dim=512,
    )
    CLIPModel(config).save_pretrained(str(directory))
    return directory
