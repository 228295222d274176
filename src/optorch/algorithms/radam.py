r"""RAdam: Adam with a rectified adaptive learning rate (= ``torch.optim.RAdam``).

With gradient :math:`g_t`, learning rate :math:`\gamma`, betas :math:`(\beta_1, \beta_2)`, weight decay
:math:`\lambda` and the parameter's step count :math:`t`:

.. math::

    g_t &\leftarrow \pm g_t + \lambda\theta_{t-1} \quad\text{(L2 decay; with decoupled decay instead }
        \theta_{t-1} \leftarrow (1 - \gamma\lambda)\theta_{t-1}) \\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
    \rho_\infty &= \frac{2}{1 - \beta_2} - 1, \qquad
        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t} \\
    r_t &= \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}, \qquad
        l_t = \frac{\sqrt{1 - \beta_2^t}}{\sqrt{v_t} + \epsilon} \\
    \theta_t &= \theta_{t-1} - \gamma\,\frac{m_t}{1 - \beta_1^t}\cdot
        \begin{cases} l_t\, r_t & \rho_t > 5 \\ 1 & \text{otherwise} \end{cases}

State per parameter: ``step``, ``exp_avg`` (:math:`m`), ``exp_avg_sq`` (:math:`v`).
"""

from __future__ import annotations

import torch

from ..core import ops
from ..core.algorithm import Algorithm, Grid, LeafState
from ..core.config import Config as _Config
from ..core.config import Flag, NonNegative, Probability

__all__ = ["Config", "init", "step", "algorithm", "init_leaf", "update"]


class Config(_Config):
    lr: NonNegative = 1e-3
    betas: tuple[Probability, Probability] = (0.9, 0.999)
    eps: NonNegative = 1e-8
    weight_decay: NonNegative = 0.0
    decoupled_weight_decay: Flag = False
    maximize: Flag = False


def init_leaf(param: torch.Tensor, config: Config) -> LeafState:
    return {"step": ops.new_step(param), "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}


def update(param: torch.Tensor, grad: torch.Tensor, state: LeafState, config: Config):
    lr, (beta1, beta2), wd = config.lr, config.betas, config.weight_decay
    g = -grad if config.maximize else grad
    step = state["step"] + 1
    t = ops.step_count(step, param)
    param, g = ops.weight_decay(param, g, wd, lr * wd if config.decoupled_weight_decay else None)
    exp_avg = ops.lerp(state["exp_avg"], g, 1 - beta1)
    exp_avg_sq = ops.addcmul(state["exp_avg_sq"] * beta2, g, g, 1 - beta2)
    new_state = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    bias_correction1, bias_correction2 = 1 - beta1**t, 1 - beta2**t
    rho_inf = 2 / (1 - beta2) - 1
    rho = rho_inf - 2 * t * (beta2**t) / bias_correction2
    if isinstance(rho, torch.Tensor):  # no host branch: clamp so the unused branch has no NaN (or NaN grads)
        rectified, rho = rho > 5.0, torch.clamp(rho, min=5.0)
    rect = ((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)) ** 0.5
    corrected = exp_avg / ops.like(bias_correction1, param)
    adaptive = ops.like(bias_correction2**0.5, param) / (exp_avg_sq.sqrt() + config.eps)
    if not isinstance(rho, torch.Tensor):  # torch's order of the products, on the host's branch
        step_ = corrected * lr * adaptive * rect if rho > 5.0 else corrected * lr
        return ops.add(param, step_, -1.0), new_state
    scale = torch.where(rectified, ops.like(rect, param) * adaptive, torch.ones_like(adaptive))
    return param - corrected * ops.like(lr, param) * scale, new_state


GRID = Grid(
    fixed={"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6},
    axes={"weight_decay": (0.0, 0.1), "decoupled_weight_decay": (False, True), "maximize": (False, True)},
)
algorithm = Algorithm("radam", Config, init_leaf, update, torch.optim.RAdam, grid=GRID)
init, step = algorithm.init, algorithm.step
