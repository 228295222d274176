r"""DAG, Dynamic-Alpha Gradient: SGD on a per-tensor normalised, scaled tanh of the gradient, with an
adaptive steepness :math:`\alpha` per tensor and a global RMS shrink :math:`s`
(``Soham4001A/DynamicAlphaGrad``, ``optim/sgd.py``, class ``DAG`` at ``b7f642a``).

For a tensor :math:`\theta` with :math:`d_L` elements and gradient :math:`g` at the optimizer's step
:math:`t` (0-based, counted over all tensors), with :math:`N = \lVert g\rVert_2`, the global
:math:`s` of the previous step and :math:`k` = ``k_val`` (or ``k_sched(t)``):

.. math::

    \sigma &= N / \sqrt{d_L} \quad(\text{or, with } \texttt{use\_exact\_sigma}, \operatorname{std}_0(g)
        \text{ when } t \bmod \texttt{sigma\_every} = 0, \text{ else the stored } \sigma) \\
    \hat\alpha &= \kappa\,\frac{N + \epsilon}{\sigma + \epsilon}
        \Big(\frac{d_L}{d_\text{total}}\Big)^{\beta}\Big(\frac{p^*}{S^- + \epsilon}\Big)^{\eta} s \\
    \alpha &= \operatorname{clamp}\big((1 - \rho)\,\alpha^- + \rho\,\hat\alpha,\ \alpha_\min, \alpha_\max\big) \\
    x &= \frac{\alpha}{s}\,\frac{g}{N + \epsilon}, \qquad
        u = \pm k\,s\,\tanh(x) + \lambda\theta \qquad (-\text{ when maximize}) \\
    S &= \operatorname{mean}\big(\mathbb 1[\lvert x\rvert > \tau]\big) \text{ when } t \bmod
        \texttt{sat\_every} = 0, \text{ else } S^- \\
    b &= \mu b^- + (1 - \delta)\,u \quad (b \text{ starts at } 0), \qquad
        u \leftarrow u + \mu b \text{ (nesterov) or } b \\
    \theta &\leftarrow \theta - \gamma u

After every tensor has stepped, the global shrink, with :math:`r = \sqrt{\sum u^2 / \sum d_L}` over all
stepped tensors:

.. math::

    \bar r_t &= r \text{ at the first measurement, else } \beta_e \bar r_{t-1} + (1 - \beta_e)\,r \\
    R_0 &= \bar r_t \text{ at the first measurement, else } \beta_e R_0 + (1 - \beta_e)\,\bar r_t
        \quad (t < \texttt{warmup\_steps}; \text{ frozen after}) \\
    s &= s_\min + (1 - s_\min)\operatorname{clip}\big(\bar r_t / (\lambda_\text{rms} R_0), 0, 1\big)^{\gamma}
        \quad (t \ge \texttt{warmup\_steps}; \; s = 1 \text{ before})

and :math:`t \leftarrow t + 1` on every step. :math:`\kappa` defaults to :math:`\tau / \Phi^{-1}(1 - p^*/2)`.

State per tensor: ``alpha``, ``sat_ratio``, ``sigma`` (0-dim, at least float32) and, with momentum,
``momentum_buffer``. Shared state (``state["shared"]``, the shim's ``optimizer.shared``): ``global_step``,
``k_val``, ``s_t``, ``rms_t_ema``, ``rms0_ema`` (meaningful once ``rms_count``, the number of steps
that measured the update RMS, is positive: the original's ``None`` before) and ``d_total``. Nothing
reads a tensor's value on the host, so a step compiles to one graph and never syncs.

Fixed relative to the original (see docs/algorithms/dag.md): maximize negates the tanh direction before
weight decay and momentum (the original flips the stored momentum buffer and the decay term); exact
sigma is computed natively (the original's Apex call does not exist); the per-tensor scalars are kept
in at least float32; invalid settings are refused; ``foreach``/``differentiable``/``fused`` only name
execution choices and never change the numbers.
"""

from __future__ import annotations

