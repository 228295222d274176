"""The algorithm registry: name -> :class:`~optorch.algorithm.Algorithm`.

Adding an algorithm is one module plus one line in ``_BUILTIN`` below; the builder, the shim,
``optorch verify``, the benchmark and the contract test suite all read this registry.
"""

from __future__ import annotations

from ..core.algorithm import Algorithm
from ..core.errors import closest
from . import (
    adadelta,
    adafactor,
    adagrad,
    adam,
    adamax,
    adamw,
    adopt,
    asgd,
    autosgm,
    dag,
    decoupled_adam,
    lars,
    nadam,
    radam,
    rmsprop,
    rprop,
    sgd,
)

__all__ = ["ALGORITHMS", "UnknownOptimizerError", "get", "register", "names", "for_config"]


class UnknownOptimizerError(ValueError):
    """No algorithm is registered under the requested name."""


_BUILTIN = (
    sgd.algorithm,
    adam.algorithm,
    adamw.algorithm,
    decoupled_adam.algorithm,
    rmsprop.algorithm,
    adagrad.algorithm,
    nadam.algorithm,
    radam.algorithm,
    adamax.algorithm,
    adadelta.algorithm,
    rprop.algorithm,
    asgd.algorithm,
    dag.algorithm,
    autosgm.algorithm,
    lars.algorithm,
    adopt.algorithm,
    adafactor.algorithm,
)

ALGORITHMS: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    """Add an algorithm under its (lower-case) name; a name can be registered once."""
    name = algorithm.name.lower()
    if name in ALGORITHMS:
        raise ValueError(f"an algorithm named {name!r} is already registered")
    ALGORITHMS[name] = algorithm
    return algorithm


def names() -> list[str]:
    return sorted(ALGORITHMS)


def get(name: str) -> Algorithm:
    """The algorithm registered as ``name`` (case-insensitive); a clear error with suggestions if none."""
    if not isinstance(name, str):
        raise TypeError(f"an algorithm name must be a string, got {type(name).__name__}")
    try:
        return ALGORITHMS[name.lower()]
    except KeyError:
        close = closest(name.lower(), names())
        hint = f" Did you mean {close!r}?" if close is not None else ""
        raise UnknownOptimizerError(
            f"unknown optimizer {name!r}.{hint} Known optimizers: {', '.join(names())}"
        ) from None


def for_config(config: object) -> Algorithm:
    """The algorithm whose Config class ``config`` is an instance of."""
    for algorithm in ALGORITHMS.values():
        if type(config) is algorithm.config:
            return algorithm
    raise TypeError(f"{type(config).__name__} is not the Config of a registered optimizer ({', '.join(names())})")


for _algorithm in _BUILTIN:
    register(_algorithm)
