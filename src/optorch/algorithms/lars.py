r"""LARS: layer-wise adaptive rate scaling on top of SGD with momentum (You, Gitman, Ginsburg 2017).

"Large Batch Training of Convolutional Networks" (arXiv:1708.03888), Algorithm 1, gives each tensor
(each "layer") its own local learning rate
:math:`\eta\,\|\theta\| / (\|\nabla L\| + \beta\|\theta\|)` and applies it to the decayed gradient
:math:`\nabla L + \beta\theta`. The form used here is that one with NVIDIA apex's ``LARC`` additions
(``apex.parallel.LARC``, scale mode): an ``eps`` in the denominator, and a ratio of 1 when either
norm is zero (a zero-initialised bias would otherwise never move). With gradient :math:`g_t`,
learning rate :math:`\gamma`, trust coefficient :math:`\eta`, weight decay :math:`\lambda`,
momentum :math:`\mu`, dampening :math:`\tau`:

.. math::

    d_t &= \pm g_t \qquad (-g_t \text{ when maximize}) \\
    r_t &= \frac{\eta\,\|\theta_{t-1}\|}{\|d_t\| + \lambda\|\theta_{t-1}\| + \epsilon}
           \text{ if } \|\theta_{t-1}\| > 0 \text{ and } \|d_t\| > 0, \text{ else } 1 \\
    u_t &= r_t\,(d_t + \lambda\theta_{t-1}) \\
    b_t &= u_t \text{ at a parameter's first step, else } \mu b_{t-1} + (1 - \tau) u_t \\
    \theta_t &= \theta_{t-1} - \gamma\,(u_t + \mu b_t \text{ if nesterov else } b_t)

that is, ``optorch.sgd`` (= ``torch.optim.SGD``, its buffer convention included) run on the scaled,
decayed gradient :math:`u_t`. Norms are Frobenius norms over the whole tensor. The paper keeps
:math:`\gamma` inside the buffer (:math:`v = \mu v + \gamma u`, :math:`\theta = \theta - v`); with a
constant :math:`\gamma` that is the same trajectory, and keeping it outside (as torch.optim.SGD,
apex's LARC and pytorch_optimizer's LARS do) makes a learning-rate schedule act at once.

**Excluded tensors** (usual practice for biases and normalisation weights) skip both the trust ratio
and the decay: :math:`u_t = d_t`, plain SGD with momentum. ``exclude_1d=True`` excludes every tensor
with at most one dimension; ``exclude=True`` excludes every tensor the config applies to, which is
how to exclude by name: put those parameters in a param group with ``"exclude": True``
(:func:`param_groups` does the split from ``model.named_parameters()``).

Conventions where pytorch_optimizer's ``LARS`` (the independent reference, adapted to these keys by
:func:`optorch.tools.references.pytorch_optimizer_lars`) differs, each tested in ``tests/test_lars.py``: it
has no ``eps`` (ours with ``eps=0`` matches); it always excludes tensors with ``ndim <= 1`` (ours:
``exclude_1d``); its ratio falls back to 1 only when :math:`\|\theta\| = 0` or the whole denominator is
zero, so a zero gradient with :math:`\lambda > 0` gets :math:`\eta/\lambda` there and 1 here; its buffer
starts at zero, so with dampening its first step is :math:`(1 - \tau)` times ours (torch.optim.SGD's
convention, kept here).

State per parameter: ``step`` and, when momentum is non-zero, ``momentum_buffer`` (as torch.optim.SGD).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, ClassVar, NamedTuple

import torch
from pydantic import model_validator

from ..core import ops
from ..core.algorithm import Algorithm, Grid, LeafState
from ..core.config import Config as _Config
from ..core.config import Flag, NonNegative, Probability, UnitInterval
from ..core.scalars import is_zero
from . import sgd

__all__ = ["Config", "init", "step", "algorithm", "trust_ratio", "param_groups"]


class Config(_Config):
    accepted_keys: ClassVar[tuple[str, ...]] = ("max_lr",)
    """The original optorch's ``LARSConfig`` called the learning rate ``max_lr``."""

    lr: NonNegative = 0.1
    momentum: Probability = 0.9
    dampening: UnitInterval = 0.0
    weight_decay: NonNegative = 0.0
    trust_coefficient: NonNegative = 1e-3
    """trust coefficient of the layer-wise ratio"""
    eps: NonNegative = 1e-8
    """added to the trust ratio's denominator"""
    nesterov: Flag = False
    maximize: Flag = False
    exclude_1d: Flag = False
    """Exclude tensors with ``ndim <= 1`` (biases, norm weights, scalars) from the trust ratio and decay."""
    exclude: Flag = False
    """Exclude every tensor under this config (set it on a param group to exclude params by name)."""

    @model_validator(mode="before")
    @classmethod
    def _max_lr_is_lr(cls, values: Any) -> Any:
        if isinstance(values, dict) and "max_lr" in values:
            values = dict(values)
            if "lr" in values:
                raise ValueError("give lr or max_lr (the original optorch's name for lr), not both")
            values["lr"] = values.pop("max_lr")
        return values

    @model_validator(mode="after")
    def _nesterov_needs_plain_momentum(self) -> Config:
        if self.nesterov and (is_zero(self.momentum) or not is_zero(self.dampening)):
            raise ValueError("nesterov requires a non-zero momentum and zero dampening")
        return self


