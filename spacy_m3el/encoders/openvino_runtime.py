"""A frozen backbone's towers compiled by OpenVINO for CPU inference.

OpenVINO's CPU plugin fuses the towers' layers and runs bfloat16 natively on
CPUs that have it; on the 2-core demo machine each tower ran 1.6-2.3x faster
per document than PyTorch's frozen TorchScript / autocast routes, over runs
of ``benchmarks/profile_doc.py``. The towers are converted
from the loaded PyTorch modules in memory through OpenVINO's PyTorch frontend
(no file is read), once per precision and thread count.

Nothing leaves the machine: ``import openvino`` sends a usage event through
the ``openvino-telemetry`` package unless the user opted out, and
``openvino.convert_model`` more; :func:`import_openvino` imports it with that
package hidden, so OpenVINO falls back to its own no-op telemetry stub, and
the towers are converted through the frontend, not ``convert_model``.
"""
import functools
import importlib.util
import sys
import threading
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy
import torch
from torch import nn

#: How a frozen backbone infers: "auto" (OpenVINO on CPU where it is installed, else PyTorch), "torch" or "openvino".
RUNTIMES = ("auto", "torch", "openvino")

#: OpenVINO's names of the precisions a tower may run in (None: float32).
_PRECISION_HINTS = {None: "f32", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


@functools.lru_cache(maxsize=None)
def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported here (looked up
    once: every backbone call resolves the runtime)."""
    return importlib.util.find_spec("openvino") is not None


def import_openvino():
    """``openvino``, imported without its usage telemetry (see above)."""
    if "openvino" not in sys.modules:
        hide = "openvino_telemetry" not in sys.modules
        if hide:
            sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # import fails: the stub is used
        try:
            import openvino  # noqa: F401
        finally:
            if hide:
                del sys.modules["openvino_telemetry"]
    return sys.modules["openvino"]


@functools.lru_cache(maxsize=None)
def openvino_core():
    """The process's one OpenVINO ``Core``, never released: its CPU plugin
    points the calling thread's alternate signal stack at memory of its own,
    and a signal that arrives after that memory is freed (with a released
    Core) kills the process (measured: a segfault on the next SIGCHLD)."""
    return import_openvino().Core()


def resolve_runtime(runtime: str, device: torch.device) -> str:
    """The runtime a frozen backbone uses on ``device``: "openvino" only on
    CPU ("auto" picks it there when the package is installed)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"inference_runtime must be one of {RUNTIMES}, got {runtime!r}")
    if device.type != "cpu" or runtime == "torch":
        return "torch"
    if runtime == "auto":
        return "openvino" if openvino_available() else "torch"
    if not openvino_available():
        raise ImportError("inference_runtime \"openvino\" needs the package 'openvino' (pip install openvino), "
                          "or set inference_runtime to \"auto\" or \"torch\"")
    return "openvino"


class CompiledTower:
    """One tower compiled for the CPU: called with tensors, returns its
    outputs as float32 tensors (copies, owned by the caller)."""

    def __init__(self, compiled_model) -> None:
        self.compiled_model = compiled_model
        # One infer request is reused across calls; a lock keeps threads (a server) from sharing it at once.
        self._lock = threading.Lock()

    def __call__(self, *inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        arrays = [numpy.ascontiguousarray(tensor.detach().cpu().numpy()) for tensor in inputs]
        with self._lock:
            outputs = self.compiled_model(arrays, share_outputs=False)
        return tuple(torch.from_numpy(numpy.asarray(outputs[i], dtype=numpy.float32)) for i in range(len(outputs)))


def convert_tower(module: nn.Module, example_inputs: Tuple[torch.Tensor, ...], input_shapes: Sequence[Sequence[int]]):
    """``module`` (put in eval mode) as an OpenVINO model; ``input_shapes``
    gives each input's shape, -1 where it varies (batch, sequence length)."""
    openvino = import_openvino()
    from openvino.frontend import FrontEndManager
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    with torch.inference_mode(False), torch.no_grad(), torch.autocast("cpu", enabled=False), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript tracing's deprecation and tracer warnings
        decoder = TorchScriptPythonDecoder(module.eval(), example_input=example_inputs)
        frontend = FrontEndManager().load_by_framework("pytorch")
        model = frontend.convert(frontend.load(decoder))
    model.reshape({port: openvino.PartialShape(list(shape)) for port, shape in zip(model.inputs, input_shapes)})
    return model


def compile_tower(model, *, dtype: Optional[torch.dtype], threads: int) -> CompiledTower:
    """An OpenVINO ``model`` (:func:`convert_tower`) compiled for the CPU in
    ``dtype`` (None: float32) with ``threads`` inference threads, unpinned:
    the process shares its cores with torch, and the processes of a
    multi-process build would otherwise all pin their thread to core 0."""
    if dtype not in _PRECISION_HINTS:
        raise ValueError(f"OpenVINO towers run in float32, bfloat16 or float16, not {dtype}")
    return CompiledTower(openvino_core().compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": _PRECISION_HINTS[dtype], "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}))


class CompiledTowers:
    """The towers of one encoder: converted once each, compiled per
    (precision, threads) at first use; never saved or trained."""

    def __init__(self) -> None:
        self._models: Dict[str, Any] = {}
        self._towers: Dict[Tuple[str, Optional[torch.dtype], int], CompiledTower] = {}

    def get(self, name: str, dtype: Optional[torch.dtype], threads: int,
            build: Callable[[], Tuple[nn.Module, Tuple[torch.Tensor, ...], Sequence[Sequence[int]]]]) -> CompiledTower:
        key = (name, dtype, threads)
        if key not in self._towers:
            if name not in self._models:
                self._models[name] = convert_tower(*build())
            self._towers[key] = compile_tower(self._models[name], dtype=dtype, threads=threads)
        return self._towers[key]

    def clear(self) -> None:
        self._models.clear()
        self._towers.clear()

    # Compiled models hold native handles: a copy or a pickle of the encoder compiles its own.
    def __getstate__(self) -> Dict:
        return {"_models": {}, "_towers": {}}

    def __deepcopy__(self, memo: Dict) -> "CompiledTowers":
        return CompiledTowers()
