"""Bad input, faults and nothing lost (images, text, KB, training, security)."""
import io
import math
import re
from pathlib import Path

import numpy
import pytest
import spacy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from spacy.training import Example

from spacy_m3el import KBError, MultimodalKB
from spacy_m3el.data.images import ImageLoadError, load_image
from spacy_m3el.kb.base import NIL
from tests.pipeline.test_linker import N_ENTITIES, examples_for, make_docs, train_pipeline

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def trained(picture_dir):
    return train_pipeline(picture_dir, epochs=20)


def item_doc(nlp, text="They showed me the item at the fair.", image=None):
    doc = nlp.make_doc(text)
    start = text.index("item")
    doc.ents = [doc.char_span(start, start + 4, label="THING")]
    doc._.image = image
    return doc


# ---------------------------------------------------------------- images
def _png_bytes(image, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, **kwargs)
    return buffer.getvalue()


def test_unusual_modes_become_rgb(tmp_path):
    cases = {
        "cmyk.jpg": Image.new("CMYK", (8, 8), (0, 255, 255, 0)),
        "la.png": Image.new("LA", (8, 8), (100, 255)),
        "palette.png": Image.new("RGB", (8, 8), (10, 200, 30)).convert("P", palette=Image.ADAPTIVE),
        "i16.png": Image.fromarray(numpy.arange(64, dtype=numpy.uint16).reshape(8, 8) * 1000),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
        loaded = load_image(tmp_path / name)
        assert loaded.mode == "RGB" and loaded.size == (8, 8), name
    assert load_image(tmp_path / "palette.png").getpixel((0, 0)) == (10, 200, 30)
    grey = numpy.asarray(load_image(tmp_path / "i16.png"))
    assert grey[0, 0, 0] == 0 and grey[-1, -1, 0] == 255  # 16-bit range scaled to 8 bits


def test_animated_gif_uses_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 6), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert load_image(tmp_path / "anim.gif").getpixel((0, 0)) == (255, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (10, 4), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (4, 10)


def test_decompression_bomb_is_refused(tmp_path):
    Image.new("1", (9000, 9000)).save(tmp_path / "bomb.png")
    with pytest.raises(ImageLoadError, match=r"bomb.png.*too large"):
        load_image(tmp_path / "bomb.png")


def test_zero_size_and_directories(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.jpg': the file is empty"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(numpy.zeros((0, 5, 3), dtype=numpy.uint8))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_loader_never_fails_with_anything_but_image_load_error(data):
    try:
        image = load_image(data)
    except ImageLoadError as err:
        assert "bytes" in str(err)
    else:
        assert image.mode == "RGB"


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.sampled_from([1, 3, 4]), st.sampled_from(["uint8", "float32"]))
def test_arrays_of_any_shape_load_or_fail_clearly(height, width, channels, dtype):
    shape = (height, width) if channels == 1 else (height, width, channels)
    array = numpy.random.default_rng(0).random(shape).astype(dtype)
    if dtype == "uint8":
        array = (array * 255).astype("uint8")
    image = load_image(array)
    assert image.size == (width, height) and image.mode == "RGB"


def test_bad_mention_image_raises_or_warns_and_links_text_only(trained, tmp_path):
    nlp, _ = trained
    linker = nlp.get_pipe("m3el_linker")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ImageLoadError, match="broken.png"):
        nlp(item_doc(nlp, image=str(tmp_path / "broken.png")))
    linker.configure(on_bad_image="warn")
    before = linker.mentions.bad_images
    try:
        with pytest.warns(UserWarning, match="broken.png.*text only"):
            doc = nlp(item_doc(nlp, image=str(tmp_path / "broken.png")))
        assert doc.ents[0].kb_id_.startswith("E")
        assert doc.ents[0]._.m3el_candidates[0]["branches"]["image"] == 0.0
        assert linker.mentions.bad_images == before + 1
    finally:
        linker.configure(on_bad_image="raise")


def test_image_urls_are_refused(trained):
    nlp, _ = trained
    with pytest.raises(ImageLoadError, match="network"):
        nlp(item_doc(nlp, image="https://example.org/photo.jpg"))


