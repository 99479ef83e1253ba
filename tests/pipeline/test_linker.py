import json
import warnings
from pathlib import Path

import numpy
import pytest
import spacy
import torch
from spacy.tokens import DocBin
from spacy.training import Example

from spacy_m3el import MultimodalKB
from spacy_m3el.data.readers import MultimodalCorpus
from spacy_m3el.kb.base import NIL
from spacy_m3el.pipeline import held_out, training
from spacy_m3el.pipeline.calibration import confidence_knots
from spacy_m3el.pipeline.linker import find_linker

N_ENTITIES = 20
CONTEXTS = [
    "They showed me the item at the fair.",
    "Everyone wanted the item after the show.",
]


def build_kb(nlp, picture_dir):
    kb = MultimodalKB(nlp.vocab)
    for k in range(N_ENTITIES):
        kb.add_entity(f"E{k}", name=f"Item number {k}", description="A thing on display.",
                      images=[str(picture_dir / f"item{k}.png")], freq=1)
    # One alias for everything: the text alone cannot tell the entities apart.
    kb.add_alias("item", [f"E{k}" for k in range(N_ENTITIES)], [1.0 / N_ENTITIES] * N_ENTITIES)
    return kb


def make_docs(nlp, picture_dir):
    docs = []
    for k in range(N_ENTITIES):
        for text in CONTEXTS:
            doc = nlp.make_doc(text)
            start = text.index("item")
            doc.ents = [doc.char_span(start, start + 4, label="THING", kb_id=f"E{k}")]
            doc._.image = str(picture_dir / f"item{k}_alt.png")
            docs.append(doc)
    return docs


def examples_for(nlp, docs):
    examples = []
    for ref in docs:
        pred = nlp.make_doc(ref.text)
        pred._.image = ref._.image
        pred.ents = [pred.char_span(e.start_char, e.end_char, label=e.label_) for e in ref.ents]
        examples.append(Example(pred, ref))
    return examples


def train_pipeline(picture_dir, *, epochs=80, **model_switches):
    spacy.util.fix_random_seed(0)
    nlp = spacy.blank("en")
    config = {"model": {"@architectures": "spacy-m3el.M3EL.v1", **model_switches,
                        "encoder": {"@misc": "spacy-m3el.MiniLMEfficientNetEncoder.v1", "frozen": True}}}
    linker = nlp.add_pipe("m3el_linker", config=config)
    kb = build_kb(nlp, picture_dir)
    examples = examples_for(nlp, make_docs(nlp, picture_dir))
    linker.set_kb(lambda vocab: kb)
    optimizer = nlp.initialize(lambda: examples)
    optimizer.learn_rate = 1e-3
    for _ in range(epochs):
        for start in range(0, len(examples), 20):
            nlp.update(examples[start : start + 20], sgd=optimizer)
    return nlp, examples


@pytest.fixture(scope="module")
def trained(picture_dir):
    return train_pipeline(picture_dir)


def hits_at_1(nlp, examples):
    return nlp.evaluate(examples)["m3el_hits1"]


@pytest.mark.slow
def test_overfits_with_images_but_text_alone_cannot(trained, picture_dir):
    nlp, examples = trained
    assert hits_at_1(nlp, examples) == 1.0
    text_only, text_examples = train_pipeline(picture_dir, use_image=False, use_t2v=False, use_v2t=False)
    # Every mention has one of two texts: a text-only model links each text to one entity.
    assert hits_at_1(text_only, text_examples) <= 2 / N_ENTITIES + 1e-9


