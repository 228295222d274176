r"""NAdam: Adam with Nesterov momentum and momentum decay (= ``torch.optim.NAdam``).

With gradient :math:`g_t`, learning rate :math:`\gamma`, betas :math:`(\beta_1, \beta_2)`, momentum
decay :math:`\psi`, weight decay :math:`\lambda` and the parameter's step count :math:`t`:

.. math::

    g_t &\leftarrow \pm g_t + \lambda\theta_{t-1} \quad\text{(L2 decay; with decoupled decay instead }
        \theta_{t-1} \leftarrow (1 - \gamma\lambda)\theta_{t-1}) \\
    \mu_t &= \beta_1 \left(1 - \tfrac12\, 0.96^{t\psi}\right), \qquad
        \Pi_t = \Pi_{t-1}\,\mu_t \quad (\Pi_0 = 1) \\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
    d_t &= \sqrt{v_t / (1 - \beta_2^t)} + \epsilon \\
    \theta_t &= \theta_{t-1} - \frac{\gamma (1 - \mu_t)}{1 - \Pi_t}\,\frac{g_t}{d_t}
        - \frac{\gamma\,\mu_{t+1}}{1 - \Pi_t\,\mu_{t+1}}\,\frac{m_t}{d_t}

State per parameter: ``step``, ``mu_product`` (:math:`\Pi`, a 0-dim tensor in torch's scalar dtype,
float32 unless the default dtype is float64, so it is rounded to that every step, as torch's is),
``exp_avg`` (:math:`m`), ``exp_avg_sq`` (:math:`v`).
"""

from __future__ import annotations

import torch

from ..core import ops
from ..core.algorithm import Algorithm, Grid, LeafState
from ..core.config import Config as _Config
from ..core.config import Flag, NonNegative, Probability

__all__ = ["Config", "init", "step", "algorithm", "init_leaf", "update"]


class Config(_Config):
    lr: NonNegative = 2e-3
    betas: tuple[Probability, Probability] = (0.9, 0.999)
    eps: NonNegative = 1e-8
    weight_decay: NonNegative = 0.0
    momentum_decay: NonNegative = 4e-3
    """momentum decay of the mu schedule"""
    decoupled_weight_decay: Flag = False
    maximize: Flag = False


def init_leaf(param: torch.Tensor, config: Config) -> LeafState:
    mu_product = torch.ones((), dtype=ops.torch_scalar_dtype(), device=param.device)
    return {
        "step": ops.new_step(param),
        "mu_product": mu_product,
        "exp_avg": torch.zeros_like(param),
        "exp_avg_sq": torch.zeros_like(param),
    }


def update(param: torch.Tensor, grad: torch.Tensor, state: LeafState, config: Config):
    lr, (beta1, beta2), wd, psi = config.lr, config.betas, config.weight_decay, config.momentum_decay
    g = -grad if config.maximize else grad
    step = state["step"] + 1
    t = ops.step_count(step, param)
    param, g = ops.weight_decay(param, g, wd, lr * wd if config.decoupled_weight_decay else None)
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
    # The product lives in torch's scalar dtype (float32, float64 when that is the default dtype) and
    # is read back from there each step.
    mu_product = state["mu_product"] * ops.like(mu, state["mu_product"])
    product = ops.step_count(mu_product, param)
    exp_avg = ops.lerp(state["exp_avg"], g, 1 - beta1)
    exp_avg_sq = ops.addcmul(state["exp_avg_sq"] * beta2, g, g, 1 - beta2)
    bias_correction2, grad_weight, avg_weight = ops.once(
        ops.like(1 - beta2**t, param),
        ops.like(-lr * (1.0 - mu) / (1.0 - product), param),
        ops.like((-lr * mu_next) / (1.0 - product * mu_next), param),
    )
    denom = (exp_avg_sq / bias_correction2).sqrt() + config.eps
    # Two separate steps, in torch's order: the gradient's share, then the momentum's.
    param = ops.addcdiv(ops.addcdiv(param, g, denom, grad_weight), exp_avg, denom, avg_weight)
    return param, {"step": step, "mu_product": mu_product, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


GRID = Grid(
    fixed={"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6, "momentum_decay": 0.01},
    axes={"weight_decay": (0.0, 0.1), "decoupled_weight_decay": (False, True), "maximize": (False, True)},
)
algorithm = Algorithm("nadam", Config, init_leaf, update, torch.optim.NAdam, grid=GRID)
init, step = algorithm.init, algorithm.step
