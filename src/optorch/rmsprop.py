r"""RMSprop with momentum, centering, weight decay and maximize (= ``torch.optim.RMSprop``).

With gradient :math:`g_t`, learning rate :math:`\gamma`, smoothing :math:`\alpha`, momentum :math:`\mu`
and weight decay :math:`\lambda`:

.. math::

    g_t &\leftarrow \pm g_t + \lambda\theta_{t-1} \\
    v_t &= \alpha v_{t-1} + (1 - \alpha) g_t^2 \\
    \bar g_t &= \alpha \bar g_{t-1} + (1 - \alpha) g_t \quad\text{(centered only)} \\
    s_t &= \sqrt{v_t - \bar g_t^2} + \epsilon \text{ if centered, else } \sqrt{v_t} + \epsilon \\
    b_t &= \mu b_{t-1} + g_t / s_t, \qquad \theta_t = \theta_{t-1} - \gamma b_t
        \quad (\text{without momentum } \theta_t = \theta_{t-1} - \gamma g_t / s_t)

State per parameter: ``step``, ``square_avg`` (:math:`v`), ``momentum_buffer`` when momentum is
non-zero, ``grad_avg`` (:math:`\bar g`) when centered.
"""

from __future__ import annotations

import torch

from . import ops
from .algorithm import Algorithm, Grid, LeafState
from .config import Config as _Config
from .config import Flag, NonNegative, Probability, UnitInterval, is_zero

__all__ = ["Config", "init", "step", "algorithm"]


class Config(_Config):
    lr: NonNegative = 1e-2
    alpha: UnitInterval = 0.99
    eps: NonNegative = 1e-8
    weight_decay: NonNegative = 0.0
    momentum: Probability = 0.0
    centered: Flag = False
    maximize: Flag = False


def init_leaf(param: torch.Tensor, config: Config) -> LeafState:
    state = {"step": ops.new_step(param), "square_avg": torch.zeros_like(param)}
    if not is_zero(config.momentum):
        state["momentum_buffer"] = torch.zeros_like(param)
    if config.centered:
        state["grad_avg"] = torch.zeros_like(param)
    return state


def update(param: torch.Tensor, grad: torch.Tensor, state: LeafState, config: Config):
    alpha = config.alpha
    g = -grad if config.maximize else grad
    if not is_zero(config.weight_decay):
        g = ops.add(g, param, config.weight_decay)
    square_avg = ops.addcmul(state["square_avg"] * alpha, g, g, 1 - alpha)
    new_state = {"step": state["step"] + 1, "square_avg": square_avg}
    if config.centered:
        grad_avg = new_state["grad_avg"] = ops.lerp(state["grad_avg"], g, 1 - alpha)
        avg = ops.addcmul(square_avg, grad_avg, grad_avg, -1.0).sqrt() + config.eps
    else:
        avg = square_avg.sqrt() + config.eps
    if "momentum_buffer" in state:
        buf = new_state["momentum_buffer"] = ops.addcdiv(state["momentum_buffer"] * config.momentum, g, avg)
        return ops.add(param, buf, -config.lr), new_state
    return ops.addcdiv(param, g, avg, -config.lr), new_state


# eps is large on purpose: with alpha=0.9 the second moment tracks g**2 closely, so near an optimum
# RMSprop takes sign-like steps and a one-ulp difference in g (an FMA here, a multiply-add there) can
# flip one; with eps=1e-6 float64 rounding grew to 7.6e-3 in 100 steps (torch's kernel against itself
# with tensor hyperparameters). eps=1e-2, comparable to sqrt(v) here, bounds that sensitivity.
GRID = Grid(
    fixed={"lr": 0.005, "alpha": 0.9, "eps": 1e-2},
    axes={"centered": (False, True), "momentum": (0.0, 0.9), "weight_decay": (0.0, 0.1), "maximize": (False, True)},
)
algorithm = Algorithm("rmsprop", Config, init_leaf, update, torch.optim.RMSprop, grid=GRID)
init, step = algorithm.init, algorithm.step