def test_linked_doc_has_kb_id_score_and_candidates(trained, picture_dir):
    nlp, examples = trained
    nlp.evaluate(examples)  # calibrates first (calibrate_on_score), as spacy train does: the confidence map
    doc = nlp.make_doc("Look at the item over there.")
    doc._.image = str(picture_dir / "item7_alt.png")
    doc.ents = [doc.char_span(12, 16, label="THING")]
    doc = nlp(doc)
    ent = doc.ents[0]
    assert ent.kb_id_ == "E7"
    first = ent._.m3el_candidates[0]
    # m3el_score is the probability that the answer is right: the answer's probability through the
    # confidence map the calibration fitted; the raw M3EL score stays per candidate.
    knots = confidence_knots(find_linker(nlp).network.scorer)
    assert knots is not None  # the examples' 3 picture conditions give enough answers
    assert 0.0 <= ent._.m3el_score <= 1.0 and ent._.m3el_score == pytest.approx(numpy.interp(first["prob"], *knots))
    assert set(first["branches"]) == {"text", "image", "t2v", "v2t"}
    assert first["score"] == pytest.approx(sum(first["branches"].values()) / 4, rel=1e-4)
    assert set(first["features"]) == {"log_prior", "from_alias", "name_exact", "name_normalized"}
    probs = [c["prob"] for c in ent._.m3el_candidates]
    assert probs == sorted(probs, reverse=True) and len(probs) == N_ENTITIES
    assert sum(probs) + ent._.m3el_nil_prob == pytest.approx(1.0, abs=1e-5)


def test_save_and_load_give_identical_predictions(trained, picture_dir, tmp_path):
    nlp, examples = trained
    nlp.to_disk(tmp_path / "pipeline")
    assert (tmp_path / "pipeline" / "m3el_linker" / "index" / "meta.json").exists()
    loaded = spacy.load(tmp_path / "pipeline")
    assert isinstance(loaded.get_pipe("m3el_linker").kb, MultimodalKB)
    docs_a = list(nlp.pipe([eg.predicted.copy() for eg in examples[:10]]))
    docs_b = list(loaded.pipe([eg.predicted.copy() for eg in examples[:10]]))
    for a, b in zip(docs_a, docs_b):
        assert [e.kb_id_ for e in a.ents] == [e.kb_id_ for e in b.ents]
        for ea, eb in zip(a.ents, b.ents):
            assert eb._.m3el_score == pytest.approx(ea._.m3el_score, rel=1e-4)
    from_bytes = spacy.blank("en")
    from_bytes.add_pipe("m3el_linker").from_bytes(nlp.get_pipe("m3el_linker").to_bytes())
    doc = from_bytes(examples[3].predicted.copy())
    assert doc.ents[0].kb_id_ == docs_a[3].ents[0].kb_id_


def test_weights_saved_before_the_confidence_map_still_load(trained):
    from safetensors.torch import load, save

    from spacy_m3el.pipeline.architecture import _deserialize, _serialize

    network = find_linker(trained[0]).network
    device = next(network.parameters()).device
    state = load(_serialize(network))
    older = {k: v for k, v in state.items() if k not in ("scorer.confidence_x", "scorer.confidence_y")}
    assert len(older) == len(state) - 2
    # Before the text expert: three NIL features and one NIL weight more, a text boost, no text expert,
    # a gate of three inputs.
    legacy = {k: v for k, v in older.items() if not k.startswith("scorer.text_")}
    legacy["scorer.nil_weights"] = torch.cat([state["scorer.nil_weights"][:3], torch.tensor([0.5])])
    legacy["scorer.gate_weights"] = state["scorer.gate_weights"][:4]
    legacy["scorer.text_boost"] = torch.tensor([0.2])
    # Before the mixture: a gate of three inputs, NIL options of three features.
    mixture_less = dict(older)
    for name in ("scorer.nil_weights", "scorer.text_nil_weights"):
        mixture_less[name] = state[name][:3]
    mixture_less["scorer.gate_weights"] = state["scorer.gate_weights"][:4]
    padded_nil = state["scorer.nil_weights"][:3].tolist() + [0.0, 0.0]
    try:
        _deserialize(network, save(older), device)
        with pytest.raises(ValueError, match="missing \\['scorer.log_scale'\\]"):
            _deserialize(network, save({k: v for k, v in older.items() if k != "scorer.log_scale"}), device)
        with pytest.warns(UserWarning, match="before the candidate scorer had a text expert"):
            _deserialize(network, save(legacy), device)
        assert network.scorer.nil_weights.tolist() == padded_nil
        assert network.scorer.text_nil_weights.tolist() == padded_nil
        with pytest.warns(UserWarning, match="mixed its experts' probabilities"):
            _deserialize(network, save(mixture_less), device)
        assert network.scorer.nil_weights.tolist() == padded_nil
        assert network.scorer.gate_weights.tolist() == state["scorer.gate_weights"][:4].tolist() + [0.0, 0.0]
    finally:
        _deserialize(network, save(state), device)


