"""The remaining schedules (decays, steps, cycles, joins, AutoSGM's window) and the lookup of a
schedule by its config's ``name`` (:func:`from_config`). The module docs of :mod:`optorch.schedules`
give the notation."""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, StrictBool, ValidationError, field_validator, model_validator
from torch import Tensor

from ..core.config import Count, Flag, Number
from ..core.errors import shown, suggest
from ..core.scalars import half_cosine
from . import window as window_math
from .base import (
    Constant,
    Cosine,
    Factor,
    Linear,
    NonNegativeValue,
    PositiveSteps,
    Schedule,
    Steps,
    Value,
    WarmupStableDecay,
    _clip,
    _floor,
    _log,
    _ones,
    _ramp,
    _sqrt,
    _Warmup,
    _WarmupThenDecay,
    _where,
    _with_warmup,
)

__all__ = [
    "SCHEDULES",
    "AnySchedule",
    "AutosgmWindow",
    "CosineWarmRestarts",
    "Exponential",
    "Join",
    "LinearWarmdown",
    "MultiStep",
    "OneCycle",
    "Polynomial",
    "Rsqrt",
    "Step",
    "UnknownScheduleError",
    "from_config",
    "names",
]


class Exponential(Schedule):
    r"""Exponential decay (optax ``exponential_decay``; torch ``ExponentialLR`` with
    ``transition_steps=1``): :math:`f(s) = v\,r^{p}`, :math:`p = \max(s - b, 0)/n`, floored if
    ``staircase``; clipped at ``end_value`` (from below if :math:`r < 1`, from above if :math:`r > 1`)."""

    name: Literal["exponential"] = "exponential"
    init_value: Value
    decay_rate: Factor
    transition_steps: PositiveSteps = 1
    transition_begin: Steps = 0
    staircase: Flag = False
    end_value: Value | None = None

    def _value(self, s):
        p = _clip(s - self.transition_begin, 0.0) / self.transition_steps
        if self.staircase:
            p = _floor(p)
        value = self.init_value * self.decay_rate**p
        if self.end_value is None:
            return value
        return _clip(value, low=self.end_value) if self.decay_rate < 1 else _clip(value, high=self.end_value)


class Polynomial(Schedule):
    r"""Polynomial decay (optax ``polynomial_schedule``; torch ``PolynomialLR`` with ``end_value=0``):
    :math:`f(s) = (v - e)(1 - k/n)^{p} + e`, :math:`k = s - b` clamped to :math:`[0, n]`."""

    name: Literal["polynomial"] = "polynomial"
    init_value: Value
    transition_steps: PositiveSteps
    end_value: Value = 0.0
    power: Factor = 1.0
    transition_begin: Steps = 0

    def _value(self, s):
        n = self.transition_steps
        k = _clip(s - self.transition_begin, 0.0, n)
        return (self.init_value - self.end_value) * (1.0 - k / n) ** self.power + self.end_value


