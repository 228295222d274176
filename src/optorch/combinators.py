r"""Combinators: gradient clipping, non-finite skipping, gradient accumulation, per-subset
optimizers and parameter EMA, as pure wrappers around steppers, and the same from a builder config.

A *stepper* is any object with ``init(params) -> state`` and ``step(params, grads, state) -> (params,
state)``: :func:`bind` makes one from an algorithm and its config, :func:`optorch.inject_hyperparams`
makes one whose hyperparameters live in the state. Each combinator takes a stepper and is a stepper,
so they nest::

    inner = optorch.bind("adamw", {"lr": 1e-3, "weight_decay": 0.01})
    stepper = multi_steps(apply_if_finite(clip_by_global_norm(ema(inner, 0.999), 1.0)), every_k=4)
    state = stepper.init(params)
    params, state = stepper.step(params, grads, state)

Every wrapper is pure (inputs are never modified) and decides with ``torch.where`` on tensors, never
with a Python branch on a value, so a composed step runs under ``torch.compile(fullgraph=True)`` and
``torch.func``. The state of a wrapper is a dict that keeps the wrapped stepper's state under
``"inner"`` (:func:`partition`: under each label).

With :math:`g_i` the gradient leaves and :math:`\|g\| = \sqrt{\sum_i \|g_i\|_2^2}`:

* :func:`clip_by_global_norm`: :math:`g_i \leftarrow g_i \cdot \min(1, c / (\|g\| + 10^{-6}))`,
  exactly ``torch.nn.utils.clip_grad_norm_(max_norm=c)``.
* :func:`apply_if_finite`: the inner step is applied only if every :math:`g_i` is finite; otherwise
  params and inner state are returned bit-identical and the skip is counted.
* :func:`multi_steps`: :math:`a \leftarrow a + g` on each call; on every :math:`k`-th call the inner
  step runs with :math:`a / k` (the mean) and :math:`a \leftarrow 0`; params stay unchanged otherwise.
* :func:`partition`: each label's stepper steps the parameters with that label, as if alone.
* :func:`ema`: after each inner step :math:`\bar\theta \leftarrow \beta\bar\theta + (1-\beta)\theta`
  (``torch.lerp``), :math:`\bar\theta_0 = \theta_0`; with ``warmup``,
  :math:`\beta_t = \min(\beta, (1+t)/(10+t))` at the :math:`t`-th step.

The builder's top-level entries ``clip_grad_norm``, ``skip_nonfinite``, ``accumulate_steps``, ``ema``
and ``param_groups`` are validated by :class:`Combinators`. :func:`from_config` turns a config into
the composed pure stepper, and ``optorch.build`` runs the same logic around the shim's step (through
:class:`InPlace`, which calls the functions here on ``.grad``), in this order: accumulate, skip if
non-finite, clip, step, EMA. That is ``multi_steps(apply_if_finite(clip_by_global_norm(ema(inner))))``.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence

import pydantic
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator
from torch import Tensor
from torch.utils import _pytree as pytree

from . import amp, distributed, ops, registry
from .algorithm import Algorithm
from .amp import ScalerConfig
from .config import Config, Count, Number, did_you_mean, first_location, problems, shown
from .configfile import ConfigError

__all__ = [
    "KEYS",
    "ApplyIfFinite",
    "Bound",
    "ClipByGlobalNorm",
    "Combinators",
    "Ema",
    "EmaSettings",
    "GroupRule",
    "InPlace",
    "MultiSteps",
    "Partition",
    "Stepper",
    "apply_if_finite",
    "bind",
    "clip_by_global_norm",
    "ema",
    "ema_params",
    "from_config",
    "labels_from_patterns",
    "multi_steps",
    "param_names",
    "partition",
    "torch_param_groups",
]


class Stepper(Protocol):
    def init(self, params: Any) -> Any: ...

    def step(self, params: Any, grads: Any, state: Any) -> tuple[Any, Any]: ...


# -- the math, shared by the pure wrappers and the shim -------------------------------------------


def global_norm(grads: Sequence[Tensor]) -> Tensor:
    """:math:`\\|g\\|_2` over all tensors: the 2-norm of the per-tensor 2-norms, as
    ``torch.nn.utils.get_total_norm`` computes it (of sharded DTensors: over the whole tensors)."""
    if not grads:
        return torch.zeros(())
    return distributed.full(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g).to(grads[0].device) for g in grads])))


def clip_coefficient(total_norm: Tensor, max_norm: Any) -> Tensor:
    """:math:`\\min(1, c / (\\|g\\| + 10^{-6}))`, the factor ``clip_grad_norm_`` multiplies by."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def finite_counters(finite: Tensor, counters: Mapping[str, Tensor], max_consecutive_errors: int | None) -> tuple[Tensor, dict[str, Tensor]]:
    """Whether to apply a step, and the updated skip counters (optax's ``apply_if_finite``)::

        notfinite_count  consecutive non-finite steps (0 after a finite one)
        total_notfinite  non-finite steps so far
        last_finite      whether this step's gradients were finite

    A non-finite step is applied anyway once ``notfinite_count`` exceeds ``max_consecutive_errors``."""
    count = torch.where(finite, torch.zeros_like(counters["notfinite_count"]), counters["notfinite_count"] + 1)
    apply = finite if max_consecutive_errors is None else finite | (count > max_consecutive_errors)
    return apply, {"notfinite_count": count, "total_notfinite": counters["total_notfinite"] + (~finite).to(count.dtype), "last_finite": finite}


