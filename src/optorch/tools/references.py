"""The optimizer each algorithm is verified against: torch.optim's counterpart, or, where torch.optim has
none, an independent implementation under optorch's keys (torch-adopt's ADOPT, pytorch_optimizer's
LARS). Those are test dependencies (the dev extra), so each is imported only when a check asks for it,
and a missing one reads as None: ``optorch verify`` then says which package to install.

An algorithm registered from outside adds its own: ``REFERENCES[name] = Reference(package, load)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..core.algorithm import Algorithm

__all__ = ["REFERENCES", "Reference", "pytorch_optimizer_lars", "reference_optimizer", "torch_adopt"]

OptimizerClass = type[torch.optim.Optimizer]


class Reference(NamedTuple):
    """An independent implementation of one algorithm."""

    package: str
    """What to install for it (``pip install <package>``)."""
    load: Callable[[], OptimizerClass | None]
    """Its optimizer class taking the algorithm's config keys, or None when ``package`` is not installed."""


def reference_optimizer(algorithm: Algorithm) -> OptimizerClass | None:
    """The optimizer class ``algorithm`` is verified against: torch.optim's counterpart, else its
    independent reference when that is installed, else None."""
    if algorithm.torch_optimizer is not None:
        return algorithm.torch_optimizer
    reference = REFERENCES.get(algorithm.name)
    return reference.load() if reference is not None else None


@functools.cache
def torch_adopt() -> OptimizerClass | None:
    """torch-adopt's ``ADOPT`` taking ``clip_exponent`` instead of ``clip_lambda`` (the config holds
    numbers only: ``clip_lambda = lambda step: step ** clip_exponent``, None for no clip)."""
    try:
        from adopt import ADOPT
    except ImportError:
        return None

    class ReferenceADOPT(ADOPT):
        """``adopt.ADOPT`` with ``clip_lambda = lambda step: step ** clip_exponent`` (None: no clip)."""

        def __init__(
            self,
            params,
            lr=1e-3,
            betas=(0.9, 0.9999),
            eps=1e-6,
            clip_exponent=0.25,
            weight_decay=0.0,
            decouple=False,
            *,
            foreach=None,
            maximize=False,
            capturable=False,
            differentiable=False,
            fused=None,
        ):
            clip_lambda = None if clip_exponent is None else functools.partial(_power, exponent=clip_exponent)
            super().__init__(
                params,
                lr,
                betas,
                eps,
                clip_lambda,
                weight_decay,
                decouple,
                foreach=foreach,
                maximize=maximize,
                capturable=capturable,
                differentiable=differentiable,
                fused=fused,
            )

    return ReferenceADOPT


def _power(step, exponent):
    return step**exponent


def pytorch_optimizer_lars() -> OptimizerClass | None:
    """pytorch_optimizer's ``LARS`` under optorch's keys, refusing the configs where its conventions
    differ from ours (``optorch.lars`` lists them)."""
    try:
        from pytorch_optimizer import LARS
    except ImportError:
        return None

    class Reference(LARS):
        """pytorch_optimizer's LARS under optorch's keys, where its conventions are ours: eps=0,
        exclude_1d=True (it always excludes ndim <= 1), no dampening (its buffer starts at zero)."""

        def __init__(self, params, eps=1e-8, exclude_1d=False, exclude=False, **kwargs):
            if eps != 0 or not exclude_1d or exclude or kwargs.get("dampening", 0.0) != 0:
                raise ValueError(
                    "pytorch_optimizer's LARS matches optorch's only with eps=0, exclude_1d=True, exclude=False, "
                    "dampening=0"
                )
            super().__init__(params, **kwargs)

    return Reference


REFERENCES: dict[str, Reference] = {
    "adopt": Reference("torch-adopt==0.1.0", torch_adopt),
    "lars": Reference("pytorch_optimizer", pytorch_optimizer_lars),
}
"""The independent reference of each algorithm torch.optim has no counterpart of, by algorithm name."""