def test_cache_settings_are_saved_and_a_change_rebuilds_the_cache(trained, tmp_path):
    import srsly

    nlp, examples = trained
    nlp.to_disk(tmp_path / "pipeline")
    meta = srsly.read_json(tmp_path / "pipeline" / "m3el_linker" / "index" / "meta.json")
    assert meta["max_queries"] is None  # exact by default
    with pytest.warns(UserWarning, match="other settings"):
        pooled = spacy.load(tmp_path / "pipeline", config={"components.m3el_linker.max_cached_queries": 12})
    docs = [eg.predicted.copy() for eg in examples[::4]]
    exact_docs = list(nlp.pipe([d.copy() for d in docs]))
    pooled_docs = list(pooled.pipe([d.copy() for d in docs]))
    linker = pooled.get_pipe("m3el_linker")
    meta = linker.index_keeper.index.meta
    assert meta["max_queries"] == 12 and linker.entity_index.arrays["image_query"].shape[1] == 12
    # Building a pooled cache measures its agreement with the exact score.
    assert meta["pooling_agreement"]["sample"] == N_ENTITIES and 0.0 <= meta["pooling_agreement"]["top1"] <= 1.0
    assert nlp.get_pipe("m3el_linker").entity_index.arrays["image_query"].shape[1] == 49
    linker.configure(max_cached_queries=4)  # on a running linker: the index follows at its next use
    assert not linker.index_keeper.is_current(linker.kb) and linker.entity_index.meta["max_queries"] == 4
    linker.configure(max_cached_queries=12)
    for a, b in zip(exact_docs, pooled_docs):
        assert a.ents[0].kb_id_ == b.ents[0].kb_id_
        # Pooled image queries change the G2L part of the score a little.
        assert a.ents[0]._.m3el_score == pytest.approx(b.ents[0]._.m3el_score, rel=0.1)
    with pytest.raises(ValueError, match="max_cached_queries"):
        spacy.blank("en").add_pipe("m3el_linker", config={"max_cached_queries": 0})


def test_an_update_drops_the_stale_entity_cache(picture_dir):
    nlp, examples = train_pipeline(picture_dir, epochs=1)
    linker = nlp.get_pipe("m3el_linker")
    before = linker.entity_index.meta["fingerprint"]
    assert linker.index_keeper.index is not None
    nlp.update(examples[:20], sgd=nlp.create_optimizer())
    assert linker.index_keeper.index is None
    nlp(examples[0].predicted.copy())  # rebuilt for the new weights
    assert linker.index_keeper.index.meta["fingerprint"] == linker.network.fingerprint() != before


def test_training_and_evaluation_hand_freed_memory_back(picture_dir, monkeypatch):
    nlp, examples = train_pipeline(picture_dir, epochs=1)
    calls = []
    monkeypatch.setattr(training, "RELEASE_EVERY", 2)
    monkeypatch.setattr(training, "release_freed_memory", lambda: calls.append("update") or True)
    monkeypatch.setattr(held_out, "release_freed_memory", lambda: calls.append("score") or True)
    nlp.get_pipe("m3el_linker").state.updates = 0
    optimizer = nlp.create_optimizer()
    for _ in range(2):  # 4 updates: the 2nd and the 4th hand memory back
        nlp.update(examples[:20], sgd=optimizer)
        nlp.update(examples[20:40], sgd=optimizer)
    nlp.evaluate(examples[:10])
    assert calls == ["update", "update", "score"]


def test_nil_by_threshold_and_by_missing_candidates(trained, picture_dir):
    nlp, examples = trained
    linker = nlp.get_pipe("m3el_linker")
    doc = examples[0].predicted.copy()
    try:
        linker.configure(threshold=1.0)
        ent = nlp(doc.copy()).ents[0]
        assert (ent.kb_id_ == NIL) == (ent._.m3el_candidates[0]["prob"] < 1.0)
        linker.configure(threshold=None, n_candidates=0)  # alias table only
        other = nlp.make_doc("The gadget was here.")
        other.ents = [other.char_span(4, 10, label="THING")]
        linked = nlp(other)
        assert linked.ents[0].kb_id_ == NIL and linked.ents[0]._.m3el_candidates == []
        assert nlp(doc.copy()).ents[0].kb_id_ != NIL  # "item" is an alias
    finally:
        linker.configure(threshold=None, n_candidates=64)


