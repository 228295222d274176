"""Where each adaptive knob lives in an optimizer's param groups (torch.optim's keys, bitsandbytes'
names), reading the bases there and writing the adapted values back: the pure side of
:mod:`optorch.functional.adaptive`, shared by :class:`optorch.AdaptiveOpt` and the pure path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..core.scalars import is_scalar
from .adaptive import AdaptiveConfig, knob_value

__all__ = ["BASE_PREFIX", "PREFIX", "bases", "flatten_state", "locations", "read_knob", "write_hyperparams"]

_TORCH_KEYS = {
    "lr": ("lr", None),
    "momentum": ("momentum", None),
    "alpha": ("alpha", None),
    "beta1": ("betas", 0),
    "beta2": ("betas", 1),
    "weight_decay": ("weight_decay", None),
}
# bitsandbytes' 8-bit optimizers keep every decay in `betas`, by their optimizer_name (spec §7). Its
# `alpha` key is never touched: in bitsandbytes >= 0.44 it may be AdEMAMix's mixing coefficient.
_BNB_KEYS = {
    "adam": {"lr": ("lr", None), "beta1": ("betas", 0), "beta2": ("betas", 1), "weight_decay": ("weight_decay", None)},
    "momentum": {"lr": ("lr", None), "momentum": ("betas", 0), "weight_decay": ("weight_decay", None)},
    "rmsprop": {
        "lr": ("lr", None),
        "alpha": ("betas", 0),
        "momentum": ("betas", 1),
        "weight_decay": ("weight_decay", None),
    },
    "adagrad": {"lr": ("lr", None), "weight_decay": ("weight_decay", None)},
}
_BNB_OTHER = {"lr": ("lr", None), "weight_decay": ("weight_decay", None)}


def locations(group: Mapping[str, Any], optimizer_name: str | None = None) -> dict[str, tuple[str, int | None]]:
    """``{knob: (key, index)}`` for the knobs a param group (or a hyperparams dict) has.

    ``optimizer_name`` is bitsandbytes' attribute (``"adam"``, ``"momentum"``, ``"rmsprop"``,
    ``"adagrad"``): its table is used, and an unknown name adapts only lr and weight decay. Without
    one, a knob lives under torch's name (``lr``, ``momentum``, ``alpha``, ``betas[0]``,
    ``betas[1]``, ``weight_decay``), which is how torch.optim and optorch name them; a knob is
    adapted only where its key holds a number.
    """
    table = _TORCH_KEYS if optimizer_name is None else _BNB_KEYS.get(optimizer_name, _BNB_OTHER)
    found = {}
    for knob, (key, index) in table.items():
        value = group.get(key)
        if index is not None:
            value = value[index] if isinstance(value, (tuple, list)) and len(value) > index else None
        if is_scalar(value):
            found[knob] = (key, index)
    return found


def read_knob(container: Mapping[str, Any], location: tuple[str, int | None]) -> Any:
    key, index = location
    return container[key] if index is None else container[key][index]


# --- the functional form with optorch.inject_hyperparams -------------------------------------


def bases(hyperparams: Mapping[str, Any], config: AdaptiveConfig) -> dict[str, Tensor]:
    """The base value of every adapted knob a stepper's ``state["hyperparams"]`` has (copies)."""
    places = locations(hyperparams)
    return {
        knob: torch.as_tensor(read_knob(hyperparams, places[knob])).detach().clone()
        for knob in config.rules()
        if knob in places
    }


def write_hyperparams(
    stepper_state: Mapping[str, Any],
    knob_bases: Mapping[str, Tensor],
    factors: Mapping[str, Tensor],
    config: AdaptiveConfig,
) -> dict[str, Any]:
    """A new stepper state whose ``hyperparams`` hold the knobs' bounded values (pure).

    ``stepper_state`` is an :func:`optorch.inject_hyperparams` state, ``knob_bases`` from
    :func:`bases`, ``factors`` from :func:`update`. Each value keeps its hyperparameter's dtype and
    device.
    """
    hyperparams = dict(stepper_state["hyperparams"])
    places = locations(hyperparams)
    for knob, base in knob_bases.items():
        if knob not in factors:
            continue
        key, index = places[knob]
        current = read_knob(hyperparams, (key, index))
        value = knob_value(knob, base, factors[knob], config).to(device=current.device, dtype=current.dtype)
        hyperparams[key] = (
            value if index is None else (*hyperparams[key][:index], value, *hyperparams[key][index + 1 :])
        )
    return {**stepper_state, "hyperparams": hyperparams}


# --- the rule state as flat keys (how an optorch shim keeps it in its param groups) ------------

PREFIX = "adapt."
BASE_PREFIX = "adapt.base."


def flatten_state(state: Mapping[str, Any], prefix: str = PREFIX) -> dict[str, Tensor]:
    """``{"adapt.t": ..., "adapt.terms.lr.trend.value": ..., ...}`` from a rule state."""
    flat = {}
    for key, value in state.items():
        if isinstance(value, Mapping):
            flat.update(flatten_state(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat
