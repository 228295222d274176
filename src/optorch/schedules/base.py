"""The :class:`Schedule` base, the helpers every schedule computes with (on floats and tensors alike),
and the warmup-then-decay family. The module docs of :mod:`optorch.schedules` give the notation."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from ..core.config import Count, Number, describe
from ..core.ops import scalar_dtype
from ..core.scalars import half_cosine, is_real

__all__ = ["FIELD_DESCRIPTIONS", "Constant", "Cosine", "Linear", "Schedule", "WarmupStableDecay"]

# Numbers are finite ints or floats and step counts ints: never a bool or a string read as one.
Steps = Annotated[Count, Field(ge=0)]
PositiveSteps = Annotated[Count, Field(ge=1)]
Value = Number
NonNegativeValue = Annotated[Number, Field(ge=0.0)]
Factor = Annotated[Number, Field(gt=0.0)]


# --- arithmetic on a step that is a number or a tensor -------------------------------------------
# Each helper is the math module on numbers and the torch op on tensors, so each schedule is written
# once. Branches are `_where`, which on tensors is torch.where (both sides evaluated, which is why
# every formula is kept finite for every step by clamping, never guarded by a Python `if`).


def _as_step(step: Any) -> float | Tensor:
    if isinstance(step, Tensor):
        if step.is_complex():
            raise TypeError(f"a step must be real, got a {step.dtype} tensor")
        return torch.clamp(step.to(scalar_dtype(step)), min=0.0)
    if not is_real(step):
        raise TypeError(f"a step must be an int, a float or a tensor, got {type(step).__name__} {step!r}")
    return max(float(step), 0.0)


def _clip(x: float | Tensor, low: float | None = None, high: float | None = None) -> float | Tensor:
    if isinstance(x, Tensor):
        return torch.clamp(x, low, high)
    if low is not None:
        x = max(x, low)
    if high is not None:
        x = min(x, high)
    return x


def _where(condition: bool | Tensor, a: float | Tensor, b: float | Tensor) -> float | Tensor:
    if isinstance(condition, Tensor):
        return torch.where(condition, a, b)  # at least one of a, b is a tensor derived from the step
    return a if condition else b


def _sqrt(x: float | Tensor) -> float | Tensor:
    return torch.sqrt(x) if isinstance(x, Tensor) else math.sqrt(x)


def _log(x: float | Tensor) -> float | Tensor:
    return torch.log(x) if isinstance(x, Tensor) else math.log(x)


def _floor(x: float | Tensor) -> float | Tensor:
    return torch.floor(x) if isinstance(x, Tensor) else float(math.floor(x))


def _ramp(s: float | Tensor, start: float, end: float, begin: float, length: float) -> float | Tensor:
    """start + (end - start)·k/length with k = s - begin clamped to [0, length]: flat outside.
    Written as torch's LinearLR closed form, ``(end - start) * k / length`` (multiply, then divide)."""
    k = _clip(s - begin, 0.0, length)
    return start + (end - start) * k / length


def _cosine(s: float | Tensor, start: float, end: float, begin: float, length: float) -> float | Tensor:
    """Half a cosine from start to end over [begin, begin + length], flat outside."""
    k = _clip(s - begin, 0.0, length)
    return half_cosine(start, end, math.pi * k / length)


def _with_warmup(schedule: Schedule, s: float | Tensor, decayed: float | Tensor) -> float | Tensor:
    """``decayed``, preceded by a linear warmup from warmup_start_value to init_value over warmup_steps."""
    w = schedule.warmup_steps
    if w == 0:
        return decayed
    return _where(s < w, _ramp(s, schedule.warmup_start_value, schedule.init_value, 0.0, w), decayed)


# --- the schedules ------------------------------------------------------------------------------


FIELD_DESCRIPTIONS: dict[str, str] = {
    "name": "the schedule kind",
    "value": "the constant value",
    "init_value": "the value at the start (after any warmup: the peak)",
    "end_value": "the value at the end",
    "transition_steps": "length of the transition",
    "transition_begin": "steps before the transition starts",
    "warmup_steps": "steps of the linear warmup from warmup_start_value to init_value",
    "warmup_start_value": "the value at step 0 when there is a warmup",
    "decay_steps": "the total length, warmup included, after which the value is end_value",
    "stable_steps": "steps held at init_value after the warmup",
    "decay_type": "shape of the decay",
    "decay_rate": "factor per transition_steps",
    "staircase": "decay in whole transitions (a staircase) instead of continuously",
    "power": "exponent of the polynomial",
    "step_size": "steps between decays",
    "gamma": "factor of each decay",
    "milestones": "steps at which the value is multiplied by gamma",
    "T_0": "length of the first cycle",
    "T_mult": "factor by which each cycle is longer than the last",
    "max_lr": "the peak value",
    "total_steps": "the length of the whole schedule",
    "pct_start": "fraction of total_steps spent rising",
    "anneal_strategy": "shape of the annealing",
    "div_factor": "the start value is max_lr / div_factor",
    "final_div_factor": "the end value is the start value / final_div_factor",
    "three_phase": "a third phase that anneals below the start value (torch's three_phase)",
    "schedules": "the schedules to join, each a schedule config",
    "boundaries": "steps at which the next schedule starts (one fewer than schedules)",
    "timescale": "the value is init_value / sqrt(1 + step / timescale)",
    "window": (
        "the window's kind: 0 flat, 1 raised cosine, 2 polynomial, 3 exponential, 4 simple polynomial, 5-6 logistic"
    ),
    "window_floor": "the window's floor",
    "window_order": "the window's order, > 0",
    "window_full": "a full window instead of a half one",
    "window_epochs": "the window's period in epochs",
    "window_steps_per_epoch": "steps per epoch",
    "window_unit": "the window's time unit",
    "window_flat_top": "fraction of the window held flat at its top",
}
"""What a schedule's field means, by name: the same in every schedule that has it (AutoSGM's window
keys: their ``rc_cfg`` places are in :class:`~optorch.schedules.window.WindowKeys`)."""


