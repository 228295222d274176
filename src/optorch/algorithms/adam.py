r"""Adam with AMSGrad, L2 or decoupled weight decay, and maximize (= ``torch.optim.Adam``).

With gradient :math:`g_t`, learning rate :math:`\gamma`, betas :math:`(\beta_1, \beta_2)`, weight decay
:math:`\lambda` and step count :math:`t`:

.. math::

    g_t &\leftarrow \pm g_t + \lambda\theta_{t-1} \quad\text{(L2 decay; with decoupled decay instead }
        \theta_{t-1} \leftarrow (1 - \gamma\lambda)\theta_{t-1}) \\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
    v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \qquad
        \hat v_t = \max(\hat v_{t-1}, v_t) \text{ with amsgrad, else } v_t \\
    \theta_t &= \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t}\,
        \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

State per parameter: ``step``, ``exp_avg`` (:math:`m`), ``exp_avg_sq`` (:math:`v`) and, with amsgrad,
``max_exp_avg_sq`` (:math:`\hat v`).
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
    amsgrad: Flag = False
    maximize: Flag = False
    decoupled_weight_decay: Flag = False

    def decay_rate(self):
        """The fraction of the parameter that decoupled decay removes per step: lr * weight_decay."""
        return self.lr * self.weight_decay


def init_leaf(param: torch.Tensor, config: Config) -> LeafState:
    state = {"step": ops.new_step(param), "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}
    if config.amsgrad:
        state["max_exp_avg_sq"] = torch.zeros_like(param)
    return state


def update(param: torch.Tensor, grad: torch.Tensor, state: LeafState, config: Config):
    lr, (beta1, beta2), wd = config.lr, config.betas, config.weight_decay
    g = -grad if config.maximize else grad
    step = state["step"] + 1
    param, g = ops.weight_decay(param, g, wd, config.decay_rate() if config.decoupled_weight_decay else None)
    exp_avg = ops.lerp(state["exp_avg"], g, 1 - beta1)
    exp_avg_sq = ops.addcmul(state["exp_avg_sq"] * beta2, g, g, 1 - beta2)
    new_state = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if config.amsgrad:
        exp_avg_sq = new_state["max_exp_avg_sq"] = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq)
    # Bias corrections in double precision, then rounded to the param's dtype, as torch.optim's are.
    t = ops.step_count(step, param)
    step_size, bias_correction2_sqrt = ops.once(
        ops.like(lr / (1 - beta1**t), param), ops.like((1 - beta2**t) ** 0.5, param)
    )
    denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + config.eps
    return ops.addcdiv(param, exp_avg, denom, -step_size), new_state


GRID = Grid(
    fixed={"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6},
    axes={
        "amsgrad": (False, True),
        "weight_decay": (0.0, 0.1),
        "maximize": (False, True),
        "decoupled_weight_decay": (False, True),
    },
)
algorithm = Algorithm("adam", Config, init_leaf, update, torch.optim.Adam, grid=GRID)
init, step = algorithm.init, algorithm.step