class Step(Schedule):
    r"""Piecewise constant, decayed by ``gamma`` every ``step_size`` steps (torch ``StepLR``):
    :math:`f(s) = v\,\gamma^{\lfloor s / \text{step\_size} \rfloor}`."""

    name: Literal["step"] = "step"
    init_value: Value
    step_size: PositiveSteps
    gamma: Factor = 0.1

    def _value(self, s):
        return self.init_value * self.gamma ** (s // self.step_size)


class MultiStep(Schedule):
    r"""Piecewise constant, decayed by ``gamma`` at each milestone (torch ``MultiStepLR``; a milestone
    listed twice decays twice): :math:`f(s) = v\,\gamma^{\#\{m \le s\}}`."""

    name: Literal["multistep"] = "multistep"
    init_value: Value
    milestones: tuple[Steps, ...]
    gamma: Factor = 0.1

    @field_validator("milestones")
    @classmethod
    def _sorted(cls, milestones: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(milestones))

    def _value(self, s):
        count = _ones(s, 0.0)
        for m in self.milestones:
            count = count + ((s >= m).to(s.dtype) if isinstance(s, Tensor) else float(s >= m))
        return self.init_value * self.gamma**count


class CosineWarmRestarts(Schedule):
    r"""Cosine annealing with warm restarts, SGDR (torch ``CosineAnnealingWarmRestarts``): cycle
    :math:`i` lasts :math:`T_i = T_0 T_{mult}^i` steps; with :math:`t` the steps since the last restart,
    :math:`f(s) = e + (v - e)\frac12\bigl(1 + \cos(\pi t / T_i)\bigr)`."""

    name: Literal["cosine_warm_restarts"] = "cosine_warm_restarts"
    init_value: Value
    T_0: PositiveSteps
    T_mult: PositiveSteps = 1
    end_value: Value = 0.0

    def _value(self, s):
        t0, m = float(self.T_0), float(self.T_mult)
        if self.T_mult == 1:
            t_cur, t_i = s % t0, t0
        else:
            # cycle n starts at T_0 (m^n - 1)/(m - 1): invert with a log, then correct the log's
            # rounding at the boundaries with exact integer arithmetic (floats below 2**53).
            def start(n):
                return t0 * (m**n - 1) / (m - 1)

            n = _floor(_log(s * (m - 1) / t0 + 1) / math.log(m))
            n = _where(s < start(n), n - 1, n)
            n = _where(s >= start(n + 1), n + 1, n)
            t_cur, t_i = s - start(n), t0 * m**n
        return half_cosine(self.init_value, self.end_value, math.pi * t_cur / t_i)


class OneCycle(Schedule):
    r"""The 1cycle policy (torch ``OneCycleLR``, learning rate only): from ``max_lr/div_factor`` up to
    ``max_lr`` until step ``pct_start·total_steps - 1``, then down to
    ``max_lr/(div_factor·final_div_factor)`` at step ``total_steps - 1`` (with ``three_phase``, first back
    to the start value at ``2·pct_start·total_steps - 2``), each phase annealed by ``cos``
    :math:`y + (x - y)\frac12(\cos(\pi p) + 1)` or ``linear`` :math:`(y - x)p + x` from :math:`x` to
    :math:`y`, :math:`p` the fraction of the phase; flat at the end value after ``total_steps - 1``
    (where torch raises)."""

    name: Literal["one_cycle"] = "one_cycle"
    max_lr: Value
    total_steps: PositiveSteps
    pct_start: Annotated[Number, Field(gt=0.0, lt=1.0)] = 0.3
    anneal_strategy: Literal["cos", "linear"] = "cos"
    div_factor: Factor = 25.0
    final_div_factor: Factor = 1e4
    three_phase: Flag = False

    def _phases(self) -> list[tuple[float, float, float]]:
        """(end_step, start value, end value) per phase, as torch's OneCycleLR computes them."""
        initial = self.max_lr / self.div_factor
        low = initial / self.final_div_factor
        first = float(self.pct_start * self.total_steps) - 1
        last = float(self.total_steps - 1)
        if self.three_phase:
            second = float(2 * self.pct_start * self.total_steps) - 2
            return [(first, initial, self.max_lr), (second, self.max_lr, initial), (last, initial, low)]
        return [(first, initial, self.max_lr), (last, self.max_lr, low)]

    @model_validator(mode="after")
    def _phases_not_empty(self):
        start = 0.0
        for i, (end, _, _) in enumerate(self._phases()):
            if end <= start:
                raise ValueError(
                    f"phase {i + 1} of the cycle is empty (steps {start} to {end}): total_steps={self.total_steps} "
                    f"and pct_start={self.pct_start} leave it no step"
                )
            start = end
        return self

    def _anneal(self, start: float, end: float, pct):
        if self.anneal_strategy == "cos":
            # torch's OneCycleLR writes (start - end) / 2 * (cos + 1): the same number, halving is exact
            return half_cosine(start, end, math.pi * pct)
        return (end - start) * pct + start

    def _value(self, s):
        phases, value = self._phases(), None
        starts = [0.0] + [end for end, _, _ in phases[:-1]]
        # every phase is evaluated with its fraction clamped to [0, 1] (finite for any step), then the
        # right one is selected, from the last phase back to the first
        for (end, x, y), start in reversed(list(zip(phases, starts))):
            phase_value = self._anneal(x, y, _clip((s - start) / (end - start), 0.0, 1.0))
            value = phase_value if value is None else _where(s <= end, phase_value, value)
        return value


class Rsqrt(_Warmup):
    r"""Inverse square root decay after an optional linear warmup; ``warmup_steps=0`` is allowed.
    With :math:`\tau` = ``timescale`` (default :math:`\max(W, 1)`):

    .. math::
        f(s) = \begin{cases} \operatorname{ramp}(a, v; s, W) & s < W \\
        v / \sqrt{1 + (s - W)/\tau} & s \ge W \end{cases}

    With :math:`\tau = W` this is the original optorch's :math:`v\sqrt{W}/\sqrt{s}`."""

    name: Literal["rsqrt"] = "rsqrt"
    timescale: PositiveSteps | None = None

    def _value(self, s):
        tau = self.timescale if self.timescale is not None else max(self.warmup_steps, 1)
        decayed = self.init_value / _sqrt(1 + _clip(s - self.warmup_steps, 0.0) / tau)
        return _with_warmup(self, s, decayed)


class LinearWarmdown(_WarmupThenDecay):
    r"""Optional linear warmup, then linear from ``init_value`` down to ``end_value`` at step
    ``decay_steps`` (the total length, warmup included), flat after; never negative (values are
    :math:`\ge 0`, and the result is clamped at 0 against rounding):

    .. math::
        f(s) = \begin{cases} \operatorname{ramp}(a, v; s, W) & s < W \\
        \max\bigl(0, \operatorname{ramp}(v, e; s - W, T - W)\bigr) & s \ge W \end{cases}
    """

    name: Literal["linear_warmdown"] = "linear_warmdown"
    init_value: NonNegativeValue
    end_value: NonNegativeValue = 0.0
    warmup_start_value: NonNegativeValue = 0.0

    def _value(self, s):
        w = self.warmup_steps
        decayed = _clip(_ramp(s, self.init_value, self.end_value, w, self.decay_steps - w), 0.0)
        decayed = _where(s >= self.decay_steps, _ones(s, self.end_value), decayed)  # exactly end_value after
        return _with_warmup(self, s, decayed)


class Join(Schedule):
    r"""Schedules joined at ``boundaries`` (optax ``join_schedules``): schedule :math:`i` runs from
    boundary :math:`b_{i-1}` (:math:`b_{-1} = 0`) and sees the steps counted from it,
    :math:`f(s) = f_i(s - b_{i-1})` for :math:`b_{i-1} \le s < b_i`."""

    name: Literal["join"] = "join"
    schedules: tuple[AnySchedule, ...]
    boundaries: tuple[Steps, ...]

    @model_validator(mode="after")
    def _one_boundary_between_schedules(self):
        if not self.schedules:
            raise ValueError("join needs at least one schedule")
        if len(self.boundaries) != len(self.schedules) - 1:
            raise ValueError(
                f"join needs one boundary between each two schedules: {len(self.schedules)} schedules need "
                f"{len(self.schedules) - 1} boundaries, got {len(self.boundaries)}"
            )
        if any(b >= c for b, c in zip(self.boundaries, self.boundaries[1:])):
            raise ValueError(f"boundaries must increase strictly, got {list(self.boundaries)}")
        return self

    def _value(self, s):
        starts = (0,) + self.boundaries
        if not isinstance(s, Tensor):
            i = bisect.bisect_right(self.boundaries, s)
            return self.schedules[i]._value(s - starts[i])
        value = self.schedules[-1]._value(torch.clamp(s - starts[-1], min=0.0))
        for i in range(len(self.boundaries) - 1, -1, -1):
            earlier = self.schedules[i]._value(torch.clamp(s - starts[i], min=0.0))
            value = torch.where(s < self.boundaries[i], earlier, value)
        return value


class AutosgmWindow(Schedule):
    r"""AutoSGM's window (its cyclic learning-rate schedule, :func:`optorch.autosgm.window`) as a
    schedule: :math:`f(s) = v\,\rho_{s + 1}`, with :math:`v` = ``init_value`` (default 1, the window
    itself) and :math:`\rho_t` the window at AutoSGM's 1-based step :math:`t`. Steps count from 0, as
    every schedule's (and the steppers' and the shim's step counters), so step :math:`s` is AutoSGM's
    :math:`t = s + 1`: an AutoSGM run with ``window=0`` and this schedule on ``lr`` is the same run as
    one with the window in its config. The keys are AutoSGM's ``window*`` config keys (the kind is
    ``window``), validated by ``optorch.autosgm.Config``; AutoSGM's ignored ``window_sequence`` is left
    out. The window math is :mod:`optorch.schedules.window`, which AutoSGM steps with too."""

    name: Literal["autosgm_window"] = "autosgm_window"
    # WindowKeys' keys typed as a schedule's: numbers only (a schedule holds no tensor), the kind
    # required, no window_sequence; their rules are WindowKeys' own (_valid_for_autosgm)
    window: Count
    init_value: Value = 1.0
    window_floor: Number = 0.0
    window_order: Number = 2.0
    window_full: StrictBool = False
    window_epochs: Count = 1000
    window_steps_per_epoch: Count = 1
    window_unit: Count = 1
    window_flat_top: Number = 0.0

    @model_validator(mode="after")
    def _valid_for_autosgm(self):
        try:
            window_math.WindowKeys(**self.model_dump(exclude={"name", "init_value"}))
        except ValidationError as error:  # re-raised as a ValueError so that pydantic names this class
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"] for e in error.errors()
            )
            raise ValueError(f"invalid AutoSGM window: {problems}") from None
        return self

    def _value(self, s):
        # the window reads only the window_* keys, which this schedule has under the same names
        rho = window_math.window(s + 1, self)
        if isinstance(s, Tensor) and not isinstance(rho, Tensor):  # the flat window is the number 1
            rho = torch.full_like(s, rho)
        return self.init_value * rho


