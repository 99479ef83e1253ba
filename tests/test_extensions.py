import io

import numpy
import pytest
import spacy
from PIL import Image

from spacy_m3el.data.images import ImageLoader, ImageLoadError, image_key, load_image
from spacy_m3el.extensions import image_source


def test_span_image_wins_over_doc_image(picture_dir):
    nlp = spacy.blank("en")
    doc = nlp.make_doc("Robertson scored 40 points.")
    doc._.image = str(picture_dir / "item1.png")
    span = doc[0:1]
    assert image_source(span) == str(picture_dir / "item1.png")
    span._.image = str(picture_dir / "item2.png")
    assert image_source(span) == str(picture_dir / "item2.png")
    ref = ImageLoader().ref(image_source(span))
    assert ref.load().size == (96, 96)


@pytest.mark.parametrize("kind", ["path", "bytes", "pil", "array"])
def test_every_source_kind_decodes_to_the_same_rgb(picture_dir, kind):
    path = picture_dir / "item4.png"
    pil = Image.open(path)
    source = {"path": str(path), "bytes": path.read_bytes(), "pil": pil, "array": numpy.asarray(pil)}[kind]
    image = load_image(source)
    assert image.mode == "RGB"
    numpy.testing.assert_array_equal(numpy.asarray(image), numpy.asarray(load_image(str(path))))


def test_transparent_png_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(image).getpixel((0, 0)) == (255, 255, 255)


def test_bad_sources_name_themselves(tmp_path):
    with pytest.raises(ImageLoadError, match=r"path '.*nope.png': no such file"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match="bad.png.*not an image format"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(ImageLoadError, match="network"):
        load_image("https://example.org/x.jpg")
    with pytest.raises(ImageLoadError, match="object of type int"):
        load_image(42)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="PNG")
    with pytest.raises(ImageLoadError, match="truncated or corrupt"):
        load_image(buffer.getvalue()[:60])


def test_image_key_tracks_content():
    a = numpy.zeros((2, 2, 3), dtype=numpy.uint8)
    b = a.copy()
    b[0, 0, 0] = 1
    assert image_key(a) == image_key(a.copy()) != image_key(b)
    assert image_key(None) is None
