import os

import pytest
import torch

from spacy_m3el.data.images import ImageRef, load_image
from spacy_m3el.encoders import CLIPEncoder, FeatureCache, MiniLMEfficientNetEncoder
from spacy_m3el.model import M3ELConfig, M3ELMatcher


@pytest.fixture(scope="module")
def default_encoder():
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    return MiniLMEfficientNetEncoder(frozen=True)


def test_default_backbone_loads_shipped_weights_offline(default_encoder, picture_dir):
    enc = default_encoder
    assert enc.text_dim == 384 and enc.image_token_dim == 1280
    first, other = load_image(picture_dir / "item1.png"), load_image(picture_dir / "item2.png")
    with torch.no_grad():
        a = enc.encode(["Jordan [SEP] Jordan scored 40 points."], [first])
        b = enc.encode(["Jordan [SEP] Jordan scored 40 points."], [load_image(picture_dir / "item1.png")])
        c = enc.encode(["Jordan [SEP] Jordan crossed the river."], [other])
    assert a.image_tokens.shape == (1, 49, 1280)
    torch.testing.assert_close(a.image_tokens, b.image_tokens)
    torch.testing.assert_close(a.text_tokens, b.text_tokens)
    assert (a.image_global - c.image_global).abs().max() > 1e-2
    assert (a.text_global - c.text_global).abs().max() > 1e-2
    # Real pretrained weights give a sentence embedding that ranks paraphrases first.
    with torch.no_grad():
        emb = enc.encode(
            ["a dog runs in the park", "a puppy is running on the grass", "stock markets fell sharply"],
            [None, None, None],
        ).text_global
    emb = torch.nn.functional.normalize(emb, dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


def test_missing_image_is_zero_input_with_false_mask(default_encoder, picture_dir):
    with torch.no_grad():
        out = default_encoder.encode(["a", "b"], [None, load_image(picture_dir / "item3.png")])
    assert out.image_mask.tolist() == [False, True]
    assert torch.all(out.image_tokens[0] == 0) and torch.any(out.image_tokens[1] != 0)


def test_text_is_truncated_to_the_configured_length(default_encoder):
    tokens = default_encoder.tokenize(["word " * 200])
    assert tokens["input_ids"].shape[1] == default_encoder.max_text_length == 40


def test_feature_cache_matches_direct_encoding(default_encoder, picture_dir):
    cache = FeatureCache(default_encoder, dtype=torch.float32)
    refs = [ImageRef.from_source(picture_dir / "item4.png"), None]
    texts = ["Paris [SEP] the capital", "Paris [SEP] Paris Hilton"]
    cached = cache.encode(texts, refs)
    again = cache.encode(texts, refs)
    with torch.no_grad():
        direct = default_encoder.encode(texts, [load_image(picture_dir / "item4.png"), None])
    for name in ("text_global", "text_tokens", "image_global", "image_tokens"):
        torch.testing.assert_close(getattr(cached, name), getattr(direct, name), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(getattr(again, name), getattr(cached, name))
    assert len(cache) == 3  # two texts, one image


def test_feature_cache_refuses_a_trainable_encoder(tiny_clip_dir):
    with pytest.raises(ValueError, match="frozen"):
        FeatureCache(CLIPEncoder(name_or_path=tiny_clip_dir, frozen=False))


def _train_end_to_end(encoder, images, steps=20, lr=1e-4):
    """A one-step update repeated: 8 mentions vs their 8 entities, in-batch negatives."""
    torch.manual_seed(0)
    matcher = M3ELMatcher(M3ELConfig(text_dim=encoder.text_dim, image_global_dim=encoder.image_global_dim,
                                     image_token_dim=encoder.image_token_dim))
    params = [p for p in list(encoder.parameters()) + list(matcher.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    mention_texts = [f"mention {i} [SEP] sentence number {i} about thing {i % 3}" for i in range(8)]
    entity_texts = [f"entity {i} [SEP] description of item {i}" for i in range(8)]
    losses = []
    encoder.train()
    matcher.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = matcher.loss(encoder.encode(mention_texts, images), encoder.encode(entity_texts, images),
                            torch.arange(8))["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_default_backbone_trains_end_to_end(picture_dir):
    encoder = MiniLMEfficientNetEncoder(frozen=False)
    images = [load_image(picture_dir / f"item{i}.png") for i in range(7)] + [None]
    losses = _train_end_to_end(encoder, images, lr=2e-4)
    assert losses[-1] < 0.8 * losses[0]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.text_model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.image_model.parameters())


def test_clip_loads_from_a_local_directory_and_trains(tiny_clip_dir, picture_dir):
    encoder = CLIPEncoder(name_or_path=tiny_clip_dir, max_text_length=40)
    assert encoder.text_dim == 24 and encoder.image_token_dim == 48 and encoder.image_size == 64
    image = load_image(picture_dir / "item5.png")
    with torch.no_grad():
        out = encoder.encode(["Oscar Robertson [SEP] basketball", "x"], [image, None])
    assert out.image_tokens.shape == (2, 17, 48)  # (64 / 16)^2 patches + CLS
    assert out.text_tokens.shape[-1] == 24  # tokens projected to the text global's width
    assert out.image_mask.tolist() == [True, False]
    images = [load_image(picture_dir / f"item{i}.png") for i in range(8)]
    losses = _train_end_to_end(encoder, images, lr=1e-3)
    assert losses[-1] < 0.8 * losses[0]


def test_clip_without_network_gives_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="without network access"):
        CLIPEncoder(name_or_path=tmp_path / "nowhere")


def test_shared_feature_caches_encode_each_item_once(default_encoder, picture_dir):
    first = FeatureCache(default_encoder, shared=True)
    second = FeatureCache(default_encoder, shared=True)
    private = FeatureCache(default_encoder)
    refs = [ImageRef.from_source(picture_dir / "item6.png")]
    first.encode(["shared text"], refs)
    assert "shared text" in second.texts.items and refs[0].key in second.images.items
    assert "shared text" not in private.texts.items


def test_feature_cache_is_bounded_by_bytes(tiny_clip_dir, picture_dir):
    from spacy_m3el.data.images import ImageRef
    from spacy_m3el.encoders import CLIPEncoder, FeatureCache
    from spacy_m3el.encoders.cache import feature_bytes

    encoder = CLIPEncoder(name_or_path=tiny_clip_dir, frozen=True)
    probe = FeatureCache(encoder)
    probe.encode(["x"], [ImageRef.from_source(picture_dir / "item0.png")])
    per_image = feature_bytes(probe.images.get(next(iter(probe.images.items))))
    cache = FeatureCache(encoder, max_bytes=3 * per_image)
    refs = [ImageRef.from_source(picture_dir / f"item{k}.png") for k in range(8)]
    cache.encode(["x"] * 8, refs)
    assert len(cache.images) == 3 and cache.images.bytes <= 3 * per_image
    assert refs[-1].key in cache.images and refs[0].key not in cache.images


def test_feature_cache_can_keep_new_features_only_where_they_fit(tiny_clip_dir, picture_dir):
    from spacy_m3el.data.images import ImageRef
    from spacy_m3el.encoders import CLIPEncoder, FeatureCache
    from spacy_m3el.encoders.cache import feature_bytes

    encoder = CLIPEncoder(name_or_path=tiny_clip_dir, frozen=True)
    probe = FeatureCache(encoder)
    refs = [ImageRef.from_source(picture_dir / f"item{k}.png") for k in range(5)]
    probe.encode_images(refs[:1])
    per_image = feature_bytes(probe.images.get(next(iter(probe.images.items))))
    cache = FeatureCache(encoder, max_bytes=3 * per_image)
    cache.encode_images(refs[:2])  # mentions, say
    passing = cache.encode_images(refs[2:], make_room=False)  # a KB build: one more fits, the rest pass through
    assert [ref.key in cache.images for ref in refs] == [True, True, True, False, False]
    cache.encode_texts(["a red apple"], make_room=False)
    assert len(cache.texts) == 1  # room left: kept
    kept = FeatureCache(encoder).encode_images(refs[2:])
    for name in vars(passing):  # the same values: both in the store's precision
        assert torch.equal(getattr(passing, name), getattr(kept, name)), name