AnySchedule = Annotated[
    Constant
    | Linear
    | Cosine
    | WarmupStableDecay
    | Exponential
    | Polynomial
    | Step
    | MultiStep
    | CosineWarmRestarts
    | OneCycle
    | Join
    | Rsqrt
    | LinearWarmdown
    | AutosgmWindow,
    Field(discriminator="name"),
]
"""Any schedule, told apart by its ``name`` (a pydantic discriminated union)."""

Join.model_rebuild()

SCHEDULES: dict[str, type[Schedule]] = {
    cls.model_fields["name"].default: cls
    for cls in (
        Constant,
        Linear,
        Cosine,
        WarmupStableDecay,
        Exponential,
        Polynomial,
        Step,
        MultiStep,
        CosineWarmRestarts,
        OneCycle,
        Join,
        Rsqrt,
        LinearWarmdown,
        AutosgmWindow,
    )
}
"""Schedule name to class."""


class UnknownScheduleError(ValueError):
    """A config names no known schedule."""


def names() -> list[str]:
    """The names :func:`from_config` accepts."""
    return sorted(SCHEDULES)


def from_config(config: Mapping[str, Any] | Schedule) -> Schedule:
    """A schedule from a config dict such as ``{"name": "cosine", "init_value": 1e-3, "decay_steps": 1000}``
    (a schedule is returned as is). A bad name raises :class:`UnknownScheduleError` with the known names;
    bad values raise ``pydantic.ValidationError`` naming the field."""
    if isinstance(config, Schedule):
        return config
    if not isinstance(config, Mapping):
        raise TypeError(f"a schedule config must be a mapping, got {type(config).__name__}")
    name = config.get("name")
    if name not in SCHEDULES:
        what = "has no 'name'" if name is None else f"names an unknown schedule {shown(name)}{suggest(name, names())}"
        raise UnknownScheduleError(f"the schedule config {what}; known schedules: {', '.join(names())}")
    return SCHEDULES[name].model_validate(dict(config))  # errors then name the class, not the union
