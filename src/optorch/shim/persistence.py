"""How an ``optorch.Optimizer`` is copied and saved: pickling (runtime objects are remade), and its
``state_dict`` / ``load_state_dict`` in torch's layout, loaded only after :mod:`.checkpoint` checked
all of it."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from ..algorithms import registry
from .checkpoint import check_and_load
from .engines import TorchEngine

__all__ = ["Persistent"]


class Persistent:
    """The copy-and-save half of :class:`optorch.Optimizer` (mixed in before ``torch.optim.Optimizer``)."""

    def __getstate__(self) -> dict[str, Any]:
        # torch's fields plus what rebuilds the rest; runtime objects (locks, compiled code) are remade.
        keep = (
            "schedules",
            "adaptive",
            "_settings",
            "_overrides",
            "_configs",
            "_linked",
            "_initial",
            "engine",
            "partition",
        )
        state = {**super().__getstate__(), **{key: self.__dict__[key] for key in keep}}
        registered = registry.ALGORITHMS.get(self.algorithm.name)
        state["algorithm"] = self.algorithm.name if registered is self.algorithm else self.algorithm
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_settings" not in state:  # a shim pickled before format 2: rebuild from its torch fields
            raise RuntimeError("this optorch optimizer was pickled by an older optorch; save its state_dict() instead")
        super().__setstate__(state)
        self.__dict__.setdefault("partition", None)
        if isinstance(self.algorithm, str):
            self.algorithm = registry.get(self.algorithm)
        self.combinators = None
        self._engine = None
        self._setup(self.engine)
        if self.adaptive is not None:
            self.adaptive.optimizer = self

    def state_dict(self) -> dict[str, Any]:
        hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = OrderedDict()
        try:
            state_dict = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = hooks
        state_dict["state"] = {index: self._states.export(leaf) for index, leaf in state_dict["state"].items() if leaf}
        state_dict["state"] = {index: leaf for index, leaf in state_dict["state"].items() if leaf}
        if isinstance(self._engine, TorchEngine):
            for group in state_dict["param_groups"]:
                self._engine.export(group)
        for hook in hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this shim or of the torch.optim optimizer it stands for.

        The whole dict is checked first (structure, shapes, dtypes, values); on any mismatch it
        raises ``ValueError`` and the optimizer is left unchanged. Checkpoints of format 1 (an older
        optorch) are migrated.
        """
        if not isinstance(state_dict, dict):
            raise ValueError(f"{self.algorithm.name}: a state_dict is a dict, got {type(state_dict).__name__}")
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        check_and_load(self, state_dict)
        self._configs = []
        for i, group in enumerate(self.param_groups):
            self._config(i, group)
        self._apply_schedules()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)
