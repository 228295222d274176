"""The builder's combinator entries (``clip_grad_norm``, ``skip_nonfinite``, ``accumulate_steps``,
``ema``, ``param_groups``, ``amp``) as one frozen, validated value, and the param groups they split
the parameters into. The pure wrappers they describe are :mod:`optorch.functional.combinators`; the
shim's in-place runtime is :mod:`optorch.shim.runtime`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import pydantic
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator
from torch import Tensor

from ..core.algorithm import Algorithm
from ..core.config import Config, Count, Number
from ..core.errors import ConfigError, first_location, problems, shown, suggest
from . import amp
from .amp import ScalerConfig
from .combinators import Stepper, _match, apply_if_finite, clip_by_global_norm, ema, multi_steps

__all__ = ["AROUND_STEP", "KEYS", "Combinators", "EmaSettings", "GroupRule", "ordered_params", "torch_param_groups"]

AROUND_STEP = ("accumulate_steps", "amp", "skip_nonfinite", "clip_grad_norm", "step", "ema")
"""The order of the combinators around the algorithm's step, outermost first, written once: the pure
wrappers nest in it (:meth:`Combinators.wrap`) and the shim's runtime runs its stages in it
(``optorch.shim.runtime.InPlace``), so both paths step alike."""


class _Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EmaSettings(_Settings):
    """The ``ema`` entry: ``{decay: 0.999, warmup: false}``, or just the decay."""

    decay: Annotated[Number, Field(ge=0.0, le=1.0)]
    """The EMA's decay beta: ema <- beta * ema + (1 - beta) * param after each step."""
    warmup: StrictBool = False
    """Use min(decay, (1 + t) / (10 + t)) at the t-th update, so early averages forget the start."""


