"""The stepper contract: ``init(params, config) -> state`` and ``step(params, grads, state, config)``.

An algorithm is written once, as two functions over a single tensor:

* ``init_leaf(param, config) -> {key: tensor}``: the fresh state of one parameter, keyed by the
  names torch.optim uses in its ``state_dict`` (``step``, ``exp_avg``, ``momentum_buffer``, ...);
* ``update(param, grad, leaf_state, config) -> (new_param, new_leaf_state)``: one step, out of place.

:class:`Algorithm` lifts them to pytrees. The state of a pytree of params is a dict from each key to a
pytree shaped like the params, e.g. ``{"step": {"w": t, "b": t}, "exp_avg": {"w": ..., "b": ...}}``:
plain dicts, lists and tensors, so dm-tree, torch's pytree utilities and ``torch.func`` all understand
it. The step counter is a per-parameter 0-dim tensor, as in torch.optim, so a parameter that misses a
gradient keeps its own count exactly as torch's does.

The same ``update`` runs in place in the shim's engines (:mod:`optorch.engines`), on one tensor or on
many joined into one: one definition of the math serves the pure path and the in-place path.

Two extensions cover algorithms that are not purely element-wise:

* ``elementwise=False``: ``update`` reduces over its tensor (a norm, a mean: LARS, DAG, AutoSGM), so
  the engines never step it on several parameters joined into one flat tensor.
  Such an algorithm may keep per-tensor scalars (0-dim state entries, e.g. DAG's ``alpha``).
* ``shared=Shared(...)``: state shared by all parameters (DAG's global RMS shrink). ``update`` then
  takes it as a fifth argument, read-only, and returns a third value, its *contributions* (a dict of
  0-dim tensors); after every parameter has stepped, ``Shared.finish`` turns the sums of the
  contributions into the next shared state. The pure state keeps it under the key ``"shared"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import opaque, stepping
from .compat import pytree
from .config import Config
from .distributed import full
from .stepping import LeafState, Update, apply_update

__all__ = ["Algorithm", "Grid", "LeafState", "Reduction", "Shared", "State", "SHARED_KEY"]

SHARED_KEY = "shared"

State = dict[str, Any]
InitLeaf = Callable[[Tensor, Config], LeafState]


def _is_none(x: Any) -> bool:
    return x is None


def _describe(i: int, spec: Any) -> str:
    """Where leaf ``i`` of a tree of this structure sits, for an error message."""
    count = spec.num_leaves if isinstance(spec, pytree.TreeSpec) else len(spec[1])
    path, _ = pytree.tree_flatten_with_path(_unflatten(list(range(count)), spec))[0][i]
    return pytree.keystr(path) or "<root>"


@dataclass(frozen=True)
class Shared:
    """State shared by all parameters of an optimizer (in the shim: by all its param groups).

    ``init(params, config)`` makes it from the list of parameters (the shim passes those with
    ``requires_grad``); ``finish(shared, totals, config)`` returns the next shared state once per
    step, after every parameter has stepped, with ``totals`` the sums over the stepped parameters
    of what their ``update`` contributed, or ``None`` when no parameter had a gradient. Keys in
    ``derived`` are sums over the parameters alone (e.g. their total size): the shim recomputes them
    when a param group is added, keeping the rest. ``contributions`` names the keys ``update``
    contributes: an optimizer holding one rank's share of the params (ZeroRedundancyOptimizer) sums
    them, and the ``derived`` keys, over every rank's share, even where none of its own params stepped.
    """

    init: Callable[[list[Tensor], Config], dict[str, Tensor]]
    finish: Callable[[dict[str, Tensor], dict[str, Tensor] | None, Config], dict[str, Tensor]]
    derived: tuple[str, ...] = ()
    contributions: tuple[str, ...] = ()


def sum_contributions(contributions: list[dict[str, Tensor]], device: torch.device) -> dict[str, Tensor] | None:
    """The per-key sums of the parameters' contributions, in a fixed order, on ``device`` (a
    sharded param's read whole: every rank holds every total)."""
    if not contributions:
        return None
    totals = {}
    for key in contributions[0]:
        values = [full(c[key]).to(device) for c in contributions]
        totals[key] = torch.stack(values).sum() if len(values) > 1 else values[0]
    return totals


