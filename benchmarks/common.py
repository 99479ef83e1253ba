"""Helpers shared by the benchmark scripts: the run description written with
every result, synthetic pictures, and a random-weight CLIP with ViT-B/32's
shapes (throughput needs the paper's backbone shape, not its weights)."""
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict

import numpy
import spacy
import torch
from PIL import Image, ImageDraw

from spacy_m3el.encoders.random_clip import save_random_clip


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


def save_vit_b32(directory: Path) -> Path:
    """Random-weight CLIP with ViT-B/32's shapes."""
    return save_random_clip(directory)


def decoding_after_text(cache, texts, images, *, make_room=True):
    """``FeatureCache.encode_texts_and_images`` as it was before pictures were
    decoded beside the text tower: texts encoded, then pictures decoded and
    encoded (for the reference rows of the benchmarks)."""
    return cache.encode_texts(texts, make_room=make_room), cache.encode_images(images, make_room=make_room)