def test_settings_change_only_through_configure_and_only_to_valid_values(trained):
    import dataclasses

    linker = trained[0].get_pipe("m3el_linker")
    with pytest.raises(dataclasses.FrozenInstanceError):
        linker.settings.threshold = 0.5
    with pytest.raises(ValueError, match="threshold is a probability"):
        linker.configure(threshold=1e9)
    # Checked as a whole: dropping the last candidate source is refused, and nothing changes.
    with pytest.raises(ValueError, match="no candidate source"):
        linker.configure(n_candidates=0, use_alias_candidates=False)
    with pytest.raises(ValueError, match="Unknown m3el_linker setting.*'treshold'"):
        linker.configure(treshold=0.5)
    assert linker.settings.threshold is None and linker.settings.n_candidates == 64
    assert linker.settings.use_alias_candidates
    old = linker.configure(on_bad_image="warn")
    try:
        # One settings object: the image loader sees the change.
        assert old == {"on_bad_image": "raise"} and linker.inputs.images.policy.on_bad_image == "warn"
    finally:
        linker.configure(**old)


def test_docs_without_images_or_entities_still_work(trained):
    nlp, _ = trained
    text = "No picture, just the item."
    doc = nlp.make_doc(text)
    doc.ents = [doc.char_span(text.index("item"), text.index("item") + 4, label="THING")]
    linked = nlp(doc)
    assert linked.ents[0].kb_id_.startswith("E")
    assert linked.ents[0]._.m3el_candidates[0]["branches"]["image"] == 0.0
    empty = nlp(nlp.make_doc(""))
    assert len(empty.ents) == 0
    batch = list(nlp.pipe([nlp.make_doc("nothing here"), nlp.make_doc("")], batch_size=2))
    assert all(len(d.ents) == 0 for d in batch)


def test_wrong_kb_type_is_rejected():
    from spacy.kb import InMemoryLookupKB

    nlp = spacy.blank("en")
    linker = nlp.add_pipe("m3el_linker")
    with pytest.raises(TypeError, match="MultimodalKB"):
        linker.set_kb(lambda vocab: InMemoryLookupKB(vocab, entity_vector_length=3))
    with pytest.raises(ValueError, match="empty KB"):
        linker.initialize(lambda: [Example(nlp.make_doc("a"), nlp.make_doc("a"))])


def test_spacy_train_from_a_config(picture_dir, tmp_path):
    from spacy.cli.train import train

    nlp = spacy.blank("en")
    kb = build_kb(nlp, picture_dir)
    kb.to_disk(tmp_path / "kb")
    docs = make_docs(nlp, picture_dir)
    DocBin(docs=docs, store_user_data=True).to_disk(tmp_path / "train.spacy")
    DocBin(docs=docs[::3], store_user_data=True).to_disk(tmp_path / "dev.spacy")
    config = Path(__file__).parents[2] / "configs" / "tiny_cpu.cfg"
    train(
        config,
        tmp_path / "out",
        overrides={
            "paths.train": str(tmp_path / "train.spacy"),
            "paths.dev": str(tmp_path / "dev.spacy"),
            "paths.kb": str(tmp_path / "kb"),
            "training.max_epochs": 3,
            "training.eval_frequency": 2,
        },
    )
    best = spacy.load(tmp_path / "out" / "model-best")
    meta = best.meta["performance"]
    for key in ("nel_micro_f", "m3el_hits1", "m3el_mrr"):
        assert key in meta
    assert meta["m3el_mrr"] > 0.2  # well above chance (about 0.18 for 20 entities)
    assert best.get_pipe("m3el_linker").kb.get_size_entities() == N_ENTITIES
    # The config averages the parameters: model-best holds the weights (and the scorer's fit) that were scored.
    assert best.get_pipe("m3el_linker").state.to_dict()["calibrated"]
    rescored = best.evaluate(list(MultimodalCorpus(tmp_path / "dev.spacy", gold_ents=True)(best)))
    assert rescored["m3el_mrr"] == pytest.approx(meta["m3el_mrr"], abs=1e-6)


