"""The calls a compiled or eager step makes: the algorithm's ``update`` on one tensor (or one flat
tensor of many) or on a stack of same-shaped ones, its results copied into the param and state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..core import ops
from ..core.config import Config
from ..core.stepping import apply_update

__all__ = ["run_stacked", "run_update"]


def run_update(
    update: Callable[..., Any],
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    config: Config,
    *shared: Any,
    mask: Tensor | None = None,
):
    """One tensor's step in place: the pure ``update``'s results copied into ``param`` and ``state``
    (only where ``mask`` holds, when one is given: a skip decided inside a compiled graph).
    Returns the tensor's contribution to the shared state (None without one)."""
    new_param, new_state, *contribution = apply_update(update, param, grad, state, config, *shared)
    if mask is not None:
        new_param = torch.where(mask.to(param.device), new_param, param)
        new_state = {key: torch.where(mask.to(value.device), value, state[key]) for key, value in new_state.items()}
    _assign_all(param, new_param, state, new_state)
    return contribution[0] if contribution else None


def run_stacked(
    update: Callable[..., Any], param: Tensor, grad: Tensor, state: dict[str, Tensor], config: Config, *shared: Any
):
    """:func:`run_update` over same-shaped tensors stacked along dimension 0 (their per-tensor scalars
    stacked too), each reducing over its own slice: one call steps them all. Returns the sum of their
    contributions to the shared state (None without one)."""

    def one(param: Tensor, grad: Tensor, state: dict[str, Tensor]):
        return apply_update(update, param, grad, state, config, *shared)

    new_param, new_state, *contribution = torch.vmap(one)(param, grad, state)
    _assign_all(param, new_param, state, new_state)
    return {key: value.sum(0) for key, value in contribution[0].items()} if contribution else None


def _assign_all(param: Tensor, new_param: Tensor, state: dict[str, Tensor], new_state: dict[str, Tensor]) -> None:
    ops.assign(param, new_param)
    for key, value in new_state.items():
        ops.assign(state[key], value)
