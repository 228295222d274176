"""The stepper contract: ``init(params, config) -> state`` and ``step(params, grads, state, config)``.

An algorithm is written once, as two functions over a single tensor:

* ``init_leaf(param, config) -> {key: tensor}``: the fresh state of one parameter, keyed by the
  names torch.optim uses in its ``state_dict`` (``step``, ``exp_avg``, ``momentum_buffer``, ...);
* ``update(param, grad, leaf_state, config) -> (new_param, new_leaf_state)``: one step, out of place.

:class:`Algorithm` lifts them to pytrees. The state of a pytree of params is a dict from each key to a
pytree shaped like the params, e.g. ``{"step": {"w": t, "b": t}, "exp_avg": {"w": ..., "b": ...}}``:
plain dicts, lists and tensors, so dm-tree, ``torch.utils._pytree`` and ``torch.func`` all understand
it. The step counter is a per-parameter 0-dim tensor, as in torch.optim, so a parameter that misses a
gradient keeps its own count exactly as torch's does.

The same ``update`` runs on one flat buffer holding many parameters in the shim's compiled engine
(:mod:`optorch.engines`): one definition of the math serves the pure path and the in-place path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from . import ops
from .config import Config

__all__ = ["Algorithm", "Grid", "LeafState", "State"]

LeafState = dict[str, Tensor]
State = dict[str, Any]
InitLeaf = Callable[[Tensor, Config], LeafState]
Update = Callable[[Tensor, Tensor, LeafState, Config], "tuple[Tensor, LeafState]"]


def _is_none(x: Any) -> bool:
    return x is None


def _describe(path: tuple) -> str:
    return pytree.keystr(path) or "<root>"


def _as_real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def apply_update(update: Update, param: Tensor, grad: Tensor, leaf_state: LeafState, config: Config):
    """Run ``update`` on one tensor; complex tensors are stepped as pairs of reals, as torch.optim does."""
    if not param.is_complex():
        new_param, new_state = update(param, grad, leaf_state, config)
        # A 0-dim param meeting a 0-dim float64 hyperparameter would be promoted: keep each dtype.
        return ops.like(new_param, param), {k: ops.like(v, leaf_state[k]) for k, v in new_state.items()}
    real_state = {k: _as_real(v) for k, v in leaf_state.items()}
    new_param, new_state = update(torch.view_as_real(param), _as_real(grad), real_state, config)
    to_complex = {k: torch.view_as_complex(v) if leaf_state[k].is_complex() else v for k, v in new_state.items()}
    return torch.view_as_complex(new_param), to_complex


@dataclass(frozen=True)
class Grid:
    """Verification grid: fixed non-default hyperparameters (so defaults are not all that is tested)
    and axes whose full product is checked (combinations the Config rejects are left out)."""

    fixed: Mapping[str, Any]
    axes: Mapping[str, tuple]


@dataclass(frozen=True)
class Algorithm:
    """One optimizer: its config class, its per-tensor math, and its torch.optim counterpart (if any)."""

    name: str
    config: type[Config]
    init_leaf: InitLeaf
    update: Update
    torch_optimizer: type[torch.optim.Optimizer] | None = None
    """The torch.optim class with the same math and the same state_dict keys, when there is one."""
    from_torch: Callable[[LeafState], LeafState] | None = None
    """Completes one parameter's state as torch.optim saves it, where torch keeps less (e.g. no step)."""
    to_torch: Callable[[LeafState], LeafState] | None = None
    """The inverse: one parameter's state as torch.optim would save it."""
    grid: Grid | None = None
    """The flag combinations ``optorch verify`` and the test suite check against ``torch_optimizer``."""

    def state_from_torch(self, leaf_state: LeafState) -> LeafState:
        """One parameter's state from a torch.optim (or optorch) checkpoint, in this algorithm's keys."""
        leaf_state = dict(leaf_state)
        return self.from_torch(leaf_state) if self.from_torch is not None else leaf_state

    def state_to_torch(self, leaf_state: LeafState) -> LeafState:
        """One parameter's state in the keys torch.optim's counterpart saves (unchanged if none)."""
        leaf_state = dict(leaf_state)
        return self.to_torch(leaf_state) if self.to_torch is not None else leaf_state

    def state_keys(self, config: Config) -> tuple[str, ...]:
        """The per-parameter state keys under ``config`` (they can depend on flags, e.g. amsgrad)."""
        return tuple(self.init_leaf(torch.zeros(1), config))

    def init(self, params: Any, config: Config) -> State:
        """Fresh state for a pytree of params. Pure: ``params`` is only read."""
        config = self._check_config(config)
        leaves, spec = pytree.tree_flatten(params)
        leaf_states = [self.init_leaf(_check_param(p), config) for p in leaves]
        return _transpose(leaf_states, self.state_keys(config), spec)

    def step(self, params: Any, grads: Any, state: State, config: Config) -> tuple[Any, State]:
        """One step over a pytree. Returns new ``(params, state)``; the inputs are never modified.

        A parameter whose grad is ``None`` is skipped as torch.optim skips it: its value and its
        state (step counter included) come back unchanged.
        """
        config = self._check_config(config)
        path_leaves, spec = pytree.tree_flatten_with_path(params)
        grad_leaves, grad_spec = pytree.tree_flatten(grads, is_leaf=_is_none)
        if grad_spec != spec:
            raise ValueError(f"{self.name}: grads must have the structure of params.\n params: {spec}\n grads: {grad_spec}")
        keys = self.state_keys(config)
        if set(state) != set(keys):
            raise ValueError(
                f"{self.name}: state has keys {sorted(state)}, but this config needs {sorted(keys)}; "
                f"build it with optorch.{self.name}.init(params, config)"
            )
        buffers = {}
        for key in keys:
            leaves, key_spec = pytree.tree_flatten(state[key])
            if key_spec != spec:
                raise ValueError(f"{self.name}: state[{key!r}] must have the structure of params")
            buffers[key] = leaves

        new_params, new_leaf_states = [], []
        for i, ((path, param), grad) in enumerate(zip(path_leaves, grad_leaves)):
            leaf_state = {key: buffers[key][i] for key in keys}
            if grad is None:
                new_params.append(param)
                new_leaf_states.append(leaf_state)
                continue
            _check_grad(self.name, path, param, grad)
            new_param, new_state = apply_update(self.update, param, grad, leaf_state, config)
            new_params.append(new_param)
            new_leaf_states.append(new_state)
        return pytree.tree_unflatten(new_params, spec), _transpose(new_leaf_states, keys, spec)

    def _check_config(self, config: Config) -> Config:
        if isinstance(config, Mapping):
            return self.config(**config)
        if type(config) is not self.config:  # exact: adamw.Config subclasses adam.Config
            raise TypeError(f"{self.name}: expected optorch.{self.name}.Config, got {type(config).__name__}")
        return config


def _transpose(leaf_states: list[LeafState], keys: tuple[str, ...], spec: pytree.TreeSpec) -> State:
    return {key: pytree.tree_unflatten([s[key] for s in leaf_states], spec) for key in keys}


def _check_param(param: Any) -> Tensor:
    if not isinstance(param, Tensor):
        raise TypeError(f"params must be a pytree of tensors, found {type(param).__name__}")
    return param


def _check_grad(name: str, path: tuple, param: Tensor, grad: Any) -> None:
    if not isinstance(grad, Tensor):
        raise TypeError(f"{name}: grad at {_describe(path)} is a {type(grad).__name__}, expected a tensor or None")
    if grad.is_sparse:
        raise RuntimeError(f"{name} does not support sparse gradients (parameter {_describe(path)})")
    if grad.shape != param.shape:
        raise ValueError(
            f"{name}: grad at {_describe(path)} has shape {tuple(grad.shape)}, param has {tuple(param.shape)}"
        )