def ema_decay(decay: Any, count: Tensor, warmup: bool) -> Any:
    """The decay of the ``count``-th EMA update: ``decay``, or with warmup ``min(decay, (1+t)/(10+t))``."""
    if not warmup:
        return decay
    t = count.to(ops.scalar_dtype(count))
    return torch.clamp((1 + t) / (10 + t), max=decay)


def ema_update(averages: Sequence[Tensor], params: Sequence[Tensor], decay: Any) -> list[Tensor]:
    """:math:`\\bar\\theta + (1-\\beta)(\\theta - \\bar\\theta)` per tensor (``torch.lerp``, as
    ``torch.optim.swa_utils.get_ema_multi_avg_fn``)."""
    return [ops.lerp(a, p.to(a.device), 1 - decay) for a, p in zip(averages, params)]


# -- pytree helpers ---------------------------------------------------------------------------------


def _is_none(x: Any) -> bool:
    return x is None


def _grad_leaves(grads: Any) -> list[Tensor]:
    return [g for g in pytree.tree_leaves(grads) if g is not None]


def _like_first(params: Any) -> Tensor:
    leaves = pytree.tree_leaves(params)
    return leaves[0] if leaves else torch.zeros(())


def _counter(params: Any) -> Tensor:
    return torch.zeros((), dtype=torch.int64, device=_like_first(params).device)


