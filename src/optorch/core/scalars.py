"""Numbers and one-element tensors: the one set of helpers every layer reads a scalar with.

A hyperparameter, a loss or a checkpoint value may be a Python number or a tensor; these helpers say
what each is without guessing twice. A bool is never a number here (``True`` is no learning rate).
The math that schedules and rules compute on either (:func:`cos`, :func:`half_cosine`) is here too.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

__all__ = ["as_float", "cos", "half_cosine", "is_real", "is_scalar", "is_zero", "reads_zero", "scales"]


def is_real(value: Any) -> bool:
    """A real Python number (an int or a float, not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_scalar(value: Any) -> bool:
    """A real Python number, or a one-element floating-point tensor."""
    if isinstance(value, Tensor):
        return value.numel() == 1 and value.is_floating_point()
    return is_real(value)


def as_float(value: Any) -> float | None:
    """A Python int or float, or a one-element real tensor, as a float (read from the device); None
    for anything else."""
    if isinstance(value, Tensor):
        return float(value.reshape(())) if value.numel() == 1 and not value.is_complex() else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def is_zero(value: Any) -> bool:
    """True only for a number that is exactly zero; a tensor's value is unknown, so never."""
    return not isinstance(value, Tensor) and value == 0


def scales(value: Any) -> bool:
    """A hyperparameter value that only scales what is computed: a tensor (its value is never read,
    see :func:`is_zero`) or a non-zero float. A zero drops a term or a buffer; a flag, an integer or a
    nested setting selects code. A compiled step takes the former as data (no recompile when a
    schedule changes it), and they never shape a param's state (``Config.structure``)."""
    return isinstance(value, Tensor) or (isinstance(value, float) and not is_zero(value))


def reads_zero(value: Any) -> bool:
    """Exactly zero, a one-element tensor's value read too (a host read: not for a step's hot path)."""
    if isinstance(value, Tensor):
        return value.numel() == 1 and not bool(value)
    return isinstance(value, (int, float)) and value == 0


def cos(x: Any) -> Any:
    """The cosine of a number (``math.cos``) or of a tensor (``torch.cos``)."""
    return torch.cos(x) if isinstance(x, Tensor) else math.cos(x)


def half_cosine(start: Any, end: Any, angle: Any) -> Any:
    """Half a cosine from ``start`` (``angle`` 0) to ``end`` (``angle`` pi): ``end + (start - end)(1 +
    cos(angle)) / 2``, on numbers and tensors. Every cosine schedule and rule computes it in this one
    order, torch's ``CosineAnnealingLR`` closed form, so each stays equal to its torch scheduler to
    the bit (the other orders in use, ``(start - end) / 2 * (cos + 1)`` and ``(start - end) * 0.5 * (1 +
    cos)``, differ from it by a factor of two taken before or after a rounding, which is exact)."""
    return end + (start - end) * (1 + cos(angle)) / 2