import math
import numbers
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from ..core import ops
from ..core.algorithm import Algorithm, LeafState, Shared
from ..core.config import Config as _Config
from ..core.config import Flag, NonNegative, Number, Probability, UnitInterval, check_count, representable
from ..core.distributed import full
from ..core.errors import shown
from ..core.scalars import half_cosine, is_zero

__all__ = [
    "Config",
    "Hyper",
    "ShrinkSettings",
    "CosineSchedule",
    "init",
    "step",
    "algorithm",
    "init_leaf",
    "update",
    "kappa",
]


def _count(value: Any) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or (isinstance(value, float) and not math.isfinite(value))
        or value != int(value)
    ):
        raise ValueError(f"expected a whole number, got {shown(value)}")
    return check_count(int(value))


def _every(value: Any) -> int:
    # The original coerces its cadences with max(1, int(x)); kept, so its calls migrate unchanged.
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise ValueError(f"expected a finite number of steps, got {type(value).__name__} {shown(value)}")
    return check_count(max(1, int(value)))


Positive = Annotated[Number, Field(gt=0.0)]
NonNegativeNumber = Annotated[Number, Field(ge=0.0)]
Every = Annotated[int, BeforeValidator(_every)]


class _Settings(BaseModel):
    """A dict-valued constructor argument of the original, merged over its defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, values: Any) -> Any:
        if values is None:
            return {}
        if isinstance(values, BaseModel):
            values = dict(values)
        if not isinstance(values, dict):
            raise ValueError(f"expected a dict of settings, got {type(values).__name__}")
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            raise ValueError(
                f"unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(cls.model_fields)}"
            )
        return values


def kappa(tau: float, p_star: float) -> float:
    r"""The automatic gain :math:`\tau / \Phi^{-1}(1 - p^*/2)`.

    The original evaluates the inverse normal CDF on a tensor of torch's default dtype (float32 unless
    it is float64) and divides in Python; the same rounding is kept here, so the gain, and every
    trajectory, matches it.
    """
    quantile = torch.special.erfinv(2 * torch.tensor(1 - p_star / 2, dtype=ops.torch_scalar_dtype()) - 1) * math.sqrt(2)
    return tau / quantile.item()


class Hyper(_Settings):
    """The alpha controller (the original's ``hyper`` dict)."""

    tau: Positive = 1.25
    """target of the controller"""
    p_star: Annotated[Number, Field(gt=0.0, lt=1.0)] = 0.10
    """target saturation probability"""
    kappa: NonNegativeNumber | None = None
    """gain; None: tau / Phi^-1(1 - p_star / 2)"""
    beta: NonNegativeNumber = 1 / 3
    """exponent of the controller"""
    eta: NonNegativeNumber = 0.3
    """step of the controller"""
    rho: Annotated[Number, Field(ge=0.0, le=1.0)] = 0.1
    """smoothing of the controller"""
    eps: Positive = 1e-5
    """added to the controller's denominators"""
    alpha_min: NonNegativeNumber = 1e-12
    """lower clamp of alpha"""
    alpha_max: NonNegativeNumber = 1e12
    """upper clamp of alpha"""

    @model_validator(mode="after")
    def _resolve(self) -> Hyper:
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"alpha_min ({self.alpha_min}) must not exceed alpha_max ({self.alpha_max})")
        # alpha and the per-tensor scalars are kept in float32 for float32 (and lower) params
        for name in ("alpha_max", "eps"):
            if not representable(getattr(self, name), torch.float32):
                raise ValueError(
                    f"{name} must be finite and non-zero in float32, where alpha is kept for float32 params, got "
                    f"{getattr(self, name)}"
                )
        if self.kappa is None:  # computed once, as the original's constructor does
            object.__setattr__(self, "kappa", kappa(self.tau, self.p_star))
        return self


class ShrinkSettings(_Settings):
    """The global RMS shrink (the original's ``shrink`` dict)."""

    lambda_rms: Positive = 0.3
    """strength of the global RMS shrink"""
    s_min: Annotated[Number, Field(gt=0.0, le=1.0)] = 0.1
    """floor of the shrink factor"""
    gamma: NonNegativeNumber = 1.0
    """exponent of the shrink"""
    ema_beta: Annotated[Number, Field(ge=0.0, le=1.0)] = 0.98
    """decay of the RMS averages"""
    warmup_steps: Annotated[int, BeforeValidator(_count), Field(ge=0)] = 500
    """steps before the shrink starts"""


