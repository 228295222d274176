"""The checks of each value a checkpoint holds: the range a hyperparameter or a counter must be in
(:data:`RANGES`), a tensor's dtype and shape, and the copies and casts that load it as torch would."""

from __future__ import annotations

import fnmatch
import math
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from ..core.errors import shown
from ..functional.amp import MIN_SCALE

if TYPE_CHECKING:  # named for the annotations only
    from .load_plan import Plan

__all__ = ["RANGES"]


class Range(NamedTuple):
    """The values a state entry may hold (beyond finite): ``low``..``high`` (open or closed ends),
    whole numbers only if ``whole``."""

    low: float = -math.inf
    high: float = math.inf
    whole: bool = False
    low_open: bool = False

    def holds(self, values: Tensor) -> bool:
        above = values > self.low if self.low_open else values >= self.low
        return bool((above & (values <= self.high)).all()) and (
            not self.whole or bool((values == values.round()).all())
        )

    def __str__(self) -> str:
        kind = "whole numbers" if self.whole else "values"
        if self.high < math.inf:
            return f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        return f"{kind} {'>' if self.low_open else '>='} {self.low:g}" if self.low > -math.inf else kind


_COUNT = Range(0.0, whole=True)
_NON_NEGATIVE = Range(0.0)
_POSITIVE = Range(0.0, low_open=True)
RANGES: dict[str, Range] = {
    # per parameter (the algorithms' own names; a complex tensor's real and imaginary parts each)
    "step": _COUNT,
    **dict.fromkeys(
        (
            "exp_avg_sq",
            "max_exp_avg_sq",
            "square_avg",
            "acc_delta",
            "sum",
            "exp_inf",
            "row_var",
            "col_var",
            "variance",
            "step_size",
            "eta",
            "g_var",
            "wsq",
            "pcx",
            "lr_num",
            "sigma",
            "alpha",
        ),
        _NON_NEGATIVE,
    ),  # second moments, sizes
    "mu": Range(0.0, 1.0, low_open=True),  # ASGD's averaging weight 1 / max(1, t - t0)
    "mu_product": Range(0.0, 1.0),  # NAdam's product of momentum factors
    "sat_ratio": Range(0.0, 1.0),  # DAG's saturated fraction
    # shared by all groups
    "amp.scale": Range(MIN_SCALE),  # its reciprocal unscales the gradients
    "amp.growth_tracker": _COUNT,
    "amp.overflows": _COUNT,
    "accumulate.micro_step": _COUNT,  # and below accumulate_steps (checked with the config)
    "skip.notfinite_count": _COUNT,
    "skip.total_notfinite": _COUNT,
    "skip.last_finite": Range(0.0, 1.0, whole=True),
    "ema.count": _COUNT,
    "shared.global_step": _COUNT,  # DAG
    "shared.rms_count": _COUNT,
    "shared.d_total": _COUNT,
    "shared.s_t": Range(0.0, 1.0, low_open=True),
    **dict.fromkeys(("shared.k_val", "shared.rms_t_ema", "shared.rms0_ema"), _NON_NEGATIVE),
    "adapt.t": _COUNT,
    "adapt.terms.*.t_cur": _COUNT,
    "adapt.terms.*.t_i": Range(1.0, whole=True),
    "adapt.terms.*.value": _POSITIVE,
    "adapt.factors.*": _POSITIVE,
    "adapt.base.*": _NON_NEGATIVE,  # the base value of an adapted knob (lr, momentum, betas, alpha, weight decay)
}
"""What each state entry may hold besides being finite (``fnmatch`` patterns for the adaptive rules'
keys): a checkpoint with a value outside is refused, since it could only poison the params (a loss
scale of 0 or a negative second moment gives inf or NaN at the next step)."""


def range_of(key: str) -> Range | None:
    return RANGES.get(key) or next(
        (r for pattern, r in RANGES.items() if "*" in pattern and fnmatch.fnmatchcase(key, pattern)), None
    )


def own_copy(value: Tensor, saved: Any, live: Any) -> Tensor:
    """A tensor of the loaded state that is nobody else's: ``value`` if casting made it new, else a
    copy of the saved tensor (torch would share it with the dict it loaded, so that stepping one
    optimizer could change another's state). The live tensor itself is kept as it is (DCP loads
    into the very tensors ``state_dict()`` returned, then hands them back)."""
    if value is not saved or value is live:
        return value
    return value.clone()


def cast_linked(value: Any, canonical: Tensor) -> Tensor:
    """A linked value as the live tensor holds it (its shape, dtype and device)."""
    if isinstance(value, Tensor):
        return value.detach().reshape(canonical.shape).to(device=canonical.device, dtype=canonical.dtype, copy=True)
    return torch.full_like(canonical, value)


def check_value(plan: Plan, what: str, value: Any, canonical: Tensor, allowed: Range | None) -> Tensor:
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
        plan.fail(f"{what} must be a number or a tensor, got {describe_value(value)}")
    listed = values.tolist() if values.numel() < 8 else "values"
    if not bool(torch.isfinite(values).all()):
        plan.fail(f"{what} holds {listed} that are not finite")
    if not canonical.is_floating_point():  # a counter or a flag
        allowed = allowed or _COUNT
    if allowed is not None and not allowed.holds(values):
        plan.fail(f"{what} must hold {allowed}, got {listed}")
    stored = values.to(canonical.dtype).to(torch.float64)
    lost = not bool(torch.isfinite(stored).all()) or bool(
        ((stored == 0) != (values == 0)).any()
    )  # overflow, underflow to 0
    if lost or (not canonical.is_floating_point() and not torch.equal(stored, values)):  # a counter must stay exact
        plan.fail(f"{what} holds {listed}, which {canonical.dtype} cannot hold")
    return values


def check_values(plan: Plan, index: Any, key: str, value: Any) -> None:
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
        plan.fail(
            f"state {key!r} of parameter {index} holds values that are not finite (NaN or inf): every later step would "
            "give NaN"
        )
    allowed = range_of(key)
    if allowed is not None and not allowed.holds(values):
        plan.fail(
            f"state {key!r} of parameter {index} must hold {allowed}; it holds "
            f"{shown(values.flatten()[:6].tolist())}..."
        )


def read_value(value: Any) -> Any:
    """A hyperparameter with its 0-dim real tensors read as numbers (in a tuple too), so that the
    Config checks their values; anything else as it is, for the Config to judge."""
    if isinstance(value, (tuple, list)):
        return type(value)(read_value(v) for v in value)
    if isinstance(value, Tensor) and value.dim() == 0 and value.is_floating_point() and not value.is_meta:
        return value.item()
    return value


def agree(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        a, b = torch.as_tensor(a).detach().cpu(), torch.as_tensor(b).detach().cpu()
        return a.shape == b.shape and bool((a.to(torch.float64) == b.to(torch.float64)).all())
    return a == b


def castable(param: Tensor) -> set[torch.dtype]:
    return (
        {torch.float16, torch.bfloat16, torch.float32, torch.float64, param.dtype}
        if param.is_floating_point()
        else {param.dtype}
    )


def describe_value(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__