def test_an_entity_added_after_linking_is_found(picture_dir):
    """Regression: the linker kept the cache it had built before the KB grew,
    so the new entity was never a candidate and its alias row indexed past
    the end of the cache."""
    nlp, examples = train_pipeline(picture_dir, epochs=1)
    linker = nlp.get_pipe("m3el_linker")
    nlp(examples[0].predicted.copy())  # builds and uses the cache
    linker.kb.add_entity("E_new", name="Brand new gadget", description="Added later.",
                         images=[str(picture_dir / "item21.png")])
    linker.kb.add_alias("gadget", ["E_new"], [1.0])
    doc = nlp.make_doc("The gadget was here.")
    doc.ents = [doc.char_span(4, 10, label="THING")]
    doc._.image = str(picture_dir / "item21_alt.png")
    ent = nlp(doc).ents[0]
    assert ent.kb_id_ == "E_new"
    assert ent._.m3el_candidates[0]["prior"] == 1.0
    assert len(linker.entity_index) == N_ENTITIES + 1
    assert "E_new" in {c["id"] for c in nlp(examples[0].predicted.copy()).ents[0]._.m3el_candidates}


def test_serialisation_honours_exclude(trained, tmp_path):
    from spacy_m3el import KBError

    nlp, _ = trained
    linker = nlp.get_pipe("m3el_linker")
    assert linker.entity_index is not None  # built: saved with the pipeline unless the KB is left out
    linker.to_disk(tmp_path / "weights_only", exclude=["kb"])
    assert sorted(p.name for p in (tmp_path / "weights_only").iterdir()) == ["model", "state.json"]
    fresh = spacy.blank("en").add_pipe("m3el_linker")
    empty_kb = fresh.kb
    fresh.from_disk(tmp_path / "weights_only", exclude=["kb"])
    assert fresh.kb is empty_kb and fresh.network.fingerprint() == linker.network.fingerprint()
    assert len(linker.to_bytes()) - len(linker.to_bytes(exclude=["kb"])) >= len(linker.kb.to_bytes())
    other = spacy.blank("en").add_pipe("m3el_linker")
    weights = other.network.fingerprint()
    # The index was built by the trained weights, not by the kept ones.
    with pytest.raises(KBError, match="different model"):
        other.from_bytes(linker.to_bytes(), exclude=["model"])
    assert other.network.fingerprint() == weights


def nil_examples(nlp, picture_dir):
    """Mentions of things the KB does not have: unseen names, unseen pictures."""
    docs = []
    for k, name in zip(range(20, 24), ("gizmo", "widget", "doohickey", "thingamajig")):
        for text in (f"They showed me the {name} at the fair.", f"Everyone wanted the {name} after the show."):
            doc = nlp.make_doc(text)
            start = text.index(name)
            doc.ents = [doc.char_span(start, start + len(name), label="THING", kb_id=NIL)]
            doc._.image = str(picture_dir / f"item{k}.png")
            docs.append(doc)
    return examples_for(nlp, docs)


@pytest.mark.slow
def test_calibrated_linker_gives_probabilities_and_says_nil(picture_dir):
    nlp, examples = train_pipeline(picture_dir, epochs=30)
    linker = nlp.get_pipe("m3el_linker")
    assert linker.state.calibration_stale  # trained since the last calibration
    report = linker.calibrate(examples + nil_examples(nlp, picture_dir))
    assert report["nil_option"] and report["nil_mentions"] == 8 and not linker.state.calibration_stale
    assert report["nll_after"] < report["nll_before"]
    doc = nlp.make_doc("Nobody had heard of the Zorgl before.")
    doc.ents = [doc.char_span(24, 29, label="THING")]
    doc = nlp(doc)
    knots = confidence_knots(linker.network.scorer)  # a NIL answer's score is NIL's probability, mapped
    assert doc.ents[0].kb_id_ == NIL and doc.ents[0]._.m3el_nil_prob > 0.5 and knots is not None
    assert doc.ents[0]._.m3el_score == pytest.approx(numpy.interp(doc.ents[0]._.m3el_nil_prob, *knots))
    scores = nlp.evaluate(examples)
    assert scores["m3el_hits1"] > 0.9 and scores["m3el_accuracy"] > 0.9
    for eg in examples:
        ent = nlp(eg.predicted.copy()).ents[0]
        assert 0.0 <= ent._.m3el_score <= 1.0
    # Saved and loaded, the calibration travels with the weights.
    restored = spacy.blank("en")
    restored.add_pipe("m3el_linker", config={"model": nlp.get_pipe_config("m3el_linker")["model"]})
    restored.from_bytes(nlp.to_bytes())
    assert not restored.get_pipe("m3el_linker").state.calibration_stale
    doc2 = restored.make_doc("Nobody had heard of the Zorgl before.")
    doc2.ents = [doc2.char_span(24, 29, label="THING")]
    doc2 = restored(doc2)
    assert doc2.ents[0].kb_id_ == NIL
    assert doc2.ents[0]._.m3el_nil_prob == pytest.approx(doc.ents[0]._.m3el_nil_prob, abs=1e-5)