# ---------------------------------------------------------------- text
@pytest.mark.parametrize(
    "text",
    [
        "The item " + "is really very remarkable and " * 80 + "ends here.",  # past the 40-token limit
        "Робертсон показал нам item на ярмарке.",
        "他们在展会上给我看了 item 。",
        "عرضوا لي item في المعرض.",
    ],
)
def test_long_and_non_latin_texts_link(trained, picture_dir, text):
    nlp, _ = trained
    doc = nlp(item_doc(nlp, text=text, image=str(picture_dir / "item3_alt.png")))
    assert doc.ents[0].kb_id_.startswith("E") and math.isfinite(doc.ents[0]._.m3el_score)


def test_entity_longer_than_the_text_limit(trained):
    nlp, _ = trained
    text = " ".join(["item"] * 120)
    doc = nlp.make_doc(text)
    doc.ents = [spacy.tokens.Span(doc, 0, 110, label="THING")]
    assert nlp(doc).ents[0].kb_id_.startswith("E")


# ---------------------------------------------------------------- KB and pipeline state
def test_empty_kb_links_nothing_but_does_not_crash():
    nlp = spacy.blank("en")
    nlp.add_pipe("m3el_linker")
    doc = nlp(item_doc(nlp))
    assert doc.ents[0].kb_id_ == NIL and doc.ents[0]._.m3el_candidates == []


def test_cache_from_a_different_model_is_an_error(trained, picture_dir, tmp_path):
    nlp, _ = trained
    nlp.to_disk(tmp_path / "a")
    other, _ = train_pipeline(picture_dir, epochs=1)
    other.to_disk(tmp_path / "b")
    # Put model b's weights next to model a's cache.
    (tmp_path / "a" / "m3el_linker" / "model").write_bytes((tmp_path / "b" / "m3el_linker" / "model").read_bytes())
    with pytest.raises(KBError, match="different model"):
        spacy.load(tmp_path / "a")


def test_pipeline_without_weights_file_names_it(trained, tmp_path):
    nlp, _ = trained
    nlp.to_disk(tmp_path / "p")
    (tmp_path / "p" / "m3el_linker" / "model").unlink()
    with pytest.raises(ValueError, match="weights file 'model' is missing"):
        spacy.load(tmp_path / "p")


def test_interrupted_pipeline_save_keeps_the_old_one(trained, tmp_path, monkeypatch):
    from spacy_m3el import save_pipeline

    nlp, _ = trained
    save_pipeline(nlp, tmp_path / "pipeline")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "pipeline").rglob("*"))
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("spacy_m3el.pipeline.linker.M3ELLinker.to_disk", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pipeline(nlp, tmp_path / "pipeline")
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "pipeline").rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]
    assert spacy.load(tmp_path / "pipeline").get_pipe("m3el_linker").kb.get_size_entities() == N_ENTITIES


# ---------------------------------------------------------------- training
def test_unknown_gold_ids_are_warned_and_skipped(trained, picture_dir):
    nlp, _ = trained
    docs = make_docs(nlp, picture_dir)[:4]
    docs[0].ents = [spacy.tokens.Span(docs[0], docs[0].ents[0].start, docs[0].ents[0].end, label="THING", kb_id="Q404")]
    with pytest.warns(UserWarning, match=r"skipped 1 gold mention\(s\).*Q404"):
        losses = nlp.update(examples_for(nlp, docs))
    assert losses["m3el_linker"] > 0


def test_batches_without_linkable_mentions_are_no_ops(trained):
    nlp, _ = trained
    doc = nlp.make_doc("Nothing to link here.")
    assert nlp.update([Example(nlp.make_doc(doc.text), doc)]) == {"m3el_linker": 0.0}


def test_non_finite_loss_is_a_clear_error(picture_dir):
    nlp, examples = train_pipeline(picture_dir, epochs=1)
    linker = nlp.get_pipe("m3el_linker")
    weight = linker.network.matcher.text_global_norm.weight
    weight.data.fill_(float("nan"))
    with pytest.raises(ValueError, match="training loss is not finite"):
        nlp.update(examples[:4])