class GroupRule(BaseModel):
    """One ``param_groups`` entry: ``match`` (fnmatch patterns on parameter names, a string or a list)
    and the algorithm's config keys to override for the parameters it matches."""

    model_config = ConfigDict(frozen=True, extra="allow")

    match: list[str] = Field(min_length=1)
    """fnmatch patterns (case-sensitive) on parameter names; a string is one pattern."""

    @field_validator("match", mode="before")
    @classmethod
    def _one_pattern(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Combinators(_Settings):
    """The builder's top-level combinator entries, one key each next to the algorithm's keys, e.g.
    ``clip_grad_norm: 1.0``, ``skip_nonfinite: true``, ``accumulate_steps: 4``, ``ema: {decay:
    0.999}`` (then ``optimizer.ema_params()`` and ``optimizer.swap_ema()``), and ``param_groups:
    [{match: ["*.bias", "*norm*"], weight_decay: 0.0}]`` (by parameter name, first match wins; needs
    named params)."""

    clip_grad_norm: Annotated[Number, Field(gt=0.0)] | None = None
    """Scale the gradients so their global 2-norm is at most this (``clip_grad_norm_``)."""
    skip_nonfinite: StrictBool = False
    """Skip (and count) a step whose gradients hold a NaN or an inf."""
    accumulate_steps: Annotated[Count, Field(ge=1)] = 1
    """Step every k-th call, on the mean of the k calls' gradients."""
    ema: EmaSettings | None = None
    """Keep an EMA of the params: ``{decay, warmup}`` or just the decay."""
    param_groups: list[GroupRule] = Field(default_factory=list)
    """Param groups by name: ``[{match: [patterns], <config key>: value, ...}]``, first match wins."""
    amp: ScalerConfig | None = None
    """Loss scaling for mixed precision (``{}`` for GradScaler's defaults): ``optimizer.scale_loss(loss)``
    before ``backward()``; each step unscales the gradients, skips on inf/NaN and updates the scale."""

    @field_validator("ema", mode="before")
    @classmethod
    def _decay_only(cls, value: Any) -> Any:
        return {"decay": value} if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @classmethod
    def from_config(cls, values: Mapping[str, Any], algorithm: Algorithm, config: Config) -> Combinators | None:
        """The entries of a config dict, validated (each ``param_groups`` entry against ``algorithm``'s
        Config too); None when the config has none of them. Raises ``ValueError`` naming the entry."""
        entries = {key: values[key] for key in KEYS if key in values}
        if not entries:
            return None
        settings = cls(**entries)
        fields = list(algorithm.config.model_fields)
        for i, rule in enumerate(settings.param_groups):
            unknown = [key for key in rule.overrides if key not in fields]
            if unknown:
                hints = [f"{shown(key)}{suggest(key, fields)}" for key in unknown]
                raise ConfigError(
                    f"param_groups[{i}]: unknown key(s) for {algorithm.name}: {', '.join(hints)}. Valid keys: match, "
                    f"{', '.join(fields)}",
                    key=("param_groups", i, unknown[0]),
                )
            try:
                config.replace(**rule.overrides)
            except pydantic.ValidationError as error:
                raise ConfigError(
                    f"param_groups[{i}]: {problems(error)}", key=("param_groups", i, *first_location(error))
                ) from None
            except ValueError as error:
                raise ConfigError(f"param_groups[{i}]: {error}", key=("param_groups", i)) from None
        return settings

    def labels(self, names: Sequence[str]) -> list[str]:
        """The param group of each name: ``"param_groups.<i>"`` for the first entry that matches it,
        else ``"default"``. Raises ``ValueError`` for a pattern or an entry that matches nothing."""
        rules = {f"param_groups.{i}": rule.match for i, rule in enumerate(self.param_groups)}
        return _match(names, rules, "default", lambda label: f"param_groups[{label.split('.')[1]}]: ")

    def is_set(self, entry: str) -> bool:
        """Whether the combinator of ``entry`` (a name of :data:`AROUND_STEP`) runs around the step."""
        return {"accumulate_steps": self.accumulate_steps > 1, "skip_nonfinite": self.skip_nonfinite}.get(
            entry, getattr(self, entry, None) is not None
        )

    def wrap(self, stepper: Stepper) -> Stepper:
        """``stepper`` inside this config's combinators, nested in :data:`AROUND_STEP`'s order:
        ``multi_steps(amp.scaled(apply_if_finite(clip_by_global_norm(ema(stepper)))))``, each only if set."""
        wrappers = {
            "ema": lambda inner: ema(inner, self.ema.decay, warmup=self.ema.warmup),
            "clip_grad_norm": lambda inner: clip_by_global_norm(inner, self.clip_grad_norm),
            "skip_nonfinite": apply_if_finite,
            "amp": lambda inner: amp.scaled(inner, self.amp),
            "accumulate_steps": lambda inner: multi_steps(inner, self.accumulate_steps),
        }
        for entry in reversed(AROUND_STEP):  # the innermost first
            if entry != "step" and self.is_set(entry):
                stepper = wrappers[entry](stepper)
        return stepper

    def state_keys(self) -> frozenset[str]:
        """The per-parameter state keys the shim's runtime keeps besides the algorithm's."""
        return frozenset(
            key for key, on in (("grad_acc", self.accumulate_steps > 1), ("ema", self.ema is not None)) if on
        )


KEYS = tuple(Combinators.model_fields)
"""The top-level builder keys that :class:`Combinators` reads (``parse_config`` leaves them out)."""


def ordered_params(params: Any) -> list[Any]:
    """``params`` (a tensor, or an iterable of tensors or param groups) as a list. A set is refused,
    as torch refuses it: its order changes between runs, and a checkpoint numbers params by it."""
    if isinstance(params, Tensor):
        return [params]
    if isinstance(params, (set, frozenset)):
        raise TypeError(
            "optimizer parameters need to be organized in ordered collections, but the ordering of tensors in sets "
            "will change between runs. Please use a list instead."
        )
    return list(params)


def torch_param_groups(params: Any, settings: Combinators | None) -> Any:
    """What to hand ``torch.optim.Optimizer``: ``params`` as given (tensors or param-group dicts), or,
    from an ``nn.Module`` or ``named_parameters()``, the tensors, split into the groups that
    ``settings.param_groups`` describes (the unmatched ones first, with no overrides)."""
    if isinstance(params, torch.nn.Module):
        params = params.named_parameters()
    params = ordered_params(params)
    named = bool(params) and all(
        isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], Tensor) for p in params
    )
    rules = settings.param_groups if settings is not None else []
    if not rules:
        return [p for _, p in params] if named else params
    if not named:
        got = "param-group dicts" if any(isinstance(p, Mapping) for p in params) else "unnamed tensors"
        raise ValueError(
            f"param_groups matches parameters by name: pass the model or model.named_parameters(), not {got} "
            "(to a wrapper that hands param groups to each rank's optimizer, such as ZeroRedundancyOptimizer, "
            "give the groups of optorch.distributed.split_param_groups(config, model))"
        )
    labels = settings.labels([name for name, _ in params])
    groups = [{"params": [p for (_, p), label in zip(params, labels) if label == "default"]}]
    groups += [
        {"params": [p for (_, p), label in zip(params, labels) if label == f"param_groups.{i}"], **rule.overrides}
        for i, rule in enumerate(rules)
    ]
    return [group for group in groups if group["params"]]
