"""Fixtures shared across the suite: real image files and a tiny CLIP."""
import json
from pathlib import Path

import numpy
import pytest
from PIL import Image, ImageDraw


def draw_picture(path: Path, kind: int, *, size: int = 96, variant: int = 0) -> Path:
    """A distinct, real PNG per ``kind`` (shape and colour); ``variant`` moves it."""
    rng = numpy.random.default_rng(kind * 1000 + variant)
    image = Image.new("RGB", (size, size), tuple(int(x) for x in rng.integers(150, 255, 3)))
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in ((kind * 67) % 256, (kind * 151) % 256, (kind * 29 + 80) % 256))
    offset = 6 * variant
    box = (10 + offset, 10 + offset, size - 10 - offset // 2, size - 10 - offset // 2)
    shape = kind % 4
    if shape == 0:
        draw.ellipse(box, fill=colour)
    elif shape == 1:
        draw.rectangle(box, fill=colour)
    elif shape == 2:
        draw.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=colour)
    else:
        for i in range(0, size, 12):
            draw.line([(i, 0), (size - i, size)], fill=colour, width=4)
    for _ in range(kind % 5 + 1):
        x, y = (int(v) for v in rng.integers(0, size - 12, 2))
        draw.rectangle((x, y, x + 10, y + 10), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture(scope="session")
def picture_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    for kind in range(24):
        draw_picture(folder / f"item{kind}.png", kind)
        draw_picture(folder / f"item{kind}_alt.png", kind, variant=1)
    return folder


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def save_tiny_clip(directory: Path) -> Path:
    """A random-weight CLIP with a character-level BPE tokenizer, saved the
    way a user's local CLIP directory is (save_pretrained)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {}
    for token in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    tokenizer.save_pretrained(str(directory))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
        projection_dim=24,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))
