"""Fixtures shared across the suite: real image files and a tiny CLIP."""
from pathlib import Path

import numpy
import pytest
from PIL import Image, ImageDraw

from spacy_m3el.encoders.random_clip import save_random_clip


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


def save_tiny_clip(directory: Path) -> Path:
    """A tiny random-weight CLIP, saved the way a user's local CLIP directory is."""
    return save_random_clip(
        directory,
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=64),
        vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
        projection_dim=24,
        seed=0,
    )


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))
