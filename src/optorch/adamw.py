r"""AdamW: Adam with decoupled weight decay (= ``torch.optim.AdamW``).

Same update as :mod:`optorch.adam` with ``decoupled_weight_decay=True``: before the Adam step the
parameter shrinks as :math:`\theta \leftarrow (1 - \gamma\lambda)\theta`, outside the moment estimates.
The default weight decay is 0.01, as in torch.optim.AdamW.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from . import adam
from .algorithm import Algorithm
from .config import NonNegative

__all__ = ["Config", "init", "step", "algorithm"]


class Config(adam.Config):
    weight_decay: NonNegative = 1e-2
    decoupled_weight_decay: ClassVar[bool] = True


algorithm = Algorithm("adamw", Config, adam.init_leaf, adam.update, torch.optim.AdamW)
init, step = algorithm.init, algorithm.step