@dataclass(frozen=True)
class Grid:
    """Verification grid: fixed non-default hyperparameters (so defaults are not all that is tested)
    and axes whose full product is checked (combinations the Config rejects are left out)."""

    fixed: Mapping[str, Any]
    axes: Mapping[str, tuple]
    float32: bool = True
    """False where torch's own float32 kernels disagree beyond the float32 tolerance on the
    verification problem (measured, with the reason next to the grid): float32 is then left out."""


@dataclass(frozen=True)
class Reduction:
    """A config of an algorithm whose trajectory equals a torch.optim optimizer's, with an LR scheduler
    where one is needed (AutoSGM reduces to SGD, heavy ball, Adam, ...). ``optorch verify`` and the
    tests check each one live."""

    label: str
    config: Mapping[str, Any]
    optimizer: str
    """The torch.optim class name."""
    kwargs: Mapping[str, Any]
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = field(default=None, compare=False)
    """Makes the torch LR scheduler stepped after each optimizer step, if the reduction needs one."""


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
    """The flag combinations ``optorch verify`` and the test suite check against the reference."""
    elementwise: bool | Callable[[Config], bool] = True
    """False when ``update`` reduces over its tensor (norms, means), or a function of the config
    saying so (AutoSGM reduces only with some numerators): the compiled engine then steps many
    params together as a stack, each reducing over its own slice, never as one flat tensor."""
    shared: Shared | None = None
    """State shared by all parameters, when the algorithm has some (see :class:`Shared`)."""
    reductions: tuple[Reduction, ...] = ()
    """Configs of this algorithm equal to torch.optim optimizers (see :class:`Reduction`)."""
    compile_options: Mapping[str, Any] = field(default_factory=dict, compare=False)
    """Inductor options (``torch.compile(options=...)``) for the shim's compiled kernels of this
    algorithm, where its code needs other choices than Inductor's defaults to run fast."""

    def __post_init__(self) -> None:
        opaque.register(self)  # the compiled step's operator finds it by its key at run time

    def state_from_torch(self, leaf_state: LeafState) -> LeafState:
        """One parameter's state from a torch.optim (or optorch) checkpoint, in this algorithm's keys."""
        leaf_state = dict(leaf_state)
        return self.from_torch(leaf_state) if self.from_torch is not None else leaf_state

    def state_to_torch(self, leaf_state: LeafState) -> LeafState:
        """One parameter's state in the keys torch.optim's counterpart saves (unchanged if none)."""
        leaf_state = dict(leaf_state)
        return self.to_torch(leaf_state) if self.to_torch is not None else leaf_state

    def is_elementwise(self, config: Config) -> bool:
        """Whether ``update`` under ``config`` treats each element on its own (see ``elementwise``)."""
        return self.elementwise(config) if callable(self.elementwise) else self.elementwise

    def state_keys(self, config: Config) -> tuple[str, ...]:
        """The per-parameter state keys under ``config`` (they can depend on flags, e.g. amsgrad)."""
        return tuple(self.init_leaf(torch.zeros(1), config))

    def init(self, params: Any, config: Config) -> State:
        """Fresh state for a pytree of params. Pure: ``params`` is only read."""
        config = self.as_config(config)
        leaves, spec = pytree.tree_flatten(params)
        leaf_states = [self.init_leaf(_check_param(p), config) for p in leaves]
        state = _transpose(leaf_states, self.state_keys(config), spec)
        if self.shared is not None:
            state[SHARED_KEY] = self.shared.init(leaves, config)
        return state

    def step(self, params: Any, grads: Any, state: State, config: Config) -> tuple[Any, State]:
        """One step over a pytree. Returns new ``(params, state)``; the inputs are never modified.

        A parameter whose grad is ``None`` is skipped as torch.optim skips it: its value and its
        state (step counter included) come back unchanged. The updates run through
        :mod:`optorch.core.stepping`'s fast paths where they apply, with the per-tensor loop's numbers.
        """
        config = self.as_config(config)
        keys = self.state_keys(config)
        expected = set(keys) | ({SHARED_KEY} if self.shared is not None else set())
        spec = _flat_spec(params)
        flat = spec is not None and _flat_spec(grads, True) == spec and isinstance(state, Mapping)
        if flat and set(state) == expected and all(_flat_spec(state[key]) == spec for key in keys):
            params, grad_leaves = _items(params), _items(grads)
            buffers = {key: _items(state[key]) for key in keys}
        else:
            params, spec = pytree.tree_flatten(params)
            grad_leaves, grad_spec = pytree.tree_flatten(grads, is_leaf=_is_none)
            if grad_spec != spec:
                raise ValueError(
                    f"{self.name}: grads must have the structure of params.\n params: {spec}\n grads: {grad_spec}"
                )
            if not isinstance(state, Mapping) or set(state) != expected:
                found = sorted(state) if isinstance(state, Mapping) else type(state).__name__
                raise ValueError(
                    f"{self.name}: state has keys {found}, but this config needs {sorted(expected)}; "
                    f"build it with optorch.{self.name}.init(params, config)"
                )
            buffers = {}
            for key in keys:
                buffers[key], key_spec = pytree.tree_flatten(state[key])
                if key_spec != spec:
                    raise ValueError(f"{self.name}: state[{key!r}] must have the structure of params")
        shared = (state[SHARED_KEY],) if self.shared is not None else ()

        for i, (param, grad) in enumerate(zip(params, grad_leaves)):
            if grad is not None:
                _check_grad(self.name, i, spec, param, grad)

        leaf_states = [{key: buffers[key][i] for key in keys} for i in range(len(params))]
        moving = [i for i, grad in enumerate(grad_leaves) if grad is not None]
        work = ([params[i] for i in moving], [grad_leaves[i] for i in moving], [leaf_states[i] for i in moving])
        if self.shared is None and self.is_elementwise(config) and stepping.eligible(*work):
            results = stepping.step_in_blocks(self.update, *work, config)
        elif self.shared is None and stepping.traceable_once(*work[:2], config):
            if opaque.takes(self, *work):
                results = opaque.step_as_blocks(self, *work, config)
            else:
                results = stepping.step_traced_once(self.update, *work, config)
        else:
            results = [apply_update(self.update, p, g, s, config, *shared) for p, g, s in zip(*work)]
        new_params, new_leaf_states, contributions = list(params), list(leaf_states), []
        for i, (new_param, new_leaf_state, *contribution) in zip(moving, results):
            new_params[i], new_leaf_states[i] = new_param, new_leaf_state
            contributions += contribution
        new_state = {key: _unflatten([s[key] for s in new_leaf_states], spec) for key in keys}
        if self.shared is not None:
            device = next(iter(shared[0].values())).device if shared[0] else torch.device("cpu")
            new_state[SHARED_KEY] = self.shared.finish(shared[0], sum_contributions(contributions, device), config)
        return _unflatten(new_params, spec), new_state

    def as_config(self, config: Config | Mapping[str, Any] | None = None) -> Config:
        """``config`` as this algorithm's Config: the defaults for None, validated from a dict of its
        keys; a Config of another algorithm is a ``TypeError``."""
        if config is None:
            return self.config()
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


