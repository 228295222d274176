r"""Adamax: Adam with an infinity-norm second moment (= ``torch.optim.Adamax``).

With gradient :math:`g_t`, learning rate :math:`\gamma`, betas :math:`(\beta_1, \beta_2)`, weight decay
:math:`\lambda` and the parameter's step count :math:`t`:

.. math::

    g_t &\leftarrow \pm g_t + \lambda\theta_{t-1} \\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
    u_t &= \max(\beta_2 u_{t-1},\ |g_t| + \epsilon) \\
    \theta_t &= \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t}\,\frac{m_t}{u_t}

A complex parameter is two real ones: :math:`|g|` is taken per real component, as torch does.
State per parameter: ``step``, ``exp_avg`` (:math:`m`), ``exp_inf`` (:math:`u`).
"""

from __future__ import annotations

import torch

from ..core import ops
from ..core.algorithm import Algorithm, Grid, LeafState
from ..core.config import Config as _Config
from ..core.config import Flag, NonNegative, Probability
from ..core.scalars import is_zero

__all__ = ["Config", "init", "step", "algorithm", "init_leaf", "update"]


class Config(_Config):
    lr: NonNegative = 2e-3
    betas: tuple[Probability, Probability] = (0.9, 0.999)
    eps: NonNegative = 1e-8
    weight_decay: NonNegative = 0.0
    maximize: Flag = False


def init_leaf(param: torch.Tensor, config: Config) -> LeafState:
    return {"step": ops.new_step(param), "exp_avg": torch.zeros_like(param), "exp_inf": torch.zeros_like(param)}


def update(param: torch.Tensor, grad: torch.Tensor, state: LeafState, config: Config):
    (beta1, beta2), wd = config.betas, config.weight_decay
    g = -grad if config.maximize else grad
    if not is_zero(wd):
        g = ops.add(g, param, wd)
    step = state["step"] + 1
    exp_avg = ops.lerp(state["exp_avg"], g, 1 - beta1)
    exp_inf = torch.maximum(state["exp_inf"] * beta2, g.abs() + config.eps)
    (step_size,) = ops.once(ops.like(config.lr / (1 - beta1 ** ops.step_count(step, param)), param))
    new_param = ops.addcdiv(param, exp_avg, exp_inf, -step_size)
    return new_param, {"step": step, "exp_avg": exp_avg, "exp_inf": exp_inf}


# beta2=0.99 and eps=1e-3 on purpose: with beta2=0.95, eps=1e-6 the steps are sign-like near the
# optimum and this problem turns chaotic in float32 (lr * (1 + 1e-7) moved torch's own trajectory by
# 6e-4 in 100 steps); with these, by 4e-7, so the float32 check can tell rounding from errors.
GRID = Grid(
    fixed={"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-3},
    axes={"weight_decay": (0.0, 0.1), "maximize": (False, True)},
)
algorithm = Algorithm("adamax", Config, init_leaf, update, torch.optim.Adamax, grid=GRID)
init, step = algorithm.init, algorithm.step
