"""The flag grids ``optorch verify`` checks each algorithm over, and how a config is labelled."""

from __future__ import annotations

import itertools
from typing import Any

import pydantic

from ..algorithms import registry
from .references import reference_optimizer


class NoGridError(ValueError):
    """The algorithm has no verification grid (it has no torch.optim counterpart to compare with)."""


def gridded_algorithms() -> list[str]:
    """Registered algorithms that declare a verification grid, whether or not their reference is
    installed here."""
    return [name for name in registry.names() if registry.get(name).grid is not None]


def grid_algorithms() -> list[str]:
    """Registered algorithms with a reference implementation installed (torch.optim's counterpart or an
    independent one): what can be verified. Each must have a grid (``flag_grid`` says so loudly if one
    is missing)."""
    return [name for name in registry.names() if reference_optimizer(registry.get(name)) is not None]


def flag_grid(name: str) -> list[dict[str, Any]]:
    """Every valid flag combination of ``name``, as config dicts in the builder's format (with ``"name"``).

    Combinations the algorithm's Config rejects (SGD's nesterov without plain momentum) are left out,
    so the grid follows the Config's own rules.
    """
    algorithm = registry.get(name)
    if reference_optimizer(algorithm) is None:
        raise NoGridError(
            f"{algorithm.name} has no reference implementation installed, so no verification grid; verifiable: "
            f"{', '.join(grid_algorithms())}"
        )
    if algorithm.grid is None:
        raise NoGridError(
            f"{algorithm.name} has a reference implementation but no verification grid: give its Algorithm a grid"
        )
    base, axes = algorithm.grid.fixed, algorithm.grid.axes
    grid = []
    for values in itertools.product(*axes.values()):
        hyperparameters = {**base, **dict(zip(axes, values))}
        try:
            algorithm.config(**hyperparameters)
        except pydantic.ValidationError:
            continue
        grid.append({"name": algorithm.name, **hyperparameters})
    return grid


def cover(name: str) -> list[tuple[dict[str, Any], bool]]:
    """A few ``(config, intermittent)`` cases of ``name``'s grid in which every flag takes each of its
    values at least once, and gradients go missing (``intermittent``) in some and not in others.

    Greedy set cover in grid order, so the first pick is the all-off combination with every gradient.
    """
    axes = registry.get(name).grid.axes
    values = lambda case: {*((key, case[0][key]) for key in axes), ("none-grads", case[1])}  # noqa: E731
    cases = [(config, intermittent) for config in flag_grid(name) for intermittent in (False, True)]
    uncovered = set().union(*map(values, cases))
    chosen = []
    while uncovered:
        best = max(cases, key=lambda case: len(uncovered & values(case)))
        chosen.append(best)
        uncovered -= values(best)
    return chosen


def most_flags(name: str) -> dict[str, Any]:
    """The combination of ``name``'s grid with the most flags on (True or non-zero), the first on ties:
    the case where the flags' interactions are all exercised at once."""
    grid = flag_grid(name)
    axes = registry.get(name).grid.axes
    return max(grid, key=lambda config: sum(bool(config[key]) for key in axes))


def describe(config: dict[str, Any]) -> str:
    """The grid flags of ``config`` in a short form: true booleans by name, non-zero values as key=value."""
    algorithm = registry.ALGORITHMS.get(str(config.get("name", "")).lower())
    axes = algorithm.grid.axes if algorithm is not None and algorithm.grid is not None else {}
    parts = []
    for key in axes:
        value = config.get(key)
        if value is True:
            parts.append(key)
        elif value not in (False, 0, None):
            parts.append(f"{key}={_short(value)}")
    return ",".join(parts) or "-"


def _short(value: Any) -> str:
    # a tuple-valued axis (Adafactor's eps pairs) as (a,b); None stays None
    if isinstance(value, tuple):
        return "(" + ",".join(_short(v) for v in value) + ")"
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def label(config: dict[str, Any], intermittent: bool = False) -> str:
    """A check's flags as reports show them: ``describe(config)``, marked when grads go missing."""
    return describe(config) + (" +none-grads" if intermittent else "")


def reduction_algorithms() -> list[str]:
    """Registered algorithms with configs that reduce to torch.optim optimizers (``Algorithm.reductions``)."""
    return [name for name in registry.names() if registry.get(name).reductions]
