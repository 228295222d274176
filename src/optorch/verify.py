"""Equivalence checks against the reference implementations, shared by ``optorch verify`` and the tests.

Every check runs one algorithm and one config on a small problem and compares parameter trajectories,
step by step (the largest absolute difference over all steps and all params):

* the reference: torch.optim's own class with its default execution, or where torch.optim has none an
  independent implementation (``Algorithm.reference``: torch-adopt, pytorch_optimizer's LARS), or the
  torch.optim optimizer a config reduces to (``Algorithm.reductions``: AutoSGM, decoupled Adam), or the
  trajectory recorded from the original (:mod:`optorch.recorded`: ADOPT, DAG, AutoSGM);
* the candidate: the pure stepper ``optorch.<name>.step`` (path ``pure``), the shim
  ``optorch.build(config, groups, engine=E)`` (paths ``shim:torch``, ``shim:eager``,
  ``shim:compiled``), or torch's fused kernel wherever the shim's ``auto`` engine may pick it (path
  ``torch:fused``, see ``engines.TORCH_KERNELS``), against torch's default kernel.

**The rule.** In float64 a candidate must equal its reference to rounding: :data:`FLOAT64_TOLERANCE`.
In float32, bfloat16 and float16 no fixed threshold can say "equal": rounding fed back through 100
steps of gradients depends on the device's kernels and on how chaotic the configuration is. A
low-precision run is therefore judged against the float64 truth, the same problem (inputs rounded
alike) computed in float64 by the reference: the candidate's error must stay within :data:`FACTOR`
times the reference's own low-precision error, plus a floor of a few ulps of the values
(:func:`tolerance`). Where the candidate's error exceeds that, and where no reference runs in low
precision (DAG, AutoSGM outside its reductions), the float64 run's spread under rounding-sized noise
(:func:`sensitivity`) stands for the reference's error when it is larger. A check whose tolerance
reaches how far the truth moves cannot tell a wrong optimizer and says so (``N/A``). The numbers are
measured over the whole grid (docs/verification.md).

**The problem** is built to exercise what an optimizer can get wrong: several tensors of different
shapes (a 0-dim one included, and one long enough for kernels' vectorized loops), a parameter that
never gets a gradient, two param groups with different learning rates, gradients recomputed from the
current parameters (so an early error feeds back into every later step), and optionally a parameter
whose gradient is ``None`` every third step (torch skips it, and its step count falls behind the
others). The loss is bounded, so ``maximize=True`` climbs it without overflowing.

**The plan** (:func:`plan`) lists the checks ``optorch verify`` runs: by default a representative
subset that answers in about a minute, with ``full=True`` every combination of every grid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import pydantic
import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from . import engines, recorded, registry

__all__ = [
    "COMPILED_REPRESENTATIVES",
    "DTYPES",
    "EXPECTED_FAILURES",
    "FACTOR",
    "FLOAT64_COMPILED_REDUCTION_TOLERANCE",
    "FLOAT64_TOLERANCE",
    "FLOOR_ULPS",
    "PATHS",
    "SPREAD_TO_ERROR",
    "Check",
    "Crash",
    "NoGridError",
    "Plan",
    "Result",
    "available_devices",
    "check",
    "check_estimated",
    "check_kernel",
    "check_recorded",
    "check_reduction",
    "cores",
    "cover",
    "describe",
    "flag_grid",
    "grid_algorithms",
    "label",
    "max_abs_diff",
    "most_flags",
    "paths_for",
    "plan",
    "problem",
    "reduction_algorithms",
    "run",
    "run_pure",
    "run_shim",
    "run_torch",
    "sensitivity",
    "tolerance",
    "worst",
]

# ------------------------------------------------------------------------------------------------
# the flag grids


class NoGridError(ValueError):
    """The algorithm has no verification grid (it has no torch.optim counterpart to compare with)."""


REFERENCE_PACKAGES = {"adopt": "torch-adopt==0.1.0", "lars": "pytorch_optimizer"}
"""Where the independent references come from, for the message when one is missing."""


def gridded_algorithms() -> list[str]:
    """Registered algorithms that declare a verification grid, whether or not their reference is
    installed here."""
    return [name for name in registry.names() if registry.get(name).grid is not None]


def grid_algorithms() -> list[str]:
    """Registered algorithms with a reference implementation installed (torch.optim's counterpart or an
    independent one): what can be verified. Each must have a grid (``flag_grid`` says so loudly if one
    is missing)."""
    return [name for name in registry.names() if registry.get(name).reference_optimizer() is not None]


def flag_grid(name: str) -> list[dict[str, Any]]:
    """Every valid flag combination of ``name``, as config dicts in the builder's format (with ``"name"``).

    Combinations the algorithm's Config rejects (SGD's nesterov without plain momentum) are left out,
    so the grid follows the Config's own rules.
    """
    algorithm = registry.get(name)
    if algorithm.reference_optimizer() is None:
        raise NoGridError(f"{algorithm.name} has no reference implementation installed, so no verification grid; verifiable: {', '.join(grid_algorithms())}")
    if algorithm.grid is None:
        raise NoGridError(f"{algorithm.name} has a reference implementation but no verification grid: give its Algorithm a grid")
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


# ------------------------------------------------------------------------------------------------
# the problem


class Setting(NamedTuple):
    """How a trajectory is made, everything but the optimizer."""

    steps: int = 100
    dtype: torch.dtype = torch.float64
    device: str = "cpu"
    intermittent: bool = False
    """Drop ``b1``'s gradient every third step."""
    inputs: torch.dtype | None = None
    """The precision the inputs are rounded to first (default: ``dtype``): a low-precision run's float64
    truth computes the rounded problem, so the rounding of the inputs is not counted as an error."""
    nudge: int | None = None
    """Seed of a perturbation of every input, and of every stepped param after each step, by up to half
    an ulp of ``inputs``: a float64 run with the noise a low-precision run's rounding adds
    (:func:`sensitivity`)."""


