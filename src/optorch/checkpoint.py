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

import fnmatch
import math
from collections import defaultdict
from typing import Any, Mapping, NamedTuple, NoReturn

import pydantic
import torch
from torch import Tensor

from .adaptive import BASE_PREFIX, flatten_state
from .amp import MIN_SCALE
from .config import problems, shown
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
    groups = [_dict(group, f"param_groups[{i}]") for i, group in enumerate(_list(state_dict.get("param_groups"), "param_groups"))]
    state = {index: _dict(leaf, f"state[{index!r}]") for index, leaf in _dict(state_dict.get("state"), "state").items()}
    linked: dict[str, Any] = {}
    for key, value in _dict(state_dict.pop("shared", {}), "shared").items():
        linked[SHARED_PREFIX + key] = value
    combinators = _dict(state_dict.pop("combinators", {}) or {}, "combinators")
    renamed = {"micro_step": "accumulate.micro_step", "notfinite_count": "skip.notfinite_count", "total_notfinite": "skip.total_notfinite",
               "last_finite": "skip.last_finite", "scale": "amp.scale", "growth_tracker": "amp.growth_tracker", "overflows": "amp.overflows",
               "ema_count": "ema.count"}
    linked.update({new: combinators[old] for old, new in renamed.items() if old in combinators})
    order = [index for i, group in enumerate(groups) for index in _list(group.get("params", []), f"param_groups[{i}].params")]
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
    plan = _Plan(optimizer, state_dict)
    plan.check()
    plan.load()


def complete(optimizer: Optimizer, state_dict: Mapping[str, Any], *, schedule_step: int | None = None) -> dict[str, Any]:
    """``state_dict`` with what ``optimizer``'s config needs and it lacks, filled in: each group's
    ``schedule_step`` (given: where the schedule continues), a combinator's per-parameter ``ema`` (the
    params' current values) and ``grad_acc`` (zeros), and the counters and loss scale at their
    initial values. Meant for a torch.optim checkpoint loaded into a shim with such entries; the
    algorithm's own state and its shared state cannot be invented and are not filled."""
    if schedule_step is not None and (isinstance(schedule_step, bool) or not isinstance(schedule_step, int) or schedule_step < 0):
        raise ValueError(f"schedule_step must be a whole number of steps >= 0, got {shown(schedule_step)}")
    state_dict = migrate(_dict(state_dict, "state_dict"))
    groups = [_dict(group, f"param_groups[{i}]") for i, group in enumerate(_list(state_dict.get("param_groups"), "param_groups"))]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"the state_dict has {len(groups)} param groups, this optimizer has {len(optimizer.param_groups)}")
    fresh = {key: value for key, value in optimizer._fresh_linked().items() if not key.startswith(SHARED_PREFIX)}
    for group, own in zip(groups, optimizer.param_groups):
        if optimizer.schedules and SCHEDULE_KEY not in group:
            if schedule_step is None:
                raise ValueError("the checkpoint has no schedule position: pass schedule_step= (the number of steps already taken)")
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


class _Range(NamedTuple):
    """The values a state entry may hold (beyond finite): ``low``..``high`` (open or closed ends),
    whole numbers only if ``whole``."""

    low: float = -math.inf
    high: float = math.inf
    whole: bool = False
    low_open: bool = False

    def holds(self, values: Tensor) -> bool:
        above = values > self.low if self.low_open else values >= self.low
        return bool((above & (values <= self.high)).all()) and (not self.whole or bool((values == values.round()).all()))

    def __str__(self) -> str:
        kind = "whole numbers" if self.whole else "values"
        if self.high < math.inf:
            return f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        return f"{kind} {'>' if self.low_open else '>='} {self.low:g}" if self.low > -math.inf else kind


