r"""AdamW: Adam with decoupled weight decay (= ``torch.optim.AdamW``).

Same update as :mod:`optorch.adam` with ``decoupled_weight_decay=True``: before the Adam step the
parameter shrinks as :math:`\theta \leftarrow (1 - \gamma\lambda)\theta`, outside the moment estimates.
The default weight decay is 0.01, as in torch.optim.AdamW.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..core.algorithm import Algorithm, Grid
from ..core.config import NonNegative
from . import adam

__all__ = ["Config", "init", "step", "algorithm"]


class Config(adam.Config):
    weight_decay: NonNegative = 1e-2
    decoupled_weight_decay: ClassVar[bool] = True


GRID = Grid(
    fixed={"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6},
    axes={"amsgrad": (False, True), "weight_decay": (0.0, 0.1), "maximize": (False, True)},
)
algorithm = Algorithm("adamw", Config, adam.init_leaf, adam.update, torch.optim.AdamW, grid=GRID)
init, step = algorithm.init, algorithm.step
