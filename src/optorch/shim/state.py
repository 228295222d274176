"""The shim's state: the names of its checkpoint layout, and the per-parameter state dicts, checked
on every step against what the algorithm keeps (:class:`StateDict` notes writes from outside)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..core import distributed
from ..core.algorithm import Algorithm
from ..core.config import Config
from .engines import Engine, TorchEngine

__all__ = [
    "FORMAT",
    "FORMAT_KEY",
    "SCHEDULE_KEY",
    "SHARED_PREFIX",
    "STATE_PREFIXES",
    "StateCheck",
    "StateDict",
    "assign",
    "check_tensor",
    "check_unique",
    "equal_values",
    "same",
]

FORMAT_KEY = "optorch_format"
FORMAT = 2
"""The layout of the shim's checkpoints: 2 keeps every piece of state in ``state`` and
``param_groups``; 1 (no ``optorch_format`` key) kept some under top-level keys, migrated on load."""
SCHEDULE_KEY = "schedule_step"
SHARED_PREFIX = "shared."
STATE_PREFIXES = (SHARED_PREFIX, "adapt.", "accumulate.", "skip.", "amp.", "ema.")
"""Param-group keys that hold state (of the algorithm, the adaptive rules, the combinators)."""
NO_EMA = "this optimizer keeps no EMA: add an 'ema' entry to its config"
NO_SCALER = "this optimizer has no loss scaler: add an 'amp' entry to its config"


def _noted(name: str) -> Callable[..., Any]:
    """``dict.<name>``, noting a write (for :class:`StateDict`)."""
    method = getattr(dict, name)

    def write(self: StateDict, *args: Any, **kwargs: Any) -> Any:
        self.written = True
        return method(self, *args, **kwargs)

    write.__name__ = name
    return write


class StateDict(dict):
    """A parameter's state in ``optimizer.state``: a plain dict that notes being written to, so a step
    can tell in O(1) that the tensors it checked are still the ones there. In-place changes to those
    tensors need no note (they cannot change a shape, dtype or device). Checkpoints hold plain dicts."""

    __slots__ = ("written",)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.written = True

    def __setitem__(self, key: Any, value: Any) -> None:
        if dict.get(self, key, _ABSENT) is not value:  # torch's SGD stores its buffer again every step
            self.written = True
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self.written = True
        super().__delitem__(key)

    clear = _noted("clear")
    pop = _noted("pop")
    popitem = _noted("popitem")
    setdefault = _noted("setdefault")
    update = _noted("update")
    __ior__ = _noted("__ior__")

    def __reduce__(self):
        return StateDict, (dict(self),)


_ABSENT = object()


class StateCheck:
    """A param's state checked against what its config needs, cheaply between steps.

    The full check (keys, shapes, dtypes, devices; a torch-layout state written directly, e.g. by
    ZeroRedundancyOptimizer, is converted) runs when the state dict, one of its tensors, the param's
    shape, dtype or device, or the config's structure (:meth:`Config.structure`: not a scheduled
    learning rate) changed since the last check; otherwise the same tensors are known good. In-place
    writes need no check: they cannot change shape, dtype or device.
    """

    def __init__(self, algorithm: Algorithm, engine: Engine, extras: frozenset[str]):
        self.algorithm = algorithm
        self.torch_layout = isinstance(engine, TorchEngine)
        self.engine = engine
        self.extras = extras
        self._known: dict[int, tuple] = {}  # id(param) -> what its last full check saw
        self._last: tuple[Config | None, tuple] = (None, ())  # the last config seen, and its structure
        self._structures: list[tuple] = []  # the recent distinct structures, each one object (compared by identity)
        self.full_checks = 0

    def fresh(self, param: Tensor, config: Config) -> dict[str, Tensor]:
        """A param's initial state in this engine's layout."""
        leaf = self.algorithm.init_leaf(param, config)
        if not self.torch_layout:
            return leaf
        leaf = self.algorithm.state_to_torch(leaf)
        if "step" in leaf:
            dtype, device = self.engine.step_dtype_device(param)
            leaf["step"] = leaf["step"].to(dtype=dtype, device=device if param.device.type != "meta" else "meta")
        return leaf

    def check(self, param: Tensor, states: dict[Tensor, Any], config: Config) -> dict[str, Tensor] | None:
        """The state the engine steps ``param`` with (None when it has none yet), after checking it:
        the algorithm's keys for optorch's engines, the whole dict (torch's layout) for torch's."""
        state = states.get(param)
        if not state:
            return None
        known = self._known.get(id(param))
        structure = self._structure(config)
        # A new data pointer means new data (p.data = ..., a dtype or device conversion): check again.
        if (
            known is not None
            and known[0] is state
            and not state.written
            and known[1] is structure
            and known[2] == param.data_ptr()
        ):
            return known[3]
        self.full_checks += 1
        leaf = self._full_check(param, state, config)
        if leaf is None:
            return None
        if type(state) is not StateDict:  # assigned from outside (ZeroRedundancyOptimizer): noted from now on
            state = states[param] = StateDict(state)
            leaf = {key: state[key] for key in leaf}
        state.written = False
        stepped = state if self.torch_layout else leaf
        self._known[id(param)] = (
            state,
            structure,
            param.data_ptr(),
            stepped,
            param,
        )  # the param kept: its id stays its own
        return stepped

    def _structure(self, config: Config) -> tuple:
        """``config.structure()``, one object for equal structures: a schedule makes a new config at
        every step, and comparing nested settings param by param would cost what the check saves."""
        if self._last[0] is config:  # a group's params are checked one after another
            return self._last[1]
        structure = config.structure()
        for seen in self._structures:
            if seen == structure:
                structure = seen
                break
        else:
            self._structures = [structure, *self._structures[:7]]
        self._last = (config, structure)
        return structure

    def traced(self, param: Tensor, states: dict[Tensor, Any], config: Config) -> dict[str, Tensor] | None:
        """:meth:`check` inside ``torch.compile``: the state as it is (the eager steps around check it)."""
        state = states.get(param)
        return {key: value for key, value in state.items() if key not in self.extras} or None if state else None

    def _full_check(self, param: Tensor, state: dict[str, Any], config: Config) -> dict[str, Tensor] | None:
        name = self.algorithm.name
        extras = {key: state[key] for key in state if key in self.extras}
        own = {key: value for key, value in state.items() if key not in self.extras}
        for key, value in extras.items():
            check_tensor(name, param, key, value, param.shape, {param.dtype}, {param.device})
        if not own:
            return None
        expected = self.fresh(distributed.meta_like(param), config)
        if set(own) != set(expected):
            converted = self.algorithm.state_from_torch(own)
            if self.torch_layout:
                converted = self.algorithm.state_to_torch(converted)
            if set(converted) != set(expected):
                raise ValueError(
                    f"{name}: the state of a parameter of shape {tuple(param.shape)} has keys {sorted(own)}, expected "
                    f"{sorted(expected)}{' (plus ' + ', '.join(sorted(self.extras)) + ')' if self.extras else ''}; "
                    "was it written for another optimizer or other flags?"
                )
            own = converted
        for key, reference in expected.items():
            value = own[key]
            if reference.dim() == 0 and not isinstance(value, Tensor):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(
                        f"{name}: state {key!r} of a parameter must be a number or a 0-dim tensor, got "
                        f"{type(value).__name__}"
                    )
                value = own[key] = torch.tensor(
                    float(value),
                    dtype=reference.dtype,
                    device=param.device if reference.device.type == "meta" else reference.device,
                )
            dtypes = {reference.dtype}
            if param.is_floating_point() or param.is_complex():
                dtypes.add(param.dtype)
            if reference.dim() == 0:
                dtypes |= {torch.float32, torch.float64}
            devices = {param.device} | ({torch.device("cpu")} if reference.dim() == 0 else set())
            check_tensor(name, param, key, value, reference.shape, dtypes, devices)
            distributed.check_layout(name, key, value, reference)
        if own.keys() != {key for key in state if key not in self.extras}:
            for key in [key for key in state if key not in self.extras]:
                del state[key]
            state.update(own)
        return {key: state[key] for key in expected}

    def export(self, state: dict[str, Any]) -> dict[str, Any]:
        """A param's state as its checkpoint holds it: torch's keys, plus the extras."""
        if self.torch_layout:
            return dict(state)
        own = {key: value for key, value in state.items() if key not in self.extras}
        exported = self.algorithm.state_to_torch(own) if own else {}
        return {**exported, **{key: value for key, value in state.items() if key in self.extras}}


def check_tensor(name: str, param: Tensor, key: str, value: Any, shape: torch.Size, dtypes: set, devices: set) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(
            f"{name}: state {key!r} of a parameter of shape {tuple(param.shape)} must be a tensor, got "
            f"{type(value).__name__}"
        )
    if value.shape != shape:
        raise ValueError(
            f"{name}: state {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)} (its parameter has "
            f"{tuple(param.shape)})"
        )
    if value.dtype not in dtypes:
        raise ValueError(
            f"{name}: state {key!r} is {value.dtype}, its parameter {param.dtype}: was the model converted "
            "(.to(dtype), .double()) after the optimizer stepped? Save and load the optimizer's state_dict to convert "
            "its state too."
        )
    if value.device not in devices:
        raise ValueError(f"{name}: state {key!r} is on {value.device}, its parameter on {param.device}")


def check_unique(params: list[Any] | None, groups: list[dict[str, Any]]) -> None:
    """The same param twice would be stepped twice per step (torch only warns): refused."""
    if not params:
        return
    seen: set[int] = set()
    for param in params:
        if not isinstance(param, Tensor):
            continue
        if id(param) in seen:
            raise ValueError(
                "a param group lists the same parameter twice: it would be stepped twice per step "
                "(torch.optim only warns); list each parameter once"
            )
        seen.add(id(param))
    existing = {id(p) for group in groups for p in group["params"]}
    if seen & existing:
        raise ValueError("some parameters appear in more than one parameter group")


def same(a: tuple, b: tuple) -> bool:
    """Whether two tuples of hyperparameter values are the same: tensors by identity, the rest by
    type and value (a tensor replaced by an equal one is new: its later in-place changes count)."""
    return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))


def _same_value(x: Any, y: Any) -> bool:
    if x is y:
        return True
    if isinstance(x, Tensor) or isinstance(y, Tensor) or type(x) is not type(y):
        return False
    if isinstance(x, tuple):
        return same(x, y)
    return x == y


def equal_values(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        a_, b_ = torch.as_tensor(a), torch.as_tensor(b)
        return (
            a_.shape == b_.shape and bool((a_.to(torch.float64) == b_.to(a_.device, torch.float64)).all())
            if a_.numel()
            else a_.shape == b_.shape
        )
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def assign(target: Tensor, value: Any, key: str) -> None:
    if isinstance(value, Tensor):
        if value.shape != target.shape and value.numel() != 1:
            raise ValueError(f"{key!r} must have shape {tuple(target.shape)}, got {tuple(value.shape)}")
        target.copy_(value.reshape(target.shape))
    else:
        target.fill_(value)