_COUNT = _Range(0.0, whole=True)
_NON_NEGATIVE = _Range(0.0)
_POSITIVE = _Range(0.0, low_open=True)
RANGES: dict[str, _Range] = {
    # per parameter (the algorithms' own names; a complex tensor's real and imaginary parts each)
    "step": _COUNT,
    **dict.fromkeys(("exp_avg_sq", "max_exp_avg_sq", "square_avg", "acc_delta", "sum", "exp_inf", "row_var", "col_var", "variance",
                     "step_size", "eta", "g_var", "wsq", "pcx", "lr_num", "sigma", "alpha"), _NON_NEGATIVE),  # second moments, sizes
    "mu": _Range(0.0, 1.0, low_open=True),  # ASGD's averaging weight 1 / max(1, t - t0)
    "mu_product": _Range(0.0, 1.0),  # NAdam's product of momentum factors
    "sat_ratio": _Range(0.0, 1.0),  # DAG's saturated fraction
    # shared by all groups
    "amp.scale": _Range(MIN_SCALE),  # its reciprocal unscales the gradients
    "amp.growth_tracker": _COUNT,
    "amp.overflows": _COUNT,
    "accumulate.micro_step": _COUNT,  # and below accumulate_steps (checked with the config)
    "skip.notfinite_count": _COUNT,
    "skip.total_notfinite": _COUNT,
    "skip.last_finite": _Range(0.0, 1.0, whole=True),
    "ema.count": _COUNT,
    "shared.global_step": _COUNT,  # DAG
    "shared.rms_count": _COUNT,
    "shared.d_total": _COUNT,
    "shared.s_t": _Range(0.0, 1.0, low_open=True),
    **dict.fromkeys(("shared.k_val", "shared.rms_t_ema", "shared.rms0_ema"), _NON_NEGATIVE),
    "adapt.t": _COUNT,
    "adapt.terms.*.t_cur": _COUNT,
    "adapt.terms.*.t_i": _Range(1.0, whole=True),
    "adapt.terms.*.value": _POSITIVE,
    "adapt.factors.*": _POSITIVE,
    "adapt.base.*": _NON_NEGATIVE,  # the base value of an adapted knob (lr, momentum, betas, alpha, weight decay)
}
"""What each state entry may hold besides being finite (``fnmatch`` patterns for the adaptive rules'
keys): a checkpoint with a value outside is refused, since it could only poison the params (a loss
scale of 0 or a negative second moment gives inf or NaN at the next step)."""


def _range(key: str) -> _Range | None:
    return RANGES.get(key) or next((r for pattern, r in RANGES.items() if "*" in pattern and fnmatch.fnmatchcase(key, pattern)), None)