class Schedule(BaseModel):
    """Base of every schedule: frozen, unknown keys rejected, validated on construction."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        describe(cls, FIELD_DESCRIPTIONS)

    def __call__(self, step: Any) -> float | Tensor:
        """The value at ``step`` (an int, a float or a tensor; negative steps count as 0)."""
        return self._value(_as_step(step))

    def _value(self, s: float | Tensor) -> float | Tensor:  # s: a float or a float tensor, >= 0
        raise NotImplementedError


class Constant(Schedule):
    r""":math:`f(s) = v`."""

    name: Literal["constant"] = "constant"
    value: Value

    def _value(self, s):
        return torch.full_like(s, self.value) if isinstance(s, Tensor) else self.value


class Linear(Schedule):
    r"""Linear from ``init_value`` to ``end_value`` over ``transition_steps``, starting at
    ``transition_begin``; flat before and after (optax ``linear_schedule``, torch ``LinearLR``):
    :math:`f(s) = \operatorname{ramp}(v, e; s - b, n)`."""

    name: Literal["linear"] = "linear"
    init_value: Value
    end_value: Value
    transition_steps: PositiveSteps
    transition_begin: Steps = 0

    def _value(self, s):
        return _ramp(s, self.init_value, self.end_value, self.transition_begin, self.transition_steps)


class _Warmup(Schedule):
    """Fields of a linear warmup from warmup_start_value to init_value over warmup_steps."""

    init_value: Value
    warmup_steps: Steps = 0
    warmup_start_value: Value = 0.0


class _WarmupThenDecay(_Warmup):
    """A warmup followed by a decay that ends at ``decay_steps``, the total length, warmup included."""

    decay_steps: PositiveSteps

    @model_validator(mode="after")
    def _decay_after_warmup(self):
        if self.decay_steps <= self.warmup_steps:
            raise ValueError(
                f"decay_steps ({self.decay_steps}) is the total length, warmup included, so it must be greater "
                f"than warmup_steps ({self.warmup_steps})"
            )
        return self


class Cosine(_WarmupThenDecay):
    r"""Optional linear warmup, then half a cosine from ``init_value`` to ``end_value``, flat at
    ``end_value`` after ``decay_steps`` (optax ``warmup_cosine_decay_schedule``; torch
    ``CosineAnnealingLR`` without warmup). ``decay_steps`` is the total length, warmup included:

    .. math::
        f(s) = \begin{cases} \operatorname{ramp}(a, v; s, W) & s < W \\
        e + (v - e)\,\tfrac{1}{2}\bigl(1 + \cos(\pi k / (T - W))\bigr),\ k = \min(s - W, T - W) & s \ge W
        \end{cases}
    """

    name: Literal["cosine"] = "cosine"
    end_value: Value = 0.0

    def _value(self, s):
        w = self.warmup_steps
        return _with_warmup(self, s, _cosine(s, self.init_value, self.end_value, w, self.decay_steps - w))


class WarmupStableDecay(_Warmup):
    r"""Warmup-stable-decay ("trapezoidal"): linear warmup over ``warmup_steps``, ``init_value`` for
    ``stable_steps``, then a decay to ``end_value`` over ``decay_steps``, flat after. With
    :math:`k = s - W - S` clamped to :math:`[0, D]`, the decay is ``linear``
    :math:`\operatorname{ramp}(v, e; k, D)`, ``cosine`` :math:`e + (v - e)\frac12(1 + \cos(\pi k/D))`
    or ``1-sqrt`` :math:`e + (v - e)(1 - \sqrt{k/D})`."""

    name: Literal["warmup_stable_decay"] = "warmup_stable_decay"
    stable_steps: Steps
    decay_steps: PositiveSteps
    end_value: Value = 0.0
    decay_type: Literal["linear", "cosine", "1-sqrt"] = "linear"

    def _value(self, s):
        begin = self.warmup_steps + self.stable_steps
        v, e, d = self.init_value, self.end_value, self.decay_steps
        if self.decay_type == "linear":
            decayed = _ramp(s, v, e, begin, d)
        elif self.decay_type == "cosine":
            decayed = _cosine(s, v, e, begin, d)
        else:
            decayed = e + (v - e) * (1 - _sqrt(_clip(s - begin, 0.0, d) / d))
        # the stable phase is init_value itself, not a decay formula that rounds to it
        return _with_warmup(self, s, _where(s < begin, _ones(s, v), decayed))


def _ones(s: float | Tensor, value: float) -> float | Tensor:
    return torch.full_like(s, value) if isinstance(s, Tensor) else value
