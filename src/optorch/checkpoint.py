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

import math
from collections import defaultdict
from typing import Any, Mapping

import torch
from torch import Tensor

from .shim import FORMAT, FORMAT_KEY, SCHEDULE_KEY, SHARED_PREFIX, STATE_PREFIXES, Optimizer, StateDict, _check_tensor

__all__ = ["check_and_load", "complete", "migrate"]

_FORMAT_1_KEYS = ("shared", "schedule_step", "combinators", "adaptive")


def migrate(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint of format 1 (optorch before every piece of state moved into ``state`` and
    ``param_groups``: top-level ``shared``, ``schedule_step``, ``combinators`` and ``adaptive``) in
    format 2. Other checkpoints come back as they are (a shallow copy)."""
    state_dict = dict(state_dict)
    if not any(key in state_dict for key in _FORMAT_1_KEYS):
        return state_dict
    groups = [dict(group) for group in _list(state_dict.get("param_groups"), "param_groups")]
    state = {index: dict(leaf) for index, leaf in _dict(state_dict.get("state"), "state").items()}
    linked: dict[str, Any] = {}
    for key, value in _dict(state_dict.pop("shared", {}), "shared").items():
        linked[SHARED_PREFIX + key] = value
    combinators = _dict(state_dict.pop("combinators", {}) or {}, "combinators")
    renamed = {"micro_step": "accumulate.micro_step", "notfinite_count": "skip.notfinite_count", "total_notfinite": "skip.total_notfinite",
               "last_finite": "skip.last_finite", "scale": "amp.scale", "growth_tracker": "amp.growth_tracker", "overflows": "amp.overflows",
               "ema_count": "ema.count"}
    linked.update({new: combinators[old] for old, new in renamed.items() if old in combinators})
    order = [index for group in groups for index in group.get("params", [])]
    for position, acc in _dict(combinators.get("accumulated", {}), "accumulated").items():
        state.setdefault(order[position], {})["grad_acc"] = acc
    if "micro_step" in combinators:  # format 1 kept sums only for params seen in the window: zeros elsewhere
        for leaf in state.values():
            if leaf and "grad_acc" not in leaf:
                leaf["grad_acc"] = None
    for position, average in enumerate(_list(combinators.get("ema", []), "ema")):
        state.setdefault(order[position], {})["ema"] = average
    adaptive = state_dict.pop("adaptive", None)
    if adaptive is not None:
        from .adaptive import BASE_PREFIX, flatten_state

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
    plan = _Plan(optimizer, state_dict)
    plan.check()
    plan.load()


def complete(optimizer: Optimizer, state_dict: Mapping[str, Any], *, schedule_step: int | None = None) -> dict[str, Any]:
    """``state_dict`` with what ``optimizer``'s config needs and it lacks, filled in: each group's
    ``schedule_step`` (given: where the schedule continues), a combinator's per-parameter ``ema`` (the
    params' current values) and ``grad_acc`` (zeros), and the counters and loss scale at their
    initial values. Meant for a torch.optim checkpoint loaded into a shim with such entries; the
    algorithm's own state and its shared state cannot be invented and are not filled."""
    state_dict = migrate(state_dict)
    groups = [dict(group) for group in _list(state_dict.get("param_groups"), "param_groups")]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"the state_dict has {len(groups)} param groups, this optimizer has {len(optimizer.param_groups)}")
    fresh = {key: value for key, value in optimizer._fresh_linked().items() if not key.startswith(SHARED_PREFIX)}
    for group, own in zip(groups, optimizer.param_groups):
        if optimizer.schedules and SCHEDULE_KEY not in group:
            if schedule_step is None:
                raise ValueError("the checkpoint has no schedule position: pass schedule_step= (the number of steps already taken)")
            group[SCHEDULE_KEY] = int(schedule_step)
        for key, value in fresh.items():
            group.setdefault(key, value.clone())
        for key, value in own.items():
            if key.startswith("adapt.base.") and key not in group:
                group[key] = value
    state = {index: dict(leaf) for index, leaf in _dict(state_dict.get("state"), "state").items()}
    params = dict(zip((i for g in groups for i in g["params"]), optimizer._all_params()))
    for index, leaf in state.items():
        param = params.get(index)
        if param is None or not leaf:
            continue
        if "ema" in optimizer._extras:
            leaf.setdefault("ema", param.detach().clone())
        if "grad_acc" in optimizer._extras:
            leaf.setdefault("grad_acc", torch.zeros_like(param))
    return {**state_dict, "param_groups": groups, "state": state}


