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
and ``param_groups`` are validated by :class:`optorch.functional.settings.Combinators`.
:func:`optorch.build_stepper` turns a config into the composed pure stepper, and ``optorch.build`` runs
the same logic around the shim's step (through :class:`optorch.shim.runtime.InPlace`, which calls the
functions here on ``.grad``), in this order: accumulate, skip if non-finite, clip, step, EMA. That is
``multi_steps(apply_if_finite(clip_by_global_norm(ema(inner))))``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..algorithms import registry
from ..core import distributed, ops
from ..core.algorithm import Algorithm
from ..core.compat import pytree
from ..core.config import Config

__all__ = [
    "ApplyIfFinite",
    "Bound",
    "ClipByGlobalNorm",
    "Ema",
    "MultiSteps",
    "Partition",
    "Stepper",
    "apply_if_finite",
    "bind",
    "clip_by_global_norm",
    "ema",
    "ema_params",
    "labels_from_patterns",
    "multi_steps",
    "param_names",
    "partition",
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
    return distributed.full(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g).to(grads[0].device) for g in grads]))
    )


def clip_coefficient(total_norm: Tensor, max_norm: Any) -> Tensor:
    """:math:`\\min(1, c / (\\|g\\| + 10^{-6}))`, the factor ``clip_grad_norm_`` multiplies by."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def finite_counters(
    finite: Tensor, counters: Mapping[str, Tensor], max_consecutive_errors: int | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Whether to apply a step, and the updated skip counters (optax's ``apply_if_finite``)::

        notfinite_count  consecutive non-finite steps (0 after a finite one)
        total_notfinite  non-finite steps so far
        last_finite      whether this step's gradients were finite

    A non-finite step is applied anyway once ``notfinite_count`` exceeds ``max_consecutive_errors``."""
    count = torch.where(finite, torch.zeros_like(counters["notfinite_count"]), counters["notfinite_count"] + 1)
    apply = finite if max_consecutive_errors is None else finite | (count > max_consecutive_errors)
    return apply, {
        "notfinite_count": count,
        "total_notfinite": counters["total_notfinite"] + (~finite).to(count.dtype),
        "last_finite": finite,
    }


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
        return {
            "notfinite_count": zero,
            "total_notfinite": zero.clone(),
            "last_finite": torch.ones_like(zero, dtype=torch.bool),
            "inner": self.inner.init(params),
        }

    def step(self, params: Any, grads: Any, state: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        apply, counters = finite_counters(
            ops.all_finite(_grad_leaves(grads)).to(state["notfinite_count"].device), state, self.max_consecutive_errors
        )
        new_params, inner = self.inner.step(params, grads, state["inner"])
        return ops.select(apply, new_params, params), {**counters, "inner": ops.select(apply, inner, state["inner"])}


def apply_if_finite(stepper: Stepper, max_consecutive_errors: int | None = None) -> ApplyIfFinite:
    """``stepper``, skipping any step whose gradients hold a NaN or an inf; with
    ``max_consecutive_errors=n``, the (n+1)-th non-finite step in a row is applied anyway."""
    if max_consecutive_errors is not None and (
        isinstance(max_consecutive_errors, bool)
        or not isinstance(max_consecutive_errors, int)
        or max_consecutive_errors < 0
    ):
        raise ValueError(
            f"apply_if_finite: max_consecutive_errors must be None or an int >= 0, got {max_consecutive_errors!r}"
        )
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
        return {
            "mini_step": _counter(params),
            "grad_acc": pytree.tree_map(torch.zeros_like, params),
            "inner": self.inner.init(params),
        }

    def step(self, params: Any, grads: Any, state: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        acc, spec = pytree.tree_flatten(state["grad_acc"])
        grad_leaves, grad_spec = pytree.tree_flatten(grads, is_leaf=_is_none)
        if grad_spec != spec:
            raise ValueError(
                f"multi_steps: grads must have the structure of params.\n params: {spec}\n grads: {grad_spec}"
            )
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
            raise ValueError(
                f"partition: labels must have the structure of params.\n params: {spec}\n labels: {label_spec}"
            )
        missing = sorted({label for label in label_leaves if label not in self.steppers})
        if missing:
            raise ValueError(
                f"partition: no stepper for label(s) {', '.join(map(repr, missing))}; steppers are given for "
                f"{', '.join(map(repr, self.steppers))}"
            )
        return [_path_name(path) for path, _ in path_leaves], label_leaves, spec

    @staticmethod
    def _subset(names: list[str], labels: list[str], leaves: list[Any], label: str) -> dict[str, Any]:
        return {name: leaf for name, leaf_label, leaf in zip(names, labels, leaves) if leaf_label == label}

    def init(self, params: Any) -> dict[str, Any]:
        names, labels, _ = self._split(params)
        leaves = pytree.tree_leaves(params)
        return {
            label: self.steppers[label].init(self._subset(names, labels, leaves, label))
            for label in dict.fromkeys(labels)
        }

    def step(self, params: Any, grads: Any, state: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        names, labels, spec = self._split(params)
        leaves = pytree.tree_leaves(params)
        grad_leaves, grad_spec = pytree.tree_flatten(grads, is_leaf=_is_none)
        if grad_spec != spec:
            raise ValueError(
                f"partition: grads must have the structure of params.\n params: {spec}\n grads: {grad_spec}"
            )
        new_leaves, new_state = dict(zip(names, leaves)), {}
        for label in dict.fromkeys(labels):
            subset, subset_grads = (
                self._subset(names, labels, leaves, label),
                self._subset(names, labels, grad_leaves, label),
            )
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


def _match(
    names: Sequence[str], rules: Mapping[str, Sequence[str]], default: str, where: Callable[[str], str]
) -> list[str]:
    """Each name's label: the first rule's (in order) with a pattern that matches it, else ``default``.
    A pattern that matches no name, or a rule whose names were all taken by earlier rules, is an
    error (``where(label)`` says which rule)."""
    for label, globs in rules.items():
        for glob in globs:
            if not any(fnmatch.fnmatchcase(name, glob) for name in names):
                raise ValueError(
                    f"{where(label)}pattern {glob!r} matches no parameter; names are: {_shown(list(names))}"
                )
    labels = [
        next((label for label, globs in rules.items() if any(fnmatch.fnmatchcase(name, g) for g in globs)), default)
        for name in names
    ]
    for label in rules:
        if label not in labels:
            raise ValueError(
                f"{where(label)}every parameter it matches was taken by an earlier entry (the first match wins)"
            )
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
        return {
            "count": _counter(params),
            "ema_params": pytree.tree_map(lambda p: p.detach().clone(), params),
            "inner": self.inner.init(params),
        }

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
