"""AutoSGM's window, its cyclic learning-rate schedule: the math, here with the other schedules, that
``optorch.autosgm`` steps with and the ``autosgm_window`` schedule computes. ``config`` is anything
with AutoSGM's ``window_*`` keys (its Config, or the schedule).

The keys are AutoSGM's and so is their validation: the algorithm, which the package imports with
the registry, sets :data:`check_keys`, and the schedule calls it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..core.scalars import cos

__all__ = ["check_keys", "window"]

check_keys: Callable[[dict[str, Any]], None] | None = None
"""Validates a dict of ``window*`` keys, raising ``pydantic.ValidationError`` (set by ``optorch.autosgm``)."""


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
