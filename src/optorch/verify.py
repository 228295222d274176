"""Equivalence checks against torch.optim, shared by ``optorch verify`` and the test suite.

Every check runs one algorithm and one config on the same small problem three ways and compares the
parameter trajectories step by step:

* the reference: torch.optim's own class (``Algorithm.torch_optimizer``), default execution flags, or
  where torch.optim has none an independent implementation (``Algorithm.reference``, e.g. torch-adopt);
* the pure stepper ``optorch.<name>.step``, one call per param group with that group's config;
* the shim, ``optorch.build(config, groups, engine=...)``, for one of its engines.

The problem is built to exercise what an optimizer can get wrong: several tensors of different shapes
(a 0-dim one included), a parameter that never gets a gradient, two param groups with different
learning rates, gradients recomputed from the current parameters (so an early error feeds back into
every later step), and optionally a parameter whose gradient is ``None`` every third step (torch skips
it, and its step count falls behind the others). The loss is bounded, so ``maximize=True`` climbs it
without overflowing.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterator

import pydantic
import torch
from torch import Tensor

from . import registry

__all__ = [
    "FLOAT32_TOLERANCE",
    "FLOAT64_COMPILED_REDUCTION_TOLERANCE",
    "FLOAT64_TOLERANCE",
    "PATHS",
    "available_devices",
    "check",
    "default_tolerance",
    "describe",
    "check_reduction",
    "flag_grid",
    "float32_algorithms",
    "grid_algorithms",
    "reduction_algorithms",
    "label",
    "max_abs_diff",
    "most_flags",
    "problem",
    "NoGridError",
    "paths_for",
    "representative",
    "Result",
    "run_pure",
    "run_shim",
    "run_torch",
    "torch_kernel_drift",
]

# ------------------------------------------------------------------------------------------------
# the flag grids

class NoGridError(ValueError):
    """The algorithm has no verification grid (it has no torch.optim counterpart to compare with)."""


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


def representative(name: str) -> list[dict[str, Any]]:
    """A few combinations of ``name``'s grid in which every flag takes each of its values at least once.

    Greedy set cover in grid order: the first pick is the all-off combination. Used where each
    combination is expensive (the compiled engine compiles once per combination).
    """
    grid = flag_grid(name)
    axes = registry.get(name).grid.axes  # flag_grid above made sure there is one
    uncovered = {(key, value) for key, values in axes.items() for value in values}
    chosen = []
    while uncovered:
        best = max(grid, key=lambda config: len(uncovered & set(_axis_items(config, axes))))
        gained = uncovered & set(_axis_items(best, axes))
        if not gained:  # a value no valid combination takes
            break
        chosen.append(best)
        uncovered -= gained
    return chosen


def most_flags(name: str) -> dict[str, Any]:
    """The combination of ``name``'s grid with the most flags on (True or non-zero), the first on ties:
    the case where the flags' interactions are all exercised at once."""
    grid = flag_grid(name)
    axes = registry.get(name).grid.axes
    return max(grid, key=lambda config: sum(bool(config[key]) for key in axes))


def _axis_items(config: dict[str, Any], axes: dict[str, tuple]) -> Iterator[tuple[str, Any]]:
    return ((key, config[key]) for key in axes)


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


# ------------------------------------------------------------------------------------------------
# the problem

TRAINABLE = ("w1", "b1", "w2", "scale")
GROUPS = (("w1", "b1", "frozen"), ("w2", "scale"))
"""Param groups by name: the second one runs at half the learning rate (a per-group override)."""
SECOND_GROUP_LR = 0.5