def alias_examples(nlp, picture_dir, *, image=True):
    """Mentions that name their entity (a one-entity alias), with or without its picture."""
    docs = []
    for k in range(N_ENTITIES):
        text = f"They showed me the thing{k} at the fair."
        doc = nlp.make_doc(text)
        start = text.index("thing")
        doc.ents = [doc.char_span(start, start + len(f"thing{k}"), label="THING", kb_id=f"E{k}")]
        doc._.image = str(picture_dir / f"item{k}_alt.png") if image else None
        docs.append(doc)
    return examples_for(nlp, docs)


@pytest.mark.slow
def test_a_mention_without_a_picture_in_a_mixed_batch_is_linked_by_its_text(picture_dir):
    """Calibrated on mentions with their picture, without and shuffled, the
    NIL option does not learn "no picture = NIL": a mention that its text
    identifies is linked without its picture, next to one with a picture."""
    nlp, examples = train_pipeline(picture_dir, epochs=30)
    linker = nlp.get_pipe("m3el_linker")
    for k in range(N_ENTITIES):
        linker.kb.add_alias(f"thing{k}", [f"E{k}"], [1.0])
    report = linker.calibrate(examples + alias_examples(nlp, picture_dir) + nil_examples(nlp, picture_dir))
    assert set(report["conditions"]) == {"given", "none", "shuffled"}
    assert report["conditions"]["none"]["nil_on_linkable"] < 0.1
    batch = [eg.predicted.copy() for eg in alias_examples(nlp, picture_dir)[3:5]]
    batch[1]._.image = None
    docs = list(nlp.pipe(batch))
    with_picture, without = docs[0].ents[0], docs[1].ents[0]
    assert with_picture.kb_id_ == "E3" and with_picture._.m3el_modalities == ["text", "image"]
    assert without.kb_id_ == "E4" and without._.m3el_modalities == ["text"]
    assert without._.m3el_nil_prob < 0.5 and without._.m3el_score > 0.5


def test_an_untrained_or_uncalibrated_linker_says_so_once_after_loading(picture_dir, tmp_path):
    def first_calls(folder):
        nlp = spacy.load(folder)
        doc = nlp.make_doc("They showed me the item.")
        doc.ents = [doc.char_span(19, 23, label="THING")]
        doc._.image = str(picture_dir / "item1_alt.png")
        said = []
        for _ in range(2):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                nlp(doc.copy())
            said.append([str(w.message) for w in caught])
        return said

    untrained, examples = train_pipeline(picture_dir, epochs=0)
    untrained.to_disk(tmp_path / "untrained")
    said = first_calls(tmp_path / "untrained")
    assert len(said[0]) == 1 and "has not been trained (0 updates)" in said[0][0] and said[1] == []
    trained, examples = train_pipeline(picture_dir, epochs=1)
    trained.to_disk(tmp_path / "trained")
    said = first_calls(tmp_path / "trained")
    assert len(said[0]) == 1 and "not calibrated" in said[0][0] and said[1] == []
    trained.get_pipe("m3el_linker").calibrate(examples)
    trained.to_disk(tmp_path / "calibrated")
    assert first_calls(tmp_path / "calibrated") == [[], []]
    state = json.loads((tmp_path / "calibrated" / "m3el_linker" / "state.json").read_text())
    assert state == {"updates": 2, "calibrated": True}  # 40 examples in batches of 20