def _path_name(path: tuple) -> str:
    parts = []
    for key in path:
        for attribute in ("key", "idx", "name"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def param_names(params: Any) -> list[str]:
    """The name of each leaf of a params pytree: its dict keys (and list indices) joined by dots,
    ``{"encoder": {"norm": {"weight": t}}}`` -> ``["encoder.norm.weight"]``; a flat dict from
    ``model.named_parameters()`` keeps its names."""
    return [_path_name(path) for path, _ in pytree.tree_flatten_with_path(params)[0]]


# -- the steppers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """A plain algorithm with a fixed config, as a stepper (:func:`bind`)."""

    algorithm: Algorithm
    config: Config

    def init(self, params: Any) -> Any:
        return self.algorithm.init(params, self.config)

    def step(self, params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
        return self.algorithm.step(params, grads, state, self.config)


def bind(algorithm: str | Algorithm, config: Config | Mapping[str, Any] | None = None) -> Bound:
    """``algorithm`` (a registered name or an :class:`~optorch.Algorithm`) with ``config`` (its
    ``Config``, a dict of its keys, or None for the defaults), as a stepper."""
    algorithm = registry.get(algorithm) if isinstance(algorithm, str) else algorithm
    return Bound(algorithm, algorithm.as_config(config))


@dataclass(frozen=True)
class ClipByGlobalNorm:
    r"""Scale the gradients by :math:`\min(1, c / (\|g\| + 10^{-6}))` before the inner step.

    The state is the inner stepper's, unchanged in layout. ``max_norm`` may be a 0-dim tensor."""

    inner: Stepper
    max_norm: Any

    def init(self, params: Any) -> Any:
        return self.inner.init(params)

    def step(self, params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
        coefficient = clip_coefficient(global_norm(_grad_leaves(grads)), self.max_norm)
        return self.inner.step(params, pytree.tree_map(lambda g: g * coefficient.to(g.device), grads), state)


def clip_by_global_norm(stepper: Stepper, max_norm: Any) -> ClipByGlobalNorm:
    """``stepper`` with its gradients clipped to a global 2-norm of at most ``max_norm``, exactly as
    ``torch.nn.utils.clip_grad_norm_`` clips them."""
    if not isinstance(max_norm, Tensor) and not max_norm > 0:
        raise ValueError(f"clip_by_global_norm: max_norm must be > 0, got {max_norm!r}")
    return ClipByGlobalNorm(stepper, max_norm)


@dataclass(frozen=True)
class ApplyIfFinite:
    """Apply the inner step only when every gradient is finite.

    State: ``{"notfinite_count", "total_notfinite", "last_finite", "inner"}`` (see
    :func:`finite_counters`). A skipped step returns params and ``inner`` bit-identical."""

    inner: Stepper
    max_consecutive_errors: int | None = None

    def init(self, params: Any) -> dict[str, Any]:
        zero = _counter(params)
        return {"notfinite_count": zero, "total_notfinite": zero.clone(), "last_finite": torch.ones_like(zero, dtype=torch.bool), "inner": self.inner.init(params)}

    def step(self, params: Any, grads: Any, state: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        apply, counters = finite_counters(ops.all_finite(_grad_leaves(grads)).to(state["notfinite_count"].device), state, self.max_consecutive_errors)
        new_params, inner = self.inner.step(params, grads, state["inner"])
        return ops.select(apply, new_params, params), {**counters, "inner": ops.select(apply, inner, state["inner"])}


def apply_if_finite(stepper: Stepper, max_consecutive_errors: int | None = None) -> ApplyIfFinite:
    """``stepper``, skipping any step whose gradients hold a NaN or an inf; with
    ``max_consecutive_errors=n``, the (n+1)-th non-finite step in a row is applied anyway."""
    if max_consecutive_errors is not None and (isinstance(max_consecutive_errors, bool) or not isinstance(max_consecutive_errors, int) or max_consecutive_errors < 0):
        raise ValueError(f"apply_if_finite: max_consecutive_errors must be None or an int >= 0, got {max_consecutive_errors!r}")
    return ApplyIfFinite(stepper, max_consecutive_errors)


@dataclass(frozen=True)
class MultiSteps:
    """Accumulate gradients over ``every_k`` calls; the ``every_k``-th runs the inner step on their mean.

    State: ``{"mini_step": calls since the last inner step, "grad_acc": the sum of their gradients
    (shaped like params), "inner"}``. A ``None`` gradient counts as zero. The inner step is traced on
    every call and its result kept only on the k-th (``torch.where``), so nothing branches on the host."""

    inner: Stepper
    every_k: int

    def init(self, params: Any) -> dict[str, Any]:
        return {"mini_step": _counter(params), "grad_acc": pytree.tree_map(torch.zeros_like, params), "inner": self.inner.init(params)}

    def step(self, params: Any, grads: Any, state: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        acc, spec = pytree.tree_flatten(state["grad_acc"])
        grad_leaves, grad_spec = pytree.tree_flatten(grads, is_leaf=_is_none)
        if grad_spec != spec:
            raise ValueError(f"multi_steps: grads must have the structure of params.\n params: {spec}\n grads: {grad_spec}")
        acc = [a if g is None else a + g for a, g in zip(acc, grad_leaves)]
        final = state["mini_step"] == self.every_k - 1
        mean = pytree.tree_unflatten([a / self.every_k for a in acc], spec)
        new_params, inner = self.inner.step(params, mean, state["inner"])
        acc = [torch.where(final, torch.zeros_like(a), a) for a in acc]
        return ops.select(final, new_params, params), {
            "mini_step": torch.where(final, torch.zeros_like(state["mini_step"]), state["mini_step"] + 1),
            "grad_acc": pytree.tree_unflatten(acc, spec),
            "inner": ops.select(final, inner, state["inner"]),
        }


def multi_steps(stepper: Stepper, every_k: int) -> MultiSteps:
    """``stepper`` stepping once every ``every_k`` calls, on the mean of their gradients."""
    if isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1:
        raise ValueError(f"multi_steps: every_k must be an int >= 1, got {every_k!r}")
    return MultiSteps(stepper, every_k)


@dataclass(frozen=True)
class Partition:
    """Each label's stepper on the parameters with that label.

    ``labels`` is a pytree of label strings shaped like params, or a function ``params -> labels``
    (e.g. ``lambda p: labels_from_patterns(p, {...})``). Each stepper sees its subset as a flat dict
    ``{name: tensor}`` (names as :func:`param_names`), so it steps exactly as if run on that dict
    alone. State: ``{label: that stepper's state}`` for each label in use."""

    steppers: Mapping[str, Stepper]
    labels: Any

    def _split(self, params: Any) -> tuple[list[str], list[str], Any]:
        labels = self.labels(params) if callable(self.labels) else self.labels
        path_leaves, spec = pytree.tree_flatten_with_path(params)
        label_leaves, label_spec = pytree.tree_flatten(labels)
        if label_spec != spec:
            raise ValueError(f"partition: labels must have the structure of params.\n params: {spec}\n labels: {label_spec}")
        missing = sorted({label for label in label_leaves if label not in self.steppers})
        if missing:
            raise ValueError(f"partition: no stepper for label(s) {', '.join(map(repr, missing))}; steppers are given for {', '.join(map(repr, self.steppers))}")
        return [_path_name(path) for path, _ in path_leaves], label_leaves, spec

    @staticmethod
    def _subset(names: list[str], labels: list[str], leaves: list[Any], label: str) -> dict[str, Any]:
        return {name: leaf for name, leaf_label, leaf in zip(names, labels, leaves) if leaf_label == label}

    def init(self, params: Any) -> dict[str, Any]:
        names, labels, _ = self._split(params)
        leaves = pytree.tree_leaves(params)
        return {label: self.steppers[label].init(self._subset(names, labels, leaves, label)) for label in dict.fromkeys(labels)}

    def step(self, params: Any, grads: Any, state: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        names, labels, spec = self._split(params)
        leaves = pytree.tree_leaves(params)
        grad_leaves, grad_spec = pytree.tree_flatten(grads, is_leaf=_is_none)
        if grad_spec != spec:
            raise ValueError(f"partition: grads must have the structure of params.\n params: {spec}\n grads: {grad_spec}")
        new_leaves, new_state = dict(zip(names, leaves)), {}
        for label in dict.fromkeys(labels):
            subset, subset_grads = self._subset(names, labels, leaves, label), self._subset(names, labels, grad_leaves, label)
            stepped, new_state[label] = self.steppers[label].step(subset, subset_grads, state[label])
            new_leaves.update(stepped)
        return pytree.tree_unflatten([new_leaves[name] for name in names], spec), new_state


def partition(steppers_by_label: Mapping[str, Stepper], labels: Any) -> Partition:
    """Different steppers for different parameters; see :class:`Partition` and
    :func:`labels_from_patterns`."""
    if not steppers_by_label:
        raise ValueError("partition: give at least one stepper")
    return Partition(dict(steppers_by_label), labels)


def labels_from_patterns(params: Any, patterns: Mapping[str, str | Sequence[str]], default: str = "default") -> Any:
    """A label per parameter, from name patterns: the first label (in ``patterns``' order) with an
    ``fnmatch`` pattern (case-sensitive) that matches the parameter's name (:func:`param_names`),
    else ``default``. A pattern that matches no name at all raises ``ValueError``::

        labels_from_patterns(params, {"no_decay": ["*.bias", "*norm*"]}, default="decay")
    """
    rules = {label: [p] if isinstance(p, str) else list(p) for label, p in patterns.items()}
    labels = _match(param_names(params), rules, default, lambda label: f"label {label!r}: ")
    return pytree.tree_unflatten(labels, pytree.tree_flatten(params)[1])


def _match(names: Sequence[str], rules: Mapping[str, Sequence[str]], default: str, where: Callable[[str], str]) -> list[str]:
    """Each name's label: the first rule's (in order) with a pattern that matches it, else ``default``.
    A pattern that matches no name, or a rule whose names were all taken by earlier rules, is an
    error (``where(label)`` says which rule)."""
    for label, globs in rules.items():
        for glob in globs:
            if not any(fnmatch.fnmatchcase(name, glob) for name in names):
                raise ValueError(f"{where(label)}pattern {glob!r} matches no parameter; names are: {_shown(list(names))}")
    labels = [next((label for label, globs in rules.items() if any(fnmatch.fnmatchcase(name, g) for g in globs)), default) for name in names]
    for label in rules:
        if label not in labels:
            raise ValueError(f"{where(label)}every parameter it matches was taken by an earlier entry (the first match wins)")
    return labels


def _shown(names: list[str], limit: int = 12) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


@dataclass(frozen=True)
class Ema:
    r"""Keep an exponential moving average of the params, updated after each inner step.

    State: ``{"count": inner steps so far, "ema_params": the averages (shaped like params),
    "inner"}``; :func:`ema_params` finds them in a nested state."""

    inner: Stepper
    decay: Any
    warmup: bool = False

    def init(self, params: Any) -> dict[str, Any]:
        return {"count": _counter(params), "ema_params": pytree.tree_map(lambda p: p.detach().clone(), params), "inner": self.inner.init(params)}

    def step(self, params: Any, grads: Any, state: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        params, inner = self.inner.step(params, grads, state["inner"])
        count = state["count"] + 1
        averages, spec = pytree.tree_flatten(state["ema_params"])
        averages = ema_update(averages, pytree.tree_leaves(params), ema_decay(self.decay, count, self.warmup))
        return params, {"count": count, "ema_params": pytree.tree_unflatten(averages, spec), "inner": inner}


def ema(stepper: Stepper, decay: Any, *, warmup: bool = False) -> Ema:
    """``stepper`` plus an EMA of its params with ``decay`` in [0, 1] (see :class:`Ema`)."""
    if not isinstance(decay, Tensor) and not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema: decay must be in [0, 1], got {decay!r}")
    return Ema(stepper, decay, warmup)


def ema_params(state: Any) -> Any:
    """The EMA params in a (possibly nested) combinator state: the outermost :class:`Ema`'s, found by
    following ``"inner"``; None when there is none. (Inside a :func:`partition`, look per label.)"""
    while isinstance(state, Mapping):
        if "ema_params" in state:
            return state["ema_params"]
        state = state.get("inner")
    return None


# -- builder config ---------------------------------------------------------------------------------


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

    clip_grad_norm: Optional[Annotated[Number, Field(gt=0.0)]] = None
    """Scale the gradients so their global 2-norm is at most this (``clip_grad_norm_``)."""
    skip_nonfinite: StrictBool = False
    """Skip (and count) a step whose gradients hold a NaN or an inf."""
    accumulate_steps: Annotated[Count, Field(ge=1)] = 1
    """Step every k-th call, on the mean of the k calls' gradients."""
    ema: Optional[EmaSettings] = None
    """Keep an EMA of the params: ``{decay, warmup}`` or just the decay."""
    param_groups: list[GroupRule] = Field(default_factory=list)
    """Param groups by name: ``[{match: [patterns], <config key>: value, ...}]``, first match wins."""
    amp: Optional[ScalerConfig] = None
    """Loss scaling for mixed precision (``{}`` for GradScaler's defaults): ``optimizer.scale_loss(loss)``
    before ``backward()``; each step unscales the gradients, skips on inf/NaN and updates the scale."""

    @field_validator("ema", mode="before")
    @classmethod
    def _decay_only(cls, value: Any) -> Any:
        return {"decay": value} if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @classmethod
    def from_config(cls, values: Mapping[str, Any], algorithm: Algorithm, config: Config) -> "Combinators | None":
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
                hints = [f"{shown(key)}{did_you_mean(key, fields)}" for key in unknown]
                raise ConfigError(f"param_groups[{i}]: unknown key(s) for {algorithm.name}: {', '.join(hints)}. Valid keys: match, {', '.join(fields)}",
                                  key=("param_groups", i, unknown[0]))
            try:
                config.replace(**rule.overrides)
            except pydantic.ValidationError as error:
                raise ConfigError(f"param_groups[{i}]: {problems(error)}", key=("param_groups", i, *first_location(error))) from None
            except ValueError as error:
                raise ConfigError(f"param_groups[{i}]: {error}", key=("param_groups", i)) from None
        return settings

    def labels(self, names: Sequence[str]) -> list[str]:
        """The param group of each name: ``"param_groups.<i>"`` for the first entry that matches it,
        else ``"default"``. Raises ``ValueError`` for a pattern or an entry that matches nothing."""
        rules = {f"param_groups.{i}": rule.match for i, rule in enumerate(self.param_groups)}
        return _match(names, rules, "default", lambda label: f"param_groups[{label.split('.')[1]}]: ")

    def wrap(self, stepper: Stepper) -> Stepper:
        """``stepper`` inside this config's combinators, in the shim's order:
        ``multi_steps(amp.scaled(apply_if_finite(clip_by_global_norm(ema(stepper)))))``, each only if set."""
        if self.ema is not None:
            stepper = ema(stepper, self.ema.decay, warmup=self.ema.warmup)
        if self.clip_grad_norm is not None:
            stepper = clip_by_global_norm(stepper, self.clip_grad_norm)
        if self.skip_nonfinite:
            stepper = apply_if_finite(stepper)
        if self.amp is not None:
            stepper = amp.scaled(stepper, self.amp)
        if self.accumulate_steps > 1:
            stepper = multi_steps(stepper, self.accumulate_steps)
        return stepper

    def state_keys(self) -> frozenset[str]:
        """The per-parameter state keys the shim's runtime keeps besides the algorithm's."""
        return frozenset(key for key, on in (("grad_acc", self.accumulate_steps > 1), ("ema", self.ema is not None)) if on)

    def attach(self, optimizer: Any) -> "InPlace | None":
        """The in-place runtime for an ``optorch.Optimizer`` (None when nothing runs around its step)."""
        if self.clip_grad_norm is None and not self.skip_nonfinite and self.accumulate_steps == 1 and self.ema is None and self.amp is None:
            return None
        return InPlace(self, optimizer)


KEYS = tuple(Combinators.model_fields)
"""The top-level builder keys that :class:`Combinators` reads (``parse_config`` leaves them out)."""


def from_config(config: Mapping[str, Any] | str | Any, params: Any = None) -> Stepper:
    """The pure stepper a builder config describes: its algorithm (with ``inject_hyperparams`` when it
    has a ``schedule``), partitioned by ``param_groups`` (``params``, a dict pytree, gives the names),
    wrapped in its combinators as :meth:`Combinators.wrap` orders them. It steps as
    ``optorch.build(config, model)`` does."""
    from . import builder
    from .inject import inject_hyperparams

    algorithm, config_ = builder.parse_config(config)
    schedules = builder.parse_schedules(config, config_)
    settings = builder.parse_combinators(config, (algorithm, config_)) or Combinators()

    def core(overrides: Mapping[str, Any]) -> Stepper:
        group_config = config_.replace(**overrides) if overrides else config_
        kept = {name: schedule for name, schedule in schedules.items() if name not in overrides}
        return inject_hyperparams(algorithm, group_config, **kept) if kept else bind(algorithm, group_config)

    stepper: Stepper = core({})
    if settings.param_groups:
        if params is None:
            raise ValueError("param_groups: from_config needs the params (a dict pytree) to match the patterns to names")
        labels = settings.labels(param_names(params))
        steppers = {f"param_groups.{i}": core(rule.overrides) for i, rule in enumerate(settings.param_groups)}
        if "default" in labels:
            steppers["default"] = stepper
        stepper = partition(steppers, pytree.tree_unflatten(labels, pytree.tree_flatten(params)[1]))
    return settings.wrap(stepper)


def ordered_params(params: Any) -> list[Any]:
    """``params`` (a tensor, or an iterable of tensors or param groups) as a list. A set is refused,
    as torch refuses it: its order changes between runs, and a checkpoint numbers params by it."""
    if isinstance(params, Tensor):
        return [params]
    if isinstance(params, (set, frozenset)):
        raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering of tensors in sets "
                        "will change between runs. Please use a list instead.")
    return list(params)


def torch_param_groups(params: Any, settings: Combinators | None) -> Any:
    """What to hand ``torch.optim.Optimizer``: ``params`` as given (tensors or param-group dicts), or,
    from an ``nn.Module`` or ``named_parameters()``, the tensors, split into the groups that
    ``settings.param_groups`` describes (the unmatched ones first, with no overrides)."""
    if isinstance(params, torch.nn.Module):
        params = params.named_parameters()
    params = ordered_params(params)
    named = bool(params) and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], Tensor) for p in params)
    rules = settings.param_groups if settings is not None else []
    if not rules:
        return [p for _, p in params] if named else params
    if not named:
        got = "param-group dicts" if any(isinstance(p, Mapping) for p in params) else "unnamed tensors"
        raise ValueError(f"param_groups matches parameters by name: pass the model or model.named_parameters(), not {got} "
                         "(to a wrapper that hands param groups to each rank's optimizer, such as ZeroRedundancyOptimizer, "
                         "give the groups of optorch.distributed.split_param_groups(config, model))")
    labels = settings.labels([name for name, _ in params])
    groups = [{"params": [p for (_, p), label in zip(params, labels) if label == "default"]}]
    groups += [{"params": [p for (_, p), label in zip(params, labels) if label == f"param_groups.{i}"], **rule.overrides} for i, rule in enumerate(rules)]
    return [group for group in groups if group["params"]]


# -- the shim ---------------------------------------------------------------------------------------


class InPlace:
    """The combinators around an ``optorch.Optimizer``'s step, on ``.grad`` in place.

    ``Optimizer.step`` calls :meth:`before_step` (accumulate, unscale, check, clip: it returns False
    to skip the engine step, and the shim then also leaves its schedules where they are) and, after
    a step, :meth:`after_step` (EMA). The math is this module's functions, so a built optimizer steps
    as :func:`from_config`'s pure stepper does.

    Its state lives where torch's tools look: per parameter in ``optimizer.state`` (``grad_acc``,
    the accumulated gradient; ``ema``, the average), and the counters in every param group, linked
    (``accumulate.micro_step``; ``skip.notfinite_count``, ``skip.total_notfinite``,
    ``skip.last_finite``; ``amp.scale``, ``amp.growth_tracker``, ``amp.overflows``; ``ema.count``).
    """

    def __init__(self, settings: Combinators, optimizer: Any):
        self.settings = settings
        self.optimizer = optimizer
        params = self._params()
        device = params[0].device if params else None
        count = lambda: torch.zeros((), dtype=torch.int64)  # noqa: E731 - host counters: read without a device sync
        values: dict[str, Tensor] = {}
        if settings.accumulate_steps > 1:
            values["accumulate.micro_step"] = count()
        if settings.skip_nonfinite:
            values.update({"skip.notfinite_count": count(), "skip.total_notfinite": count(), "skip.last_finite": torch.ones((), dtype=torch.bool)})
        if settings.amp is not None:
            scaler = amp.init(settings.amp, device)
            values.update({"amp.scale": scaler.scale, "amp.growth_tracker": scaler.growth_tracker, "amp.overflows": count()})
        if settings.ema is not None:
            values["ema.count"] = torch.zeros((), dtype=torch.int64, device=device)
        optimizer._link(values)  # kept where they are when the optimizer already has them (a copy)
        self.last_grad_norm: Tensor | None = None
        """The global gradient norm the last step clipped with (``clip_grad_norm`` only)."""

    def _value(self, key: str) -> Tensor:
        return self.optimizer.linked(key)

    @property
    def stepped(self) -> bool:
        """Whether the last ``optimizer.step()`` updated the params (``not optimizer.step_was_skipped``)."""
        return not self.optimizer.step_was_skipped

    @property
    def overflows(self) -> int:
        """Steps skipped for an inf/NaN in the scaled gradients (``amp``)."""
        return int(self._value("amp.overflows"))

    @property
    def skipped(self) -> int:
        """Steps skipped for a non-finite gradient so far (``skip_nonfinite``)."""
        return int(self._value("skip.total_notfinite"))

    @property
    def scaler(self) -> amp.ScalerState | None:
        """The loss scaler's state (``amp``): live tensors."""
        if self.settings.amp is None:
            return None
        return amp.ScalerState(self._value("amp.scale"), self._value("amp.growth_tracker"))

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``loss * scale``: call ``backward()`` on this (``amp`` entry)."""
        if self.settings.amp is None:
            raise RuntimeError("this optimizer has no loss scaler: add an 'amp' entry to its config")
        return amp.scale_loss(loss, self.scaler)

    def state_keys(self) -> frozenset[str]:
        return self.settings.state_keys()

    def _params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def new_param(self, param: Tensor, state: dict[str, Tensor]) -> None:
        """A param's first step: its average starts at its value before the update; its accumulated
        gradient at zero, if it has none yet (so a new state has every key a checkpoint has: DCP's
        flattened loading reads the keys of the state it loads into)."""
        if self.settings.ema is not None and "ema" not in state:
            state["ema"] = param.detach().clone()
        if self.settings.accumulate_steps > 1 and "grad_acc" not in state:
            state["grad_acc"] = torch.zeros_like(param)

    @torch.no_grad()
    def before_step(self, work: Sequence[Any]) -> bool | Tensor:
        """Accumulate, unscale, check and clip the gradients of ``work``; whether to step.

        An accumulating call returns False (one host read of a CPU counter). Otherwise the loss
        scale and the skip counters are updated with tensor ops, and the answer is a 0-dim bool
        tensor (no NaN/inf, no overflow) that the shim reads once eagerly, as ``GradScaler.step``
        does, and that a compiled step applies with ``torch.where`` instead, so neither amp nor
        skip_nonfinite costs a graph break there."""
        params = [p for item in work for p in item.params]
        state = self.optimizer.state
        k = self.settings.accumulate_steps
        if k > 1:
            for param in params:  # zeros + g, as multi_steps sums (a first -0.0 becomes 0.0 in both)
                entry = state[param]
                if "grad_acc" not in entry:
                    entry["grad_acc"] = torch.zeros_like(param.grad)
                entry["grad_acc"].add_(param.grad)
            micro_step = self._value("accumulate.micro_step")
            ops.assign(micro_step, micro_step + 1)
            if int(micro_step) < k:
                return False
            with_grad = {id(p) for p in params}
            for param in self._params():
                acc = state[param].get("grad_acc") if param in state else None
                # a param without a gradient now steps if it had one earlier in this window
                if acc is None or (id(param) not in with_grad and not bool(distributed.full(acc.any()))):
                    continue
                if param.grad is None:
                    param.grad = acc / k
                else:
                    param.grad.copy_(acc / k)
                acc.zero_()
                if id(param) not in with_grad:
                    self._adopt(work, param)
            ops.assign(micro_step, 0)
            params = [p for item in work for p in item.params]
        grads = [p.grad for p in params]
        partition = self.optimizer.partition  # this rank's share of the params (ZeRO): decide over all shares
        apply: bool | Tensor = True
        if self.settings.amp is not None:
            unscaled, found_inf = amp.unscale(grads, self.scaler)
            if partition is not None:
                found_inf = partition.reduce(found_inf, "max")
            new = amp.update(self.scaler, found_inf, self.settings.amp)
            ops.assign(self._value("amp.scale"), new.scale)
            ops.assign(self._value("amp.growth_tracker"), new.growth_tracker)
            overflow = (found_inf != 0).cpu()
            ops.assign(self._value("amp.overflows"), self._value("amp.overflows") + overflow.to(torch.int64))
            apply = ~overflow
            for grad, value in zip(grads, unscaled):  # as GradScaler: an overflowing step leaves them scaled
                grad.copy_(torch.where(apply.to(grad.device), value, grad))
        if self.settings.skip_nonfinite:
            names = ("notfinite_count", "total_notfinite", "last_finite")
            counters = {name: self._value(f"skip.{name}") for name in names}
            finite = ops.all_finite(grads).cpu()
            if partition is not None:
                finite = partition.reduce(finite, "min").bool()
            finite, new_counters = finite_counters(finite, counters, None)
            for name in names:  # counted only on steps amp let through, as apply_if_finite inside amp.scaled
                ops.assign(counters[name], new_counters[name] if apply is True else torch.where(apply, new_counters[name], counters[name]))
            apply = finite if apply is True else apply & finite
        if self.settings.clip_grad_norm is not None and (grads or partition is not None):
            self.last_grad_norm = global_norm(grads) if partition is None else partition.norm(global_norm(grads))
            coefficient = clip_coefficient(self.last_grad_norm, self.settings.clip_grad_norm)
            for grad in grads:
                grad.mul_(coefficient.to(grad.device))
        if torch.compiler.is_compiling() or apply is True:
            return apply
        return bool(apply)  # one host read, as GradScaler.step

    def _adopt(self, work: Sequence[Any], param: Tensor) -> None:
        """A param with no gradient this call but some in the accumulated ones steps too."""
        for item, group in zip(work, self.optimizer.param_groups):
            if any(param is p for p in group["params"]):
                item.params.append(param)
                item.grads.append(param.grad)
                item.states.append(self.optimizer._states.check(param, self.optimizer.state, item.config))  # eager only: a host read got us here
                return

    @torch.no_grad()
    def after_step(self, apply: bool | Tensor = True) -> None:
        """The EMA update; ``apply`` is :meth:`before_step`'s answer (a tensor inside torch.compile)."""
        if self.settings.ema is None:
            return
        count = self._value("ema.count")
        counted = count + (apply.to(count.device, count.dtype) if isinstance(apply, Tensor) else 1)
        decay = ema_decay(self.settings.ema.decay, counted, self.settings.ema.warmup)
        ops.assign(count, counted)
        pairs = [(state["ema"], p) for p in self._params() if (state := self.optimizer.state.get(p)) and "ema" in state]
        for average, new in zip([a for a, _ in pairs], ema_update([a for a, _ in pairs], [p for _, p in pairs], decay)):
            average.copy_(new if apply is True else torch.where(apply.to(new.device), new, average))

    def ema_params(self) -> list[Tensor]:
        """The EMA of each param, in ``param_groups`` order (live tensors: read, don't write). A param
        that has not stepped yet is its own average."""
        if self.settings.ema is None:
            raise RuntimeError("this optimizer keeps no EMA: add an 'ema' entry to its config")
        state = self.optimizer.state
        return [state[p]["ema"] if p in state and "ema" in state[p] else p.detach() for p in self._params()]

    @contextlib.contextmanager
    def swap_ema(self) -> Iterator[None]:
        """Within the block the params hold their EMA (e.g. to evaluate); restored on exit."""
        averages, params = self.ema_params(), self._params()
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            for p, average in zip(params, averages):
                p.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(params, saved):
                    p.copy_(value)
