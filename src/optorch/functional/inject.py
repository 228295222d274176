r"""Hyperparameters as state: schedules and online rules without recompiling (optax's
``inject_hyperparams`` idea).

:func:`inject_hyperparams` wraps an algorithm and a config into a stepper whose state carries every
real-valued hyperparameter as a 0-dim tensor::

    stepper = optorch.inject_hyperparams(optorch.adam.algorithm, optorch.adam.Config(lr=1e-3),
                                         lr=optorch.schedules.Cosine(init_value=1e-3, decay_steps=1000))
    state = stepper.init(params)
    params, state = stepper.step(params, grads, state)
    state["hyperparams"]["lr"]        # the learning rate the last step used

The state is ``{"count": ..., "hyperparams": {field: tensor, ...}, "inner": <the algorithm's state>}``.
Each step first sets the scheduled hyperparameters to ``schedule(count)``, then steps with a config
holding the tensors from ``state["hyperparams"]``. Because they are tensors, a compiled step sees a
new value as new data, never as a new constant: 100 steps of a changing lr and beta run one graph.
Unscheduled hyperparameters can be changed between steps by writing a new tensor into the state
(what an adaptive rule does), and ``torch.func.grad`` differentiates with respect to them.

A tuple field (``betas``) is a tuple of tensors; its schedule is a tuple with a schedule or None per
member, e.g. ``betas=(None, schedules.Linear(...))``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..core import ops
from ..core.algorithm import Algorithm
from ..core.compat import pytree
from ..core.config import Config

__all__ = ["InjectedHyperparams", "inject_hyperparams"]

Schedule = Callable[[Tensor], Any]


@dataclass(frozen=True)
class InjectedHyperparams:
    """A stepper ``init(params) -> state``, ``step(params, grads, state) -> (params, state)`` whose
    hyperparameters live in its state. Build it with :func:`inject_hyperparams`."""

    algorithm: Algorithm
    config: Config
    schedules: Mapping[str, Any] = field(default_factory=dict)

    def init(self, params: Any) -> dict[str, Any]:
        leaves = pytree.tree_leaves(params)
        like = leaves[0] if leaves else torch.zeros(())
        as_tensor = lambda value: torch.as_tensor(value, dtype=ops.scalar_dtype(like), device=like.device)  # noqa: E731
        hyperparams = {
            name: tuple(as_tensor(v) for v in value) if isinstance(value, tuple) else as_tensor(value)
            for name, value in self.config.hyperparameters().items()
            if _is_real(value)
        }
        count = torch.zeros((), dtype=torch.int64, device=like.device)
        hyperparams = self._scheduled(hyperparams, count)
        # The state keys a config implies may depend on its values (SGD keeps a momentum buffer
        # unless momentum is the number 0): init with the tensor config the steps will use.
        return {
            "count": count,
            "hyperparams": hyperparams,
            "inner": self.algorithm.init(params, self.config.with_tensors(**hyperparams)),
        }

    def step(self, params: Any, grads: Any, state: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        hyperparams = self._scheduled(state["hyperparams"], state["count"])
        config = self.config.with_tensors(**hyperparams)
        params, inner = self.algorithm.step(params, grads, state["inner"], config)
        return params, {"count": state["count"] + 1, "hyperparams": hyperparams, "inner": inner}

    def _scheduled(self, hyperparams: Mapping[str, Any], count: Tensor) -> dict[str, Any]:
        values = dict(hyperparams)
        for name, schedule in self.schedules.items():
            current = values[name]
            if isinstance(current, tuple):
                values[name] = tuple(c if s is None else _like(s(count), c) for s, c in zip(schedule, current))
            else:
                values[name] = _like(schedule(count), current)
        return values


def inject_hyperparams(
    algorithm: Algorithm, config: Config | Mapping[str, Any] | None = None, **schedules: Any
) -> InjectedHyperparams:
    """``algorithm`` with its real-valued hyperparameters held in the state; ``schedules`` maps field
    names to ``step -> value`` callables (e.g. :mod:`optorch.schedules`), called with the step count
    (a 0-dim int64 tensor) before each step."""
    config = algorithm.as_config(config)
    values = config.hyperparameters()
    for name, schedule in schedules.items():
        if name not in values:
            raise ValueError(f"{algorithm.name} has no hyperparameter {name!r}; it has {', '.join(values)}")
        if not _is_real(values[name]):
            raise ValueError(
                f"{algorithm.name}'s {name!r} is not a real-valued hyperparameter, so it cannot be scheduled"
            )
        if isinstance(values[name], tuple):
            if (
                not isinstance(schedule, tuple)
                or len(schedule) != len(values[name])
                or not all(s is None or callable(s) for s in schedule)
            ):
                raise ValueError(
                    f"{name!r} is a tuple of {len(values[name])}: give a tuple of as many schedules (None keeps one "
                    "fixed)"
                )
        elif not callable(schedule):
            raise ValueError(
                f"the schedule for {name!r} must be callable (step -> value), got {type(schedule).__name__}"
            )
    return InjectedHyperparams(algorithm, config, dict(schedules))


def _is_real(value: Any) -> bool:
    if isinstance(value, tuple):
        return bool(value) and all(_is_real(v) for v in value)
    return isinstance(value, (float, Tensor)) and not isinstance(value, bool)


def _like(value: Any, reference: Tensor) -> Tensor:
    return torch.as_tensor(value, device=reference.device).to(reference.dtype)