# ---------------------------------------------------------------- robustness
def test_predictions_are_deterministic(picture_dir):
    a, examples = train_pipeline(picture_dir, epochs=3)
    b, _ = train_pipeline(picture_dir, epochs=3)
    docs = [eg.predicted.copy() for eg in examples[:6]]
    scores_a = [d.ents[0]._.m3el_score for d in a.pipe([d.copy() for d in docs])]
    scores_b = [d.ents[0]._.m3el_score for d in b.pipe([d.copy() for d in docs])]
    assert scores_a == pytest.approx(scores_b, rel=1e-5)


def test_two_processes_give_the_same_results(trained):
    nlp, examples = trained
    docs = [eg.predicted.copy() for eg in examples[:8]]
    one = [(d.ents[0].kb_id_, d.ents[0]._.m3el_score) for d in nlp.pipe([d.copy() for d in docs])]
    two = [(d.ents[0].kb_id_, d.ents[0]._.m3el_score) for d in nlp.pipe([d.copy() for d in docs], n_process=2, batch_size=4)]
    assert [k for k, _ in one] == [k for k, _ in two]
    assert [s for _, s in one] == pytest.approx([s for _, s in two], rel=1e-4)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(st.text(min_size=1, max_size=12).filter(lambda s: s.strip() and s != NIL), st.text(max_size=30),
                  st.floats(0, 100, allow_nan=False)),
        min_size=1, max_size=6, unique_by=lambda t: t[0],
    ),
    st.text(min_size=1, max_size=10).filter(lambda s: s.strip()),
)
def test_kb_round_trips_anything(tmp_path_factory, entities, alias):
    nlp = spacy.blank("en")
    kb = MultimodalKB(nlp.vocab)
    for entity_id, description, freq in entities:
        kb.add_entity(entity_id, name=entity_id, description=description, freq=freq)
    ids = [e[0] for e in entities]
    kb.add_alias(alias, ids, [1.0 / len(ids)] * len(ids))
    folder = tmp_path_factory.mktemp("kb") / "kb"
    kb.to_disk(folder)
    loaded = MultimodalKB(nlp.vocab).from_disk(folder)
    assert [loaded.get_entity(i) for i in ids] == [kb.get_entity(i) for i in ids]
    assert loaded.alias_rows(alias) == kb.alias_rows(alias)