def test_saving_never_encodes_the_kb(picture_dir, tmp_path):
    nlp, examples = train_pipeline(picture_dir, epochs=1)
    linker = nlp.get_pipe("m3el_linker")
    assert linker.index_keeper.index is None  # training updates dropped it
    builds = []
    build = linker.index_keeper.build
    linker.index_keeper.build = lambda *args, **kwargs: builds.append(1) or build(*args, **kwargs)
    nlp.to_disk(tmp_path / "saved")
    linker.to_bytes()
    assert builds == [] and not (tmp_path / "saved" / "m3el_linker" / "index").exists()
    # Loaded without an index, the pipeline builds it at first use; once built, it is saved with it.
    loaded = spacy.load(tmp_path / "saved")
    doc = loaded(examples[0].predicted.copy())
    assert doc.ents[0].kb_id_.startswith("E") and loaded.get_pipe("m3el_linker").index_keeper.index is not None
    loaded.to_disk(tmp_path / "with_cache")
    assert (tmp_path / "with_cache" / "m3el_linker" / "index" / "meta.json").exists()


def test_a_pipeline_saved_with_its_index_in_kb_cache_loads_it(trained, tmp_path):
    """Pipelines saved before the index had its own folder kept it in kb/cache/: read, not rebuilt."""
    import shutil

    nlp, examples = trained
    linker = nlp.get_pipe("m3el_linker")
    assert linker.entity_index is not None
    nlp.to_disk(tmp_path / "p")
    saved = tmp_path / "p" / "m3el_linker"
    shutil.move(saved / "index", saved / "kb" / "cache")
    meta = json.loads((saved / "kb" / "cache" / "meta.json").read_text())
    del meta["kb"]  # nor did they record the KB's entity ids
    (saved / "kb" / "cache" / "meta.json").write_text(json.dumps(meta))
    loaded = spacy.load(tmp_path / "p").get_pipe("m3el_linker")
    index = loaded.index_keeper.index
    assert index is not None and loaded.entity_index is index  # valid: taken as it is
    assert loaded.index_keeper.is_current(loaded.kb)


def test_both_runtimes_link_alike_and_one_doc_runs_torch_on_one_thread(trained, picture_dir, monkeypatch):
    from spacy_m3el.pipeline import linking

    nlp, examples = trained
    linker = find_linker(nlp)
    with pytest.raises(ValueError, match="inference_runtime must be one of"):
        linker.configure(inference_runtime="onnx")
    seen_threads = []
    two_stage = linking.two_stage
    monkeypatch.setattr(linking, "two_stage", lambda *a, **k: seen_threads.append(torch.get_num_threads())
                        or two_stage(*a, **k))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    links, probs = {}, {}
    try:
        for runtime, precision in (("torch", "float32"), ("torch", "auto"), ("openvino", "auto")):
            linker.configure(inference_runtime=runtime, inference_precision=precision)
            docs = [nlp(eg.predicted.copy()) for eg in examples[:6]]
            links[runtime, precision] = [ent.kb_id_ for doc in docs for ent in doc.ents]
            probs[runtime, precision] = numpy.array([ent._.m3el_candidates[0]["prob"] for doc in docs
                                                     for ent in doc.ents])
            assert torch.get_num_threads() == 2  # given back after every call
            list(nlp.pipe([eg.predicted.copy() for eg in examples[:20]], batch_size=20))  # 20 mentions: all threads
    finally:
        linker.configure(inference_runtime="auto", inference_precision="auto")
        torch.set_num_threads(threads)
    gold = [eg.reference.ents[0].kb_id_ for eg in examples[:6]]
    assert links["openvino", "auto"] == links["torch", "auto"] == links["torch", "float32"] == gold
    # Both bfloat16 routes round: OpenVINO's no further from float32's probabilities than PyTorch's.
    exact = probs["torch", "float32"]
    assert abs(probs["openvino", "auto"] - exact).max() <= abs(probs["torch", "auto"] - exact).max() + 0.01
    # One doc in the OpenVINO runtime: torch's own ops ran on one thread, the rest on two.
    assert seen_threads == [2] * 7 + [2] * 7 + [1] * 6 + [2]
