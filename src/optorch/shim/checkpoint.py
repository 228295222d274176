"""Loading a checkpoint into an :class:`optorch.Optimizer`: migrate, check everything, then load.

A checkpoint is torch's layout, ``{"state": {index: {key: value}}, "param_groups": [...]}``, with
everything optorch keeps beside the algorithm's state in those two places (see :mod:`optorch.shim`).
Loading is all or nothing: :func:`check_and_load` validates the whole dict (structure, group sizes,
hyperparameters, state keys, shapes and dtypes, the shared values and counters) before it changes
anything, and raises ``ValueError`` naming what is wrong.

A checkpoint that lacks state the optimizer's config needs (a torch.optim checkpoint loaded into a
shim with a ``schedule``, an ``ema``, ...) is refused rather than silently restarted; :func:`complete`
fills the missing pieces explicitly, e.g. ``opt.load_state_dict(optorch.complete_state_dict(opt, ckpt,
schedule_step=1000))``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import shown
from ..functional.knobs import BASE_PREFIX, flatten_state
from .load_plan import Plan

if TYPE_CHECKING:  # the optimizer loads through this module: named for the annotations only
    from .optimizer import Optimizer
from .state import FORMAT_KEY, SCHEDULE_KEY, SHARED_PREFIX

__all__ = ["check_and_load", "complete", "migrate"]

_FORMAT_1_KEYS = ("shared", "schedule_step", "combinators", "adaptive")


def migrate(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint of format 1 (optorch before every piece of state moved into ``state`` and
    ``param_groups``: top-level ``shared``, ``schedule_step``, ``combinators`` and ``adaptive``) in
    format 2. Other checkpoints come back as they are (a shallow copy)."""
    state_dict = dict(state_dict)
    if not any(key in state_dict for key in _FORMAT_1_KEYS):
        return state_dict
    groups = [
        _dict(group, f"param_groups[{i}]")
        for i, group in enumerate(_list(state_dict.get("param_groups"), "param_groups"))
    ]
    state = {index: _dict(leaf, f"state[{index!r}]") for index, leaf in _dict(state_dict.get("state"), "state").items()}
    linked: dict[str, Any] = {}
    for key, value in _dict(state_dict.pop("shared", {}), "shared").items():
        linked[SHARED_PREFIX + key] = value
    combinators = _dict(state_dict.pop("combinators", {}) or {}, "combinators")
    renamed = {
        "micro_step": "accumulate.micro_step",
        "notfinite_count": "skip.notfinite_count",
        "total_notfinite": "skip.total_notfinite",
        "last_finite": "skip.last_finite",
        "scale": "amp.scale",
        "growth_tracker": "amp.growth_tracker",
        "overflows": "amp.overflows",
        "ema_count": "ema.count",
    }
    linked.update({new: combinators[old] for old, new in renamed.items() if old in combinators})
    order = [
        index for i, group in enumerate(groups) for index in _list(group.get("params", []), f"param_groups[{i}].params")
    ]
    for position, acc in _dict(combinators.get("accumulated", {}), "accumulated").items():
        state.setdefault(_at(order, position, "combinators.accumulated"), {})["grad_acc"] = acc
    if "micro_step" in combinators:  # format 1 kept sums only for params seen in the window: zeros elsewhere
        for leaf in state.values():
            if leaf and "grad_acc" not in leaf:
                leaf["grad_acc"] = None
    for position, average in enumerate(_list(combinators.get("ema", []), "ema")):
        state.setdefault(_at(order, position, "combinators.ema"), {})["ema"] = average
    adaptive = state_dict.pop("adaptive", None)
    if adaptive is not None:
        adaptive = _dict(adaptive, "adaptive")
        linked.update(flatten_state(_dict(adaptive.get("state"), "adaptive.state")))
        for group, bases in zip(groups, _list(adaptive.get("bases", []), "adaptive.bases")):
            group.update({BASE_PREFIX + knob: value for knob, value in _dict(bases, "adaptive.bases").items()})
    position = state_dict.pop("schedule_step", None)
    for group in groups:
        group.update(linked)
        if position is not None:
            group[SCHEDULE_KEY] = position
        group[FORMAT_KEY] = 1
    state_dict["param_groups"], state_dict["state"] = groups, state
    return state_dict


def check_and_load(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    """Load ``state_dict`` into ``optimizer`` if all of it fits; else raise and change nothing."""
    state_dict = migrate(state_dict)
    plan = Plan(optimizer, state_dict)
    plan.check()
    plan.load()


def complete(
    optimizer: Optimizer, state_dict: Mapping[str, Any], *, schedule_step: int | None = None
) -> dict[str, Any]:
    """``state_dict`` with what ``optimizer``'s config needs and it lacks, filled in: each group's
    ``schedule_step`` (given: where the schedule continues), a combinator's per-parameter ``ema`` (the
    params' current values) and ``grad_acc`` (zeros), and the counters and loss scale at their
    initial values. Meant for a torch.optim checkpoint loaded into a shim with such entries; the
    algorithm's own state and its shared state cannot be invented and are not filled."""
    if schedule_step is not None and (
        isinstance(schedule_step, bool) or not isinstance(schedule_step, int) or schedule_step < 0
    ):
        raise ValueError(f"schedule_step must be a whole number of steps >= 0, got {shown(schedule_step)}")
    state_dict = migrate(_dict(state_dict, "state_dict"))
    groups = [
        _dict(group, f"param_groups[{i}]")
        for i, group in enumerate(_list(state_dict.get("param_groups"), "param_groups"))
    ]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"the state_dict has {len(groups)} param groups, this optimizer has {len(optimizer.param_groups)}"
        )
    fresh = {key: value for key, value in optimizer._fresh_linked().items() if not key.startswith(SHARED_PREFIX)}
    for group, own in zip(groups, optimizer.param_groups):
        if optimizer.schedules and SCHEDULE_KEY not in group:
            if schedule_step is None:
                raise ValueError(
                    "the checkpoint has no schedule position: pass schedule_step= (the number of steps already taken)"
                )
            group[SCHEDULE_KEY] = schedule_step
        for key, value in fresh.items():
            group.setdefault(key, value.clone())
        for key, value in own.items():
            if key.startswith(BASE_PREFIX) and key not in group:
                group[key] = value
    state = {index: _dict(leaf, f"state[{index!r}]") for index, leaf in _dict(state_dict.get("state"), "state").items()}
    indices = [i for n, group in enumerate(groups) for i in _list(group.get("params"), f"param_groups[{n}].params")]
    params = {i: p for i, p in zip(indices, optimizer._all_params()) if isinstance(i, (int, str))}
    for index, leaf in state.items():
        param = params.get(index)
        if param is None or not leaf:
            continue
        if "ema" in optimizer._extras:
            leaf.setdefault("ema", param.detach().clone())
        if "grad_acc" in optimizer._extras:
            leaf.setdefault("grad_acc", torch.zeros_like(param))
    return {**state_dict, "param_groups": groups, "state": state}


def _at(order: list[Any], position: Any, where: str) -> Any:
    """The parameter at ``position`` of a format-1 checkpoint's param groups."""
    if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < len(order):
        raise ValueError(
            f"a format-1 checkpoint's {where!r} names position {shown(position)}, but its param groups list "
            f"{len(order)} params"
        )
    return order[position]


def _dict(value: Any, where: str) -> dict:
    if not isinstance(value, Mapping):
        raise ValueError(f"a checkpoint's {where!r} must be a dict, got {type(value).__name__}")
    return dict(value)


def _list(value: Any, where: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"a checkpoint's {where!r} must be a list, got {type(value).__name__}")
    return list(value)
