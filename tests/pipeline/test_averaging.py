import json

import numpy
import spacy
import torch
from thinc.api import Adam

from .test_linker import train_pipeline


def test_parameter_averages_are_used_to_evaluate_and_save(picture_dir, tmp_path):
    """``use_averages = true``: evaluation and saving run the averaged
    matcher (thinc's own PyTorch shim would keep the last step's weights);
    the scorer fitted for them is what is saved, and training resumes with
    its own weights and index."""
    nlp, examples = train_pipeline(picture_dir, epochs=1)
    linker = nlp.get_pipe("m3el_linker")
    optimizer = Adam(1e-3, use_averages=True)
    for _ in range(3):
        nlp.update(examples[:20], sgd=optimizer)
        nlp.update(examples[20:40], sgd=optimizer)
    matcher = linker.network.matcher
    shim_id = linker.model.shims[0].id
    trained = {name: param.detach().clone() for name, param in linker.network.named_parameters()}
    averaged = {name: torch.from_numpy(numpy.asarray(optimizer.averages[(shim_id, name)])).reshape(trained[name].shape)
                for name in trained if (shim_id, name) in optimizer.averages}
    assert "matcher.text_global_norm.weight" in averaged
    assert not torch.equal(averaged["matcher.text_global_norm.weight"], trained["matcher.text_global_norm.weight"])
    linker.index_keeper.current(linker.kb)
    training_index = linker.index_keeper.index
    with nlp.use_params(optimizer.averages):
        for name, param in linker.network.named_parameters():
            expected = trained[name] if name.startswith("scorer.") or name not in averaged else averaged[name]
            assert torch.equal(param.detach(), expected), name
        assert linker.state.calibration_stale  # the scorer was never fitted for these weights
        nlp.evaluate(examples)  # calibrates for the averaged weights
        assert not linker.state.calibration_stale
        assert linker.index_keeper.index.meta["fingerprint"] == linker.network.fingerprint()
        fitted_scorer = {n: p.detach().clone() for n, p in linker.network.scorer.named_parameters()}
    for name, param in matcher.named_parameters():
        assert torch.equal(param.detach(), trained[f"matcher.{name}"])
    assert linker.index_keeper.index is training_index
    assert linker.state.calibration_stale  # the scorer now holds the averaged weights' fit
    with nlp.use_params(optimizer.averages):  # as spacy train saves model-best after evaluating
        assert not linker.state.calibration_stale
        assert linker.index_keeper.is_current(linker.kb)
        nlp.to_disk(tmp_path / "averaged")
    state = json.loads((tmp_path / "averaged" / "m3el_linker" / "state.json").read_text())
    assert state == {"updates": 8, "calibrated": True}
    loaded = spacy.load(tmp_path / "averaged").get_pipe("m3el_linker")
    for name, param in loaded.network.matcher.named_parameters():
        assert torch.equal(param.detach(), averaged[f"matcher.{name}"])
    for name, param in loaded.network.scorer.named_parameters():
        assert torch.equal(param.detach(), fitted_scorer[name])
    assert (tmp_path / "averaged" / "m3el_linker" / "index" / "meta.json").exists()
    nlp.update(examples[:20], sgd=optimizer)  # the averages move: their index is not kept while training goes on
    assert linker.index_keeper.index is None and linker.averages.index is None
    with nlp.use_params(optimizer.averages):
        assert linker.state.calibration_stale and linker.index_keeper.index is None
