"""How two trajectories compare, and the rule that judges a candidate: equal to rounding in float64,
within :data:`FACTOR` times the reference's own error against the float64 truth below."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..core.compat import pytree
from .verify_problem import Setting, Trajectory, cached_reference, problem_for


def worst(values: Iterable[float]) -> float:
    """The largest of ``values``, NaN-aware: ``inf`` if any is NaN (Python's ``max`` skips a NaN that
    does not come first), 0.0 for none."""
    result = 0.0
    for value in values:
        if math.isnan(value):
            return math.inf
        result = max(result, value)
    return result


def max_abs_diff(a: Any, b: Any) -> float:
    """The largest |a - b| over two pytrees of tensors (trajectories, param dicts, state dicts) or of
    numbers, leaf by leaf in float64 (dict entries matched by key); ``inf`` on any NaN and on any
    mismatch of structure or shape."""
    leaves_a, spec_a = pytree.tree_flatten(_by_key(a))
    leaves_b, spec_b = pytree.tree_flatten(_by_key(b))
    if spec_a != spec_b:
        return math.inf
    pairs = [(_tensor(x), _tensor(y)) for x, y in zip(leaves_a, leaves_b)]
    if any(x.shape != y.shape for x, y in pairs):
        return math.inf
    return _largest([(x, y if y.device == x.device else y.to(x.device)) for x, y in pairs], lambda x, y: x - y)


def magnitude(trajectory: Any) -> float:
    """The largest |value| of a trajectory: the scale of its ulps."""
    return _largest([(_tensor(x),) for x in pytree.tree_leaves(trajectory)], lambda x: x)


def _by_key(tree: Any) -> Any:
    # dicts in key order, so that two trees differing only in insertion order compare
    if isinstance(tree, dict):
        return {key: _by_key(tree[key]) for key in sorted(tree, key=repr)}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(_by_key(item) for item in tree)
    return tree


def _largest(groups_of: list[tuple[Tensor, ...]], measure: Callable[..., Tensor]) -> float:
    """The largest |measure(*tensors)| over the tuples, in float64 (complex128), NaN as ``inf``: leaves
    of one shape are stacked and measured at once (a trajectory has hundreds of small ones)."""
    by_shape: dict[tuple, list[tuple[Tensor, ...]]] = {}
    for tensors in groups_of:
        if tensors[0].numel():
            by_shape.setdefault((tensors[0].shape, tensors[0].device), []).append(tensors)
    peaks = []
    for members in by_shape.values():
        stacked = [_wide(torch.stack(column)) for column in zip(*members)]
        peaks.append(measure(*stacked).abs().max().to("cpu", torch.float64))
    return worst(torch.stack(peaks).tolist()) if peaks else 0.0


def _tensor(value: Any) -> Tensor:
    return value.detach() if isinstance(value, Tensor) else torch.as_tensor(value)


def _wide(tensor: Tensor) -> Tensor:
    return tensor.to(torch.complex128) if tensor.is_complex() else tensor.to(torch.float64)


# ------------------------------------------------------------------------------------------------
# the rule

FLOAT64_TOLERANCE = 1e-12

# float64, compiled, for algorithms that reduce over tensors (norms, means: Adafactor, LARS, DAG):
# Inductor sums in another order than torch's eager kernels, an ulp or so per reduction per step, and
# normalised or RMS-scaled updates amplify it where gradients vanish. Measured: Adafactor 7.9e-12 with
# maximize and None grads over 100 steps (pure and eager are bit-exact there). Still 1e6 below what an
# algorithmic mistake moves these trajectories by.
FLOAT64_COMPILED_REDUCTION_TOLERANCE = 1e-10

DTYPES = ("float64", "float32", "bfloat16", "float16")

FACTOR = 4.0
"""Low precision: optorch's error against the float64 truth may be at most this multiple of the
reference's own error (docs/verification.md has the measured distribution it is chosen from)."""

FLOOR_ULPS = {torch.float32: 2.0, torch.bfloat16: 2.0, torch.float16: 2.0}
"""Plus this many ulps of each dtype (its machine epsilon times the values' magnitude), for a reference
that lands on the truth (an error of 0 would allow no rounding at all). Measured, the references' own
errors are at least 1.5 (float32), 1.6 (bfloat16) and 1.3 (float16) such ulps: the floor never decides
a check on the grid."""

