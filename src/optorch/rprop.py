r"""Rprop: resilient backpropagation, sign-based steps with per-element step sizes (= ``torch.optim.Rprop``).

With gradient :math:`g_t` (negated with maximize), step-size factors :math:`(\eta^-, \eta^+)` and
bounds :math:`(\Delta_{\min}, \Delta_{\max})`, element-wise:

.. math::

    s_t &= \operatorname{sign}(g_t\, p_{t-1}) \\
    \Delta_t &= \operatorname{clamp}\!\left(\Delta_{t-1} \cdot
        \begin{cases} \eta^+ & s_t > 0 \\ \eta^- & s_t < 0 \\ 1 & s_t = 0 \end{cases},\
        \Delta_{\min}, \Delta_{\max}\right), \qquad \Delta_0 = \gamma \\
    p_t &= \begin{cases} 0 & s_t < 0 \\ g_t & \text{otherwise} \end{cases} \\
    \theta_t &= \theta_{t-1} - \operatorname{sign}(p_t)\, \Delta_t

After a sign change the gradient is forgotten (:math:`p_t = 0`), so the next step neither moves that
element nor changes its step size. The learning rate :math:`\gamma` only sets the initial step sizes
(both components of a complex parameter start at :math:`\gamma`, as in torch).
State per parameter: ``step`` (counted, unused by the math), ``prev`` (:math:`p`), ``step_size``
(:math:`\Delta`).
"""

from __future__ import annotations

import torch
from pydantic import field_validator

from . import ops
from .algorithm import Algorithm, Grid, LeafState
from .config import Config as _Config
from .config import Flag, NonNegative, Scalar

__all__ = ["Config", "init", "step", "algorithm", "init_leaf", "update"]


class Config(_Config):
    lr: NonNegative = 1e-2
    etas: tuple[Scalar, Scalar] = (0.5, 1.2)
    step_sizes: tuple[NonNegative, NonNegative] = (1e-6, 50.0)
    maximize: Flag = False

    @field_validator("etas", "step_sizes", mode="before")
    @classmethod
    def _as_tuple(cls, value):
        return tuple(value) if isinstance(value, list) else value

    @field_validator("etas")
    @classmethod
    def _etas_around_one(cls, value):
        minus, plus = value
        if not any(isinstance(v, torch.Tensor) for v in value) and not 0.0 < minus < 1.0 < plus:
            raise ValueError(f"must satisfy 0 < etaminus < 1 < etaplus, got {value!r}")
        return value

    @field_validator("step_sizes")
    @classmethod
    def _ordered(cls, value):
        low, high = value
        if not any(isinstance(v, torch.Tensor) for v in value) and not low <= high:
            raise ValueError(f"must satisfy 0 <= min <= max, got {value!r}")
        return value


def init_leaf(param: torch.Tensor, config: Config) -> LeafState:
    lr = config.lr * (1 + 1j) if param.is_complex() else config.lr  # both real components start at lr
    step_size = torch.zeros_like(param) + lr if isinstance(lr, torch.Tensor) else torch.full_like(param, lr)
    return {"step": ops.new_step(param), "prev": torch.zeros_like(param), "step_size": step_size}


def update(param: torch.Tensor, grad: torch.Tensor, state: LeafState, config: Config):
    (eta_minus, eta_plus), (size_min, size_max) = config.etas, config.step_sizes
    g = -grad if config.maximize else grad
    sign = torch.sign(g * state["prev"])
    factor = torch.where(sign > 0, eta_plus, torch.where(sign < 0, eta_minus, torch.where(sign == 0, 1.0, sign)))
    step_size = torch.clamp(state["step_size"] * factor, size_min, size_max)
    g = torch.where(sign < 0, 0.0, g)  # a sign change: skip this step, and forget the gradient
    new_param = ops.addcmul(param, g.sign(), step_size, -1.0)
    return new_param, {"step": state["step"] + 1, "prev": g, "step_size": step_size}


GRID = Grid(
    fixed={"lr": 0.01, "etas": (0.4, 1.3), "step_sizes": (1e-4, 0.05)},
    axes={"maximize": (False, True)},
)
algorithm = Algorithm("rprop", Config, init_leaf, update, torch.optim.Rprop, grid=GRID)
init, step = algorithm.init, algorithm.step
