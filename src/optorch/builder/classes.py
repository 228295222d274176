"""One ``torch.optim``-style class per registered algorithm: ``optorch.optim.ADOPT(params, lr=1e-3)``.

Each class is :class:`optorch.Optimizer` for one algorithm, built from keyword arguments as
``optorch.build({"name": ..., **kwargs}, params)`` builds it from a config dict: the algorithm's keys
and the builder's entries (``schedule``, ``clip_grad_norm``, ``ema``, ...), plus ``engine`` and
``partition_group``. A class is what wrappers that construct the optimizer themselves expect
(ZeroRedundancyOptimizer's ``optimizer_class``, a Lightning CLI ``class_path``)::

    ZeroRedundancyOptimizer(model.parameters(), optimizer_class=optorch.optim.ADOPT, lr=1e-3)

Class names follow torch.optim where it has the algorithm (``SGD``, ``AdamW``, ``RMSprop``, ...) and
the original's otherwise (``ADOPT``, ``DAG``, ``AutoSGM``, ``LARS``, ``DecoupledAdam``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..algorithms import registry
from ..shim.optimizer import Optimizer
from .make import build

NAMES = {
    "sgd": "SGD",
    "adam": "Adam",
    "adamw": "AdamW",
    "decoupled_adam": "DecoupledAdam",
    "rmsprop": "RMSprop",
    "adagrad": "Adagrad",
    "nadam": "NAdam",
    "radam": "RAdam",
    "adamax": "Adamax",
    "adadelta": "Adadelta",
    "rprop": "Rprop",
    "asgd": "ASGD",
    "dag": "DAG",
    "autosgm": "AutoSGM",
    "lars": "LARS",
    "adopt": "ADOPT",
    "adafactor": "Adafactor",
}
"""Registered name -> class name (the registry's own names, for the built-in algorithms)."""


class _Named(Optimizer):
    algorithm_name: str = ""

    def __init__(self, params: Iterable[Any], *, engine: str = "auto", partition_group: Any = None, **config: Any):
        build(
            {"name": self.algorithm_name, **config}, params, engine=engine, partition_group=partition_group, into=self
        )


def _class(name: str) -> type[Optimizer]:
    algorithm = registry.get(name)
    return type(
        NAMES[name],
        (_Named,),
        {
            "algorithm_name": name,
            "__module__": "optorch.optim",  # the public path (an alias of this module)
            "__doc__": f"optorch's {name} as a torch.optim-style class: ``{NAMES[name]}(params, **config)`` is "
            f"``optorch.build({{'name': {name!r}, **config}}, params)``; keys: "
            f"{', '.join(algorithm.config.model_fields)}.",
        },
    )


for _name in NAMES:
    globals()[NAMES[_name]] = _class(_name)

__all__ = sorted(NAMES.values())
