"""AutoSGM's window, its cyclic learning-rate schedule: the math, here with the other schedules, that
``optorch.autosgm`` steps with and the ``autosgm_window`` schedule computes. ``config`` is anything
with AutoSGM's ``window_*`` keys (its Config, or the schedule).

The keys themselves, their defaults and their validation are :class:`WindowKeys`: AutoSGM's Config
inherits them, and the schedule validates its keys as them.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from pydantic import field_validator, model_validator
from torch import Tensor

from ..core.config import Config, Count, Flag, Scalar, UnitInterval
from ..core.scalars import cos

__all__ = ["WindowKeys", "check_kind", "window"]


def check_kind(value: int, count: int, meanings: str) -> int:
    """``value`` if it is one of the ``count`` kinds 0, 1, ..., else an error listing them."""
    if value not in range(count):
        raise ValueError(f"must be 0-{count - 1} ({meanings}), got {value}")
    return value


class WindowKeys(Config):
    """AutoSGM's window keys, the original's ``rc_cfg`` tuple by name, and what makes a window valid."""

    window: Count = 0
    """learning-rate window: 0 flat, 1 raised cosine, 2 polynomial, 3 exponential, 4 simple polynomial, 5-6
    logistic (rc_cfg[0])"""
    window_sequence: Count = 0
    """0, or 1, which warns and is ignored as in the original (rc_cfg[1])"""
    window_floor: UnitInterval = 0.0
    """the window's floor (rc_cfg[2])"""
    window_order: Scalar = 2.0
    """the window's order, > 0 (rc_cfg[3])"""
    window_full: Flag = False
    """a full window instead of a half one (rc_cfg[4] == 0)"""
    window_epochs: Count = 1000
    """the window's period in epochs (rc_cfg[5])"""
    window_steps_per_epoch: Count = 1
    """steps per epoch (rc_cfg[6])"""
    window_unit: Count = 1
    """the window's time unit (rc_cfg[7])"""
    window_flat_top: UnitInterval = 0.0
    """fraction of the window held flat at its top (rc_cfg[8])"""

    @field_validator("window_order")
    @classmethod
    def _order_positive(cls, value):
        if not isinstance(value, Tensor) and not value > 0:
            raise ValueError(f"must be > 0, got {value!r}")
        return value

    @field_validator("window")
    @classmethod
    def _window(cls, value):
        return check_kind(
            value, 7, "0 flat, 1 raised cosine, 2 polynomial, 3 exponential, 4 simple polynomial, 5-6 logistic"
        )

    @field_validator("window_sequence")
    @classmethod
    def _sequence(cls, value):
        check_kind(value, 2, "0 uniform, 1 Kronecker")
        if value == 1:
            warnings.warn(
                "autosgm: window_sequence (inseq) = 1 is ignored, as in the original: the uniform sequence is used",
                UserWarning,
                stacklevel=2,
            )
        return value

    @field_validator("window_epochs", "window_steps_per_epoch")
    @classmethod
    def _at_least_one(cls, value):
        if value < 1:
            raise ValueError(f"must be >= 1, got {value}")
        return value

    @field_validator("window_unit")
    @classmethod
    def _unit(cls, value):
        if value < 0:
            raise ValueError(
                "must be >= 0 (0 epochs, 1 steps, 2 steps restarting each epoch, >= 3 steps in that many stairs), got "
                f"{value}"
            )
        return value

    @model_validator(mode="after")
    def _consistent_window(self):
        if self.window_epochs * self.window_steps_per_epoch < 2:
            raise ValueError(
                f"window_epochs * window_steps_per_epoch (tau * spe) must be >= 2, got {self.window_epochs} * "
                f"{self.window_steps_per_epoch}"
            )
        if self.window_unit == 0 and self.window_epochs <= 1:
            raise ValueError("window_unit 0 (frames counted in epochs) needs window_epochs (tau) > 1")
        if self.window == 3 and not isinstance(self.window_order, Tensor) and self.window_order == 1:
            raise ValueError("window 3 (exponential) needs window_order (its base n) != 1")
        if self.window in (5, 6) and not isinstance(self.window_order, Tensor):
            stairs = self.window_unit if self.window_unit >= 3 else 1
            power = 2 * stairs * self.window_order if self.window == 5 else self.window_order
            if power >= 1024:  # the logistic computes 2 ** power, which overflows float64 from 1024 on
                raise ValueError(
                    f"window {self.window} (logistic) raises 2 to "
                    f"{'2 * stairs * window_order' if self.window == 5 else 'window_order'}, which must be below 1024 "
                    f"(2 ** 1024 overflows float64), got {power:g}"
                )
        return self


def _ceil(v: Any) -> Any:
    return torch.ceil(v) if isinstance(v, Tensor) else math.ceil(v)


def _at_least_one(v: Any) -> Any:
    return torch.clamp(v, min=1) if isinstance(v, Tensor) else max(1, v)


def _shape(kind: int, f: Any, n: Any, stairs: int) -> Any:
    """The window shape S(f) on [0, 1] (1 at f = 0), in ``stairs`` scaled copies (the original's M)."""
    if kind == 2:  # polynomial; ignores the stairs
        return (1 - f) ** n
    if kind == 5:  # logistic, inflection mid-frame

        def mean_sigmoid(x):
            return sum(1 / (1 + 2 ** (2 * stairs * n * (x - (j + 0.5) / stairs))) for j in range(stairs)) / stairs

        low = mean_sigmoid(1.0)
        return (mean_sigmoid(f) - low) / (mean_sigmoid(0.0) - low)
    i = _at_least_one(_ceil(stairs * f))
    r = stairs * f - i + 1
    if kind == 1:  # raised cosine
        s = cos(math.pi * r / 2) ** n
    elif kind == 3:  # exponential, base n
        s = (n**r - n) / (1 - n)
    elif kind == 4:  # simple polynomial
        s = (1 - r**n) ** 2
    else:  # 6: logistic, late inflection (not normalised, as in the original)
        high, low = 1 / (1 + 2 ** (-n)), 1 / (1 + 2**n)
        s = (1 / (1 + 2 ** (2 * n * (r - 0.875))) - low) / (high - low)
    return (stairs - i + s) / stairs


def window(t: Any, config: Any) -> Any:
    """The window (learning-rate schedule) value rho_t at the 1-based step ``t`` (a number or a tensor).

    Frames of L steps (or epochs, window_unit 0) restart cyclically; inside a frame, f = c / L for
    the frame's c-th step (from 0), folded to |2f - 1| for a full window. rho = 1 on the flat top
    (f < window_flat_top), else x + (1 - x) S(f') with f' = (f - e) / (1 - e) and x the floor.
    """
    kind = config.window
    e = config.window_flat_top
    if kind == 0 or (not isinstance(e, Tensor) and e == 1):
        return 1.0
    tau, spe, unit = config.window_epochs, config.window_steps_per_epoch, config.window_unit
    if unit == 0:  # frames of tau epochs; the epoch is ceil(t / spe) (the original counts by tau)
        u, length = _ceil(t / spe), tau
    else:
        u, length = t, spe if unit == 2 else tau * spe
    f = ((u - 1) % length) / length
    if config.window_full:
        f = abs(2 * f - 1)
    x = config.window_floor
    shaped = _shape(kind, (f - e) / (1 - e), config.window_order, unit if unit >= 3 else 1)
    rho = x + (1 - x) * shaped
    flat = (f < e) | (e == 1) if isinstance(e, Tensor) else f < e
    if isinstance(flat, bool):
        return 1.0 if flat else rho
    return torch.where(flat, torch.ones_like(rho), rho)