class _Plan:
    """The checks of one load, then the load itself; nothing is written before :meth:`load`."""

    def __init__(self, optimizer: Optimizer, state_dict: dict[str, Any]):
        self.optimizer = optimizer
        self.name = optimizer.algorithm.name
        self.state_dict = state_dict

    def fail(self, message: str) -> None:
        raise ValueError(f"{self.name}: {message}")

    def check(self) -> None:
        optimizer, state_dict = self.optimizer, self.state_dict
        if not isinstance(state_dict.get("state"), Mapping) or not isinstance(state_dict.get("param_groups"), list):
            self.fail("a state_dict is a dict with 'state' (a dict) and 'param_groups' (a list)")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(optimizer.param_groups):
            self.fail(f"the state_dict has {len(saved_groups)} param groups, this optimizer has {len(optimizer.param_groups)}")
        self.params: dict[Any, tuple[Tensor, Any]] = {}
        self.configs = []
        for i, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
            if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), list):
                self.fail(f"param group {i} of the state_dict is not a dict with a 'params' list")
            if len(saved["params"]) != len(group["params"]):
                self.fail(f"param group {i} has {len(saved['params'])} params in the state_dict, {len(group['params'])} here")
            version = saved.get(FORMAT_KEY, 0)
            if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT:
                self.fail(f"param group {i} has {FORMAT_KEY}={version!r}: written by a newer optorch (this one reads up to {FORMAT})")
            fields = optimizer.algorithm.config.model_fields
            try:
                config = optimizer.group_config({**{k: group[k] for k in fields}, **{k: v for k, v in saved.items() if k in fields}})
            except ValueError as error:
                self.fail(f"param group {i} of the state_dict has invalid hyperparameters: {error}")
            if i and (differing := [k for k in optimizer.algorithm.config.global_keys if getattr(config, k) != getattr(self.configs[0], k)]):
                self.fail(f"param group {i} of the state_dict sets {', '.join(map(repr, differing))}, which hold one value for all param groups, unlike group 0")
            self.configs.append(config)
            for index, param in zip(saved["params"], group["params"]):
                self.params[index] = (param, config)
            self._check_group_values(i, saved)
        self._check_linked_agree(saved_groups)
        self.states = {index: self._check_state(index, leaf) for index, leaf in state_dict["state"].items()}

    def _check_group_values(self, i: int, saved: Mapping[str, Any]) -> None:
        optimizer = self.optimizer
        if optimizer.schedules:
            if SCHEDULE_KEY not in saved:
                self.fail(f"param group {i} of the state_dict has no {SCHEDULE_KEY!r}, which this optimizer's 'schedule' entry needs "
                          "(a torch.optim checkpoint?); to continue the schedule from a known step, load "
                          "optorch.complete_state_dict(optimizer, state_dict, schedule_step=N)")
            position = _number(saved[SCHEDULE_KEY])
            if position is None or position < 0 or position != int(position):
                self.fail(f"param group {i}: {SCHEDULE_KEY!r} must be a whole number >= 0, got {saved[SCHEDULE_KEY]!r}")
        for key in saved:
            if isinstance(key, str) and key.startswith(STATE_PREFIXES) and key not in optimizer._linked \
                    and not (key.startswith("adapt.base.") and optimizer.adaptive is not None):
                self.fail(f"param group {i} of the state_dict holds {key!r}, which this optimizer does not keep: "
                          "a checkpoint of another config (other adaptive rules, combinators or algorithm)?")
        for key, canonical in optimizer._linked.items():
            if key not in saved:
                hint = ("load optorch.complete_state_dict(optimizer, state_dict) to start it fresh"
                        if not key.startswith(SHARED_PREFIX) else "is this a checkpoint of another algorithm?")
                self.fail(f"param group {i} of the state_dict has no {key!r}, which this optimizer keeps; {hint}")
            _check_value(self, key, saved[key], canonical)

    def _check_linked_agree(self, saved_groups: list[Mapping[str, Any]]) -> None:
        for key in self.optimizer._linked:
            first = saved_groups[0][key]
            for i, saved in enumerate(saved_groups[1:], 1):
                if not _agree(first, saved[key]):
                    self.fail(f"param groups 0 and {i} of the state_dict disagree on {key!r}, which holds one value for all of them")

    def _check_state(self, index: Any, leaf: Any) -> dict[str, Any]:
        optimizer = self.optimizer
        if index not in self.params:
            self.fail(f"the state_dict has state for parameter {index!r}, which no param group lists")
        if not isinstance(leaf, Mapping):
            self.fail(f"the state of parameter {index} is not a dict")
        # torch.distributed.checkpoint's flattened loading rebuilds each key of the live state, and a key
        # the checkpoint lacks (one torch's layout leaves out, e.g. SGD's step) as an empty dict: absent
        leaf = {key: value for key, value in leaf.items() if not (isinstance(value, Mapping) and not value)}
        param, config = self.params[index]
        extras = {key: leaf[key] for key in leaf if key in optimizer._extras}
        own = {key: value for key, value in leaf.items() if key not in optimizer._extras}
        for key, value in extras.items():
            if value is None and key == "grad_acc":
                continue
            _check_tensor(self.name, param, key, value, param.shape, _castable(param), {value.device} if isinstance(value, Tensor) else set())
            _check_finite(self, index, key, value)
        if own:
            missing = sorted(optimizer._extras - set(extras))
            if missing:
                self.fail(f"the state of parameter {index} lacks {', '.join(map(repr, missing))}, which this optimizer keeps per parameter "
                          "(a torch.optim checkpoint?); load optorch.complete_state_dict(optimizer, state_dict) to start it fresh")
            own, expected = self._check_own(index, param, config, own)
            return {"own": own, "expected": expected, "extras": extras}
        return {"own": {}, "expected": {}, "extras": extras}

    def _check_own(self, index: Any, param: Tensor, config: Any, own: dict[str, Any]) -> dict[str, Any]:
        algorithm = self.optimizer.algorithm
        expected = algorithm.init_leaf(torch.empty(param.shape, dtype=param.dtype, device="meta"), config)
        internal = algorithm.state_from_torch(dict(own))
        if set(internal) != set(expected):
            self.fail(f"state of parameter {index} has keys {sorted(own)}, expected {sorted(algorithm.state_to_torch(dict(expected)))}; "
                      "is this a checkpoint of another optimizer or with other flags?")
        for key, reference in expected.items():
            value = internal[key]
            if reference.dim() == 0:
                number = _number(value)
                if number is None:
                    self.fail(f"{key!r} of parameter {index} must be a number or a one-element tensor, got {_describe(value)}")
                if key == "step" and (number < 0 or not math.isfinite(number)):
                    self.fail(f"'step' of parameter {index} must be a finite number >= 0, got {number}")
            elif not isinstance(value, Tensor) or value.shape != reference.shape:
                self.fail(f"state {key!r} of parameter {index} has shape {_describe(value)}, expected {tuple(reference.shape)} "
                          f"(the parameter has {tuple(param.shape)})")
            elif not (value.is_floating_point() or value.is_complex()) and (param.is_floating_point() or param.is_complex()) and reference.is_floating_point():
                self.fail(f"state {key!r} of parameter {index} is {value.dtype}, expected a floating-point tensor")
        return internal, expected

    # -- loading -------------------------------------------------------------------------------

    def load(self) -> None:
        optimizer, state_dict = self.optimizer, self.state_dict
        torch_layout = optimizer.engine == "torch"
        new_groups = []
        for saved, group in zip(state_dict["param_groups"], optimizer.param_groups):
            new = {key: value for key, value in saved.items() if key not in optimizer._linked and key not in ("params", SCHEDULE_KEY)}
            for key, value in group.items():  # what the checkpoint lacks keeps this optimizer's value
                if key not in optimizer._linked and key not in ("params", SCHEDULE_KEY):
                    new.setdefault(key, value)
            for key in ("foreach", "fused", "capturable", "differentiable"):
                if key in group:
                    new[key] = group[key]  # how this shim runs is not the checkpoint's to say
            new[FORMAT_KEY] = FORMAT
            if optimizer.schedules:
                new[SCHEDULE_KEY] = torch.tensor(int(_number(saved[SCHEDULE_KEY])), dtype=torch.int64)
            new["params"] = group["params"]
            new_groups.append(new)
        with torch.no_grad():
            for key, canonical in optimizer._linked.items():
                _copy_into(canonical, state_dict["param_groups"][0][key])
        for new in new_groups:
            new.update(optimizer._linked)
        state: defaultdict[Tensor, dict[str, Any]] = defaultdict(StateDict)
        algorithm = optimizer.algorithm
        for index, checked in self.states.items():
            param, _ = self.params[index]
            live = optimizer.state.get(param, {})
            leaf = {}
            own, reference = checked["own"], checked["expected"]
            if torch_layout and own:
                own, reference = algorithm.state_to_torch(dict(own)), algorithm.state_to_torch(dict(reference))
            for key, value in own.items():
                leaf[key] = _own_copy(self._cast(param, key, value, reference[key]), value, live.get(key))
            for key, value in checked["extras"].items():
                cast = torch.zeros_like(param) if value is None else value.to(device=param.device, dtype=param.dtype)
                leaf[key] = _own_copy(cast, value, live.get(key))
            if leaf:
                state[param] = StateDict(leaf)
        optimizer.param_groups[:] = new_groups
        optimizer.state = state

    def _cast(self, param: Tensor, key: str, value: Any, reference: Tensor) -> Tensor:
        """torch's load rule (``Optimizer._process_value_according_to_param_policy``): ``step`` as
        saved (float32 on the param's device for a fused kernel), everything else in the param's
        dtype, if it is floating point, and on its device. optorch's own algorithms (no torch
        counterpart) keep the dtypes their ``init_leaf`` gives (DAG's float32 alpha for bfloat16)."""
        optimizer = self.optimizer
        if not isinstance(value, Tensor):
            value = torch.tensor(float(value), dtype=reference.dtype)
        if reference.dim() == 0 and value.dim() != 0:
            value = value.reshape(())
        if key == "step":
            fused = optimizer.engine == "torch" and any(group.get("fused") for group in optimizer.param_groups)
            return value.to(dtype=torch.float32, device=param.device) if fused else value
        if optimizer.algorithm.torch_optimizer is None:
            return value.to(dtype=reference.dtype, device=param.device)
        if param.is_floating_point():
            return value.to(dtype=param.dtype, device=param.device)
        return value.to(device=param.device)


