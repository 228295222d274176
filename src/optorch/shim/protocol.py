"""The interface every engine of the shim fulfils (:class:`Engine`), and the share of a step it is
handed (:class:`Work`): the torch kernel's engine and the update engines are interchangeable behind it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from ..core.config import Config

__all__ = ["Engine", "Work"]


class Work:
    """One param group's share of a step: its config and the params that have a gradient, with their
    gradients and their checked state (for the torch engine the params' whole state dicts, in
    torch's layout; for optorch's engines the algorithm's keys)."""

    __slots__ = ("config", "params", "grads", "states")

    def __init__(self, config: Config, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]]):
        self.config, self.params, self.grads, self.states = config, params, grads, states


class Engine(Protocol):
    name: str

    def add_group(self, group: dict[str, Any]) -> None:
        """Prepare for a param group added after construction (raise if it cannot be stepped)."""

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        work: Sequence[Work],
        shared: tuple[dict[str, Tensor], ...],
        mask: Tensor | None = None,
    ) -> list[dict[str, Tensor]]:
        """Step every param of ``work`` in place (where ``mask`` holds, if given: only inside
        torch.compile, for engines that can); returns the contributions to the shared state."""
