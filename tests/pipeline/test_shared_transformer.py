"""One spacy-transformers `transformer` shared by `ner` and the linker."""
import json
import subprocess
import sys

import pytest
import spacy
import torch
from spacy.training import Example

import spacy_m3el
from spacy_m3el.pipeline.linker import find_linker
from spacy_m3el.pipeline.shared_transformer import create_load_frozen_transformers, find_listener
from tests.pipeline.test_linker import CONTEXTS, N_ENTITIES, build_kb, make_docs
from tests.test_package import package_wheel

NAME = "m3el_trf_citest"
TRANSFORMER = {"model": {"@architectures": "spacy-m3el.TransformerModel.v1", "name": None}}
NER = {"model": {"@architectures": "spacy.TransitionBasedParser.v2", "state_type": "ner", "hidden_width": 32,
                 "tok2vec": {"@architectures": "spacy-transformers.TransformerListener.v1", "grad_factor": 1.0,
                             "pooling": {"@layers": "reduce_mean.v1"}, "upstream": "transformer"}}}
LINKER = {"model": {"@architectures": "spacy-m3el.M3EL.v1",
                    "encoder": {"@misc": "spacy-m3el.SharedTransformerEncoder.v1", "upstream": "transformer"}}}


def shared_pipeline(picture_dir, *, with_ner: bool = True):
    spacy.util.fix_random_seed(0)
    nlp = spacy.blank("en")
    nlp.add_pipe("transformer", config=TRANSFORMER)
    if with_ner:
        nlp.add_pipe("ner", config=NER)
    linker = nlp.add_pipe("m3el_linker", config=LINKER)
    kb = build_kb(nlp, picture_dir)
    linker.set_kb(lambda vocab: kb)
    return nlp


def examples_for(nlp, docs):
    """Predicted docs from the raw text and image: ner must find the mentions."""
    return [Example(spacy_m3el.make_doc(nlp, ref.text, ref._.image), ref) for ref in docs]


def train_frozen(nlp, examples, epochs):
    """As configs/trf_cpu.cfg trains: the transformer frozen and annotating,
    ner and the linker learning on its output."""
    create_load_frozen_transformers()(nlp)  # [initialize.before_init]
    with nlp.select_pipes(disable=["transformer"]):
        optimizer = nlp.initialize(lambda: examples)
    optimizer.learn_rate = 1e-3
    for _ in range(epochs):
        for start in range(0, len(examples), 8):
            nlp.update(examples[start : start + 8], sgd=optimizer, exclude=["transformer"], annotates=["transformer"])


@pytest.fixture(scope="module")
def trained_shared(picture_dir):
    nlp = shared_pipeline(picture_dir)
    examples = examples_for(nlp, make_docs(nlp, picture_dir))
    train_frozen(nlp, examples, epochs=20)
    return nlp, examples


def hf_model(nlp):
    return nlp.get_pipe("transformer").model.transformer


def test_one_text_model_in_memory(trained_shared):
    nlp, _ = trained_shared
    linker = find_linker(nlp)
    shared = linker.network.encoder.text_model()
    assert shared.model is hf_model(nlp)
    assert shared.tokenizer is nlp.get_pipe("transformer").model.tokenizer
    # The linker's own weights hold no copy: its torch module has no transformer parameter.
    borrowed = {id(p) for p in hf_model(nlp).parameters()}
    assert not any(id(p) in borrowed for p in linker.network.parameters())
    assert not any(name.startswith("encoder.text") for name in linker.network.trainable_state())


def test_training_moves_the_transformer_through_both_listeners(picture_dir):
    nlp = shared_pipeline(picture_dir)
    examples = examples_for(nlp, make_docs(nlp, picture_dir))
    nlp.initialize(lambda: examples)
    before = {k: v.clone() for k, v in hf_model(nlp).state_dict().items()}
    optimizer = nlp.create_optimizer()
    losses = {}
    nlp.update(examples[:20], sgd=optimizer, losses=losses)
    assert losses["transformer"] > 0 and losses["m3el_linker"] > 0 and losses["ner"] > 0
    # spaCy steps each component right after its update, so the listeners'
    # gradients wait in the shared model for the transformer's next step.
    assert any(p.grad is not None and p.grad.any() for p in hf_model(nlp).parameters())
    nlp.update(examples[20:], sgd=optimizer, losses=losses)
    after = hf_model(nlp).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_kb_text_gradient_reaches_the_shared_model(picture_dir):
    nlp = shared_pipeline(picture_dir, with_ner=False)
    examples = examples_for(nlp, make_docs(nlp, picture_dir))
    nlp.initialize(lambda: examples)
    transformer, linker = nlp.get_pipe("transformer"), find_linker(nlp)
    seen = []
    hf = hf_model(nlp)
    # Record the word embedding gradient before the upstream's backprop adds
    # the mention side's: only the KB texts' encoding can have put it there.
    send = linker.network.encoder
    transformer.update(examples[:20])
    listener = transformer.listeners[0]
    original = listener._backprop

    def spy(d_trf_datas):
        grad = hf.embeddings.word_embeddings.weight.grad
        seen.append(None if grad is None else float(grad.abs().sum()))
        return original(d_trf_datas)

    listener._backprop = spy
    linker.update(examples[:20])
    assert send.text_training is False
    assert seen and seen[0] is not None and seen[0] > 0


def test_links_raw_text_with_an_image(trained_shared, picture_dir):
    nlp, _ = trained_shared
    correct = 0
    for k in range(N_ENTITIES):
        doc = nlp(spacy_m3el.make_doc(nlp, CONTEXTS[k % 2], picture_dir / f"item{k}_alt.png"))
        assert [ent.text for ent in doc.ents] == ["item"]  # found by ner, not given
        correct += doc.ents[0].kb_id_ == f"E{k}"
        assert 0.0 <= doc.ents[0]._.m3el_score <= 1.0
    assert correct >= 0.9 * N_ENTITIES


