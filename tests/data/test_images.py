import functools
import http.server
import threading
import warnings

import numpy
import pytest

from spacy_m3el import M3ELWarning
from spacy_m3el.data.images import DECODED_IMAGES, ImageLoader, ImagePolicy, load_image
from spacy_m3el.errors import ImageLoadError


@pytest.fixture(scope="module")
def served(picture_dir):
    """The picture folder over HTTP on the loopback interface."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(picture_dir))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_urls_are_fetched_only_when_allowed(served, picture_dir):
    url = f"{served}/item4.png"
    with pytest.raises(ImageLoadError, match="allow_image_urls"):
        load_image(url)
    fetched = numpy.asarray(load_image(url, allow_urls=True))
    numpy.testing.assert_array_equal(fetched, numpy.asarray(load_image(picture_dir / "item4.png")))
    with pytest.raises(ImageLoadError, match="download failed"):
        load_image(f"{served}/nope.png", allow_urls=True)
    with pytest.raises(ImageLoadError, match="only http"):
        load_image("s3://bucket/photo.jpg", allow_urls=True)


def test_loader_policy_is_read_at_each_use(tmp_path, picture_dir):
    policy = ImagePolicy()
    loader = ImageLoader(policy)
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    with pytest.raises(ImageLoadError, match=r"bad.png.*\(KB entity 'Q1'\)"):
        loader.ref(str(tmp_path / "bad.png"), context="KB entity 'Q1'").load()
    policy.on_bad_image = "warn"
    with pytest.warns(M3ELWarning, match="bad.png.*text only"):
        assert loader.ref(str(tmp_path / "bad.png")).load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing else may warn
        warnings.filterwarnings("ignore", category=M3ELWarning)
        assert loader.ref(str(tmp_path / "bad.png")).load() is None
    assert loader.ref(None) is None
    good = loader.ref(str(picture_dir / "item2.png"))
    assert good.load() is good.load()  # decoded once, then shared
    assert good.key in DECODED_IMAGES


@pytest.mark.parametrize("size", [(500, 400), (333, 640), (224, 224), (225, 900)])
def test_fit_square_equals_resizing_the_shorter_side_then_cropping_the_centre(size):
    from PIL import Image

    from spacy_m3el.data.images import fit_square

    rows, columns = numpy.mgrid[0 : size[1], 0 : size[0]]
    picture = numpy.stack([rows * 255 // size[1], columns * 255 // size[0], 128 + 100 * numpy.sin(rows / 7.0)
                           * numpy.cos(columns / 5.0)], axis=-1)
    image = Image.fromarray(picture.astype(numpy.uint8))
    scale = 224 / min(size)
    width, height = max(224, round(size[0] * scale)), max(224, round(size[1] * scale))
    left, top = (width - 224) // 2, (height - 224) // 2
    expected = image.resize((width, height), Image.BICUBIC).crop((left, top, left + 224, top + 224))
    fitted = fit_square(image, 224)
    assert fitted.size == (224, 224)
    difference = numpy.abs(numpy.asarray(fitted, dtype=int) - numpy.asarray(expected, dtype=int))
    assert difference.max() <= 3 and difference.mean() < 0.5


def test_pixels_are_uint8_zero_without_an_image_and_normalised_channels_last():
    from types import MethodType, SimpleNamespace

    import torch
    from PIL import Image

    from spacy_m3el.encoders.base import MultimodalEncoder

    encoder = SimpleNamespace(image_size=4, image_mean=(0.1, 0.2, 0.3), image_std=(0.5, 0.25, 0.125))
    for name in ("image_pixels", "normalize_pixels"):
        setattr(encoder, name, MethodType(getattr(MultimodalEncoder, name), encoder))
    images = [Image.new("RGB", (4, 4), (255, 51, 0)), None]
    raw, raw_mask = encoder.image_pixels(images)  # what image workers send: uint8, height x width x RGB
    assert raw.dtype == torch.uint8 and raw.shape == (2, 4, 4, 3) and raw_mask.tolist() == [True, False]
    assert raw[0, 2, 1].tolist() == [255, 51, 0] and raw[1].max() == 0
    pixels = encoder.normalize_pixels(raw)
    assert pixels.shape == (2, 3, 4, 4) and pixels.is_contiguous(memory_format=torch.channels_last)
    expected = torch.tensor([(1.0 - 0.1) / 0.5, (0.2 - 0.2) / 0.25, (0.0 - 0.3) / 0.125])
    torch.testing.assert_close(pixels[0, :, 2, 1], expected)
