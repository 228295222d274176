r"""Adam with fully decoupled weight decay (Loshchilov & Hutter, 2019; the original optorch's
``decoupled_adam``; MosaicML Composer's ``DecoupledAdamW``).

AdamW shrinks the parameter by :math:`1 - \gamma_t\lambda`, so its decay strength depends on the
peak learning rate. Fully decoupled decay follows the *shape* of the schedule but not its scale:

.. math::

    \theta_{t-1} \leftarrow \Big(1 - \lambda\,\frac{\gamma_t}{\gamma_0}\Big)\,\theta_{t-1},

then the Adam step of :mod:`optorch.adam` with learning rate :math:`\gamma_t`. :math:`\gamma_0` is
``initial_lr``: the learning rate the schedule multiplies. It defaults to ``lr``, and in the shim to
each param group's own ``lr``, the key ``torch.optim.lr_scheduler`` also records as ``initial_lr``,
so a torch LR scheduler drives the decay factor. With a constant learning rate the decay is
:math:`\theta \leftarrow (1 - \lambda)\theta` per step, so ``weight_decay`` is typically ~1e-5..1e-4.

This equals ``torch.optim.AdamW`` with weight decay :math:`\lambda / \gamma_0` (up to the rounding of
the product). State: as :mod:`optorch.adam`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import model_validator

from ..core.algorithm import Algorithm, Reduction
from ..core.config import NonNegative
from ..core.scalars import is_zero
from . import adam

__all__ = ["Config", "init", "step", "algorithm"]


class Config(adam.Config):
    initial_lr: NonNegative | None = None
    """The schedule's base learning rate; ``None`` means ``lr`` (a constant schedule)."""
    decoupled_weight_decay: ClassVar[bool] = True
    field_descriptions: ClassVar[dict[str, str]] = {
        "weight_decay": "fraction of the parameter removed per step at the schedule's peak"
    }
    linked_defaults: ClassVar[dict[str, str]] = {"initial_lr": "lr"}

    @model_validator(mode="before")
    @classmethod
    def _initial_lr_defaults_to_lr(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("initial_lr") is None:
            values = {**values, "initial_lr": values.get("lr", cls.model_fields["lr"].default)}
        return values

    @model_validator(mode="after")
    def _initial_lr_positive(self) -> Config:
        if (
            not isinstance(self.initial_lr, torch.Tensor)
            and is_zero(self.initial_lr)
            and not is_zero(self.weight_decay)
        ):
            raise ValueError("initial_lr must be > 0 when weight_decay is set: the decay follows lr / initial_lr")
        return self

    def decay_rate(self):
        if is_zero(self.weight_decay):
            return 0.0  # no decay (initial_lr may be 0 then)
        return self.weight_decay * (self.lr / self.initial_lr)


_COMMON = {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6}
REDUCTIONS = (
    Reduction("adamw", {**_COMMON, "weight_decay": 0.01}, "AdamW", {**_COMMON, "weight_decay": 0.5}),
    Reduction(
        "adamw-amsgrad-maximize",
        {**_COMMON, "weight_decay": 0.01, "amsgrad": True, "maximize": True},
        "AdamW",
        {**_COMMON, "weight_decay": 0.5, "amsgrad": True, "maximize": True},
    ),
)
"""At a constant lr (= initial_lr), torch.optim.AdamW with weight_decay / lr: ``optorch verify`` checks both."""

algorithm = Algorithm("decoupled_adam", Config, adam.init_leaf, adam.update, reductions=REDUCTIONS)
init, step = algorithm.init, algorithm.step