def problem(dtype: torch.dtype, device: str) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The initial params (by name) and the data ``(x, y)``: drawn in float64 from a private generator,
    then cast, so the float32 problem is the float64 one rounded and nothing depends on (or disturbs)
    the global RNG."""
    generator = torch.Generator().manual_seed(20240611)

    def draw(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    params = {
        "w1": draw(4, 3, scale=0.5),
        "b1": draw(3, scale=0.1),
        "w2": draw(3, 2, scale=0.5),
        "scale": torch.tensor(1.3, dtype=dtype, device=device),
        "frozen": draw(3, scale=0.1),
    }
    return params, draw(16, 4), draw(16, 2, scale=0.5)


def _loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    hidden = torch.tanh(x @ params["w1"] + params["b1"] + params["frozen"])
    return ((torch.sin(hidden @ params["w2"] * params["scale"]) - y) ** 2).mean()


def _gradients(params: dict[str, Tensor], x: Tensor, y: Tensor, step: int, intermittent: bool) -> dict[str, Tensor | None]:
    """Gradients at the current params (by autograd, on detached copies so nothing is recorded on them)."""
    live = {name: p.detach().requires_grad_(name in TRAINABLE) for name, p in params.items()}
    values = torch.autograd.grad(_loss(live, x, y), [live[name] for name in TRAINABLE])
    grads: dict[str, Tensor | None] = {**dict(zip(TRAINABLE, values)), "frozen": None}
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


def _run_live(make_optimizer, config: dict[str, Any], steps: int, dtype: torch.dtype, device: str, intermittent: bool) -> Trajectory:
    """Train leaf params in verify's two param groups with a torch.optim-style optimizer."""
    hyper = _group_hyperparameters(config)
    groups_of = lambda params: [{"params": [params[n] for n in names], "lr": h["lr"]} for names, h in zip(GROUPS, hyper)]  # noqa: E731
    return _train_live(lambda params: make_optimizer(groups_of(params)), None, steps, dtype, device, intermittent)


def _train_live(make_optimizer, make_scheduler, steps: int, dtype: torch.dtype, device: str, intermittent: bool) -> Trajectory:
    """``make_optimizer(params by name)`` trains the problem's leaf params, setting ``.grad`` from the
    current params each step (and stepping ``make_scheduler(optimizer)`` after, if given)."""
    initial, x, y = problem(dtype, device)
    params = {name: p.clone().requires_grad_(name in TRAINABLE) for name, p in initial.items()}
    optimizer = make_optimizer(params)
    scheduler = make_scheduler(optimizer) if make_scheduler is not None else None
    trajectory = []
    for step in range(steps):
        for name, grad in _gradients(params, x, y, step, intermittent).items():
            params[name].grad = grad
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        trajectory.append({name: p.detach().clone() for name, p in params.items()})
    return trajectory


def run_torch(name: str, config: dict[str, Any], *, steps: int, dtype: torch.dtype, device: str, intermittent: bool = False, **flags: Any) -> Trajectory:
    """The reference: torch.optim's class (or the independent reference) with its default execution
    (``flags`` may ask for another)."""
    torch_class = registry.get(name).reference_optimizer()
    if torch_class is None:
        raise ValueError(f"{name} has no reference implementation installed to verify against")
    hyperparameters = {k: v for k, v in config.items() if k != "name"}
    return _run_live(lambda groups: torch_class(groups, **hyperparameters, **flags), config, steps, dtype, device, intermittent)


def run_shim(name: str, config: dict[str, Any], *, engine: str, steps: int, dtype: torch.dtype, device: str, intermittent: bool = False) -> Trajectory:
    """The shim ``optorch.build({...}, groups, engine=engine)``."""
    from .builder import build

    config = {**config, "name": name}
    return _run_live(lambda groups: build(config, groups, engine=engine), config, steps, dtype, device, intermittent)


def run_pure(name: str, config: dict[str, Any], *, steps: int, dtype: torch.dtype, device: str, intermittent: bool = False) -> Trajectory:
    """The pure stepper, one ``step`` per param group with that group's Config; ``frozen`` passes
    through with a ``None`` grad."""
    algorithm = registry.get(name)
    params, x, y = problem(dtype, device)
    configs = [algorithm.config(**h) for h in _group_hyperparameters(config)]
    groups = [{n: params[n] for n in names} for names in GROUPS]
    states = [algorithm.init(group, c) for group, c in zip(groups, configs)]
    trajectory = []
    for step in range(steps):
        grads = _gradients(params, x, y, step, intermittent)
        for i, (group, c) in enumerate(zip(groups, configs)):
            groups[i], states[i] = algorithm.step(group, {n: grads[n] for n in group}, states[i], c)
        params = {n: p for group in groups for n, p in group.items()}
        trajectory.append(dict(params))
    return trajectory


def max_abs_diff(a: Trajectory, b: Trajectory) -> float:
    """The largest |a - b| over all steps and all params; ``inf`` on any NaN or length mismatch."""
    if len(a) != len(b):
        return math.inf
    worst = 0.0
    for step_a, step_b in zip(a, b):
        for name, value in step_a.items():
            diff = (value.double() - step_b[name].double()).abs().max().item()
            if math.isnan(diff):
                return math.inf
            worst = max(worst, diff)
    return worst


