r"""ASGD: averaged stochastic gradient descent (= ``torch.optim.ASGD``).

With gradient :math:`g_t`, learning rate :math:`\gamma`, decay :math:`\lambda` (``lambd``), power
:math:`\alpha`, averaging start :math:`t_0`, weight decay :math:`w` and the parameter's step count
:math:`t`:

.. math::

    g_t &\leftarrow \pm g_t + w\,\theta_{t-1} \\
    \theta_t &= (1 - \lambda\eta_{t-1})\,\theta_{t-1} - \eta_{t-1} g_t, \qquad \eta_0 = \gamma \\
    \bar\theta_t &= \bar\theta_{t-1} + \mu_{t-1}(\theta_t - \bar\theta_{t-1})
        \quad(\bar\theta_t = \theta_t \text{ while } \mu_{t-1} = 1), \qquad \mu_0 = 1 \\
    \eta_t &= \gamma / (1 + \lambda\gamma t)^{\alpha}, \qquad \mu_t = 1 / \max(1, t - t_0)

:math:`\bar\theta` (``ax``) is the running average, kept in the state and never fed back.
State per parameter: ``step``, ``eta`` and ``mu`` (0-dim tensors in torch's scalar dtype, float32 unless
the default dtype is float64, and rounded to it, as torch's are), ``ax`` (:math:`\bar\theta`).
"""

from __future__ import annotations

import torch

from . import ops
from .algorithm import Algorithm, Grid, LeafState
from .config import Config as _Config
from .config import Flag, NonNegative, Scalar, UnitInterval, is_zero

__all__ = ["Config", "init", "step", "algorithm", "init_leaf", "update"]


class Config(_Config):
    lr: NonNegative = 1e-2
    lambd: NonNegative = 1e-4
    alpha: UnitInterval = 0.75  # above 1, (1 + lambd * lr * t) ** alpha overflows (an error, in torch too) in long runs
    t0: Scalar = 1e6
    weight_decay: NonNegative = 0.0
    maximize: Flag = False


def _scalar(value, like: torch.Tensor) -> torch.Tensor:
    """A per-tensor scalar state entry (``like``'s dtype and device) holding ``value``."""
    # torch's ASGD makes the new value a tensor of the default dtype before copying it into the state,
    # so a float64 state (after a checkpoint load) still holds float32-rounded values. (From a tensor
    # hyperparameter torch keeps the tensor's dtype; here a tensor is rounded as a number is, since the
    # shim's compiled engine passes every number as a tensor.)
    value = value.to(torch.get_default_dtype()) if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    return value.to(device=like.device, dtype=like.dtype, copy=True)


def init_leaf(param: torch.Tensor, config: Config) -> LeafState:
    step = ops.new_step(param)  # eta and mu share its dtype, torch's scalar dtype, as in torch
    return {"step": step, "eta": _scalar(config.lr, step), "mu": torch.ones_like(step), "ax": torch.zeros_like(param)}


def update(param: torch.Tensor, grad: torch.Tensor, state: LeafState, config: Config):
    lr, lambd = config.lr, config.lambd
    g = -grad if config.maximize else grad
    if not is_zero(config.weight_decay):
        g = ops.add(g, param, config.weight_decay)
    step = state["step"] + 1
    eta, mu = ops.step_count(state["eta"], param), ops.step_count(state["mu"], param)
    param = ops.add(param * ops.like(1 - lambd * eta, param), g, -ops.like(eta, param))
    ax = state["ax"]
    if isinstance(mu, torch.Tensor):
        ax = torch.where(mu == 1, param, ax + (param - ax) * ops.like(mu, param))
    else:  # torch copies the param while mu is exactly 1
        ax = param.clone() if mu == 1 else ax + (param - ax) * mu
    t = ops.step_count(step, param)
    new_eta = lr / ((1 + lambd * lr * t) ** config.alpha)
    new_mu = 1 / (torch.clamp(t - config.t0, min=1) if isinstance(t, torch.Tensor) else max(1, t - config.t0))
    new_state = {"step": step, "eta": _scalar(new_eta, state["eta"]), "mu": _scalar(new_mu, state["mu"]), "ax": ax}
    return param, new_state


GRID = Grid(
    fixed={"lr": 0.02, "lambd": 0.01, "alpha": 0.6, "t0": 20.0},
    axes={"weight_decay": (0.0, 0.1), "maximize": (False, True)},
)
algorithm = Algorithm("asgd", Config, init_leaf, update, torch.optim.ASGD, grid=GRID)
init, step = algorithm.init, algorithm.step
