"""Parameter averaging (``use_averages = true``) for the linker.

thinc's optimizer keeps a running average of every parameter it updates,
and spaCy evaluates and saves a pipeline with those averages in place. For
a PyTorch model thinc's shim looks the averages up under other keys than
the ones its own ``finish_update`` writes, so the setting did nothing:
:class:`AveragingPyTorchShim` finds them. While the averages are in place
the linker's entity index and the scorer's fit must be theirs:
:class:`AveragedWeights` keeps those apart from the training weights'.
"""
import contextlib
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional, Tuple

import torch
from thinc.api import Model, PyTorchShim, xp2torch

if TYPE_CHECKING:  # pragma: no cover
    from ..index.entity_index import EntityIndex
    from .linker import M3ELLinker


class AveragingPyTorchShim(PyTorchShim):
    """thinc's PyTorch shim whose ``use_params`` finds the parameter averages
    its own ``finish_update`` keeps (``use_averages = true``): thinc's looks
    them up under other keys, so with it evaluation and saving would use the
    last step's weights. The candidate scorer's weights are not swapped: the
    evaluation refits them (``calibrate_on_score``) for the averaged weights,
    and that fit must be what is saved."""

    def averaged_parameters(self, params: Dict[Any, Any]) -> Dict[str, torch.nn.Parameter]:
        """The parameters ``params`` holds averages of (the scorer's left out), by name."""
        return {name: param for name, param in self._model.named_parameters()
                if (self.id, name) in params and not name.startswith("scorer.")}

    @contextlib.contextmanager
    def use_params(self, params: Dict[Any, Any]) -> Iterator[None]:
        averaged = self.averaged_parameters(params)
        if not averaged:
            yield
            return
        kept = {name: param.detach().clone() for name, param in averaged.items()}
        with torch.no_grad():
            for name, param in averaged.items():
                param.copy_(xp2torch(params[(self.id, name)], device=param.device).reshape(param.shape))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in averaged.items():
                    param.copy_(kept[name])


def swaps_averages(model: Model, params: Dict[Any, Any]) -> bool:
    """Whether ``model.use_params(params)`` puts averaged weights in place."""
    return any(isinstance(shim, AveragingPyTorchShim) and shim.averaged_parameters(params) for shim in model.shims)


class AveragedWeights:
    """What belongs to the averaged weights of one linker: their entity index
    (kept from an evaluation to the save that follows it, dropped at the next
    update) and the update after which the scorer was fitted for them."""

    def __init__(self, linker: "M3ELLinker") -> None:
        self.linker = linker
        self.index: Optional["EntityIndex"] = None
        self.calibrated_at: Optional[Tuple[int, Optional[int]]] = None

    def forget(self) -> None:
        """The averages moved (a training update): their index is stale."""
        self.index = None

    def use_params(self, params: Dict[Any, Any]) -> Iterator[None]:
        """The averaged weights in place (a generator, stepped through by
        ``nlp.use_params``), with their own index and calibration state; the
        training weights get their index back afterwards."""
        linker = self.linker
        if not swaps_averages(linker.model, params):
            with linker.model.use_params(params):
                yield
            return
        keeper, state = linker.index_keeper, linker.state
        training_stale = state.calibration_stale
        averages = (id(params), state.updates)
        with linker.model.use_params(params):
            training_index = keeper.exchange(self.index)
            state.calibration_stale = self.calibrated_at != averages
            try:
                yield
            finally:
                self.index = keeper.exchange(training_index)
                fitted = not state.calibration_stale
                # A fit inside replaced the scorer's weights: they are the averaged weights' now.
                refitted = fitted and self.calibrated_at != averages
                if fitted:
                    self.calibrated_at = averages
                state.calibration_stale = training_stale or refitted