# ------------------------------------------------------------------------------------------------
# checks

FLOAT64_TOLERANCE = 1e-12

# float32: measured, not guessed (``torch_kernel_drift`` reproduces the measurement). torch.optim disagrees
# with itself in float32 on this very problem: over 100 steps, its fused kernels drift from its for-loop
# ones by at most 6.0e-7 (Adam, AdamW; SGD 3.6e-7, Adagrad 1.2e-7) over the whole grid, None grads on and
# off (CPU, torch 2.13; RMSprop's foreach kernel is bit-identical to its for-loop there). That is ~5 ulp
# at the parameters' magnitude (~1.5): rounding fed back through the gradients. Being within torch's own
# kernel-to-kernel drift is as equal as float32 can be asked to be; the tolerance is that drift times a
# safety factor of ~16, for other devices' kernels and Inductor's code (optorch's largest observed float32
# difference: 1.6e-6, RMSprop compiled). Gross errors still stand out by orders of magnitude (stepping a
# param whose grad is None as if its grad were zero moves these trajectories by 0.07-0.19); finer ones
# (Adam's eps 1% off: 4.8e-6) are the float64 checks' job, 1e7 times tighter.
FLOAT32_TOLERANCE = 1e-5

# float64, compiled, for algorithms that reduce over tensors (norms, means: Adafactor, LARS, DAG):
# Inductor sums in another order than torch's eager kernels, an ulp or so per reduction per step, and
# normalised or RMS-scaled updates amplify it where gradients vanish. Measured: Adafactor 7.9e-12 with
# maximize and None grads over 100 steps (pure and eager are bit-exact there). Still 1e6 below what an
# algorithmic mistake moves these trajectories by.
FLOAT64_COMPILED_REDUCTION_TOLERANCE = 1e-10

PATHS = ("pure", "torch", "eager", "compiled")
"""What ``check`` can verify: the pure stepper, or the shim with one of its engines."""


def paths_for(name: str, paths: tuple[str, ...] | list[str] = PATHS) -> list[str]:
    """The paths of ``paths`` that ``name`` can run: the shim's engine "torch" needs a torch.optim
    counterpart, which an algorithm verified against an independent reference (ADOPT) does not have."""
    has_torch = registry.get(name).torch_optimizer is not None
    return [path for path in paths if path != "torch" or has_torch]


def float32_algorithms() -> list[str]:
    """The verifiable algorithms whose grid is also checked in float32 (``Grid.float32``)."""
    return [name for name in grid_algorithms() if registry.get(name).grid is None or registry.get(name).grid.float32]


def default_tolerance(dtype: torch.dtype) -> float:
    """The default max-abs-diff tolerance for a dtype."""
    tolerances = {torch.float64: FLOAT64_TOLERANCE, torch.float32: FLOAT32_TOLERANCE}
    if dtype not in tolerances:
        raise ValueError(f"no default tolerance for {dtype}; pass tolerance=")
    return tolerances[dtype]


@dataclass(frozen=True)
class Result:
    algorithm: str
    flags: str
    steps: int
    dtype: str
    device: str
    path: str
    """``"pure"`` or ``"shim:<engine>"``."""
    max_abs_diff: float
    tolerance: float
    passed: bool


def check(
    name: str,
    config: dict[str, Any],
    *,
    steps: int = 100,
    dtype: torch.dtype | str = torch.float64,
    device: str = "cpu",
    engine: str = "pure",
    intermittent: bool = False,
    tolerance: float | None = None,
) -> Result:
    """Run ``name`` with ``config`` against torch.optim and compare the trajectories.

    ``engine`` is ``"pure"`` for the pure stepper or a shim engine (``"torch"``, ``"eager"``,
    ``"compiled"``, ``"auto"``). ``intermittent=True`` drops ``b1``'s gradient every third step.
    """
    algorithm = registry.get(name)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    limit = default_tolerance(dtype) if tolerance is None else tolerance
    config = {k: v for k, v in config.items() if k != "name"}
    if tolerance is None and dtype == torch.float64 and engine == "compiled" and not algorithm.is_elementwise(algorithm.as_config(config)):
        limit = FLOAT64_COMPILED_REDUCTION_TOLERANCE
    kwargs = dict(steps=steps, dtype=dtype, device=device, intermittent=intermittent)
    if engine == "pure":
        candidate, path = run_pure(algorithm.name, config, **kwargs), "pure"
    else:
        candidate, path = run_shim(algorithm.name, config, engine=engine, **kwargs), f"shim:{engine}"
    reference = _reference(algorithm.name, tuple(sorted(config.items())), steps, dtype, device, intermittent)
    diff = max_abs_diff(candidate, reference)
    flags = label({"name": algorithm.name, **config}, intermittent)
    return Result(algorithm.name, flags, steps, str(dtype).removeprefix("torch."), device, path, diff, limit, diff <= limit)


