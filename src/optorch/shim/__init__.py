"""The in-place layer: ``optorch.Optimizer``, a ``torch.optim.Optimizer`` that runs an algorithm's
pure update on ``.grad`` in place.

``optimizer`` (the class), ``engines`` (how a step executes, behind the ``Engine`` protocol),
``state`` (per-parameter state, checked), ``runtime`` (the combinators around the step),
``persistence`` and ``checkpoint`` (copies, ``state_dict`` and its checked loading), ``adaptive``
(``AdaptiveOpt``, the adaptive rules on a live optimizer).
"""

from .optimizer import ENGINES, Optimizer
from .state import StateDict

__all__ = ["ENGINES", "Optimizer", "StateDict"]
