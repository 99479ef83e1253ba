"""The feature cache decodes a cold batch's pictures beside the text tower:
the same features as one after the other, errors raised in the caller."""
import threading

import pytest
import torch

from spacy_m3el.data.images import ImageLoader, ImageLoadError, ImagePolicy, ImageRef
from spacy_m3el.encoders import CLIPEncoder, FeatureCache

TEXTS = ["a clock [SEP] it struck twelve", "a grenade [SEP] pulled pin", "Paris [SEP] the capital", "no picture"]


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir):
    return CLIPEncoder(name_or_path=tiny_clip_dir, frozen=True)


def recording_decoder(cache, monkeypatch):
    """Record the thread that decodes each batch of pictures."""
    threads = []
    decoded = cache._decoded

    def recorded(refs):
        threads.append((threading.current_thread().name, len(refs)))
        return decoded(refs)

    monkeypatch.setattr(cache, "_decoded", recorded)
    return threads


def test_a_cold_batch_decodes_its_pictures_beside_the_text_tower(encoder, picture_dir, monkeypatch):
    refs = [ImageRef.from_source(picture_dir / f"item{k}.png") for k in (1, 2, 1)] + [None]
    cache = FeatureCache(encoder)
    threads = recording_decoder(cache, monkeypatch)
    text, image = cache.encode_texts_and_images(TEXTS, refs)
    assert [(name.startswith("m3el-decode"), count) for name, count in threads] == [(True, 2)]  # one per picture
    one_after_the_other = FeatureCache(encoder)
    want_text, want_image = one_after_the_other.encode_texts(TEXTS), one_after_the_other.encode_images(refs)
    for got, want in ((text, want_text), (image, want_image)):
        for name, value in vars(want).items():
            torch.testing.assert_close(getattr(got, name), value, rtol=0, atol=0, msg=name)
    assert image.image_mask.tolist() == [True, True, True, False]

    threads.clear()
    cache.encode_texts_and_images(TEXTS, refs)  # warm: nothing to decode
    assert threads == []
    new_pictures = [ImageRef.from_source(picture_dir / f"item{k}.png") for k in (3, 4)] + [None, None]
    cache.encode_texts_and_images(TEXTS, new_pictures)  # texts cached: no tower to overlap, decoded here
    assert threads[-1] == (threading.current_thread().name, 2)
    one_doc = FeatureCache(encoder)
    one_doc_threads = recording_decoder(one_doc, monkeypatch)
    one_doc.encode_texts_and_images(TEXTS[:1], refs[:1])  # one picture: decoded after its text, here
    assert one_doc_threads == [(threading.current_thread().name, 1)]


def test_a_bad_picture_decoded_beside_the_text_tower_raises_in_the_caller(encoder, picture_dir, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    loader = ImageLoader(ImagePolicy())  # on_bad_image = "raise"
    refs = [loader.ref(picture_dir / "item1.png"), loader.ref(tmp_path / "broken.png", context="mention 2")]
    cache = FeatureCache(encoder)
    with pytest.raises(ImageLoadError, match=r"broken\.png.*mention 2"):
        cache.encode_texts_and_images(TEXTS[:2], refs)
    # Nothing half-done was stored for the batch's pictures; its texts went through.
    assert not any(ref.key in key for ref in refs for key in cache.images.items)
    assert len(cache.texts) == 2
