r"""Adadelta (= ``torch.optim.Adadelta``).

With gradient :math:`g_t`, learning rate :math:`\gamma`, decay :math:`\rho` and weight decay
:math:`\lambda`:

.. math::

    g_t &\leftarrow \pm g_t + \lambda\theta_{t-1} \\
    v_t &= \rho v_{t-1} + (1 - \rho) g_t^2 \\
    \Delta_t &= \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t \\
    u_t &= \rho u_{t-1} + (1 - \rho) \Delta_t^2 \\
    \theta_t &= \theta_{t-1} - \gamma \Delta_t

State per parameter: ``step`` (counted, unused by the math), ``square_avg`` (:math:`v`),
``acc_delta`` (:math:`u`).
"""

from __future__ import annotations

import torch

from ..core import ops
from ..core.algorithm import Algorithm, Grid, LeafState
from ..core.config import Config as _Config
from ..core.config import Flag, NonNegative, UnitInterval
from ..core.scalars import is_zero

__all__ = ["Config", "init", "step", "algorithm", "init_leaf", "update"]


class Config(_Config):
    lr: NonNegative = 1.0
    """scales the update (torch's default 1.0)"""
    rho: UnitInterval = 0.9
    """decay rate of the running averages of squared gradients and updates"""
    eps: NonNegative = 1e-6
    weight_decay: NonNegative = 0.0
    maximize: Flag = False


def init_leaf(param: torch.Tensor, config: Config) -> LeafState:
    return {"step": ops.new_step(param), "square_avg": torch.zeros_like(param), "acc_delta": torch.zeros_like(param)}


def update(param: torch.Tensor, grad: torch.Tensor, state: LeafState, config: Config):
    rho, eps = config.rho, config.eps
    g = -grad if config.maximize else grad
    if not is_zero(config.weight_decay):
        g = ops.add(g, param, config.weight_decay)
    square_avg = ops.addcmul(state["square_avg"] * rho, g, g, 1 - rho)
    delta = (state["acc_delta"] + eps).sqrt() / (square_avg + eps).sqrt() * g
    acc_delta = ops.addcmul(state["acc_delta"] * rho, delta, delta, 1 - rho)
    new_state = {"step": state["step"] + 1, "square_avg": square_avg, "acc_delta": acc_delta}
    return ops.add(param, delta, -config.lr), new_state


GRID = Grid(
    fixed={"lr": 0.5, "rho": 0.8, "eps": 1e-4},
    axes={"weight_decay": (0.0, 0.1), "maximize": (False, True)},
)
algorithm = Algorithm("adadelta", Config, init_leaf, update, torch.optim.Adadelta, grid=GRID)
init, step = algorithm.init, algorithm.step
