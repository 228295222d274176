r"""A functional loss scaler for mixed-precision training (``torch.amp.GradScaler`` as pure functions).

The scaler's state is a :class:`ScalerState` of two 0-dim tensors, ``scale`` (float32) and
``growth_tracker`` (int32, the clean steps since the last change of scale). One training step::

    config = amp.ScalerConfig()                      # GradScaler's defaults
    scaler = amp.init(config)                        # ScalerState(scale=65536., growth_tracker=0)
    loss = amp.scale_loss(loss, scaler)              # backward() this: the grads come out scaled
    grads, found_inf = amp.unscale(grads, scaler)    # grads / scale, and 1.0 if any is inf or NaN
    ...                                              # step only if found_inf == 0 (or use `scaled`)
    scaler = amp.update(scaler, found_inf, config)

With :math:`s` the scale, :math:`k` the growth tracker, :math:`\gamma` ``growth_factor``,
:math:`\beta` ``backoff_factor`` and :math:`N` ``growth_interval``, ``update`` is torch's rule:

.. math::
    (s, k) \leftarrow \begin{cases}
        (\beta s,\ 0) & \text{if a gradient was non-finite} \\
        (\gamma s \text{ if finite, else } s,\ 0) & \text{if } k + 1 \ge N \\
        (s,\ k + 1) & \text{otherwise}
    \end{cases}

The products :math:`\beta s` and :math:`\gamma s` are taken in float64 and rounded to float32, as
torch's kernel does, so the scale sequence equals GradScaler's bit for bit, for any factors.

**The cap.** A growth whose result would not be a finite float32 is skipped (the tracker still
resets), so the scale never becomes inf: it stops at the largest value below float32's maximum that
the growth reaches. This is what torch's GradScaler does too (no difference).

:func:`scaled` wraps a stepper (``init(params)``, ``step(params, grads, state)``, e.g.
:func:`optorch.inject_hyperparams`) into one that takes scaled gradients, unscales them, skips the
inner step on overflow (params and inner state bit-identical) and updates the scale, all without a
host sync, so it runs under ``torch.compile(fullgraph=True)``.

Fixes of the original optorch's scaler (specs/optorch-origin.md §5, §9 items 6-7, §10.1): NaN is
detected, not only ±inf; the scale update runs on every step, so backoff happens on overflow; no
``eval`` of config strings (there is no ``precision`` key: the autocast dtype is the caller's); the
scale cannot grow to inf; no private ``torch._amp_*`` calls; no ``device`` argument (results live on
the scale's device, inputs on theirs); the update is out of place (it returns a new state).

**fp16 gradients** are refused by :func:`unscale` (``ValueError``) unless ``allow_fp16=True``, as
GradScaler refuses them: gradients of fp16 *parameters* mean there are no float32 master weights, and
unscaling in fp16 loses the small values the scaling protected. With ``allow_fp16=True`` the product
is computed in float32 and rounded to fp16 once, as torch's kernel does. bfloat16 gradients are
allowed (and need no scaling: bf16 has float32's exponent range).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from ..core.compat import pytree
from ..core.config import Count, Flag, Number, representable
from ..core.ops import all_finite, scalar_dtype, select

__all__ = ["MIN_SCALE", "Scaled", "ScalerConfig", "ScalerState", "init", "scale_loss", "scaled", "unscale", "update"]


MIN_SCALE = torch.finfo(torch.float32).tiny
"""The smallest loss scale accepted, 2**-126 (float32's smallest normal number): unscaling multiplies
by 1/scale in float32, which a scale below ~2.9e-39 makes inf (and every gradient inf or NaN)."""


class ScalerConfig(BaseModel):
    """The scaler's constants; the defaults are ``torch.amp.GradScaler``'s."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    init_scale: Annotated[Number, Field(gt=0.0)] = 2.0**16
    """The first scale (kept in float32, where it and its reciprocal must be finite and non-zero)."""
    growth_factor: Annotated[Number, Field(gt=1.0)] = 2.0
    """The scale is multiplied by this after ``growth_interval`` clean steps in a row."""
    backoff_factor: Annotated[Number, Field(gt=0.0, lt=1.0)] = 0.5
    """The scale is multiplied by this on a step with an inf or NaN gradient."""
    growth_interval: Annotated[Count, Field(ge=1)] = 2000
    """Clean steps in a row before the scale grows."""
    enabled: Flag = True
    """False: a scale of 1 and no updates (a disabled GradScaler)."""

    @field_validator("init_scale")
    @classmethod
    def _usable_in_float32(cls, value: float) -> float:
        if not (value >= MIN_SCALE and representable(value, torch.float32)):
            raise ValueError(
                f"must be in [2**-126, {torch.finfo(torch.float32).max:.4g}], where it and its reciprocal are finite "
                f"in float32, got {value}"
            )
        return value


class ScalerState(NamedTuple):
    """The scaler's state (a pytree of two 0-dim tensors)."""

    scale: Tensor  # float32
    growth_tracker: Tensor  # int32: clean steps since the scale last changed


def init(config: ScalerConfig = ScalerConfig(), device: torch.device | str | None = None) -> ScalerState:  # noqa: B008 - frozen
    """A fresh state on ``device`` (default: torch's default device). A disabled config gives a scale
    of 1, so that :func:`scale_loss` and :func:`unscale` are exact identities (and :func:`update`
    leaves it there)."""
    scale = config.init_scale if config.enabled else 1.0
    return ScalerState(
        torch.tensor(scale, dtype=torch.float32, device=device),
        torch.zeros((), dtype=torch.int32, device=device),
    )


def scale_loss(loss: Tensor, state: ScalerState) -> Tensor:
    """``loss * scale``, in the loss's dtype (as GradScaler.scale)."""
    return loss * state.scale.to(device=loss.device)


def unscale(grads: Any, state: ScalerState, *, allow_fp16: bool = False) -> tuple[Any, Tensor]:
    """``(grads * (1/scale), found_inf)``: new tensors (the inputs are untouched), ``None`` grads pass
    through, and ``found_inf`` is a float32 0-dim tensor on the scale's device, 1.0 if any gradient
    holds an inf or a NaN, else 0.0. As torch, 1/scale is a float64 reciprocal rounded to float32,
    and the check looks at the gradients before unscaling."""
    leaves, spec = pytree.tree_flatten(grads)
    tensors = [g for g in leaves if g is not None]
    for g in tensors:
        if not isinstance(g, Tensor):
            raise TypeError(f"gradients must be tensors or None, got {type(g).__name__}")
        if g.dtype == torch.float16 and not allow_fp16:
            raise ValueError(
                "Attempting to unscale FP16 gradients (fp16 parameters have no float32 master "
                "weights); pass allow_fp16=True to unscale them anyway."
            )
    scale = state.scale
    if not tensors:
        return grads, torch.zeros((), dtype=torch.float32, device=scale.device)
    found_inf = (~all_finite(tensors)).to(device=scale.device, dtype=torch.float32)
    inv_scale = scale.to(scalar_dtype(scale)).reciprocal().to(torch.float32)
    unscaled = iter([_times(g, inv_scale) for g in tensors])
    return pytree.tree_unflatten([None if g is None else next(unscaled) for g in leaves], spec), found_inf


def _times(grad: Tensor, inv_scale: Tensor) -> Tensor:
    """grad * inv_scale computed in at least float32 and rounded to the grad's dtype once."""
    inv_scale = inv_scale.to(grad.device)
    if grad.dtype in (torch.float16, torch.bfloat16):
        return (grad.float() * inv_scale).to(grad.dtype)
    return grad * inv_scale.to(grad.dtype) if grad.dtype == torch.float64 else grad * inv_scale


def update(state: ScalerState, found_inf: Tensor, config: ScalerConfig) -> ScalerState:
    """The next state (the rule in the module docstring); branch-free, so no host sync. ``found_inf``
    is any 0-dim tensor, non-zero meaning an overflow (a sum of several ``found_inf`` works too). A
    disabled config returns ``state`` unchanged."""
    if not config.enabled:
        return state
    scale, tracker = state
    found = found_inf.to(device=scale.device) != 0
    wide = scale.to(scalar_dtype(scale))  # torch multiplies in double, then rounds to float32
    backed_off = (wide * config.backoff_factor).to(torch.float32)
    grown = (wide * config.growth_factor).to(torch.float32)
    counted = tracker + 1
    # `>=` rather than torch's `==`: the same on every state update() makes, and a tracker left above
    # a smaller new interval still grows instead of never growing again
    grow = ~found & (counted >= config.growth_interval)
    new_scale = torch.where(found, backed_off, torch.where(grow & torch.isfinite(grown), grown, scale))
    new_tracker = torch.where(found | grow, torch.zeros_like(counted), counted)
    return ScalerState(new_scale, new_tracker)


# --- a stepper that skips on overflow -------------------------------------------------------------


@dataclass(frozen=True)
class Scaled:
    """A stepper whose ``step`` takes the *scaled* gradients (of ``scale_loss(loss,
    state["scaler"])``): it unscales them, runs ``inner.step``, keeps the old params and inner state
    where a gradient was inf or NaN (bit-identical: a ``torch.where``, no host sync), and updates the
    scale. State: ``{"scaler": ScalerState, "inner": inner state, "skipped": int64 count}``."""

    inner: Any
    config: ScalerConfig = ScalerConfig()
    allow_fp16: bool = False

    def init(self, params: Any) -> dict[str, Any]:
        leaves = [p for p in pytree.tree_leaves(params) if isinstance(p, Tensor)]
        device = leaves[0].device if leaves else None
        return {
            "scaler": init(self.config, device),
            "inner": self.inner.init(params),
            "skipped": torch.zeros((), dtype=torch.int64, device=device),
        }

    def step(self, params: Any, grads: Any, state: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if not self.config.enabled:  # as a disabled GradScaler: step on the grads as they are
            params, inner = self.inner.step(params, grads, state["inner"])
            return params, {**state, "inner": inner}
        scaler = state["scaler"]
        grads, found_inf = unscale(grads, scaler, allow_fp16=self.allow_fp16)
        new_params, new_inner = self.inner.step(params, grads, state["inner"])
        found = found_inf != 0
        return select(found, params, new_params), {
            "scaler": update(scaler, found_inf, self.config),
            "inner": select(found, state["inner"], new_inner),
            "skipped": state["skipped"] + found.to(state["skipped"].device, torch.int64),
        }


def scaled(stepper: Any, config: ScalerConfig | dict[str, Any] | None = None, *, allow_fp16: bool = False) -> Scaled:
    """``stepper`` behind a loss scaler (see :class:`Scaled`); ``config`` is a :class:`ScalerConfig`
    or its dict."""
    if config is None:
        config = ScalerConfig()
    elif not isinstance(config, ScalerConfig):
        config = ScalerConfig.model_validate(config)
    if not (callable(getattr(stepper, "init", None)) and callable(getattr(stepper, "step", None))):
        raise TypeError(
            f"scaled() needs a stepper with init(params) and step(params, grads, state), got {type(stepper).__name__}"
        )
    return Scaled(stepper, config, allow_fp16)
