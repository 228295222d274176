r"""AutoSGM: a first-order lowpass filter of the gradient and an iteration-dependent learning rate.

Reimplements ``AutoSGM`` of somefunAgba/autosgm @c5b0935 (``asgm.py``), elementwise mode. Notation:
:math:`t` the parameter's step count, :math:`w` the parameter, :math:`\lambda` the weight decay,
:math:`\epsilon` eps, :math:`\alpha_0` lr.

**The filter** :math:`\mathrm{LPF}(\beta, \gamma, \eta, \text{debias})` (:func:`lowpass`; :math:`\eta = 0`
means :math:`1 - \beta`), with state :math:`s`:

.. math::

    p_t = s_{t-1} + \eta x_t, \qquad
    y_t = p_t / c_t \;(c_1 = 1,\ c_{t \ge 2} = 1 - \gamma), \qquad
    s_t = \beta p_t - \gamma\eta x_t,

and with debias :math:`y_t \leftarrow y_t \cdot \frac{(1 - \beta)/\eta}{1 - \beta^t}`: the transfer function
:math:`\eta(1 - \gamma z^{-1})/(1 - \beta z^{-1})`. :math:`\mathrm{EMA}_\beta = \mathrm{LPF}(\beta, 0, 0)` and
:math:`\mathrm{SUM}_\beta = \mathrm{LPF}(\beta, 0, 1)`, neither debiased.

**One step** (:math:`\sigma = -1` with maximize, else 1):

.. math::

    g &= \sigma\nabla f(w) \;(+\, \lambda w \text{ with coupled decay}) \\
    m &= \mathrm{LPF}_{g\_sm}(g;\ \beta_i, \gamma_i, \eta_i, \text{debias}) \\
    d &= \sqrt{\mathrm{LPF}_{g\_var}((g + \epsilon)^2;\ \beta_a, 0, \eta_i, \text{debias})} + \epsilon
        \quad (d = 1 \text{ unless adaptive}) \\
    v &= m / d \;(+\, \tfrac{1 - \beta_i}{1 - \gamma_i}\lambda w \text{ with decoupled decay}) \\
    w &\leftarrow w - \alpha_t v, \qquad \alpha_t = \rho_t \cdot a_t

with :math:`\rho_t` the window (:func:`window`) and the numerator :math:`a_t`: :math:`\alpha_0` (numerator 0
or 4, or not adaptive), else :math:`\mathrm{LPF}_{lr\_num}(\overline{\min(|P_t|, \alpha_0(c_t + 1))};\
0.1, 0, 0.9)`, a per-tensor mean, with :math:`c_t = \mathrm{EMA}_{\beta_n}(w^2)` and
:math:`P_t = \mathrm{SUM}_{\beta_n}(\alpha_0 w v)` (numerator 1),
:math:`P_t = \mathrm{SUM}_{\beta_n}(\alpha_0\,\mathrm{sign}(wv)\min(|wv|, 4h_t)/(c_t + 1))`,
:math:`h_t = \mathrm{EMA}_{\beta_a}(|wv|)` (numerator 2), or :math:`\min(Q_t, \alpha_0)`,
:math:`Q_t = \mathrm{EMA}_{\beta_n}(\alpha_0 (g/d)^2)` (numerator 3).

State per parameter, under the original's names, only what the config uses: ``step``, ``g_sm``;
``g_var`` when adaptive; ``pc``, ``lr_num`` (0-dim) for numerators 1-3; ``wsq`` for 1-2; ``pcx`` for 2.
The window needs no state: its frame position follows from ``step``.

Deviations from the original (docs/algorithms/autosgm.md lists them all, each with a test): the
parameter is updated itself (no private weight copy, no ``+eps`` nudge of tiny initial weights);
``lr`` is a param-group key and the config is read every step; maximize negates the gradient, not
the step; the epoch counter is ``ceil(t / spe)``; frames always restart; scalars are kept in the
parameter's precision (the original keeps lr in float32); 0-dim parameters work; 2D mode is absent.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import field_validator, model_validator
from torch import Tensor

from ..core import ops
from ..core.algorithm import Algorithm, LeafState, Reduction
from ..core.config import Config as _Config
from ..core.config import Count, Flag, NonNegative, Probability, Scalar, UnitInterval
from ..core.distributed import full
from ..core.scalars import is_zero
from ..schedules.window import WindowKeys, check_kind, window

__all__ = [
    "Config",
    "Reduction",
    "REDUCTIONS",
    "TUPLES",
    "algorithm",
    "init",
    "init_leaf",
    "lowpass",
    "step",
    "update",
    "window",
]


# The original's tuple arguments and the named fields their positions fill, in order.
TUPLES: dict[str, tuple[str, ...]] = {
    "lr_cfg": ("adaptive", "lr", "numerator"),
    "beta_cfg": ("beta_n", "beta_a", "beta_i", "gamma_i", "eta_i", "debias"),
    "rc_cfg": tuple(WindowKeys.model_fields),  # declared in rc_cfg's order
    "wd_cfg": ("weight_decay", "decoupled_weight_decay"),
    "eps_cfg": ("eps",),
}
_OFF_ONLY = {"mix_cfg": 5, "dbg": None}  # accepted for migration, only with their feature off


class _RateAndFilters(_Config):
    """The keys of lr_cfg and beta_cfg, ahead of the window's (:class:`WindowKeys`, rc_cfg) so that the
    fields keep the order of the original's tuples."""

    # lr_cfg
    adaptive: Flag = True
    """normalize by the second moment (lr_cfg[0])"""
    lr: NonNegative = 1e-2
    numerator: Count = 0
    """numerator of the learning-rate estimate, 0-4 (lr_cfg[2])"""
    # beta_cfg
    beta_n: Probability = 0.9999
    """pole of the numerator's smoothing filter (beta_cfg[0])"""
    beta_a: Probability = 0.999
    """pole of the second-moment average (beta_cfg[1])"""
    beta_i: Probability = 0.9
    """pole of the gradient's smoothing filter, the momentum (beta_cfg[2])"""
    gamma_i: Scalar = 0.0
    """zero of the gradient's smoothing filter, below beta_i or 0 (beta_cfg[3])"""
    eta_i: UnitInterval = 0.0
    """input gain of the smoothing filter; 0 means 1 - beta_i (beta_cfg[4])"""
    debias: Flag = True
    """bias-correct both filters (beta_cfg[5])"""


