r"""Adagrad with learning-rate decay, weight decay and maximize (= ``torch.optim.Adagrad``, dense).

With gradient :math:`g_t`, learning rate :math:`\gamma`, lr decay :math:`\eta` and weight decay
:math:`\lambda`:

.. math::

    g_t &\leftarrow \pm g_t + \lambda\theta_{t-1} \\
    \tilde\gamma_t &= \gamma / (1 + (t - 1)\eta) \\
    s_t &= s_{t-1} + g_t^2, \qquad s_0 = \text{initial\_accumulator\_value} \\
    \theta_t &= \theta_{t-1} - \tilde\gamma_t\, g_t / (\sqrt{s_t} + \epsilon)

State per parameter: ``step`` and ``sum`` (:math:`s`). Sparse gradients are rejected.
"""

from __future__ import annotations

import torch

from ..core import ops
from ..core.algorithm import Algorithm, Grid, LeafState
from ..core.config import Config as _Config
from ..core.config import Flag, NonNegative
from ..core.scalars import is_zero

__all__ = ["Config", "init", "step", "algorithm"]


class Config(_Config):
    lr: NonNegative = 1e-2
    lr_decay: NonNegative = 0.0
    """the learning rate at step t is lr / (1 + (t - 1) lr_decay)"""
    weight_decay: NonNegative = 0.0
    initial_accumulator_value: NonNegative = 0.0
    """starting value of the sum of squared gradients"""
    eps: NonNegative = 1e-10
    maximize: Flag = False


def init_leaf(param: torch.Tensor, config: Config) -> LeafState:
    value = config.initial_accumulator_value
    accumulator = torch.zeros_like(param) + value if isinstance(value, torch.Tensor) else torch.full_like(param, value)
    return {"step": ops.new_step(param), "sum": accumulator}


def update(param: torch.Tensor, grad: torch.Tensor, state: LeafState, config: Config):
    g = -grad if config.maximize else grad
    if not is_zero(config.weight_decay):
        g = ops.add(g, param, config.weight_decay)
    step = state["step"] + 1
    (decayed_lr,) = ops.once(ops.like(config.lr / (1 + (ops.step_count(step, param) - 1) * config.lr_decay), param))
    accumulator = ops.addcmul(state["sum"], g, g)
    new_param = ops.addcdiv(param, g, accumulator.sqrt() + config.eps, -decayed_lr)
    return new_param, {"step": step, "sum": accumulator}


GRID = Grid(
    fixed={"lr": 0.05, "eps": 1e-8},
    axes={
        "lr_decay": (0.0, 0.01),
        "initial_accumulator_value": (0.0, 0.1),
        "weight_decay": (0.0, 0.1),
        "maximize": (False, True),
    },
)
algorithm = Algorithm("adagrad", Config, init_leaf, update, torch.optim.Adagrad, grid=GRID)
init, step = algorithm.init, algorithm.step
