"""The problem every check runs (small, deterministic, built to catch what optimizers get wrong) and
the runners that train it with torch.optim, the shim or the pure stepper."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..algorithms import registry
from ..builder import build
from .references import reference_optimizer


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


def problem(
    dtype: torch.dtype, device: str = "cpu", *, inputs: torch.dtype | None = None, nudge: int | None = None
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
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


def problem_for(setting: Setting) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The :func:`problem` a trajectory made under ``setting`` starts from."""
    return problem(setting.dtype, setting.device, inputs=setting.inputs, nudge=setting.nudge)


def _loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    hidden = torch.tanh(x @ params["w1"] + params["b1"] + params["frozen"])
    return ((torch.sin(hidden @ params["w2"] * params["scale"]) - y) ** 2).mean() + torch.cos(
        params["wide"]
    ).sum() * WIDE_WEIGHT


def _gradients(
    params: dict[str, Tensor], x: Tensor, y: Tensor, step: int, intermittent: bool
) -> dict[str, Tensor | None]:
    """The loss's gradient at the current params, written out: autograd costs four times as much on
    tensors this small, and every check computes thousands (a test holds it to autograd's)."""
    w1, w2, scale = params["w1"], params["w2"], params["scale"]
    hidden = torch.tanh(x @ w1 + params["b1"] + params["frozen"])
    logits = hidden @ w2
    z = logits * scale
    dz = (torch.sin(z) - y) * (2 / y.numel()) * torch.cos(z)
    dlogits = dz * scale
    dpre = (dlogits @ w2.T) * (1 - hidden * hidden)
    grads: dict[str, Tensor | None] = {
        "w1": x.T @ dpre,
        "b1": dpre.sum(0),
        "w2": hidden.T @ dlogits,
        "scale": (dz * logits).sum(),
        "wide": torch.sin(params["wide"]) * -WIDE_WEIGHT,
        "frozen": None,
    }
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
    initial, x, y = problem_for(setting)
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
    groups_of = lambda params: [
        {"params": [params[n] for n in names], "lr": h["lr"]} for names, h in zip(GROUPS, hyper)
    ]  # noqa: E731
    return _train_live(lambda params: make_optimizer(groups_of(params)), None, setting)


def run_reference(name: str, config: dict[str, Any], setting: Setting, **flags: Any) -> Trajectory:
    """The optimizer ``name`` is verified against (:func:`~optorch.tools.references.reference_optimizer`)
    in verify's two param groups, with its default execution unless ``flags`` ask for another."""
    torch_class = reference_optimizer(registry.get(name))
    if torch_class is None:
        raise ValueError(f"{name} has no reference implementation installed to verify against")
    hyperparameters = {k: v for k, v in config.items() if k != "name"}
    return _run_groups(lambda groups: torch_class(groups, **hyperparameters, **flags), config, setting)


def _run_shim(name: str, config: dict[str, Any], setting: Setting, engine: str) -> Trajectory:
    config = {**config, "name": name}
    return _run_groups(lambda groups: build(config, groups, engine=engine), config, setting)


def _run_pure(name: str, config: dict[str, Any], setting: Setting) -> Trajectory:
    """The pure stepper, one ``step`` per param group with that group's Config; ``frozen`` passes
    through with a ``None`` grad."""
    return _pure(name, list(zip(GROUPS, _group_hyperparameters(config))), setting)


def _pure(name: str, groups: list[tuple[tuple[str, ...], dict[str, Any]]], setting: Setting) -> Trajectory:
    """The pure stepper on ``groups``: the names of each group's params, and its config."""
    algorithm = registry.get(name)
    params, x, y = problem_for(setting)
    configs = [algorithm.config(**hyperparameters) for _, hyperparameters in groups]
    states = [algorithm.init({n: params[n] for n in names}, c) for (names, _), c in zip(groups, configs)]
    nudged = _stepwise_nudge(setting)
    trajectory = []
    for step in range(setting.steps):
        grads = _gradients(params, x, y, step, setting.intermittent)
        for i, ((names, _), c) in enumerate(zip(groups, configs)):
            stepped, states[i] = algorithm.step(
                {n: params[n] for n in names}, {n: grads[n] for n in names}, states[i], c
            )
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


def path_runner(name: str, path: str) -> Callable[[dict[str, Any], Setting], Trajectory]:
    """The candidate of one of :data:`PATHS`: ``run(config, setting)``."""
    if path == "pure":
        return functools.partial(_run_pure, name)
    return lambda config, setting: _run_shim(name, config, setting, path)


def run_torch(
    name: str,
    config: dict[str, Any],
    *,
    steps: int,
    dtype: torch.dtype,
    device: str,
    intermittent: bool = False,
    **flags: Any,
) -> Trajectory:
    """The reference: torch.optim's class (or the independent reference) with its default execution
    (``flags`` may ask for another)."""
    return run_reference(name, config, Setting(steps, dtype, device, intermittent), **flags)


def run_shim(
    name: str,
    config: dict[str, Any],
    *,
    engine: str,
    steps: int,
    dtype: torch.dtype,
    device: str,
    intermittent: bool = False,
) -> Trajectory:
    """The shim ``optorch.build({...}, groups, engine=engine)``."""
    return _run_shim(name, config, Setting(steps, dtype, device, intermittent), engine)


def run_pure(
    name: str, config: dict[str, Any], *, steps: int, dtype: torch.dtype, device: str, intermittent: bool = False
) -> Trajectory:
    """The pure stepper, one ``step`` per param group with that group's Config."""
    return _run_pure(name, config, Setting(steps, dtype, device, intermittent))


def train_one_group(make_optimizer, make_scheduler, setting: Setting) -> Trajectory:
    """``make_optimizer(trainable params)`` on all trainable params as one param group."""
    trainable = lambda params: [params[name] for name in TRAINABLE]  # noqa: E731
    return _train_live(lambda params: make_optimizer(trainable(params)), make_scheduler, setting)


def pure_one_group(name: str, config: dict[str, Any], setting: Setting) -> Trajectory:
    """The pure stepper on all trainable params as one pytree (one param group, as the reductions'
    optimizers and algorithms whose state is shared by all params see them)."""
    return _pure(name, [(TRAINABLE, config)], setting)


@functools.lru_cache(maxsize=48)
def _cached(run: Callable[..., Trajectory], *args: Any, default_dtype: torch.dtype) -> Trajectory:
    """A reference's trajectory, computed once per case however many candidates are checked against it
    (``default_dtype`` is part of the key: torch's scalar dtypes follow it)."""
    return run(*args)


def cached_reference(run: Callable[..., Trajectory], *args: Any) -> Trajectory:
    """``run(*args)``, a reference's trajectory, computed once per case under the current default dtype."""
    return _cached(run, *args, default_dtype=torch.get_default_dtype())
