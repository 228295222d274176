r"""ADOPT (Taniguchi et al., NeurIPS 2024), as ``torch-adopt`` 0.1.0 (``adopt.ADOPT``) computes it.

ADOPT divides each gradient by the square root of the *previous* second-moment estimate, clips the
result, and only then applies momentum; there is no bias correction. With learning rate
:math:`\gamma`, betas :math:`(\beta_1, \beta_2)`, floor :math:`\epsilon`, weight decay
:math:`\lambda`, clip exponent :math:`e` and :math:`k` the parameter's step count *before* the call:

.. math::

    g &\leftarrow \pm g + \lambda\theta \quad\text{(coupled decay; } -g \text{ when maximize)} \\
    k = 0 &: \quad v \leftarrow v + g^2 \quad\text{(and nothing else: } \theta \text{ and } m
        \text{ are unchanged)} \\
    k \ge 1 &: \quad \theta' = (1 - \gamma\lambda)\,\theta \text{ if decouple, else } \theta \\
        &\qquad u = \operatorname{clip}\bigl(g / \max(\sqrt{v}, \epsilon),\ \pm k^{e}\bigr)
        \quad\text{(no clip when } e \text{ is None)} \\
        &\qquad m \leftarrow \beta_1 m + (1 - \beta_1)\,u, \qquad \theta \leftarrow \theta' - \gamma m \\
        &\qquad v \leftarrow \beta_2 v + (1 - \beta_2)\,g^2 \quad\text{(after it was used)}

and :math:`k \leftarrow k + 1`. :math:`\epsilon` is a floor on :math:`\sqrt v`, not added to it. The clip
bound at the first real update (the second call) is :math:`1^e = 1`. Complex parameters are stepped as
pairs of reals, so :math:`v` holds :math:`\mathrm{re}^2` and :math:`\mathrm{im}^2` separately.
State per parameter, named as torch-adopt's ``state_dict``: ``step``, ``exp_avg`` (:math:`m`),
``exp_avg_sq`` (:math:`v`).

torch-adopt takes a callable ``clip_lambda(step)``; a config holds numbers only, so ``clip_exponent``
:math:`e` stands for ``clip_lambda=lambda step: step ** e`` (the default ``0.25`` is torch-adopt's
default) and ``None`` for ``clip_lambda=None`` (the adapter ``optorch verify`` and the tests compare
through: :func:`optorch.tools.references.torch_adopt`).
"""

from __future__ import annotations

import numbers
from typing import Annotated

import torch

from ..core import ops
from ..core.algorithm import Algorithm, Grid, LeafState
from ..core.config import Config as _Config
from ..core.config import Flag, NonNegative, Probability, Scalar, _bounded
from ..core.scalars import is_zero

__all__ = ["Config", "init", "step", "algorithm", "init_leaf", "update"]


class Config(_Config):
    lr: NonNegative = 1e-3
    betas: tuple[Probability, Probability] = (0.9, 0.9999)
    eps: NonNegative = 1e-6
    """floor on the square root of the second moment"""
    clip_exponent: Annotated[Scalar, _bounded(lambda v: 0.0 <= v <= 19.0, "in [0, 19]")] | None = 0.25
    """The clip bound at step count k is ``k ** clip_exponent`` (finite in float64 for every k up to
    2**53 when the exponent is at most 19); None: no clipping."""
    weight_decay: NonNegative = 0.0
    decouple: Flag = False
    """decoupled weight decay (skipped on the first call) instead of an L2 penalty"""
    maximize: Flag = False


def init_leaf(param: torch.Tensor, config: Config) -> LeafState:
    return {"step": ops.new_step(param), "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}


def update(param: torch.Tensor, grad: torch.Tensor, state: LeafState, config: Config):
    lr, (beta1, beta2), wd = config.lr, config.betas, config.weight_decay
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    g = -grad if config.maximize else grad
    if not is_zero(wd) and not config.decouple:
        g = ops.add(g, param, wd)  # before the first-call check: v starts from (g + wd*p)^2
    k = ops.step_count(state["step"], param)
    new_step = state["step"] + 1
    if isinstance(k, numbers.Number) and k == 0:
        # The first call only initialises v (no decay, no move); a number k can branch for free.
        return param.clone(), {
            "step": new_step,
            "exp_avg": exp_avg.clone(),
            "exp_avg_sq": ops.addcmul(exp_avg_sq, g, g),
        }

    theta = param
    if not is_zero(wd) and config.decouple:
        theta = ops.add(param, param, -lr * wd)  # p + (-lr*wd)*p, torch-adopt's rounding
    denom = torch.clamp(exp_avg_sq.sqrt(), min=ops.like(config.eps, param))
    u = g / denom
    if config.clip_exponent is not None:
        # Once per step: compiled, a float64 pow inlined into the element-wise loop would run per vector.
        bound = ops.like(k**config.clip_exponent, param)
        low, high = ops.once(-bound, bound)
        u = torch.clamp(u, low, high)
    step_size, weight1, weight2 = ops.once(-lr, 1 - beta1, 1 - beta2)
    new_avg = ops.lerp(exp_avg, u, weight1)
    new_param = ops.add(theta, new_avg, step_size)
    new_sq = ops.addcmul(exp_avg_sq * beta2, g, g, weight2)
    if not isinstance(k, numbers.Number):
        # A tensor step count (compiled, torch.func, other devices): pick the first-call result
        # element-wise instead of branching, so nothing syncs and one graph serves every step.
        first = k == 0
        new_param = torch.where(first, param, new_param)
        new_avg = torch.where(first, exp_avg, new_avg)
        new_sq = torch.where(first, ops.addcmul(exp_avg_sq, g, g), new_sq)
    return new_param, {"step": new_step, "exp_avg": new_avg, "exp_avg_sq": new_sq}


# beta2 near ADOPT's default: with a fast v (0.95) the normalised step stays O(1) as the gradients shrink,
# and on verify's problem the trajectory turns chaotic near step 90 (one-ulp differences between any two
# roundings of the same math, e.g. the compiled engine's, grow to 1e-12 by step 100, 5e-4 in float32).
GRID = Grid(
    fixed={"lr": 0.01, "betas": (0.8, 0.999), "eps": 1e-4},
    axes={
        "weight_decay": (0.0, 0.1),
        "decouple": (False, True),
        "maximize": (False, True),
        "clip_exponent": (0.25, 0.5, None),
    },
)
algorithm = Algorithm("adopt", Config, init_leaf, update, grid=GRID)
init, step = algorithm.init, algorithm.step