init_leaf = sgd.init_leaf  # step, and momentum_buffer when momentum is non-zero


def is_excluded(param: torch.Tensor, config: Config) -> bool:
    return config.exclude or (config.exclude_1d and param.dim() <= 1)


def trust_ratio(param: torch.Tensor, grad: torch.Tensor, config: Config) -> torch.Tensor:
    """The 0-dim local rate r of one tensor (1 where either norm is zero), without host syncs."""
    param_norm = ops.norm(param)
    grad_norm = ops.norm(grad)
    adapt = (param_norm > 0) & (grad_norm > 0)
    denominator = grad_norm + config.weight_decay * param_norm + config.eps
    # The unselected branch must stay finite too: torch.func.grad through where() would turn a 0/0 into NaN.
    denominator = torch.where(adapt, denominator, 1.0)
    return torch.where(adapt, config.trust_coefficient * param_norm / denominator, 1.0)


class _Momentum(NamedTuple):
    """The fields sgd.update reads (a NamedTuple, which torch.compile traces without a graph break)."""

    lr: Any
    momentum: Any
    dampening: Any
    nesterov: bool
    weight_decay: float = 0.0
    maximize: bool = False


def update(param: torch.Tensor, grad: torch.Tensor, state: LeafState, config: Config):
    d = -grad if config.maximize else grad
    if not is_excluded(param, config):
        ratio = trust_ratio(param, d, config)
        if not is_zero(config.weight_decay):
            d = ops.add(d, param, config.weight_decay)
        d = d * ratio
    # The rest is SGD with momentum on d (sign and decay already applied), so its buffer convention is
    # torch.optim.SGD's exactly.
    return sgd.update(param, d, state, _Momentum(config.lr, config.momentum, config.dampening, config.nesterov))


def param_groups(
    named_parameters: Iterable[tuple[str, torch.Tensor]], pattern: str = r"bias|norm|bn", **options: Any
) -> list[dict[str, Any]]:
    """Split ``model.named_parameters()`` into ``[{"params": adapted}, {"params": excluded, "exclude": True}]``,
    excluding the params whose name matches ``pattern`` (``re.search``); ``options`` go to both groups.
    Empty groups are left out. Pass the result to ``optorch.build``."""
    adapted, excluded = [], []
    for name, param in named_parameters:
        (excluded if re.search(pattern, name) else adapted).append(param)
    groups = [{"params": adapted, **options}, {"params": excluded, **options, "exclude": True}]
    return [group for group in groups if group["params"]]


GRID = Grid(
    fixed={"lr": 0.1, "trust_coefficient": 0.05, "eps": 0.0, "exclude_1d": True},
    axes={"momentum": (0.0, 0.9), "nesterov": (False, True), "weight_decay": (0.0, 0.01), "maximize": (False, True)},
)
algorithm = Algorithm(
    "lars",
    Config,
    init_leaf,
    update,
    from_torch=sgd.from_torch,
    to_torch=sgd.to_torch,
    grid=GRID,
    elementwise=False,
)
init, step = algorithm.init, algorithm.step