class _Plan:
    """One load: :meth:`check` validates everything and prepares every new value; :meth:`load` only
    assigns them, so that nothing can fail once something has changed."""

    def __init__(self, optimizer: Optimizer, state_dict: dict[str, Any]):
        self.optimizer = optimizer
        self.name = optimizer.algorithm.name
        self.state_dict = state_dict

    def fail(self, message: str) -> NoReturn:
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
        self.flags: list[dict[str, Any]] = []
        for i, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
            if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), list):
                self.fail(f"param group {i} of the state_dict is not a dict with a 'params' list")
            if len(saved["params"]) != len(group["params"]):
                self.fail(f"param group {i} has {len(saved['params'])} params in the state_dict, {len(group['params'])} here")
            version = saved.get(FORMAT_KEY, 0)
            if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= FORMAT:
                self.fail(f"param group {i} has {FORMAT_KEY}={shown(version)}: not a format this optorch reads (0 to {FORMAT}; "
                          "a newer one writes higher)")
            fields = optimizer.algorithm.config.model_fields
            # torch.optim saves every hyperparameter and fails at its next step without one; a
            # reference of optorch's own algorithms may name one otherwise (torch-adopt's clip_lambda):
            # this optimizer's value stays
            missing = [k for k in fields if k not in saved and not isinstance(fields[k].default, bool)]
            if missing and optimizer.algorithm.torch_optimizer is not None:
                self.fail(f"param group {i} of the state_dict has no {', '.join(map(repr, missing))}, which torch.optim saves with every "
                          "checkpoint: a checkpoint of another optimizer?")
            # a flag an older torch did not save takes its default, as torch's own load gives it
            self.flags.append({k: fields[k].default for k in fields if k not in saved and isinstance(fields[k].default, bool)})
            values = {**{k: group[k] for k in fields}, **self.flags[i], **{k: v for k, v in saved.items() if k in fields}}
            try:
                # a tensor's value too (DESIGN rule 7: loaded values are checked), then the values as saved
                optimizer.group_config({k: _read_value(v) for k, v in values.items()})
                config = optimizer.group_config(values)
            except pydantic.ValidationError as error:
                self.fail(f"param group {i} of the state_dict has invalid hyperparameters: {problems(error)}")
            except ValueError as error:
                self.fail(f"param group {i} of the state_dict has invalid hyperparameters: {error}")
            if i and (differing := [k for k in optimizer.algorithm.config.global_keys if getattr(config, k) != getattr(self.configs[0], k)]):
                self.fail(f"param group {i} of the state_dict sets {', '.join(map(repr, differing))}, which hold one value for all param groups, unlike group 0")
            self.configs.append(config)
            for index, param in zip(saved["params"], group["params"]):
                if isinstance(index, bool) or not isinstance(index, (int, str)):
                    self.fail(f"param group {i} lists {shown(index)} as a parameter: a checkpoint numbers its parameters (or names them)")
                if index in self.params:
                    self.fail(f"the state_dict lists parameter {index!r} twice in its param groups")
                self.params[index] = (param, config)
            self._check_group_values(i, saved)
        self._check_linked_agree(saved_groups)
        self.states = {index: self._check_state(index, leaf) for index, leaf in state_dict["state"].items()}
        self._prepare()

    def _check_group_values(self, i: int, saved: Mapping[str, Any]) -> None:
        optimizer = self.optimizer
        if optimizer.schedules:
            if SCHEDULE_KEY not in saved:
                self.fail(f"param group {i} of the state_dict has no {SCHEDULE_KEY!r}, which this optimizer's 'schedule' entry needs "
                          "(a torch.optim checkpoint?); to continue the schedule from a known step, load "
                          "optorch.complete_state_dict(optimizer, state_dict, schedule_step=N)")
            position = _number(saved[SCHEDULE_KEY])
            if position is None or not math.isfinite(position) or not 0 <= position < 2**63 or position != int(position):
                self.fail(f"param group {i}: {SCHEDULE_KEY!r} must be a whole number >= 0, got {shown(saved[SCHEDULE_KEY])}")
        for key in saved:
            if isinstance(key, str) and key.startswith(STATE_PREFIXES) and key not in optimizer._linked \
                    and not (key.startswith(BASE_PREFIX) and optimizer.adaptive is not None):
                self.fail(f"param group {i} of the state_dict holds {key!r}, which this optimizer does not keep: "
                          "a checkpoint of another config (other adaptive rules, combinators or algorithm)?")
            if isinstance(key, str) and key.startswith(BASE_PREFIX):
                _check_value(self, f"{key!r} of param group {i}", saved[key], torch.zeros((), dtype=torch.float64), _range(key))
        for key, canonical in optimizer._linked.items():
            if key not in saved:
                hint = ("load optorch.complete_state_dict(optimizer, state_dict) to start it fresh"
                        if not key.startswith(SHARED_PREFIX) else "is this a checkpoint of another algorithm?")
                self.fail(f"param group {i} of the state_dict has no {key!r}, which this optimizer keeps; {hint}")
            values = _check_value(self, repr(key), saved[key], canonical, _range(key))
            if key == "accumulate.micro_step" and bool((values >= optimizer._settings.accumulate_steps).any()):
                self.fail(f"'accumulate.micro_step' is {values.tolist()}, but accumulate_steps is {optimizer._settings.accumulate_steps}: "
                          "a checkpoint of another config?")

    def _check_linked_agree(self, saved_groups: list[Mapping[str, Any]]) -> None:
        for key in self.optimizer._linked:
            first = saved_groups[0][key]
            for i, saved in enumerate(saved_groups[1:], 1):
                if not _agree(first, saved[key]):
                    self.fail(f"param groups 0 and {i} of the state_dict disagree on {key!r}, which holds one value for all of them")

    def _check_state(self, index: Any, leaf: Any) -> dict[str, Any]:
        optimizer = self.optimizer
        if index not in self.params:
            self.fail(f"the state_dict has state for parameter {shown(index)}, which no param group lists")
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
            self._check_dense(index, key, value)
        if own:
            missing = sorted(optimizer._extras - set(extras))
            if missing:
                self.fail(f"the state of parameter {index} lacks {', '.join(map(repr, missing))}, which this optimizer keeps per parameter "
                          "(a torch.optim checkpoint?); load optorch.complete_state_dict(optimizer, state_dict) to start it fresh")
            own, expected = self._check_own(index, param, config, own)
            return {"own": own, "expected": expected, "extras": extras}
        return {"own": {}, "expected": {}, "extras": extras}

    def _check_own(self, index: Any, param: Tensor, config: Any, own: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
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
                if key == "step" and isinstance(value, Tensor) and value.dtype not in (torch.float32, torch.float64):
                    self.fail(f"'step' of parameter {index} is {value.dtype}: a step count is float32 or float64 (as torch keeps it)")
            elif not isinstance(value, Tensor) or value.shape != reference.shape:
                self.fail(f"state {key!r} of parameter {index} has shape {_describe(value)}, expected {tuple(reference.shape)} "
                          f"(the parameter has {tuple(param.shape)})")
            if isinstance(value, Tensor):
                self._check_dense(index, key, value)
                if value.is_complex() and not reference.is_complex():
                    self.fail(f"state {key!r} of parameter {index} is {value.dtype}, its parameter {param.dtype}: loading would drop the imaginary part")
                if reference.is_complex() and not value.is_complex() and reference.dim():
                    self.fail(f"state {key!r} of parameter {index} is {value.dtype}, its parameter {param.dtype}: a complex parameter keeps complex state")
                if not (value.is_floating_point() or value.is_complex()) and reference.is_floating_point():
                    self.fail(f"state {key!r} of parameter {index} is {value.dtype}, expected a floating-point tensor")
        return internal, expected

    def _check_dense(self, index: Any, key: str, value: Tensor) -> None:
        if value.layout != torch.strided:
            self.fail(f"state {key!r} of parameter {index} is a {value.layout} tensor; state is dense")
        if value.is_meta:
            self.fail(f"state {key!r} of parameter {index} is a meta tensor: it has a shape but no values")

    def _prepare(self) -> None:
        """Every value the load assigns, made now (casts to the params' dtypes and devices, the linked
        values in their live dtype) and checked as it will be stored (a float64 1e300 is inf in a
        float32 param's state): a cast that fails, or a value out of range, fails here, before
        anything changed."""
        optimizer = self.optimizer
        torch_layout = optimizer.engine == "torch"
        self.linked = {key: _cast_linked(self.state_dict["param_groups"][0][key], canonical) for key, canonical in optimizer._linked.items()}
        self.new_state: defaultdict[Tensor, dict[str, Any]] = defaultdict(StateDict)
        algorithm = optimizer.algorithm
        try:
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
                for key, value in leaf.items():
                    _check_values(self, index, key, value)
                if leaf:
                    self.new_state[param] = StateDict(leaf)
        except (RuntimeError, NotImplementedError) as error:  # e.g. "Cannot copy out of meta tensor"
            self.fail(f"the state of parameter {index} cannot be moved to its parameter's device and dtype: {str(error).splitlines()[0]}")
        self.new_groups = []
        for saved, group, flags in zip(self.state_dict["param_groups"], optimizer.param_groups, self.flags):
            new = {key: value for key, value in saved.items() if key not in optimizer._linked and key not in ("params", SCHEDULE_KEY)}
            new.update(flags)
            for key, value in group.items():  # what else the checkpoint lacks (torch's execution flags) keeps this optimizer's value
                if key not in optimizer._linked and key not in ("params", SCHEDULE_KEY):
                    new.setdefault(key, value)
            for key in ("foreach", "fused", "capturable", "differentiable"):
                if key in group:
                    new[key] = group[key]  # how this shim runs is not the checkpoint's to say
            new[FORMAT_KEY] = FORMAT
            if optimizer.schedules:
                new[SCHEDULE_KEY] = torch.tensor(int(_number(saved[SCHEDULE_KEY])), dtype=torch.int64)
            new["params"] = group["params"]
            new.update(optimizer._linked)
            self.new_groups.append(new)

    # -- loading -------------------------------------------------------------------------------

    def load(self) -> None:
        optimizer = self.optimizer
        with torch.no_grad():
            for key, canonical in optimizer._linked.items():
                canonical.copy_(self.linked[key])
        optimizer.param_groups[:] = self.new_groups
        optimizer.state = self.new_state

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


def _cast_linked(value: Any, canonical: Tensor) -> Tensor:
    """A linked value as the live tensor holds it (its shape, dtype and device)."""
    if isinstance(value, Tensor):
        return value.detach().reshape(canonical.shape).to(device=canonical.device, dtype=canonical.dtype, copy=True)
    return torch.full_like(canonical, value)


def _check_value(plan: _Plan, what: str, value: Any, canonical: Tensor, allowed: _Range | None) -> Tensor:
    """A value kept in the param groups: a number or a tensor of the live one's size, finite, within
    ``allowed``, and the same after it is stored in the live one's dtype (an int32 counter of 2**40
    or a float32 loss scale of 1e-50 would not be). Returns its values, as float64."""
    if isinstance(value, bool) and canonical.dtype != torch.bool:
        plan.fail(f"{what} must be a number, got {value!r}")
    if isinstance(value, Tensor):
        if value.is_meta:
            plan.fail(f"{what} is a meta tensor: it has a shape but no values")
        if value.numel() != canonical.numel():
            plan.fail(f"{what} has shape {tuple(value.shape)}, expected {tuple(canonical.shape)}")
        if value.is_complex():
            plan.fail(f"{what} must be real, got {value.dtype}")
        values = value.detach().to("cpu", torch.float64).reshape(-1)
    elif isinstance(value, (int, float)) and canonical.numel() == 1:
        values = torch.tensor([float(value)], dtype=torch.float64)
    else:
        plan.fail(f"{what} must be a number or a tensor, got {_describe(value)}")
    listed = values.tolist() if values.numel() < 8 else "values"
    if not bool(torch.isfinite(values).all()):
        plan.fail(f"{what} holds {listed} that are not finite")
    if not canonical.is_floating_point():  # a counter or a flag
        allowed = allowed or _COUNT
    if allowed is not None and not allowed.holds(values):
        plan.fail(f"{what} must hold {allowed}, got {listed}")
    stored = values.to(canonical.dtype).to(torch.float64)
    lost = not bool(torch.isfinite(stored).all()) or bool(((stored == 0) != (values == 0)).any())  # overflow, underflow to 0
    if lost or (not canonical.is_floating_point() and not torch.equal(stored, values)):  # a counter must stay exact
        plan.fail(f"{what} holds {listed}, which {canonical.dtype} cannot hold")
    return values


def _check_values(plan: _Plan, index: Any, key: str, value: Any) -> None:
    """A per-parameter state entry: finite (NaN or inf state can only give NaN params), and within
    its range (``RANGES``) where it has one."""
    if isinstance(value, Tensor):
        if not (value.is_floating_point() or value.is_complex()):
            return  # an integer tensor is refused or converted elsewhere
        values = torch.view_as_real(value.detach()) if value.is_complex() else value.detach()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        values = torch.tensor(float(value), dtype=torch.float64)
    else:
        return
    if not bool(torch.isfinite(values).all()):
        plan.fail(f"state {key!r} of parameter {index} holds values that are not finite (NaN or inf): every later step would give NaN")
    allowed = _range(key)
    if allowed is not None and not allowed.holds(values):
        plan.fail(f"state {key!r} of parameter {index} must hold {allowed}; it holds {shown(values.flatten()[:6].tolist())}...")


def _read_value(value: Any) -> Any:
    """A hyperparameter with its 0-dim real tensors read as numbers (in a tuple too), so that the
    Config checks their values; anything else as it is, for the Config to judge."""
    if isinstance(value, (tuple, list)):
        return type(value)(_read_value(v) for v in value)
    if isinstance(value, Tensor) and value.dim() == 0 and value.is_floating_point() and not value.is_meta:
        return value.item()
    return value


def _agree(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        a, b = torch.as_tensor(a).detach().cpu(), torch.as_tensor(b).detach().cpu()
        return a.shape == b.shape and bool((a.to(torch.float64) == b.to(torch.float64)).all())
    return a == b


def _castable(param: Tensor) -> set[torch.dtype]:
    return {torch.float16, torch.bfloat16, torch.float32, torch.float64, param.dtype} if param.is_floating_point() else {param.dtype}


def _number(value: Any) -> float | None:
    if isinstance(value, Tensor):
        return float(value.reshape(())) if value.numel() == 1 and not value.is_complex() else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _describe(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def _at(order: list[Any], position: Any, where: str) -> Any:
    """The parameter at ``position`` of a format-1 checkpoint's param groups."""
    if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < len(order):
        raise ValueError(f"a format-1 checkpoint's {where!r} names position {shown(position)}, but its param groups list {len(order)} params")
    return order[position]


def _dict(value: Any, where: str) -> dict:
    if not isinstance(value, Mapping):
        raise ValueError(f"a checkpoint's {where!r} must be a dict, got {type(value).__name__}")
    return dict(value)


def _list(value: Any, where: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"a checkpoint's {where!r} must be a list, got {type(value).__name__}")
    return list(value)