class CosineSchedule(_Settings):
    """``DAG.cosine_decay(k0, total_steps)``: :math:`k_0 \\cdot \\frac12(1 + \\cos(\\pi \\min(t, T)/T))`.

    It reaches 0 at ``total_steps`` and stays there (no floor): from then on every update is zero.
    ``total_steps`` counts optimizer steps, not epochs.
    """

    name: Literal["cosine"] = "cosine"
    """the schedule kind"""
    k0: NonNegativeNumber
    """k_val at step 0"""
    total_steps: Annotated[int, BeforeValidator(_count), Field(ge=1)]
    """optimizer steps until k_val reaches 0"""

    def __call__(self, step: torch.Tensor) -> torch.Tensor:
        return _cosine(self, step)


def _cosine(schedule: Any, step: torch.Tensor) -> torch.Tensor:
    total = _setting(schedule, "total_steps")
    ratio = torch.clamp(step, max=total) / total
    return half_cosine(_setting(schedule, "k0"), 0.0, math.pi * ratio)


_SETTINGS = {"hyper": Hyper, "shrink": ShrinkSettings, "k_sched": CosineSchedule}


class Config(_Config):
    """The original constructor's keywords. Per param group: ``lr``, ``momentum``, ``dampening``,
    ``weight_decay``, ``nesterov``, ``maximize``. The rest are global (one value for all tensors, as in
    the original): set them on the optimizer, not per group."""

    lr: NonNegative = 1e-3
    momentum: Probability = 0.0
    dampening: UnitInterval = 0.0
    weight_decay: NonNegative = 0.0
    k_val: NonNegative = 2.0
    """gain of the alpha controller; global"""
    k_sched: CosineSchedule | None = None
    """a cosine schedule for k_val; global"""
    nesterov: Flag = False
    maximize: Flag = False
    foreach: Flag | None = None
    """accepted for compatibility; changes nothing"""
    differentiable: Flag = False
    """accepted for compatibility; changes nothing"""
    fused: Flag | None = None
    """accepted for compatibility; changes nothing"""
    hyper: Hyper = Hyper()
    """the alpha controller's settings, merged over their defaults; global"""
    shrink: ShrinkSettings = ShrinkSettings()
    """the global RMS shrink's settings, merged over their defaults; global"""
    use_exact_sigma: Flag = False
    """exact per-tensor standard deviation instead of the estimate; global"""
    sigma_every: Every = 1
    """recompute sigma every this many steps; global"""
    sat_every: Every = 10
    """recompute the saturation statistics every this many steps; global"""

    global_keys: ClassVar[tuple[str, ...]] = (
        "k_val",
        "k_sched",
        "hyper",
        "shrink",
        "use_exact_sigma",
        "sigma_every",
        "sat_every",
    )
    accepted_keys: ClassVar[tuple[str, ...]] = ("lambda_rms", "s_min")
    """The README's quick-start passes these two shrink settings at the top level (a TypeError in the
    original); accepted, and folded into ``shrink``, overriding its values."""

    @field_validator("hyper", "shrink", mode="before")
    @classmethod
    def _none_is_defaults(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="before")
    @classmethod
    def _top_level_shrink(cls, values: Any) -> Any:
        if not isinstance(values, dict) or not any(key in values for key in cls.accepted_keys):
            return values
        values = dict(values)
        shrink = values.get("shrink")
        shrink = dict(shrink) if isinstance(shrink, (dict, BaseModel)) else {}
        shrink.update({key: values.pop(key) for key in cls.accepted_keys if key in values})
        return {**values, "shrink": shrink}

    @model_validator(mode="after")
    def _nesterov_needs_plain_momentum(self) -> Config:
        if self.nesterov and (is_zero(self.momentum) or not is_zero(self.dampening)):
            raise ValueError("nesterov requires a non-zero momentum and zero dampening")
        return self

    def hyperparameters(self) -> dict[str, Any]:
        """Field name to value; the nested settings as plain dicts, which is what a param group holds
        (a checkpoint then needs nothing but plain values to load with ``weights_only``)."""
        values = super().hyperparameters()
        for key in _SETTINGS:
            if isinstance(values[key], BaseModel):
                values[key] = dict(values[key])
        return values