def reduction_algorithms() -> list[str]:
    """Registered algorithms with configs that reduce to torch.optim optimizers (``Algorithm.reductions``)."""
    return [name for name in registry.names() if registry.get(name).reductions]


def check_reduction(
    name: str,
    label: str,
    *,
    steps: int = 100,
    dtype: torch.dtype | str = torch.float64,
    device: str = "cpu",
    engine: str = "pure",
    tolerance: float | None = None,
) -> Result:
    """Run the reduction ``label`` of algorithm ``name`` (a config of it that equals a torch.optim
    optimizer and scheduler) against that torch.optim optimizer, all trainable params in one group."""
    algorithm = registry.get(name)
    reduction = next((r for r in algorithm.reductions if r.label == label), None)
    if reduction is None:
        raise ValueError(f"{name} has no reduction {label!r}; it has {', '.join(r.label for r in algorithm.reductions) or 'none'}")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    limit = default_tolerance(dtype) if tolerance is None else tolerance
    torch_class = getattr(torch.optim, reduction.optimizer)
    reference = _run_one_group(lambda ps: torch_class(ps, **reduction.kwargs), reduction.scheduler, steps, dtype, device)
    if engine == "pure":
        candidate, path = _run_one_group_pure(algorithm, algorithm.config(**reduction.config), steps, dtype, device), "pure"
    else:
        from .builder import build

        config = {"name": algorithm.name, **reduction.config}
        candidate, path = _run_one_group(lambda ps: build(config, ps, engine=engine), None, steps, dtype, device), f"shim:{engine}"
    diff = max_abs_diff(candidate, reference)
    flags = f"= {reduction.optimizer}: {reduction.label}"
    return Result(algorithm.name, flags, steps, str(dtype).removeprefix("torch."), device, path, diff, limit, diff <= limit)


def _run_one_group(make_optimizer, make_scheduler, steps: int, dtype: torch.dtype, device: str) -> Trajectory:
    trainable = lambda params: [params[name] for name in TRAINABLE]  # noqa: E731
    return _train_live(lambda params: make_optimizer(trainable(params)), make_scheduler, steps, dtype, device, intermittent=False)


def _run_one_group_pure(algorithm, config, steps: int, dtype: torch.dtype, device: str) -> Trajectory:
    params, x, y = problem(dtype, device)
    trainable = {n: params[n] for n in TRAINABLE}
    state = algorithm.init(trainable, config)
    trajectory = []
    for step in range(steps):
        grads = _gradients(params, x, y, step, intermittent=False)
        trainable, state = algorithm.step(trainable, {n: grads[n] for n in trainable}, state, config)
        params = {**params, **trainable}
        trajectory.append(dict(params))
    return trajectory


@functools.lru_cache(maxsize=32)
def _reference(name: str, config: tuple, steps: int, dtype: torch.dtype, device: str, intermittent: bool) -> Trajectory:
    """torch.optim's trajectory, computed once per case however many paths are checked against it."""
    return run_torch(name, dict(config), steps=steps, dtype=dtype, device=device, intermittent=intermittent)


def torch_kernel_drift(name: str, config: dict[str, Any], *, steps: int = 100, dtype: torch.dtype = torch.float32, device: str = "cpu", intermittent: bool = False) -> float:
    """How far torch.optim's own fused and foreach kernels drift from its default one on this problem:
    the yardstick for the float32 tolerance. 0.0 where torch has no other kernel for ``device``."""
    parameters = inspect.signature(registry.get(name).reference_optimizer().__init__).parameters
    kwargs = dict(steps=steps, dtype=dtype, device=device, intermittent=intermittent)
    reference = run_torch(name, config, **kwargs)
    drift = 0.0
    for flag in ("fused", "foreach"):
        if flag not in parameters:
            continue
        try:
            other = run_torch(name, config, **kwargs, **{flag: True})
        except RuntimeError:  # no such kernel for this device
            continue
        drift = max(drift, max_abs_diff(reference, other))
    return drift


def available_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