TRAINABLE = ("w1", "b1", "w2", "scale", "wide")
GROUPS = (("w1", "b1", "frozen"), ("w2", "scale", "wide"))
"""Param groups by name: the second one runs at half the learning rate (a per-group override)."""
SECOND_GROUP_LR = 0.5
WIDE = (6, 25)
"""``wide`` has 150 elements, more than a vector register holds many times over and no multiple of one,
so kernels run both their vectorized loops and their scalar tails (torch 2.13's fused CPU SGD is wrong
in bfloat16 only in its vectorized loop). It enters the loss on its own, element by element: widening
the network instead turned Adam's sign-like steps chaotic, amplifying rounding a thousandfold."""
WIDE_SCALE, WIDE_WEIGHT = 0.3, 1 / 16
"""``wide`` starts at pi/2 give or take this, half way between the optima of its loss
``WIDE_WEIGHT * cos(wide).sum()`` (pi when minimizing, 0 when maximizing): its gradients are of the
network's size, and it starts far from the stationary points where normalized steps turn chaotic."""


def problem(dtype: torch.dtype, device: str = "cpu", *, inputs: torch.dtype | None = None, nudge: int | None = None) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The initial params (by name) and the data ``(x, y)``: drawn in float64 from a private generator,
    rounded to ``inputs`` (default ``dtype``), optionally nudged (:class:`Setting`), then cast to
    ``dtype``; so the float32 problem is the float64 one rounded and nothing depends on (or disturbs)
    the global RNG."""
    generator = torch.Generator().manual_seed(20240611)
    nudged = _Nudge(nudge, inputs or dtype)

    def draw(*shape: int, scale: float = 1.0) -> Tensor:
        return prepare(torch.randn(*shape, generator=generator, dtype=torch.float64) * scale)

    def prepare(value: Tensor) -> Tensor:
        return nudged(value.to(inputs or dtype).double()).to(dtype=dtype, device=device)

    params = {
        "w1": draw(4, 3, scale=0.5),
        "b1": draw(3, scale=0.1),
        "w2": draw(3, 2, scale=0.5),
        "scale": prepare(torch.tensor(1.3, dtype=torch.float64)),
        "frozen": draw(3, scale=0.1),
    }
    x, y = draw(16, 4), draw(16, 2, scale=0.5)
    # drawn last, so the network's numbers are the ones every earlier measurement used
    params["wide"] = prepare(torch.randn(*WIDE, generator=generator, dtype=torch.float64) * WIDE_SCALE + math.pi / 2)
    return params, x, y


class _Nudge:
    """Adds to every element a relative error drawn uniformly from half an ulp of ``dtype`` either way
    (seeded), as rounding to ``dtype`` would; nothing for a None seed."""

    def __init__(self, seed: int | None, dtype: torch.dtype):
        self.draws = torch.Generator().manual_seed(seed) if seed is not None else None
        self.eps = torch.finfo(dtype).eps

    def __call__(self, value: Tensor) -> Tensor:
        if self.draws is None:
            return value
        uniform = torch.rand(value.shape, generator=self.draws, dtype=torch.float64).to(value)
        return value * (1 + (uniform - 0.5) * self.eps)


def _problem(setting: Setting) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    return problem(setting.dtype, setting.device, inputs=setting.inputs, nudge=setting.nudge)


def _loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    hidden = torch.tanh(x @ params["w1"] + params["b1"] + params["frozen"])
    return ((torch.sin(hidden @ params["w2"] * params["scale"]) - y) ** 2).mean() + torch.cos(params["wide"]).sum() * WIDE_WEIGHT


def _gradients(params: dict[str, Tensor], x: Tensor, y: Tensor, step: int, intermittent: bool) -> dict[str, Tensor | None]:
    """The loss's gradient at the current params, written out: autograd costs four times as much on
    tensors this small, and every check computes thousands (a test holds it to autograd's)."""
    w1, w2, scale = params["w1"], params["w2"], params["scale"]
    hidden = torch.tanh(x @ w1 + params["b1"] + params["frozen"])
    logits = hidden @ w2
    z = logits * scale
    dz = (torch.sin(z) - y) * (2 / y.numel()) * torch.cos(z)
    dlogits = dz * scale
    dpre = (dlogits @ w2.T) * (1 - hidden * hidden)
    grads: dict[str, Tensor | None] = {"w1": x.T @ dpre, "b1": dpre.sum(0), "w2": hidden.T @ dlogits, "scale": (dz * logits).sum(),
                                       "wide": torch.sin(params["wide"]) * -WIDE_WEIGHT, "frozen": None}
    if intermittent and step % 3 == 2:
        grads["b1"] = None
    return grads


def _group_hyperparameters(config: dict[str, Any]) -> list[dict[str, Any]]:
    hyperparameters = {k: v for k, v in config.items() if k != "name"}
    return [hyperparameters, {**hyperparameters, "lr": hyperparameters["lr"] * SECOND_GROUP_LR}]


Trajectory = list[dict[str, Tensor]]
"""The params after each step, by name."""


# ------------------------------------------------------------------------------------------------
# runners


def _train_live(make_optimizer, make_scheduler, setting: Setting) -> Trajectory:
    """``make_optimizer(params by name)`` trains the problem's leaf params, setting ``.grad`` from the
    current params each step (and stepping ``make_scheduler(optimizer)`` after, if given)."""
    initial, x, y = _problem(setting)
    params = {name: p.clone().requires_grad_(name in TRAINABLE) for name, p in initial.items()}
    optimizer = make_optimizer(params)
    scheduler = make_scheduler(optimizer) if make_scheduler is not None else None
    nudged = _stepwise_nudge(setting)
    trajectory = []
    for step in range(setting.steps):
        for name, grad in _gradients(params, x, y, step, setting.intermittent).items():
            params[name].grad = grad
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        with torch.no_grad():
            for p in params.values():
                if p.grad is not None:
                    p.copy_(nudged(p))
        trajectory.append({name: p.detach().clone() for name, p in params.items()})
    return trajectory


def _stepwise_nudge(setting: Setting) -> _Nudge:
    # a seed of its own, so the steps' perturbations do not repeat the inputs'
    return _Nudge(None if setting.nudge is None else setting.nudge + 1_000_003, setting.inputs or setting.dtype)


def _run_groups(make_optimizer, config: dict[str, Any], setting: Setting) -> Trajectory:
    """Train leaf params in verify's two param groups with a torch.optim-style optimizer."""
    hyper = _group_hyperparameters(config)
    groups_of = lambda params: [{"params": [params[n] for n in names], "lr": h["lr"]} for names, h in zip(GROUPS, hyper)]  # noqa: E731
    return _train_live(lambda params: make_optimizer(groups_of(params)), None, setting)


def _run_torch(name: str, config: dict[str, Any], setting: Setting, **flags: Any) -> Trajectory:
    torch_class = registry.get(name).reference_optimizer()
    if torch_class is None:
        raise ValueError(f"{name} has no reference implementation installed to verify against")
    hyperparameters = {k: v for k, v in config.items() if k != "name"}
    return _run_groups(lambda groups: torch_class(groups, **hyperparameters, **flags), config, setting)


def _run_shim(name: str, config: dict[str, Any], setting: Setting, engine: str) -> Trajectory:
    from .builder import build

    config = {**config, "name": name}
    return _run_groups(lambda groups: build(config, groups, engine=engine), config, setting)


def _run_pure(name: str, config: dict[str, Any], setting: Setting) -> Trajectory:
    """The pure stepper, one ``step`` per param group with that group's Config; ``frozen`` passes
    through with a ``None`` grad."""
    return _pure(name, list(zip(GROUPS, _group_hyperparameters(config))), setting)


def _pure(name: str, groups: list[tuple[tuple[str, ...], dict[str, Any]]], setting: Setting) -> Trajectory:
    """The pure stepper on ``groups``: the names of each group's params, and its config."""
    algorithm = registry.get(name)
    params, x, y = _problem(setting)
    configs = [algorithm.config(**hyperparameters) for _, hyperparameters in groups]
    states = [algorithm.init({n: params[n] for n in names}, c) for (names, _), c in zip(groups, configs)]
    nudged = _stepwise_nudge(setting)
    trajectory = []
    for step in range(setting.steps):
        grads = _gradients(params, x, y, step, setting.intermittent)
        for i, ((names, _), c) in enumerate(zip(groups, configs)):
            stepped, states[i] = algorithm.step({n: params[n] for n in names}, {n: grads[n] for n in names}, states[i], c)
            params = {**params, **{n: p if grads[n] is None else nudged(p) for n, p in stepped.items()}}
        trajectory.append(params)
    return trajectory


PATHS = ("pure", "torch", "eager", "compiled")
"""The candidates a check can run: the pure stepper, or the shim with one of its engines."""


def paths_for(name: str, paths: Iterable[str] = PATHS) -> list[str]:
    """The paths of ``paths`` that ``name`` can run: the shim's engine "torch" needs a torch.optim
    counterpart, which an algorithm verified against an independent reference (ADOPT) does not have."""
    has_torch = registry.get(name).torch_optimizer is not None
    return [path for path in paths if path != "torch" or has_torch]


def _path_runner(name: str, path: str) -> Callable[[dict[str, Any], Setting], Trajectory]:
    if path == "pure":
        return functools.partial(_run_pure, name)
    return lambda config, setting: _run_shim(name, config, setting, path)


def run_torch(name: str, config: dict[str, Any], *, steps: int, dtype: torch.dtype, device: str, intermittent: bool = False, **flags: Any) -> Trajectory:
    """The reference: torch.optim's class (or the independent reference) with its default execution
    (``flags`` may ask for another)."""
    return _run_torch(name, config, Setting(steps, dtype, device, intermittent), **flags)


def run_shim(name: str, config: dict[str, Any], *, engine: str, steps: int, dtype: torch.dtype, device: str, intermittent: bool = False) -> Trajectory:
    """The shim ``optorch.build({...}, groups, engine=engine)``."""
    return _run_shim(name, config, Setting(steps, dtype, device, intermittent), engine)


def run_pure(name: str, config: dict[str, Any], *, steps: int, dtype: torch.dtype, device: str, intermittent: bool = False) -> Trajectory:
    """The pure stepper, one ``step`` per param group with that group's Config."""
    return _run_pure(name, config, Setting(steps, dtype, device, intermittent))


def _one_group(make_optimizer, make_scheduler, setting: Setting) -> Trajectory:
    trainable = lambda params: [params[name] for name in TRAINABLE]  # noqa: E731
    return _train_live(lambda params: make_optimizer(trainable(params)), make_scheduler, setting)


def _one_group_pure(name: str, config: dict[str, Any], setting: Setting) -> Trajectory:
    """The pure stepper on all trainable params as one pytree (one param group, as the reductions'
    optimizers and algorithms whose state is shared by all params see them)."""
    return _pure(name, [(TRAINABLE, config)], setting)


@functools.lru_cache(maxsize=48)
def _cached(run: Callable[..., Trajectory], *args: Any, default_dtype: torch.dtype) -> Trajectory:
    """A reference's trajectory, computed once per case however many candidates are checked against it
    (``default_dtype`` is part of the key: torch's scalar dtypes follow it)."""
    return run(*args)


def _reference(run: Callable[..., Trajectory], *args: Any) -> Trajectory:
    return _cached(run, *args, default_dtype=torch.get_default_dtype())


# ------------------------------------------------------------------------------------------------
# comparing


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


def sensitivity(run: Callable[[Setting], Trajectory], truth_setting: Setting, truth: Trajectory, draws: int = NUDGES) -> float:
    """How far rounding noise alone spreads the float64 run ``truth``: its largest move when its inputs,
    and every stepped param after each step, take a random error of up to half an ulp of the low
    precision (``truth_setting.inputs``), as rounding would, over :data:`NUDGES` draws. A correct
    low-precision run's error is of this size (docs/verification.md has the measured ratios)."""
    return worst(max_abs_diff(_reference(run, truth_setting._replace(nudge=seed)), truth) for seed in range(draws))


class Judgement(NamedTuple):
    error: float
    reference_error: float | None
    tolerance: float
    movement: float | None
    basis: str = "reference"


def _judge(candidate: Callable[[Setting], Trajectory], reference: Callable[[Setting], Trajectory], setting: Setting,
           *, live: bool = True, float64_tolerance: float | None = None) -> Judgement:
    """``candidate`` measured by the rule (``reference`` is cached): in float64 against the reference,
    below against the float64 truth, with the reference's own error and how far the truth moves."""
    if setting.dtype == torch.float64:
        limit = FLOAT64_TOLERANCE if float64_tolerance is None else float64_tolerance
        expected = _reference(reference, setting)
        error = max_abs_diff(candidate(setting), expected)
        if error > limit > FLOAT64_TOLERANCE:
            # A path that rounds otherwise (Inductor's reductions) on a chaotic configuration: its
            # ulp-sized differences grow as the reference's own run grows float64 rounding noise.
            spread = sensitivity(reference, setting._replace(inputs=torch.float64), expected, NUDGES_BEFORE_FAILING)
            if FACTOR * spread > limit:  # judged only where that noise stays below how far the params move
                movement = max_abs_diff(expected, [_problem(setting)[0]] * len(expected))
                return Judgement(error, spread, FACTOR * spread, movement, "sensitivity")
        return Judgement(error, None, limit, None)
    truth_setting = setting._replace(dtype=torch.float64, inputs=setting.dtype)
    truth = _reference(reference, truth_setting)
    error, scale = max_abs_diff(candidate(setting), truth), magnitude(truth)
    movement = max_abs_diff(truth, [_problem(truth_setting)[0]] * len(truth))
    if not live:
        reference_error, basis = SPREAD_TO_ERROR * sensitivity(reference, truth_setting, truth), "sensitivity"
    else:
        reference_error, basis = max_abs_diff(_reference(reference, setting), truth), "reference"
        if error > tolerance(setting.dtype, reference_error, scale):
            # The reference's error is one draw of the rounding noise, sometimes a lucky one (torch's
            # float32 Adafactor: 1.1e-6 where that noise spreads the trajectory by 4.6e-5); the spread
            # is another.
            spread = sensitivity(reference, truth_setting, truth, NUDGES_BEFORE_FAILING)
            if spread > reference_error:
                reference_error, basis = spread, "sensitivity"
    return Judgement(error, reference_error, tolerance(setting.dtype, reference_error, scale), movement, basis)


# ------------------------------------------------------------------------------------------------
# checks


@dataclass(frozen=True)
class Result:
    algorithm: str
    flags: str
    steps: int
    dtype: str
    device: str
    path: str
    """``"pure"``, ``"shim:<engine>"`` or ``"torch:fused"``."""
    error: float
    """float64: the largest |candidate - reference|; lower precisions: |candidate - float64 truth|."""
    reference_error: float | None
    """Lower precisions: the reference's own |reference - float64 truth| (``basis`` says whether it was
    measured or estimated); None in float64."""
    tolerance: float
    movement: float | None = None
    """Lower precisions: how far the float64 truth moves from the initial params (the error of an
    optimizer that does nothing)."""
    basis: str = "reference"
    """``"reference"`` (torch.optim or an independent implementation, run live), ``"recording"`` (the
    original's recorded trajectory) or ``"sensitivity"`` (the reference error estimated)."""
    expected_failure: str | None = None
    """Why this check is known to fail (an issue), if it is."""

    @property
    def judged(self) -> bool:
        """Whether the check can tell a wrong optimizer: in low precision, only where the reference's
        own run approximates the truth closely enough that the tolerance stays below the movement
        (float16 Adam, whose second moment underflows, does not)."""
        return self.movement is None or self.tolerance < self.movement

    @property
    def passed(self) -> bool:
        return self.judged and self.error <= self.tolerance

    @property
    def verdict(self) -> str:
        if not self.judged:
            return "N/A"
        if self.expected_failure:
            return "XPASS" if self.passed else "XFAIL"
        return "PASS" if self.passed else "FAIL"

    @property
    def ok(self) -> bool:
        """Not a failure: passed, failed as expected, or not judged."""
        return self.verdict != "FAIL"


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _path(engine: str) -> str:
    return "pure" if engine == "pure" else f"shim:{engine}"


def check(name: str, config: dict[str, Any], *, steps: int = 100, dtype: torch.dtype | str = torch.float64, device: str = "cpu",
          engine: str = "pure", intermittent: bool = False) -> Result:
    """Run ``name`` with ``config`` against its reference and judge it by the rule.

    ``engine`` is ``"pure"`` for the pure stepper or a shim engine (``"torch"``, ``"eager"``,
    ``"compiled"``, ``"auto"``). ``intermittent=True`` drops ``b1``'s gradient every third step.
    """
    algorithm = registry.get(name)
    config = {k: v for k, v in config.items() if k != "name"}
    items = tuple(sorted(config.items()))
    setting = Setting(steps, _dtype(dtype), device, intermittent)
    limit = _float64_limit(algorithm, engine, config)
    run = _path_runner(algorithm.name, engine)
    judgement = _judge(lambda s: run(config, s), _GridReference(algorithm.name, items), setting, float64_tolerance=limit)
    return Result(algorithm.name, label({"name": algorithm.name, **config}, intermittent), steps, _name(setting.dtype), device, _path(engine), *judgement)


def _float64_limit(algorithm, engine: str, config: dict[str, Any]) -> float:
    """The float64 tolerance of a path: Inductor's reductions sum in another order (see the docs)."""
    reduces = not algorithm.is_elementwise(algorithm.as_config(config))
    return FLOAT64_COMPILED_REDUCTION_TOLERANCE if engine == "compiled" and reduces else FLOAT64_TOLERANCE


class _GridReference(NamedTuple):
    """The reference of a grid case as a hashable callable (the cache's key)."""

    name: str
    config: tuple

    def __call__(self, setting: Setting) -> Trajectory:
        return _run_torch(self.name, dict(self.config), setting)


def check_kernel(name: str, config: dict[str, Any], *, steps: int = 100, dtype: torch.dtype | str = torch.float64, device: str = "cpu",
                 intermittent: bool = False) -> Result:
    """torch's fused kernel against torch's default one, where ``engines.TORCH_KERNELS`` lets the shim's
    ``auto`` engine pick it: the list's claim, checked on this device."""
    config = {k: v for k, v in config.items() if k != "name"}
    setting = Setting(steps, _dtype(dtype), device, intermittent)
    judgement = _judge(lambda s: _run_torch(name, config, s, fused=True), _GridReference(name, tuple(sorted(config.items()))), setting)
    return Result(name, label({"name": name, **config}, intermittent), steps, _name(setting.dtype), device, "torch:fused", *judgement)


class _ReductionReference(NamedTuple):
    name: str
    label: str

    def __call__(self, setting: Setting) -> Trajectory:
        reduction = _reduction(self.name, self.label)
        torch_class = getattr(torch.optim, reduction.optimizer)
        return _one_group(lambda params: torch_class(params, **reduction.kwargs), reduction.scheduler, setting)


def _reduction(name: str, label: str):
    algorithm = registry.get(name)
    found = [r for r in algorithm.reductions if r.label == label]
    if not found:
        raise ValueError(f"{name} has no reduction {label!r}; it has {', '.join(r.label for r in algorithm.reductions) or 'none'}")
    return found[0]


def check_reduction(name: str, label: str, *, steps: int = 100, dtype: torch.dtype | str = torch.float64, device: str = "cpu", engine: str = "pure") -> Result:
    """Run the reduction ``label`` of algorithm ``name`` (a config of it that equals a torch.optim
    optimizer and scheduler) against that torch.optim optimizer, all trainable params in one group."""
    algorithm = registry.get(name)
    reduction = _reduction(algorithm.name, label)
    setting = Setting(steps, _dtype(dtype), device)
    if engine == "pure":
        candidate = functools.partial(_one_group_pure, algorithm.name, dict(reduction.config))
    else:
        from .builder import build

        config = {"name": algorithm.name, **reduction.config}
        candidate = functools.partial(_one_group, lambda ps: build(config, ps, engine=engine), None)
    limit = _float64_limit(algorithm, engine, reduction.config)
    judgement = _judge(candidate, _ReductionReference(algorithm.name, label), setting, float64_tolerance=limit)
    return Result(algorithm.name, f"= {reduction.optimizer}: {label}", steps, _name(setting.dtype), device, _path(engine), *judgement)


def check_recorded(name: str, case_id: str, *, engine: str = "pure") -> Result:
    """Replay the recorded case ``case_id`` of the original ``name`` (float64, on the CPU, as recorded)
    and compare with the recording optorch reproduces (``recorded.expected``), emulating the original's
    documented first-step nudge (:data:`recorded.NUDGED`)."""
    algorithm = registry.get(name)
    case = recorded.case(algorithm.name, case_id)
    error = max_abs_diff(recorded.replay(algorithm.name, case, engine), recorded.expected(algorithm.name, case, torch.get_default_dtype()))
    limit = _float64_limit(algorithm, engine, {k: v for k, v in recorded.config(case).items() if k != "name"})
    return Result(algorithm.name, f"recorded: {case_id}", case["steps"], "float64", "cpu", _path(engine), error, None, limit, basis="recording")


class _PureReference(NamedTuple):
    """The pure stepper with a recorded case's config: the float64 truth of an algorithm that has no
    low-precision reference (the pure stepper is itself verified against the original's recording)."""

    name: str
    case_id: str

    def __call__(self, setting: Setting) -> Trajectory:
        return _one_group_pure(self.name, _recorded_config(self.name, self.case_id), setting)


def _recorded_config(name: str, case_id: str) -> dict[str, Any]:
    return {k: v for k, v in recorded.config(recorded.case(name, case_id)).items() if k != "name"}


def check_estimated(name: str, case_id: str, *, steps: int = 100, dtype: torch.dtype | str = torch.float32, device: str = "cpu",
                    engine: str = "pure", intermittent: bool = False) -> Result:
    """A low-precision check of an algorithm without a live reference (DAG, AutoSGM): the config of its
    recorded case ``case_id`` on verify's problem, all params in one group (DAG's state is shared by
    all of them), judged against its own float64 run (the pure stepper, verified against the
    recording), whose spread under rounding noise (:func:`sensitivity`) stands for the reference's
    error."""
    algorithm = registry.get(name)
    config = _recorded_config(algorithm.name, case_id)
    setting = Setting(steps, _dtype(dtype), device, intermittent)
    if setting.dtype == torch.float64:
        raise ValueError("check_estimated judges low precision; in float64, check_recorded compares with the recording")
    if engine == "pure":
        candidate = functools.partial(_one_group_pure, algorithm.name, config)
    else:
        from .builder import build

        candidate = functools.partial(_one_group, lambda ps: build({"name": algorithm.name, **config}, ps, engine=engine), None)
    judgement = _judge(candidate, _PureReference(algorithm.name, case_id), setting, live=False)
    flags = f"recorded: {case_id}{' +none-grads' if intermittent else ''}"
    return Result(algorithm.name, flags, steps, _name(setting.dtype), device, _path(engine), *judgement)


def available_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


# ------------------------------------------------------------------------------------------------
# the plan


COMPILED_REPRESENTATIVES = {"adam": ("float32", "bfloat16"), "lars": ("float16",), "dag": ("float64",)}
"""The compiled engine's checks by default, one case each in these dtypes (each compiles from an empty
cache on a fresh machine, seconds apiece; ``full=True`` compiles everything): an element-wise algorithm
(its small params gathered into one scratch buffer), one that reduces over each tensor (stepped per
shape run), and one with state shared by all params (its recorded trajectories)."""

DEFAULT_FLOAT64 = "default float64"

EXPECTED_FAILURES: dict[tuple[str, str], str] = {}
"""Checks known to fail, by ``(algorithm, condition)``, with the issue that fixes them: reported as
XFAIL (not a failure) while they fail, XPASS once they pass (then remove the entry)."""


@dataclass(frozen=True)
class Check:
    """One check of the plan, ready to run: what it compares, under which conditions."""

    kind: str
    """``"grid"`` (a flag combination against the live reference), ``"kernel"`` (torch's fused kernel
    against its default one), ``"reduction"``, ``"recorded"`` (float64, against the original's recording)
    or ``"estimated"`` (low precision, no live reference: a recorded case's config on verify's problem)."""
    algorithm: str
    case: Any
    """The config's items (grid, kernel), the reduction's label, or the recorded case's id."""
    path: str = "pure"
    dtype: str = "float64"
    device: str = "cpu"
    steps: int = 100
    intermittent: bool = False
    default_dtype: str = "float32"
    """torch's default dtype while the check runs (``set_default_dtype``)."""

    @property
    def expected_failure(self) -> str | None:
        if self.default_dtype != "float64" or self.path == "torch":  # torch's engine runs torch's own code
            return None
        return EXPECTED_FAILURES.get((self.algorithm, DEFAULT_FLOAT64))

    @property
    def flags(self) -> str:
        if self.kind in ("grid", "kernel"):
            flags = label({"name": self.algorithm, **dict(self.case)}, self.intermittent)
        elif self.kind == "reduction":
            flags = f"= {_reduction(self.algorithm, self.case).optimizer}: {self.case}"
        else:
            flags = f"recorded: {self.case}" + (" +none-grads" if self.intermittent else "")
        return flags + (f" ({DEFAULT_FLOAT64})" if self.default_dtype == "float64" else "")

    @property
    def shown_path(self) -> str:
        return "torch:fused" if self.kind == "kernel" else _path(self.path)

    @property
    def id(self) -> str:
        return f"{self.algorithm}[{self.flags}]-{self.shown_path}-{self.dtype}-{self.device}".replace(" ", "")

    def run(self) -> Result:
        with _default_dtype(_dtype(self.default_dtype)):
            result = self._run()
        return dataclasses.replace(result, flags=self.flags, expected_failure=self.expected_failure)

    def _run(self) -> Result:
        common = dict(steps=self.steps, dtype=self.dtype, device=self.device)
        if self.kind == "grid":
            return check(self.algorithm, dict(self.case), engine=self.path, intermittent=self.intermittent, **common)
        if self.kind == "kernel":
            return check_kernel(self.algorithm, dict(self.case), intermittent=self.intermittent, **common)
        if self.kind == "reduction":
            return check_reduction(self.algorithm, self.case, engine=self.path, **common)
        if self.kind == "recorded":
            return check_recorded(self.algorithm, self.case, engine=self.path)
        return check_estimated(self.algorithm, self.case, engine=self.path, intermittent=self.intermittent, **common)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@dataclass(frozen=True)
class Plan:
    checks: list[Check]
    skipped: list[str]
    """What this machine cannot check, and why (no compiler, no CUDA, a reference package missing)."""
    subset: list[str]
    """What the default subset leaves to ``full=True``."""


LOW_PRECISION_PATHS = ("eager", "compiled")
"""By default, bfloat16 and float16 run on the engines the shim's ``auto`` picks for them (torch's
kernel is on ``TORCH_KERNELS`` for float32/float64 only); ``full=True`` adds the pure stepper, whose
math is the eager engine's."""


def plan(*, full: bool = False, algorithms: Iterable[str] | None = None, dtypes: Iterable[str] = DTYPES, devices: Iterable[str] | None = None,
         paths: Iterable[str] = PATHS, steps: int = 100) -> Plan:
    """The checks ``optorch verify`` runs on this machine, and what it skips and why.

    By default a representative subset: every algorithm, its flag combinations chosen so that every flag
    takes each of its values (:func:`cover`), every dtype, every engine, the compiled one on
    :data:`COMPILED_REPRESENTATIVES`; ``full=True`` checks every combination on every path. Also one
    run per algorithm with float64 as torch's default dtype (its scalar dtypes follow it).
    """
    names = [registry.get(name).name for name in algorithms] if algorithms is not None else registry.names()
    dtypes, paths = [_name(_dtype(d)) for d in dtypes], list(paths)
    skipped, subset = [], []
    if devices is None:
        devices = available_devices()
        if "cuda" not in devices:
            skipped.append("device cuda: no CUDA device here")
    if "compiled" in paths and not engines.compiler_available():
        paths.remove("compiled")
        skipped.append("engine compiled: torch.compile finds no C++ compiler here (Inductor needs one)")
    if not full:
        subset.append("flag combinations: a cover in which every flag takes each of its values (full: every combination)")
        if "compiled" in paths:
            shown = "; ".join(f"{name} {', '.join(dtypes)}" for name, dtypes in COMPILED_REPRESENTATIVES.items())
            subset.append(f"engine compiled: one case of {shown} (full: every case)")
        subset.append(f"bfloat16 and float16: engines {' and '.join(LOW_PRECISION_PATHS)} (full: the pure stepper too)")
        subset.append("reductions: float64 and float32 (full: all four dtypes); DAG and AutoSGM below float64: one recorded config (full: all)")
    checks = []
    for name in names:
        found = _plan_algorithm(name, full, dtypes, list(devices), paths, steps, checks)
        if found:
            skipped.append(f"{name}: {found}")
    return Plan(checks, skipped, subset)


def _plan_algorithm(name: str, full: bool, dtypes: list[str], devices: list[str], paths: list[str], steps: int, checks: list[Check]) -> str | None:
    """Append ``name``'s checks; returns why something of it cannot be checked here, if so."""
    algorithm = registry.get(name)
    compiled_dtypes = COMPILED_REPRESENTATIVES.get(name, ())

    def on(kind: str, cases: list[tuple[Any, bool]], dtype_list: list[str], path_list: list[str]) -> None:
        for device, (index, (case, intermittent)), dtype, path in itertools.product(devices, enumerate(cases), dtype_list, path_list):
            if path == "compiled" and not full and (index > 0 or dtype not in compiled_dtypes):
                continue
            if dtype in ("bfloat16", "float16") and (path == "torch" or not full and path not in LOW_PRECISION_PATHS):
                continue  # torch's engine runs torch's own default kernel below float32: the reference itself
            checks.append(Check(kind, name, case, path, dtype, device, steps, intermittent))

    missing = None
    if algorithm.grid is not None and algorithm.reference_optimizer() is None:
        missing = f"reference not installed (pip install {REFERENCE_PACKAGES.get(name, 'its reference package')}): its grid is not checked"
    elif algorithm.grid is not None:
        cases = [(tuple(sorted((k, v) for k, v in config.items() if k != "name")), intermittent)
                 for config, intermittent in ([(c, i) for c in flag_grid(name) for i in (False, True)] if full else cover(name))]
        on("grid", cases, dtypes, paths_for(name, paths))
        for device in devices:
            kernel_dtypes = [d for d in dtypes if _dtype(d) in engines.TORCH_KERNELS.get((name, torch.device(device).type), ())]
            for (case, intermittent), dtype in itertools.product(cases if full else cases[:1], kernel_dtypes):
                checks.append(Check("kernel", name, case, "fused", dtype, device, steps, intermittent))
        if "float64" in dtypes:
            most = tuple(sorted((k, v) for k, v in most_flags(name).items() if k != "name"))
            for path in paths_for(name, [p for p in paths if p != "compiled"]):
                checks.append(Check("grid", name, most, path, "float64", "cpu", steps, True, default_dtype="float64"))
    reductions = [(r.label, False) for r in algorithm.reductions]
    on("reduction", reductions, [d for d in dtypes if full or d in ("float64", "float32")], [p for p in paths if p != "torch"])
    if name in recorded.algorithms():
        cases = [c["id"] for c in recorded.cases(name)]
        if "float64" in dtypes and "cpu" in devices:  # recorded in float64 on the CPU
            compiled = paths if full or "float64" in compiled_dtypes else [p for p in paths if p != "compiled"]
            for case_id, path in itertools.product(cases, [p for p in compiled if p != "torch"]):
                if path != "compiled" or full or case_id == cases[0]:
                    checks.append(Check("recorded", name, case_id, path))
            if name not in recorded.FLOAT64_SCALARS:
                checks += [Check("recorded", name, case_id, "pure", default_dtype="float64") for case_id in cases if "pure" in paths]
        if algorithm.grid is None:  # no live reference in low precision: judged against its own float64 run
            estimated = [(c, i) for c in cases for i in (False, True)] if full else [(cases[0], True)]
            on("estimated", estimated, [d for d in dtypes if d in ("float32", "bfloat16")], [p for p in paths if p != "torch"])
            if "float16" in dtypes:
                missing = ("float16 not checked: with no reference run in float16, nothing tells its range limits from a mistake "
                           "(torch's own float16 Adam overflows as its second moment underflows)")
    return missing


# ------------------------------------------------------------------------------------------------
# running a plan


COMPILED_PER_TASK = 16


@dataclass(frozen=True)
class Crash:
    """A check that raised instead of returning a result (a failed check)."""

    error: str


def run(checks: list[Check], jobs: int = 1) -> Iterator[tuple[Check, Result | Crash]]:
    """Run ``checks``, yielding each with its result as it completes. With ``jobs`` > 1 they run in that
    many processes (checks of tiny tensors use one core each): the compiled engine's checks in runs of
    :data:`COMPILED_PER_TASK` (the default plan's few in one process, which alone pays Inductor's
    start-up), every other case whole, so that its references are computed once."""
    if jobs <= 1 or len(checks) < 2:
        yield from ((check, _outcome(check)) for check in checks)
        return
    import concurrent.futures
    import multiprocessing

    compiled = [check for check in checks if check.path == "compiled"]
    tasks = [compiled[i:i + COMPILED_PER_TASK] for i in range(0, len(compiled), COMPILED_PER_TASK)]
    for check in checks:
        if check.path != "compiled":
            if tasks and tasks[-1][-1].path != "compiled" and _case_key(tasks[-1][-1]) == _case_key(check):
                tasks[-1].append(check)
            else:
                tasks.append([check])
    # spawned workers: a forked copy of a process that has run torch may hold its thread pools' locks
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_one_thread) as pool:
        futures = {pool.submit(_outcomes, task): task for task in tasks if task}
        for future in concurrent.futures.as_completed(futures):
            yield from zip(futures[future], future.result())


def cores() -> int:
    """The CPU cores this process may use: how many processes ``run`` uses by default."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _one_thread() -> None:
    torch.set_num_threads(1)  # tiny tensors: a second intra-op thread only costs time


def _case_key(check: Check) -> tuple:
    return (check.kind, check.algorithm, check.case, check.intermittent, check.device, check.default_dtype)


def _outcomes(checks: list[Check]) -> list[Result | Crash]:
    return [_outcome(check) for check in checks]


def _outcome(check: Check) -> Result | Crash:
    try:
        return check.run()
    except Exception as error:  # a check that crashes is a failed check: reported, and the run goes on
        return Crash(f"{type(error).__name__}: {error}")