def _setting(settings: Any, key: str) -> Any:
    # A validated Config holds models; a copy made without validation (the shim's compiled engine
    # swaps numbers for tensors with model_copy) may hold the plain dicts of ``hyperparameters()``.
    return settings[key] if isinstance(settings, dict) else getattr(settings, key)


def _amplitude(config: Config, global_step: torch.Tensor) -> Any:
    """k for the step numbered ``global_step``: the schedule's value, else ``k_val``."""
    return config.k_val if config.k_sched is None else _cosine(config.k_sched, global_step)


def _scalar_dtype(param: torch.Tensor) -> torch.dtype:
    # The original keeps alpha/sat_ratio/sigma in the param's dtype; alpha reaches 1e3-1e5, so never
    # below float32.
    return param.dtype if param.dtype in (torch.float32, torch.float64) else torch.float32


def init_leaf(param: torch.Tensor, config: Config) -> LeafState:
    scalar = {"dtype": _scalar_dtype(param), "device": param.device}
    state = {
        "alpha": torch.ones((), **scalar),
        "sat_ratio": torch.zeros((), **scalar),
        "sigma": torch.ones((), **scalar),
    }
    if not is_zero(config.momentum):
        state["momentum_buffer"] = torch.zeros_like(param)  # zeros, not a copy of u: the first buf is (1 - dampening) u
    return state


