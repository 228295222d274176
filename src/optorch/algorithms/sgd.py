r"""SGD with momentum, dampening, Nesterov momentum, weight decay and maximize (= ``torch.optim.SGD``).

With gradient :math:`g_t`, learning rate :math:`\gamma`, momentum :math:`\mu`, dampening :math:`\tau`
and weight decay :math:`\lambda`:

.. math::

    d_t &= \pm g_t + \lambda\theta_{t-1} \qquad (-g_t \text{ when maximize}) \\
    b_t &= d_t \text{ at a parameter's first step, else } \mu b_{t-1} + (1 - \tau) d_t \\
    \theta_t &= \theta_{t-1} - \gamma\,(d_t + \mu b_t \text{ if nesterov else } b_t)

With :math:`\mu = 0` there is no buffer and :math:`\theta_t = \theta_{t-1} - \gamma d_t`.
State per parameter: ``step`` and, when momentum is non-zero, ``momentum_buffer``.
"""

from __future__ import annotations

import torch
from pydantic import model_validator

from ..core import ops
from ..core.algorithm import Algorithm, Grid, LeafState
from ..core.config import Config as _Config
from ..core.config import Flag, NonNegative, Probability, UnitInterval
from ..core.scalars import is_zero

__all__ = ["Config", "init", "step", "algorithm"]


class Config(_Config):
    lr: NonNegative = 1e-3
    momentum: Probability = 0.0
    dampening: UnitInterval = 0.0
    weight_decay: NonNegative = 0.0
    nesterov: Flag = False
    maximize: Flag = False

    @model_validator(mode="after")
    def _nesterov_needs_plain_momentum(self) -> Config:
        if self.nesterov and (is_zero(self.momentum) or not is_zero(self.dampening)):
            raise ValueError("nesterov requires a non-zero momentum and zero dampening")
        return self


def init_leaf(param: torch.Tensor, config: Config) -> LeafState:
    state = {"step": ops.new_step(param)}
    if not is_zero(config.momentum):
        state["momentum_buffer"] = torch.zeros_like(param)
    return state


def update(param: torch.Tensor, grad: torch.Tensor, state: LeafState, config: Config):
    d = -grad if config.maximize else grad
    if not is_zero(config.weight_decay):
        d = ops.add(d, param, config.weight_decay)
    new_state = {"step": state["step"] + 1}
    if "momentum_buffer" in state:
        # torch.optim starts the buffer as a copy of d, so dampening does not touch the first step.
        first = ops.step_count(state["step"], param) == 0
        if first is True:
            buf = d.clone()
        else:
            buf = ops.add(state["momentum_buffer"] * config.momentum, d, 1 - config.dampening)
            if isinstance(first, torch.Tensor):
                buf = torch.where(first, d, buf)
        new_state["momentum_buffer"] = buf
        d = ops.add(d, buf, config.momentum) if config.nesterov else buf
    return ops.add(param, d, -config.lr), new_state


def from_torch(state: LeafState) -> LeafState:
    # torch.optim.SGD keeps no step count; all the math needs is whether the buffer has started.
    if state.get("momentum_buffer", ...) is None:
        del state["momentum_buffer"]
    state.setdefault("step", torch.tensor(1.0 if "momentum_buffer" in state else 0.0))
    return state


def to_torch(state: LeafState) -> LeafState:
    del state["step"]
    return state


GRID = Grid(
    fixed={"lr": 0.05},
    axes={
        "momentum": (0.0, 0.9),
        "dampening": (0.0, 0.3),
        "nesterov": (False, True),
        "weight_decay": (0.0, 0.1),
        "maximize": (False, True),
    },
)
algorithm = Algorithm("sgd", Config, init_leaf, update, torch.optim.SGD, from_torch, to_torch, grid=GRID)
init, step = algorithm.init, algorithm.step