# ---------------------------------------------------------------- security
def test_no_pickle_or_unrestricted_torch_load_in_the_package():
    for path in (ROOT / "spacy_m3el").rglob("*.py"):
        source = path.read_text()
        assert not re.search(r"^\s*import pickle|^\s*from pickle|cloudpickle", source, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", source):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "allow_pickle=True" not in source, path


# ---------------------------------------------------------------- second pass: found from outside
def test_an_elongated_image_is_cropped_before_it_is_resized(monkeypatch):
    from types import SimpleNamespace

    from spacy_m3el.encoders.base import MultimodalEncoder

    sizes = []
    original = Image.Image.resize

    def recording_resize(self, size, *args, **kwargs):
        sizes.append(size)
        assert size[0] * size[1] <= 16 * 224 * 224, f"intermediate image of {size}"
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    encoder = SimpleNamespace(image_size=224, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    strips = [Image.new("RGB", (1, 100_000), (9, 9, 9)), Image.new("RGB", (100_000, 1), (9, 9, 9)),
              Image.new("RGB", (640, 480), (9, 9, 9))]
    pixels, mask = MultimodalEncoder.image_pixels(encoder, strips)
    assert pixels.shape == (3, 224, 224, 3) and mask.all() and sizes


def test_a_nul_in_an_image_path_is_a_bad_image(trained):
    nlp, _ = trained
    linker = nlp.get_pipe("m3el_linker")
    with pytest.raises(ImageLoadError, match="NUL"):
        nlp(item_doc(nlp, image="photo\x00.png"))
    linker.configure(on_bad_image="warn")
    try:
        with pytest.warns(UserWarning, match="NUL"):
            doc = nlp(item_doc(nlp, image="photo\x00.png"))
        assert doc.ents[0].kb_id_.startswith("E")
    finally:
        linker.configure(on_bad_image="raise")


@pytest.mark.parametrize(
    "array, message",
    [(numpy.full((4, 4, 3), numpy.nan, dtype="float32"), "NaN or infinite"),
     (numpy.full((4, 4), numpy.inf), "NaN or infinite"),
     (numpy.ones((4, 4), dtype=bool), "dtype bool"),
     (numpy.empty((4, 4), dtype=object), "dtype object"),
     (numpy.broadcast_to(numpy.uint8(0), (10_001, 10_001)), "too large")],
)
def test_arrays_that_are_not_pictures_are_refused(array, message):
    with pytest.raises(ImageLoadError, match=message):
        load_image(array)


def test_a_replaced_image_file_gets_a_new_cache_key(tmp_path):
    import os

    from spacy_m3el.data.images import image_key

    path = tmp_path / "photo.bmp"  # BMP: same size for the same dimensions
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    first = image_key(path)
    stat = path.stat()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert image_key(path) != first


def test_bad_images_are_counted_per_mention_and_named_by_doc(trained, tmp_path):
    nlp, _ = trained
    linker = nlp.get_pipe("m3el_linker")
    docs = [item_doc(nlp, image=str(ROOT / "assets" / "clipart_mel" / "mention_image" / "CA00013-m2.jpg"))
            for _ in range(10)]
    docs[7]._.image = b"not a picture at all"
    with pytest.raises(ImageLoadError, match=r"20 bytes.*\(doc 7 of the batch, 'They showed"):
        list(nlp.pipe([d.copy() for d in docs], batch_size=10))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    for doc in docs[:3]:
        doc._.image = str(tmp_path / "broken.png")
    linker.configure(on_bad_image="warn")
    before = linker.mentions.bad_images
    try:
        with pytest.warns(UserWarning):
            linked = list(nlp.pipe(docs, batch_size=10))
    finally:
        linker.configure(on_bad_image="raise")
    assert linker.mentions.bad_images == before + 4  # three docs share one broken file, one has bad bytes
    assert all(d.ents[0].kb_id_.startswith("E") for d in linked)


def test_a_cache_missing_an_array_in_meta_json_is_named_at_load(trained, tmp_path):
    import json

    nlp, _ = trained
    nlp.to_disk(tmp_path / "p")
    meta_path = tmp_path / "p" / "m3el_linker" / "index" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["arrays"].remove("text_query")
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(KBError, match=r"lacks the array\(s\) \['text_query'\]"):
        spacy.load(tmp_path / "p")


def test_a_broken_kb_image_never_aborts_training_or_linking(picture_dir, tmp_path):
    nlp = spacy.blank("en")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    kb = MultimodalKB(nlp.vocab)
    for k in range(4):
        image = tmp_path / "broken.png" if k == 2 else picture_dir / f"item{k}.png"
        kb.add_entity(f"E{k}", name=f"Item number {k}", images=[str(image)])
    kb.add_alias("item", [f"E{k}" for k in range(4)], [0.25] * 4)
    linker = nlp.add_pipe("m3el_linker", config={"on_bad_image": "raise"})
    linker.set_kb(lambda vocab: kb)
    docs = []
    for k in range(4):
        doc = item_doc(nlp, image=str(picture_dir / f"item{k}_alt.png"))
        doc.ents = [spacy.tokens.Span(doc, doc.ents[0].start, doc.ents[0].end, label="THING", kb_id=f"E{k}")]
        docs.append(doc)
    examples = examples_for(nlp, docs)
    nlp.initialize(lambda: examples)
    assert nlp.update(examples)["m3el_linker"] > 0  # E2 trains without its image
    with pytest.warns(UserWarning, match=r"1 KB entities are linked without their image.*\['E2'\]"):
        linked = nlp(item_doc(nlp, image=str(picture_dir / "item1_alt.png")))
    assert linked.ents[0].kb_id_.startswith("E")
    assert linker.index_keeper.index.meta["unreadable_kb_images"] == {"count": 1, "ids": ["E2"]}
    assert any("broken.png" in error for error in linker.inputs.kb_images.failures.values())
