"""The OpenVINO runtime of a frozen backbone: same features as PyTorch
(float32 to float32's rounding, bfloat16 to bfloat16's), used only where it
may be, and rebuilt when the weights change."""
import copy
import os
import subprocess
import sys

import pytest
import torch

from spacy_m3el.data.images import load_image
from spacy_m3el.encoders import MiniLMEfficientNetEncoder
from spacy_m3el.encoders import openvino_runtime
from spacy_m3el.encoders.base import PreprocessedImages
from spacy_m3el.encoders.openvino_runtime import resolve_runtime

TEXTS = ["Jordan [SEP] Jordan scored 40 points in the final.", "Paris", "the old clock [SEP] it struck twelve"]


@pytest.fixture(scope="module")
def encoder():
    return MiniLMEfficientNetEncoder(frozen=True)

@pytest.fixture(scope="module")
def images(picture_dir):
    return [load_image(picture_dir / "item1.png"), None, load_image(picture_dir / "item3.png")]

def encode(encoder, images, runtime, dtype=None):
    autocast = torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), autocast, encoder.inference_runtime_scope(runtime):
        return encoder.encode(TEXTS, images)

def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1)

def test_auto_picks_openvino_on_cpu_only_where_installed(monkeypatch):
    assert resolve_runtime("auto", torch.device("cpu")) == "openvino"
    assert resolve_runtime("torch", torch.device("cpu")) == "torch"
    assert resolve_runtime("openvino", torch.device("cuda")) == "torch"
    monkeypatch.setattr(openvino_runtime, "openvino_available", lambda: False)
    assert resolve_runtime("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ImportError, match="pip install openvino"):
        resolve_runtime("openvino", torch.device("cpu"))
    with pytest.raises(ValueError, match="inference_runtime must be one of"):
        resolve_runtime("onnx", torch.device("cpu"))

def test_float32_towers_give_pytorchs_features(encoder, images):
    reference = encode(encoder, images, "torch")
    compiled = encode(encoder, images, "openvino")
    for name in ("text_global", "text_tokens", "image_global", "image_tokens"):
        torch.testing.assert_close(getattr(compiled, name).float(), getattr(reference, name).float(),
                                   rtol=1e-3, atol=1e-3)
    assert compiled.image_mask.tolist() == [True, False, True]
    assert torch.all(compiled.image_tokens[1] == 0)  # no picture: the tower never saw it

def test_bfloat16_towers_stay_within_bfloat16s_rounding(encoder, images):
    reference = encode(encoder, images, "torch")
    compiled = encode(encoder, images, "openvino", torch.bfloat16)
    torch_bf16 = encode(encoder, images, "torch", torch.bfloat16)
    for name in ("text_global", "image_global"):
        present = compiled.image_mask if name == "image_global" else torch.ones(len(TEXTS), dtype=torch.bool)
        want = getattr(reference, name).float()[present]
        ours = cosine(getattr(compiled, name).float()[present], want)
        # Measured: text 0.99999, pictures 0.998 (PyTorch's own bfloat16 route: 0.97-0.994).
        assert ours.min() > 0.995
        assert ours.min() >= cosine(getattr(torch_bf16, name).float()[present], want).min() - 1e-4


def test_uint8_pixels_are_normalised_inside_the_compiled_graph(encoder, images):
    """What image workers send (uint8 pixels, one picture missing) through the
    compiled tower gives PyTorch's features of the normalised float pixels."""
    raw, mask = encoder.image_pixels(images)
    assert raw.dtype == torch.uint8 and mask.tolist() == [True, False, True]
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        with encoder.inference_runtime_scope("openvino"):
            compiled = encoder.encode_preprocessed(PreprocessedImages(raw, mask))
        with encoder.inference_runtime_scope("torch"):
            reference = encoder.encode_image(encoder.normalize_pixels(raw[mask]))
    torch.testing.assert_close(compiled.image_global[mask], reference[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(compiled.image_tokens[mask], reference[1], rtol=1e-3, atol=1e-3)
    assert compiled.image_global[1].abs().max() == 0 and compiled.image_tokens[1].abs().max() == 0


def test_towers_are_compiled_once_per_precision_and_thread_count(encoder, images):
    towers = encoder.__dict__["_compiled_towers"]
    towers.clear()
    encode(encoder, images, "openvino")
    first = dict(towers._towers)
    encode(encoder, images, "openvino")
    assert sorted(key[0] for key in towers._towers) == ["image_pixels", "text"]  # pictures go in as uint8
    assert all(towers._towers[key] is tower for key, tower in first.items())  # reused, not compiled again
    encode(encoder, images, "openvino", torch.bfloat16)
    assert len(towers._towers) == 4 and len(towers._models) == 2  # converted once per tower

def test_a_backbone_that_trains_never_runs_compiled(images):
    encoder = MiniLMEfficientNetEncoder(frozen=False)
    with encoder.inference_runtime_scope("openvino"):
        assert encoder.compiled_tower("image", torch.device("cpu"), encoder._image_tower_for_export) is None
        features = encoder.encode(TEXTS, images)
    assert features.text_global.requires_grad  # PyTorch ran it: gradients flow
    assert not encoder.__dict__["_compiled_towers"]._towers

def test_new_weights_are_compiled_again(images):
    encoder = MiniLMEfficientNetEncoder(frozen=True)
    before = encode(encoder, images, "openvino")
    state = {name: value.clone() for name, value in encoder.state_dict().items()}
    state["text_model.embeddings.word_embeddings.weight"] *= 1.5
    state["image_model._conv_stem.weight"] *= 0.5
    encoder.load_state_dict(state)
    after = encode(encoder, images, "openvino")
    reference = encode(encoder, images, "torch")
    torch.testing.assert_close(after.text_global, reference.text_global, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(after.image_global, reference.image_global, rtol=1e-3, atol=1e-3)
    assert (after.text_global - before.text_global).abs().max() > 1e-2
    assert (after.image_global[0] - before.image_global[0]).abs().max() > 1e-2

def test_a_copy_compiles_its_own(encoder, images):
    encode(encoder, images, "openvino")
    clone = copy.deepcopy(encoder)
    assert not clone.__dict__["_compiled_towers"]._towers
    torch.testing.assert_close(encode(clone, images, "openvino").image_global,
                               encode(encoder, images, "openvino").image_global)


def test_openvino_is_imported_without_its_usage_telemetry():
    """A fresh interpreter: importing OpenVINO through us and compiling a
    tower starts no process (the telemetry package sends from a forked one)
    and leaves OpenVINO on its own no-op telemetry stub."""
    script = (
        "import os, sys\n"
        "forks = []\n"
        "os.register_at_fork(before=lambda: forks.append(1))\n"
        "import torch\n"
        "from spacy_m3el.encoders.openvino_runtime import compile_tower, convert_tower, import_openvino\n"
        "import_openvino()\n"
        "model = convert_tower(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), [[-1, 4]])\n"
        "tower = compile_tower(model, dtype=None, threads=1)\n"
        "assert tower(torch.ones(3, 4))[0].shape == (3, 2)\n"
        "import openvino.tools.ovc.telemetry_utils as telemetry\n"
        "print(len(forks), telemetry.tm.__name__, 'openvino_telemetry' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "openvino.tools.ovc.telemetry_stub", "False"]


def test_released_towers_leave_signal_handling_intact():
    """OpenVINO's CPU plugin points the thread's alternate signal stack at
    memory of its own: with a Core per compile, a released pipeline freed it
    and the next SIGCHLD (a forked worker exiting) killed the process with
    a segfault. One Core per process keeps it valid."""
    script = (
        "import gc, os, signal, time, torch\n"
        "from spacy_m3el.encoders import MiniLMEfficientNetEncoder\n"
        "signal.signal(signal.SIGCHLD, lambda *args: None)\n"
        "for _ in range(2):\n"
        "    encoder = MiniLMEfficientNetEncoder(frozen=True)\n"
        "    with encoder.inference_runtime_scope('openvino'), torch.no_grad():\n"
        "        encoder.encode(['a text'], [None])\n"
        "        encoder.encode_image(torch.zeros(2, 3, 224, 224))\n"
        "    del encoder\n"
        "    gc.collect()\n"
        "children = []\n"
        "for _ in range(2):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        time.sleep(0.2)\n"
        "        os._exit(0)\n"
        "    children.append(pid)\n"
        "print([os.waitpid(pid, 0)[1] for pid in children])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, f"exit status {result.returncode}: {result.stderr[-2000:]}"
    assert result.stdout.split()[-2:] == ["[0,", "0]"]