SPREAD_TO_ERROR = 8.0
"""Where no reference runs in low precision (DAG, AutoSGM), its error is taken as this many times the
float64 run's spread under rounding noise (:func:`sensitivity`): on the torch algorithms, where both
are known, the reference's own error is at most 28 spreads over the whole grid (Adafactor; 99% of the
cases under 11 in float32, 6 in bfloat16), within the 32 this allows with :data:`FACTOR`."""

NUDGES = 2
"""How many random one-ulp perturbations measure the sensitivity (the largest spread counts)."""
NUDGES_BEFORE_FAILING = 8
"""How many a check measures before it fails on the spread: where rounding noise grows step after step
(a chaotic configuration) the spread has a heavy tail, and two draws can miss its size."""


def tolerance(dtype: torch.dtype, reference_error: float = 0.0, scale: float = 1.0) -> float:
    """The largest error a check in ``dtype`` passes with. float64: :data:`FLOAT64_TOLERANCE` (against
    the reference itself); below: :data:`FACTOR` times the reference's own error against the float64
    truth, plus :data:`FLOOR_ULPS` ulps of values of magnitude ``scale``."""
    if dtype == torch.float64:
        return FLOAT64_TOLERANCE
    return FACTOR * reference_error + FLOOR_ULPS[dtype] * torch.finfo(dtype).eps * scale


def sensitivity(
    run: Callable[[Setting], Trajectory], truth_setting: Setting, truth: Trajectory, draws: int = NUDGES
) -> float:
    """How far rounding noise alone spreads the float64 run ``truth``: its largest move when its inputs,
    and every stepped param after each step, take a random error of up to half an ulp of the low
    precision (``truth_setting.inputs``), as rounding would, over :data:`NUDGES` draws. A correct
    low-precision run's error is of this size (docs/verification.md has the measured ratios)."""
    return worst(
        max_abs_diff(cached_reference(run, truth_setting._replace(nudge=seed)), truth) for seed in range(draws)
    )


class Judgement(NamedTuple):
    error: float
    reference_error: float | None
    tolerance: float
    movement: float | None
    basis: str = "reference"


def _movement(trajectory: Trajectory, setting: Setting) -> float:
    """How far ``trajectory`` moves from its initial params: the error of an optimizer that does nothing."""
    return max_abs_diff(trajectory, [problem_for(setting)[0]] * len(trajectory))


def judge(
    candidate: Callable[[Setting], Trajectory],
    reference: Callable[[Setting], Trajectory],
    setting: Setting,
    *,
    live: bool = True,
    float64_tolerance: float | None = None,
) -> Judgement:
    """``candidate`` measured by the rule (``reference`` is cached): in float64 against the reference,
    below against the float64 truth, with the reference's own error and how far the truth moves."""
    if setting.dtype == torch.float64:
        limit = FLOAT64_TOLERANCE if float64_tolerance is None else float64_tolerance
        expected = cached_reference(reference, setting)
        error = max_abs_diff(candidate(setting), expected)
        if error > limit > FLOAT64_TOLERANCE:
            # A path that rounds otherwise (Inductor's reductions) on a chaotic configuration: its
            # ulp-sized differences grow as the reference's own run grows float64 rounding noise.
            spread = sensitivity(reference, setting._replace(inputs=torch.float64), expected, NUDGES_BEFORE_FAILING)
            if FACTOR * spread > limit:  # judged only where that noise stays below how far the params move
                movement = _movement(expected, setting)
                return Judgement(error, spread, FACTOR * spread, movement, "sensitivity")
        return Judgement(error, None, limit, None)
    truth_setting = setting._replace(dtype=torch.float64, inputs=setting.dtype)
    truth = cached_reference(reference, truth_setting)
    error, scale = max_abs_diff(candidate(setting), truth), magnitude(truth)
    movement = _movement(truth, truth_setting)
    if not live:
        reference_error, basis = SPREAD_TO_ERROR * sensitivity(reference, truth_setting, truth), "sensitivity"
    else:
        reference_error, basis = max_abs_diff(cached_reference(reference, setting), truth), "reference"
        if error > tolerance(setting.dtype, reference_error, scale):
            # The reference's error is one draw of the rounding noise, sometimes a lucky one (torch's
            # float32 Adafactor: 1.1e-6 where that noise spreads the trajectory by 4.6e-5); the spread
            # is another.
            spread = sensitivity(reference, truth_setting, truth, NUDGES_BEFORE_FAILING)
            if spread > reference_error:
                reference_error, basis = spread, "sensitivity"
    return Judgement(error, reference_error, tolerance(setting.dtype, reference_error, scale), movement, basis)
