import functools
import http.server
import threading
import warnings

import numpy
import pytest

from spacy_m3el import M3ELWarning
from spacy_m3el.images import DECODED_IMAGES, ImageLoader, ImagePolicy, load_image
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