def test_save_and_load_keep_ids_scores_and_sharing(trained_shared, picture_dir, tmp_path):
    nlp, examples = trained_shared
    texts = [(CONTEXTS[k % 2], picture_dir / f"item{k}_alt.png") for k in range(N_ENTITIES)]
    before = [[(e.kb_id_, e._.m3el_score) for e in nlp(spacy_m3el.make_doc(nlp, t, i)).ents] for t, i in texts]
    nlp.to_disk(tmp_path / "shared")
    loaded = spacy.load(tmp_path / "shared")
    assert find_linker(loaded).network.encoder.text_model().model is hf_model(loaded)
    after = [[(e.kb_id_, e._.m3el_score) for e in loaded(spacy_m3el.make_doc(loaded, t, i)).ents] for t, i in texts]
    assert [[kb for kb, _ in doc] for doc in after] == [[kb for kb, _ in doc] for doc in before]
    for doc_before, doc_after in zip(before, after):
        for (_, s1), (_, s2) in zip(doc_before, doc_after):
            assert s2 == pytest.approx(s1, abs=1e-5)
    # The saved entity index was taken as it is (same weights), not rebuilt.
    assert find_linker(loaded).index_keeper.index is not None


def test_cache_is_rebuilt_when_the_transformer_changes(trained_shared, picture_dir, tmp_path):
    nlp, examples = trained_shared
    nlp.to_disk(tmp_path / "copy")
    copy = spacy.load(tmp_path / "copy")
    linker = find_linker(copy)
    cache = linker.entity_index
    assert linker.entity_index is cache
    with torch.no_grad():
        hf_model(copy).embeddings.word_embeddings.weight.mul_(1.5)  # as an update by another listener would
    assert linker.entity_index is not cache


def test_errors_name_the_missing_transformer(picture_dir):
    nlp = spacy.blank("en")
    linker = nlp.add_pipe("m3el_linker", config=LINKER)
    kb = build_kb(nlp, picture_dir)
    linker.set_kb(lambda vocab: kb)
    examples = examples_for(nlp, make_docs(nlp, picture_dir))
    nlp.initialize(lambda: examples)
    with pytest.raises(ValueError, match="component named 'transformer'"):
        linker.build_entity_index()


def test_doc_without_transformer_output_is_an_error(trained_shared, picture_dir):
    nlp, _ = trained_shared
    doc = nlp.make_doc(CONTEXTS[0])
    doc.ents = [doc.char_span(19, 23, label="THING")]
    with pytest.raises(ValueError, match="has none: run the whole pipeline"):
        find_linker(nlp)(doc)


def test_width_mismatch_is_explained(picture_dir):
    nlp = spacy.blank("en")
    nlp.add_pipe("transformer", config=TRANSFORMER)
    config = json.loads(json.dumps(LINKER))
    config["model"]["encoder"]["text_dim"] = 256
    linker = nlp.add_pipe("m3el_linker", config=config)
    kb = build_kb(nlp, picture_dir)
    linker.set_kb(lambda vocab: kb)
    examples = examples_for(nlp, make_docs(nlp, picture_dir))
    with pytest.raises(ValueError, match="text_dim = 384"):
        nlp.initialize(lambda: examples)
        linker.build_entity_index()


@pytest.mark.slow
def test_spacy_package_of_the_shared_pipeline(trained_shared, picture_dir, tmp_path):
    nlp, _ = trained_shared
    expected = [e.kb_id_ for e in nlp(spacy_m3el.make_doc(nlp, CONTEXTS[0], picture_dir / "item7_alt.png")).ents]
    meta, _ = package_wheel(nlp, NAME, tmp_path)
    try:
        assert any(req.startswith("spacy-m3el") for req in meta["requirements"]), meta["requirements"]
        assert any(req.startswith("spacy-transformers") for req in meta["requirements"]), meta["requirements"]
        script = (
            "import spacy, spacy_m3el\n"
            f"nlp = spacy.load('en_{NAME}')\n"
            f"doc = nlp(spacy_m3el.make_doc(nlp, {CONTEXTS[0]!r}, {str(picture_dir / 'item7_alt.png')!r}))\n"
            "print(nlp.pipe_names, [e.kb_id_ for e in doc.ents])\n"
        )
        out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                             cwd=tmp_path)
        assert out.stdout.strip() == f"{['transformer', 'ner', 'm3el_linker']} {expected}"
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", f"en_{NAME}"], check=False)


def test_frozen_transformer_is_read_and_left_alone(picture_dir):
    nlp = shared_pipeline(picture_dir)
    create_load_frozen_transformers()(nlp)  # [initialize.before_init]: spaCy skips frozen components
    for name in ("ner", "m3el_linker"):
        assert find_listener(nlp.get_pipe(name).model).get_dim("nO") == 384
    examples = examples_for(nlp, make_docs(nlp, picture_dir))
    with nlp.select_pipes(disable=["transformer"]):
        nlp.initialize(lambda: examples)
    before = {k: v.clone() for k, v in hf_model(nlp).state_dict().items()}
    optimizer = nlp.create_optimizer()
    for _ in range(3):  # the transformer annotates (doc._.trf_data) and is not updated
        nlp.update(examples[:20], sgd=optimizer, exclude=["transformer"], annotates=["transformer"])
    after = hf_model(nlp).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in hf_model(nlp).parameters())