class Config(WindowKeys, _RateAndFilters):
    """AutoSGM's hyperparameters under names; the original's tuples are accepted too (see ``TUPLES``)."""

    accepted_keys: ClassVar[tuple[str, ...]] = (*TUPLES, *_OFF_ONLY)

    # rc_cfg: inherited from WindowKeys
    # wd_cfg, eps_cfg
    weight_decay: NonNegative = 0.0
    """weight decay (wd_cfg[0])"""
    decoupled_weight_decay: Flag = False
    """decoupled weight decay (wd_cfg[1] != 0)"""
    eps: NonNegative = 1e-10
    """added to the denominator (eps_cfg[0])"""
    maximize: Flag = False

    @model_validator(mode="before")
    @classmethod
    def _expand_tuples(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        values = dict(values)
        for key, size in _OFF_ONLY.items():
            if key not in values:
                continue
            value = values.pop(key)
            if key == "dbg" and value is not False:
                raise ValueError("dbg=True (diagnostics history) is not supported; leave dbg out or False")
            if key == "mix_cfg":
                if not isinstance(value, (tuple, list)) or len(value) != size:
                    raise ValueError(
                        f"mix_cfg must have {size} entries (mix2d, avg, lr0_2d, pole_2d, zero_2d), got {value!r}"
                    )
                if value[0] is not False:
                    raise ValueError("mix_cfg: the 2D mode (mix2d=True) is not implemented; set mix_cfg[0] to False")
        for key, names in TUPLES.items():
            if key not in values:
                continue
            value = values.pop(key)
            if not isinstance(value, (tuple, list)) or len(value) != len(names):
                raise ValueError(f"{key} must have {len(names)} entries ({', '.join(names)}), got {value!r}")
            both = [name for name in names if name in values]
            if both:
                raise ValueError(
                    f"{key} and {', '.join(both)} are both given; use the tuple or the named fields, not both"
                )
            expanded = dict(zip(names, value))
            if key == "rc_cfg":  # m: 0 is a full window, anything else a half one
                expanded["window_full"] = _int_flag("rc_cfg m", expanded["window_full"]) == 0
            if key == "wd_cfg":  # wd_lvl: 0 is coupled (L2), anything else decoupled
                expanded["decoupled_weight_decay"] = _int_flag("wd_cfg wd_lvl", expanded["decoupled_weight_decay"]) != 0
            values.update(expanded)
        return values

    @field_validator("numerator")
    @classmethod
    def _numerator(cls, value):
        return check_kind(value, 5, "0 unity, 1 partial correlation, 2 clipped partial correlation, 3 moment, 4 = 0")

    @model_validator(mode="after")
    def _consistent(self):
        gamma, beta = self.gamma_i, self.beta_i
        if not isinstance(gamma, Tensor) and not isinstance(beta, Tensor) and not (gamma < beta or gamma == 0):
            raise ValueError(
                f"gamma_i (the filter's zero) must be below beta_i (its pole) or 0, got gamma_i={gamma}, beta_i={beta}"
            )
        return self


def _int_flag(name: str, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------
# the filter and the window


def _where(cond: Any, a: Any, b: Any) -> Any:
    """``a if cond else b``, for a Python bool or a tensor condition."""
    if isinstance(cond, bool):
        return a if cond else b
    return torch.where(cond, a, b)


def lowpass(
    state: Tensor, x: Tensor, t: Any, beta: Any, gamma: Any = 0.0, eta: Any = 0.0, debias: bool = False
) -> tuple[Tensor, Tensor]:
    """One step of the first-order filter LPF(beta, gamma, eta, debias): ``(output, new_state)``.

    ``t`` is the 1-based step (a number or a tensor); ``eta = 0`` stands for ``1 - beta``.
    """
    eta = (1 - beta if eta == 0 else eta) if not isinstance(eta, Tensor) else torch.where(eta == 0, 1 - beta, eta)
    p = ops.add(state, x, eta)
    new_state = p * beta
    y = p
    if not is_zero(gamma):
        new_state = ops.add(new_state, x, -gamma * eta)
        y = p / ops.like(_where(t == 1, 1.0, 1 - gamma), p)  # the first output is not normalised
    if debias:  # once per step: compiled, the float64 pow would run per vector of elements
        (correction,) = ops.once(ops.like((1 - beta) / eta / (1 - beta**t), p))
        y = y * correction
    return y, new_state


# ------------------------------------------------------------------------------------------------
# the stepper


def init_leaf(param: Tensor, config: Config) -> LeafState:
    state = {"step": ops.new_step(param), "g_sm": torch.zeros_like(param)}
    if config.adaptive:
        state["g_var"] = torch.zeros_like(param)
        if config.numerator in (1, 2, 3):
            state["pc"] = torch.zeros_like(param)
            state["lr_num"] = torch.zeros((), dtype=param.dtype, device=param.device)
        if config.numerator in (1, 2):
            state["wsq"] = torch.zeros_like(param)
        if config.numerator == 2:
            state["pcx"] = torch.zeros_like(param)
    return state


def update(param: Tensor, grad: Tensor, state: LeafState, config: Config):
    c = config
    step = state["step"] + 1
    t = ops.step_count(step, param)
    g = -grad if c.maximize else grad
    wd = c.weight_decay
    if not c.decoupled_weight_decay and not is_zero(wd):
        g = ops.add(g, param, wd)
    m, g_sm = lowpass(state["g_sm"], g, t, c.beta_i, c.gamma_i, c.eta_i, c.debias)
    new_state = {"step": step, "g_sm": g_sm}
    d = None
    if c.adaptive:
        shifted = g if is_zero(c.eps) else g + c.eps  # the original's (g + eps)^2
        moment, new_state["g_var"] = lowpass(state["g_var"], shifted * shifted, t, c.beta_a, 0.0, c.eta_i, c.debias)
        d = moment.sqrt() + c.eps
        v = m / d
    else:
        v = m
    if c.decoupled_weight_decay and not is_zero(wd):
        v = ops.add(v, param, (1 - c.beta_i) / (1 - c.gamma_i) * wd)
    rho = window(t, c)
    if c.adaptive and c.numerator in (1, 2, 3):
        numerator = _numerator(param, g, d, v, state, new_state, t, c)
        alpha = rho * numerator
    else:  # numerator 4's Huber prefilter is unreachable in the original: 4 is 0
        alpha = c.lr * rho
    return ops.add(param, v, -ops.like(alpha, param)), new_state


def _numerator(
    w: Tensor, g: Tensor, d: Tensor, v: Tensor, state: LeafState, new_state: LeafState, t: Any, c: Config
) -> Tensor:
    """The per-tensor learning-rate numerator of numerators 1-3 (a 0-dim tensor); fills its state."""
    lr = c.lr
    if c.numerator == 3:
        u = g / d
        q, new_state["pc"] = lowpass(state["pc"], ops.like(lr, w) * u * u, t, c.beta_n)
        clipped = torch.clamp(q, max=lr) if not isinstance(lr, Tensor) else torch.minimum(q, ops.like(lr, q))
    else:
        csq, new_state["wsq"] = lowpass(state["wsq"], w * w, t, c.beta_n)
        x = w * v
        if c.numerator == 1:
            source = ops.like(lr, w) * x
        else:  # a Markov (Huber-like) clip of w v at four times its running mean magnitude
            h, new_state["pcx"] = lowpass(state["pcx"], x.abs(), t, c.beta_a)
            source = ops.like(lr, w) * torch.sign(x) * torch.minimum(x.abs(), 4 * h) / (csq + 1)
        p, new_state["pc"] = lowpass(state["pc"], source, t, c.beta_n, 0.0, 1.0)
        clipped = torch.minimum(p.abs(), ops.like(lr, w) * (csq + 1))
    # sum / n is mean's own arithmetic (bit for bit); a sharded param's sum is one number reduced, not the tensor
    # gathered
    smoothed, new_state["lr_num"] = lowpass(state["lr_num"], full(clipped.sum()) / clipped.numel(), t, 0.1, 0.0, 0.9)
    return smoothed


# ------------------------------------------------------------------------------------------------
# exact reductions to torch.optim (spec section 7), shared by the tests


_MU, _LR = 0.9, 2.0**-5
_ADAM = {"adaptive": True, "lr": 2.0**-7, "beta_a": 0.999, "beta_i": 0.9, "eps": 1e-30}
_ADAM_TORCH = {"lr": 2.0**-7, "betas": (0.9, 0.999), "eps": 1e-30}
_PLAIN = {"adaptive": False, "lr": _LR, "beta_i": 0.0}


def _lambda(factor: Callable[[int], float]) -> Callable[[torch.optim.Optimizer], Any]:
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# a table: one reduction a row, each wrapped as name, config; torch optimizer, its settings; any scheduler
# fmt: off
REDUCTIONS: tuple[Reduction, ...] = (
    Reduction("sgd", _PLAIN, "SGD", {"lr": _LR}),
    Reduction("sgd-l2", {**_PLAIN, "weight_decay": 0.0625}, "SGD", {"lr": _LR, "weight_decay": 0.0625}),
    Reduction("heavy-ball", {**_PLAIN, "beta_i": _MU, "eta_i": 1.0, "debias": False},
              "SGD", {"lr": _LR, "momentum": _MU}),
    Reduction("heavy-ball-l2-maximize",
              {**_PLAIN, "beta_i": _MU, "eta_i": 1.0, "debias": False, "weight_decay": 0.0625, "maximize": True},
              "SGD", {"lr": _LR, "momentum": _MU, "weight_decay": 0.0625, "maximize": True}),
    Reduction("heavy-ball-eta", {**_PLAIN, "beta_i": _MU, "debias": False},
              "SGD", {"lr": _LR * (1 - _MU), "momentum": _MU}),
    Reduction("heavy-ball-debiased", {**_PLAIN, "beta_i": _MU}, "SGD", {"lr": _LR, "momentum": _MU},
              _lambda(lambda s: (1 - _MU) / (1 - _MU ** (s + 1)))),
    Reduction("nesterov", {**_PLAIN, "beta_i": _MU, "gamma_i": _MU / (1 + _MU), "eta_i": 1.0, "debias": False},
              "SGD", {"lr": _LR, "momentum": _MU, "nesterov": True},
              _lambda(lambda s: 1 / (1 + _MU) if s == 0 else 1.0)),
    Reduction("adam", _ADAM, "Adam", _ADAM_TORCH),
    Reduction("adam-l2-maximize", {**_ADAM, "weight_decay": 0.0625, "maximize": True},
              "Adam", {**_ADAM_TORCH, "weight_decay": 0.0625, "maximize": True}),
    Reduction("adamw", {**_ADAM, "weight_decay": 0.25 * (1 - 0.0) / (1 - 0.9), "decoupled_weight_decay": True},
              "AdamW", {**_ADAM_TORCH, "weight_decay": 0.25}),
    Reduction("adam-beta1-0", {**_ADAM, "beta_i": 0.0}, "Adam", {**_ADAM_TORCH, "betas": (0.0, 0.999)}),
    Reduction("rmsprop", {**_ADAM, "beta_a": 0.99, "beta_i": 0.0, "debias": False},
              "RMSprop", {"lr": 2.0**-7, "alpha": 0.99, "eps": 1e-30}),
    Reduction("sgd-cosine-frame",
              {**_PLAIN, "window": 1, "window_order": 2.0, "window_floor": 0.125,
               "window_epochs": 1, "window_steps_per_epoch": 150},
              "SGD", {"lr": _LR},
              lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=150, eta_min=0.125 * _LR)),
    Reduction("adam-cosine-restarts",
              {**_ADAM, "window": 1, "window_order": 2.0, "window_floor": 0.125,
               "window_epochs": 5, "window_steps_per_epoch": 6},
              "Adam", _ADAM_TORCH,
              lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=30, eta_min=0.125 * 2.0**-7)),
    Reduction("sgd-linear-frame",
              {**_PLAIN, "beta_i": _MU, "eta_i": 1.0, "debias": False, "window": 2, "window_order": 1.0,
               "window_floor": 0.25, "window_epochs": 1, "window_steps_per_epoch": 150},
              "SGD", {"lr": _LR, "momentum": _MU},
              lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=0.25, total_iters=150)),
)
# fmt: on
"""Spec section 7: each AutoSGM config and the torch.optim optimizer (and scheduler) it reduces to
exactly, up to float64 rounding (eps 1e-30 stands for 0: the original's (g + eps)^2 is g^2 then)."""


def _elementwise(config: Config) -> bool:
    return not (config.adaptive and config.numerator in (1, 2, 3))  # those numerators are per-tensor means


algorithm = Algorithm("autosgm", Config, init_leaf, update, elementwise=_elementwise, reductions=REDUCTIONS)
init, step = algorithm.init, algorithm.step