def _flat_spec(tree: Any, grads: bool = False) -> tuple[type, Any] | None:
    """The structure of a flat list, tuple or dict of tensors (``None`` too, for grads) as ``(type, keys
    or positions)``, else None. Most steps get such trees, and for them the step skips pytree, whose
    Python ``torch.compile`` traces at ~3 ms a leaf (measured, torch 2.13)."""
    kind = type(tree)
    if kind not in (list, tuple, dict):
        return None
    if not all(isinstance(x, Tensor) or (grads and x is None) for x in _items(tree)):
        return None
    return kind, tuple(tree) if kind is dict else range(len(tree))


def _items(tree: list | tuple | dict) -> list:
    return list(tree.values()) if type(tree) is dict else list(tree)


def _unflatten(leaves: list, spec: Any) -> Any:
    """The inverse of the step's flattening: a pytree spec, or a flat structure (:func:`_flat_spec`)."""
    if isinstance(spec, pytree.TreeSpec):
        return pytree.tree_unflatten(leaves, spec)
    kind, keys = spec
    return dict(zip(keys, leaves)) if kind is dict else kind(leaves)


def _check_grad(name: str, i: int, spec: Any, param: Tensor, grad: Any) -> None:
    if not isinstance(grad, Tensor):
        raise TypeError(f"{name}: grad at {_describe(i, spec)} is a {type(grad).__name__}, expected a tensor or None")
    if grad.is_sparse:
        raise RuntimeError(f"{name} does not support sparse gradients (parameter {_describe(i, spec)})")
    if grad.shape != param.shape:
        raise ValueError(
            f"{name}: grad at {_describe(i, spec)} has shape {tuple(grad.shape)}, param has {tuple(param.shape)}"
        )
