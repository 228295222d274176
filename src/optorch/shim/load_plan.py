"""A checkpoint checked whole before anything loads (:class:`Plan`): its structure against the
optimizer's, each group's values, each parameter's state; then loaded in one go, so that nothing can
fail once something has changed."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import pydantic
import torch
from torch import Tensor

from ..core.errors import problems, shown
from ..core.scalars import as_float
from ..functional.knobs import BASE_PREFIX

if TYPE_CHECKING:  # the optimizer loads through this module: named for the annotations only
    from .optimizer import Optimizer
from .load_values import (
    agree,
    cast_linked,
    castable,
    check_value,
    check_values,
    describe_value,
    own_copy,
    range_of,
    read_value,
)
from .state import FORMAT, FORMAT_KEY, SCHEDULE_KEY, SHARED_PREFIX, STATE_PREFIXES, StateDict, check_tensor

__all__ = ["Plan"]


class Plan:
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
            self.fail(
                f"the state_dict has {len(saved_groups)} param groups, this optimizer has {len(optimizer.param_groups)}"
            )
        self.params: dict[Any, tuple[Tensor, Any]] = {}
        self.configs = []
        self.flags: list[dict[str, Any]] = []
        for i, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
            if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), list):
                self.fail(f"param group {i} of the state_dict is not a dict with a 'params' list")
            if len(saved["params"]) != len(group["params"]):
                self.fail(
                    f"param group {i} has {len(saved['params'])} params in the state_dict, {len(group['params'])} here"
                )
            version = saved.get(FORMAT_KEY, 0)
            if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= FORMAT:
                self.fail(
                    f"param group {i} has {FORMAT_KEY}={shown(version)}: not a format this optorch reads (0 to "
                    f"{FORMAT}; a newer one writes higher)"
                )
            fields = optimizer.algorithm.config.model_fields
            # torch.optim saves every hyperparameter and fails at its next step without one; a
            # reference of optorch's own algorithms may name one otherwise (torch-adopt's clip_lambda):
            # this optimizer's value stays
            missing = [k for k in fields if k not in saved and not isinstance(fields[k].default, bool)]
            if missing and optimizer.algorithm.torch_optimizer is not None:
                self.fail(
                    f"param group {i} of the state_dict has no {', '.join(map(repr, missing))}, which torch.optim "
                    "saves with every checkpoint: a checkpoint of another optimizer?"
                )
            # a flag an older torch did not save takes its default, as torch's own load gives it
            self.flags.append(
                {k: fields[k].default for k in fields if k not in saved and isinstance(fields[k].default, bool)}
            )
            values = {
                **{k: group[k] for k in fields},
                **self.flags[i],
                **{k: v for k, v in saved.items() if k in fields},
            }
            try:
                # a tensor's value too (DESIGN rule 7: loaded values are checked), then the values as saved
                optimizer.group_config({k: read_value(v) for k, v in values.items()})
                config = optimizer.group_config(values)
            except pydantic.ValidationError as error:
                self.fail(f"param group {i} of the state_dict has invalid hyperparameters: {problems(error)}")
            except ValueError as error:
                self.fail(f"param group {i} of the state_dict has invalid hyperparameters: {error}")
            if i and (
                differing := [
                    k
                    for k in optimizer.algorithm.config.global_keys
                    if getattr(config, k) != getattr(self.configs[0], k)
                ]
            ):
                self.fail(
                    f"param group {i} of the state_dict sets {', '.join(map(repr, differing))}, which hold one value "
                    "for all param groups, unlike group 0"
                )
            self.configs.append(config)
            for index, param in zip(saved["params"], group["params"]):
                if isinstance(index, bool) or not isinstance(index, (int, str)):
                    self.fail(
                        f"param group {i} lists {shown(index)} as a parameter: a checkpoint numbers its parameters (or "
                        "names them)"
                    )
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
                self.fail(
                    f"param group {i} of the state_dict has no {SCHEDULE_KEY!r}, which this optimizer's 'schedule' "
                    "entry needs (a torch.optim checkpoint?); to continue the schedule from a known step, load "
                    "optorch.complete_state_dict(optimizer, state_dict, schedule_step=N)"
                )
            position = as_float(saved[SCHEDULE_KEY])
            if (
                position is None
                or not math.isfinite(position)
                or not 0 <= position < 2**63
                or position != int(position)
            ):
                self.fail(
                    f"param group {i}: {SCHEDULE_KEY!r} must be a whole number >= 0, got {shown(saved[SCHEDULE_KEY])}"
                )
        for key in saved:
            if (
                isinstance(key, str)
                and key.startswith(STATE_PREFIXES)
                and key not in optimizer._linked
                and not (key.startswith(BASE_PREFIX) and optimizer.adaptive is not None)
            ):
                self.fail(
                    f"param group {i} of the state_dict holds {key!r}, which this optimizer does not keep: "
                    "a checkpoint of another config (other adaptive rules, combinators or algorithm)?"
                )
            if isinstance(key, str) and key.startswith(BASE_PREFIX):
                check_value(
                    self, f"{key!r} of param group {i}", saved[key], torch.zeros((), dtype=torch.float64), range_of(key)
                )
        for key, canonical in optimizer._linked.items():
            if key not in saved:
                hint = (
                    "load optorch.complete_state_dict(optimizer, state_dict) to start it fresh"
                    if not key.startswith(SHARED_PREFIX)
                    else "is this a checkpoint of another algorithm?"
                )
                self.fail(f"param group {i} of the state_dict has no {key!r}, which this optimizer keeps; {hint}")
            values = check_value(self, repr(key), saved[key], canonical, range_of(key))
            if key == "accumulate.micro_step" and bool((values >= optimizer._settings.accumulate_steps).any()):
                self.fail(
                    f"'accumulate.micro_step' is {values.tolist()}, but accumulate_steps is "
                    f"{optimizer._settings.accumulate_steps}: a checkpoint of another config?"
                )

    def _check_linked_agree(self, saved_groups: list[Mapping[str, Any]]) -> None:
        for key in self.optimizer._linked:
            first = saved_groups[0][key]
            for i, saved in enumerate(saved_groups[1:], 1):
                if not agree(first, saved[key]):
                    self.fail(
                        f"param groups 0 and {i} of the state_dict disagree on {key!r}, which holds one value for all "
                        "of them"
                    )

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
            check_tensor(
                self.name,
                param,
                key,
                value,
                param.shape,
                castable(param),
                {value.device} if isinstance(value, Tensor) else set(),
            )
            self._check_dense(index, key, value)
        if own:
            missing = sorted(optimizer._extras - set(extras))
            if missing:
                self.fail(
                    f"the state of parameter {index} lacks {', '.join(map(repr, missing))}, which this optimizer keeps "
                    "per parameter (a torch.optim checkpoint?); load optorch.complete_state_dict(optimizer, "
                    "state_dict) to start it fresh"
                )
            own, expected = self._check_own(index, param, config, own)
            return {"own": own, "expected": expected, "extras": extras}
        return {"own": {}, "expected": {}, "extras": extras}

    def _check_own(
        self, index: Any, param: Tensor, config: Any, own: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        algorithm = self.optimizer.algorithm
        expected = algorithm.init_leaf(torch.empty(param.shape, dtype=param.dtype, device="meta"), config)
        internal = algorithm.state_from_torch(dict(own))
        if set(internal) != set(expected):
            self.fail(
                f"state of parameter {index} has keys {sorted(own)}, expected "
                f"{sorted(algorithm.state_to_torch(dict(expected)))}; is this a checkpoint of another optimizer or "
                "with other flags?"
            )
        for key, reference in expected.items():
            value = internal[key]
            if reference.dim() == 0:
                number = as_float(value)
                if number is None:
                    self.fail(
                        f"{key!r} of parameter {index} must be a number or a one-element tensor, got "
                        f"{describe_value(value)}"
                    )
                if key == "step" and isinstance(value, Tensor) and value.dtype not in (torch.float32, torch.float64):
                    self.fail(
                        f"'step' of parameter {index} is {value.dtype}: a step count is float32 or float64 (as torch "
                        "keeps it)"
                    )
            elif not isinstance(value, Tensor) or value.shape != reference.shape:
                self.fail(
                    f"state {key!r} of parameter {index} has shape {describe_value(value)}, expected "
                    f"{tuple(reference.shape)} (the parameter has {tuple(param.shape)})"
                )
            if isinstance(value, Tensor):
                self._check_dense(index, key, value)
                if value.is_complex() and not reference.is_complex():
                    self.fail(
                        f"state {key!r} of parameter {index} is {value.dtype}, its parameter {param.dtype}: loading "
                        "would drop the imaginary part"
                    )
                if reference.is_complex() and not value.is_complex() and reference.dim():
                    self.fail(
                        f"state {key!r} of parameter {index} is {value.dtype}, its parameter {param.dtype}: a complex "
                        "parameter keeps complex state"
                    )
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
        self.linked = {
            key: cast_linked(self.state_dict["param_groups"][0][key], canonical)
            for key, canonical in optimizer._linked.items()
        }
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
                    leaf[key] = own_copy(self._cast(param, key, value, reference[key]), value, live.get(key))
                for key, value in checked["extras"].items():
                    cast = (
                        torch.zeros_like(param) if value is None else value.to(device=param.device, dtype=param.dtype)
                    )
                    leaf[key] = own_copy(cast, value, live.get(key))
                for key, value in leaf.items():
                    check_values(self, index, key, value)
                if leaf:
                    self.new_state[param] = StateDict(leaf)
        except (RuntimeError, NotImplementedError) as error:  # e.g. "Cannot copy out of meta tensor"
            self.fail(
                f"the state of parameter {index} cannot be moved to its parameter's device and dtype: "
                f"{str(error).splitlines()[0]}"
            )
        self.new_groups = []
        for saved, group, flags in zip(self.state_dict["param_groups"], optimizer.param_groups, self.flags):
            new = {
                key: value
                for key, value in saved.items()
                if key not in optimizer._linked and key not in ("params", SCHEDULE_KEY)
            }
            new.update(flags)
            for (
                key,
                value,
            ) in group.items():  # what else the checkpoint lacks (torch's execution flags) keeps this optimizer's value
                if key not in optimizer._linked and key not in ("params", SCHEDULE_KEY):
                    new.setdefault(key, value)
            for key in ("foreach", "fused", "capturable", "differentiable"):
                if key in group:
                    new[key] = group[key]  # how this shim runs is not the checkpoint's to say
            new[FORMAT_KEY] = FORMAT
            if optimizer.schedules:
                new[SCHEDULE_KEY] = torch.tensor(int(as_float(saved[SCHEDULE_KEY])), dtype=torch.int64)
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