def init_shared(params: list[torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    device = params[0].device if params else torch.device("cpu")
    dtype = ops.scalar_dtype(params[0]) if params else torch.float64

    def scalar(value: Any) -> torch.Tensor:
        return torch.as_tensor(value, dtype=dtype, device=device).detach().clone().reshape(())

    return {
        "global_step": scalar(0.0),
        "k_val": scalar(config.k_val),
        "s_t": scalar(1.0),
        "rms_t_ema": scalar(0.0),
        "rms0_ema": scalar(0.0),
        "rms_count": scalar(0.0),
        "d_total": scalar(float(sum(p.numel() for p in params))),
    }


def update(param: torch.Tensor, grad: torch.Tensor, state: LeafState, config: Config, shared: dict[str, torch.Tensor]):
    h = config.hyper
    eps, tau = _setting(h, "eps"), _setting(h, "tau")
    dtype = state["alpha"].dtype
    step, s, d_total = (shared[key].to(dtype) for key in ("global_step", "s_t", "d_total"))
    d = grad.numel()
    k = ops.like(_amplitude(config, shared["global_step"]), state["alpha"])

    norm = ops.norm(grad, dtype)
    sigma = norm * (1.0 / math.sqrt(d))
    if config.use_exact_sigma:  # population std, refreshed every sigma_every steps, stale in between
        exact = full(torch.std(grad.to(dtype), correction=0))  # of a sharded param: all-gathers it (DTensor's std)
        sigma = torch.where(torch.remainder(step, config.sigma_every) == 0, exact, state["sigma"])
    alpha_hat = (
        _setting(h, "kappa")
        * (norm + eps)
        / (sigma + eps)
        * (d / d_total) ** _setting(h, "beta")
        * (_setting(h, "p_star") / (state["sat_ratio"] + eps)) ** _setting(h, "eta")
        * s
    )
    rho = _setting(h, "rho")
    alpha = torch.clamp(
        (1 - rho) * state["alpha"] + rho * alpha_hat, _setting(h, "alpha_min"), _setting(h, "alpha_max")
    )

    # Once per step, not per element: compiled, these would be recomputed in the element-wise loop.
    inverse_norm, gain, amplitude = ops.once(
        *(v.to(grad.dtype) for v in (torch.reciprocal(norm + eps), alpha / s, k * s))
    )
    x = grad * inverse_norm * gain
    u = ops.tanh(x) * amplitude
    # Measured on x (so with the /s), used by the next step's alpha; float32 like the original's mean
    # (whatever torch's default dtype).
    # The count / d is mean's own arithmetic, bit for bit. A sharded param's count is read whole first:
    # its shards' counts are exact, their quotients in float32 are not (and one number moves, not the tensor).
    # Counted as integers: exact, and cheap in the update's loop (see ops.sum_dtype).
    count = (x.abs() > tau).sum(dtype=torch.int32 if d < 2**31 else torch.int64)
    saturation = (full(count).to(torch.float32) / d).to(dtype)
    sat_ratio = torch.where(torch.remainder(step, config.sat_every) == 0, saturation, state["sat_ratio"])
    new_state = {"alpha": alpha, "sat_ratio": sat_ratio, "sigma": sigma}

    if config.maximize:  # before decay and momentum: the same as ascending on -g (fix of the original)
        u = -u
    if not is_zero(config.weight_decay):
        u = u + param * config.weight_decay  # coupled, after the tanh
    if "momentum_buffer" in state:
        buf = ops.add(state["momentum_buffer"] * config.momentum, u, 1 - config.dampening)
        new_state["momentum_buffer"] = buf
        u = ops.add(u, buf, config.momentum) if config.nesterov else buf
    contributions = {
        "sum_u2": (u * u).sum(dtype=ops.sum_dtype(u, fused=True)).to(shared["s_t"].dtype),
        "numel": torch.full_like(shared["s_t"], d),
    }
    return ops.add(param, u, -config.lr), new_state, contributions


def finish(
    shared: dict[str, torch.Tensor], totals: dict[str, torch.Tensor] | None, config: Config
) -> dict[str, torch.Tensor]:
    """The global RMS shrink (only when some tensor stepped), then ``global_step + 1`` (always)."""
    step = shared["global_step"]
    new = {key: value.clone() for key, value in shared.items()}
    new["k_val"] = torch.as_tensor(_amplitude(config, step), dtype=step.dtype, device=step.device).reshape(())
    new["global_step"] = step + 1
    if totals is None:
        return new
    sh = config.shrink
    beta = _setting(sh, "ema_beta")
    rms = torch.sqrt(totals["sum_u2"] / totals["numel"])
    first = shared["rms_count"] == 0  # the original's None: nothing measured yet
    rms_t = torch.where(first, rms, beta * shared["rms_t_ema"] + (1 - beta) * rms)
    warmup = step < _setting(sh, "warmup_steps")
    # During warmup RMS0 is an EMA of the EMA; after it, frozen (set to rms_t if warmup was empty).
    rms0 = torch.where(
        warmup,
        torch.where(first, rms_t, beta * shared["rms0_ema"] + (1 - beta) * rms_t),
        torch.where(first, rms_t, shared["rms0_ema"]),
    )
    s_min, baseline = _setting(sh, "s_min"), _setting(sh, "lambda_rms") * rms0
    # A zero baseline (all updates zero so far) means no shrink; the original divides by zero there.
    ratio = torch.where(baseline > 0, rms_t / baseline, torch.ones_like(rms_t)).clamp(0.0, 1.0)
    new["s_t"] = torch.where(warmup, shared["s_t"], s_min + (1 - s_min) * ratio ** _setting(sh, "gamma"))
    new["rms_t_ema"], new["rms0_ema"], new["rms_count"] = rms_t, rms0, shared["rms_count"] + 1
    return new


algorithm = Algorithm(
    "dag",
    Config,
    init_leaf,
    update,
    elementwise=False,
    shared=Shared(init_shared, finish, derived=("d_total",), contributions=("sum_u2", "numel")),
    # The update u feeds the new param and two statistics. Inductor's CPU code keeps a value used
    # twice only when it holds an exp-like op or over 50 ops; compiled, ops.tanh has neither, so u
    # would be computed twice in two loops instead of once in one. 16 is measured: the stacked
    # kernel (200 x 20k) fuses at 16, not at 24. One 4M float32 tensor: 6.4-6.5 ms a step without,
    # 4.3-4.5 ms with; 200 x 20k laid out: 7.4 against 5.1 ms.
    compile_options={"realize_opcount_threshold": 16},
)
init, step = algorithm.init, algorithm.step