def _own_copy(value: Tensor, saved: Any, live: Any) -> Tensor:
    """A tensor of the loaded state that is nobody else's: ``value`` if casting made it new, else a
    copy of the saved tensor (torch would share it with the dict it loaded, so that stepping one
    optimizer could change another's state). The live tensor itself is kept as it is (DCP loads
    into the very tensors ``state_dict()`` returned, then hands them back)."""
    if value is not saved or value is live:
        return value
    return value.clone()


def _copy_into(target: Tensor, value: Any) -> None:
    if isinstance(value, Tensor):
        target.copy_(value.detach().reshape(target.shape).to(device=target.device, dtype=target.dtype))
    else:
        target.fill_(value)


def _check_value(plan: _Plan, key: str, value: Any, canonical: Tensor) -> None:
    """A linked value: a number or a tensor of the live one's shape, finite; counters whole and >= 0;
    a loss scale > 0."""
    if isinstance(value, bool) and canonical.dtype != torch.bool:
        plan.fail(f"{key!r} must be a number, got {value!r}")
    if isinstance(value, Tensor):
        if value.numel() != canonical.numel():
            plan.fail(f"{key!r} has shape {tuple(value.shape)}, expected {tuple(canonical.shape)}")
        values = value.detach().to("cpu", torch.float64).reshape(-1) if value.numel() else value.new_zeros(0)
    elif isinstance(value, (int, float)) and canonical.numel() == 1:
        values = torch.tensor([float(value)], dtype=torch.float64)
    else:
        plan.fail(f"{key!r} must be a number or a tensor, got {_describe(value)}")
    if not bool(torch.isfinite(values).all()):
        plan.fail(f"{key!r} holds {values.tolist() if values.numel() < 8 else 'values'} that are not finite")
    if not canonical.is_floating_point() and canonical.dtype != torch.bool:
        if bool((values < 0).any()) or bool((values != values.round()).any()):
            plan.fail(f"{key!r} is a count: a whole number >= 0, got {values.tolist() if values.numel() < 8 else 'other values'}")
    if key == "amp.scale" and bool((values <= 0).any()):
        plan.fail(f"{key!r} (the loss scale) must be > 0, got {values.tolist()}")


def _check_finite(plan: _Plan, index: Any, key: str, value: Tensor) -> None:
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        plan.fail(f"state {key!r} of parameter {index} holds values that are not finite")


def _agree(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        a, b = torch.as_tensor(a).detach().cpu(), torch.as_tensor(b).detach().cpu()
        return a.shape == b.shape and bool((a.to(torch.float64) == b.to(torch.float64)).all())
    return a == b


def _castable(param: Tensor) -> set[torch.dtype]:
    return {torch.float16, torch.bfloat16, torch.float32, torch.float64, param.dtype} if param.is_floating_point() else {param.dtype}


def _number(value: Any) -> float | None:
    if isinstance(value, Tensor):
        return float(value.reshape(())) if value.numel() == 1 else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _describe(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def _dict(value: Any, where: str) -> dict:
    if not isinstance(value, Mapping):
        raise ValueError(f"a format-1 checkpoint's {where!r} must be a dict, got {type(value).__name__}")
    return dict(value)


def _list(value: Any, where: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"a checkpoint's {where!r} must be a list, got {type(value).__name__}")
    return list(value)
