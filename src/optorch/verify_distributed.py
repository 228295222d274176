"""``optorch verify --distributed``: every algorithm under torch's distributed engines, compared with
the single-process run of the same model and global batch.

Each case trains a small float64 MLP (uneven shapes, so that shards are uneven) for a few steps on a
fixed global batch, split evenly over the ranks, in one of these *modes*:

==============  ===============================================================================
``fsdp2``       ``fully_shard`` on each layer and the model (parameters are DTensors sharded on dim 0)
``ddp``         ``DistributedDataParallel``
``zero``        ``ZeroRedundancyOptimizer`` over DDP, ``parameters_as_bucket_view=False``, the local
                optimizer ``functools.partial(optorch.build, config, partition_group=WORLD)``
``zero-bucket`` the same with ``parameters_as_bucket_view=True``
``zero-class``  ``zero`` with ``optimizer_class=functools.partial(optorch.optim.<Name>, partition_group=WORLD)``
                and the config's keys as ZeRO's keyword arguments, as with a torch.optim class (configs
                without builder entries)
``zero-resume`` ``zero``, saved halfway (``consolidate_state_dict``) and resumed in a new optimizer
``dcp``         FSDP2, saved halfway with ``torch.distributed.checkpoint`` and resumed in a new model
                and optimizer (``get/set_optimizer_state_dict``, ``dcp.save``/``dcp.load``)
``dcp-flat``    the same with ``flatten_optimizer_state_dict=True``
``dcp-full``    FSDP2, saved halfway as a full state dict (``full_state_dict=True``) and resumed both in
                a new FSDP2 run and in a single process
``dcp-ddp``     ``dcp`` under DDP
``tp``          tensor parallel (``ColwiseParallel``, ``RowwiseParallel``: placements on dims 0 and 1)
``fsdp2-tp``    a 2-D mesh, FSDP2 over tensor parallel (needs 4 ranks; skipped with fewer)
==============  ===============================================================================

and reports, per case, the largest difference of the final parameters from the single-process run
(and from torch.optim's own class in the same mode, where torch.optim has the algorithm), and for the
resuming modes from the same mode run without a break. Tolerances: :data:`TOLERANCE`, and
:data:`RESUME_TOLERANCE` for a resume against its own uninterrupted run.

Run it on this machine (it starts the processes)::

    optorch verify --distributed                 # 2 processes, gloo on CPU
    optorch verify --distributed --backend nccl --nproc 8

or across machines with ``torchrun`` (one process per GPU; rank 0 prints the table)::

    torchrun --nnodes 2 --nproc-per-node 8 ... -m optorch.verify_distributed --backend nccl
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from . import builder, distributed, optim, registry

__all__ = ["CONFIGS", "Case", "MODES", "RESUME_TOLERANCE", "TOLERANCE", "cases", "main", "run_case", "spawn"]

TOLERANCE = 1e-10
"""Distributed against single-process (float64): reductions are summed in another order."""
RESUME_TOLERANCE = 1e-12
"""A resumed run against the same mode without a break."""

MODES = ("fsdp2", "ddp", "zero", "zero-bucket", "zero-class", "zero-resume", "dcp", "dcp-flat", "dcp-full", "dcp-ddp", "tp", "fsdp2-tp")
RESUMING = ("zero-resume", "dcp", "dcp-flat", "dcp-full", "dcp-ddp")
STEPS = 8
POISON_STEP = 3
RESUME_AT = 3
"""Resuming modes save after this many steps (mid-window for accumulate_steps=2)."""
"""Cases with ``skip_nonfinite`` or ``amp`` get an inf in one gradient element at this step (on the
one rank whose shard holds it, under FSDP2 and ZeRO)."""

CONFIGS: dict[str, dict[str, Any]] = {
    "sgd": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
    "adam": {"name": "adam", "lr": 0.01, "amsgrad": True},
    "adamw": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
    "decoupled_adam": {"name": "decoupled_adam", "lr": 0.01, "weight_decay": 0.1},
    "rmsprop": {"name": "rmsprop", "lr": 0.01, "momentum": 0.5, "centered": True},
    "adagrad": {"name": "adagrad", "lr": 0.1},
    "nadam": {"name": "nadam", "lr": 0.01},
    "radam": {"name": "radam", "lr": 0.01},
    "adamax": {"name": "adamax", "lr": 0.01},
    "adadelta": {"name": "adadelta", "lr": 1.0},
    "rprop": {"name": "rprop", "lr": 0.01},
    "asgd": {"name": "asgd", "lr": 0.05, "t0": 3},
    "dag": {"name": "dag", "lr": 0.01, "momentum": 0.9, "sat_every": 2, "shrink": {"warmup_steps": 2}},
    "dag-exact-sigma": {"name": "dag", "lr": 0.01, "momentum": 0.5, "use_exact_sigma": True, "shrink": {"warmup_steps": 2}},
    "autosgm": {"name": "autosgm", "lr": 0.01, "numerator": 2},
    "lars": {"name": "lars", "lr": 0.1, "weight_decay": 0.01, "trust_coefficient": 0.02},
    "adopt": {"name": "adopt", "lr": 0.01},
    "adafactor": {"name": "adafactor", "lr": 0.01},
    # the builder's entries
    "adamw+schedule": {"name": "adamw", "lr": 0.01, "schedule": {"lr": {"name": "cosine", "init_value": 0.01, "decay_steps": STEPS}}},
    "dag+clip+skip": {"name": "dag", "lr": 0.01, "momentum": 0.5, "clip_grad_norm": 0.5, "skip_nonfinite": True, "shrink": {"warmup_steps": 2}},
    "adam+amp": {"name": "adam", "lr": 0.01, "amp": {"init_scale": 1024.0, "growth_interval": 2}},
    "lars+clip": {"name": "lars", "lr": 0.1, "clip_grad_norm": 0.5},
    "sgd+accumulate+ema": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "accumulate_steps": 2, "ema": {"decay": 0.9}},
    "adamw+param_groups": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1, "param_groups": [{"match": "*.bias", "weight_decay": 0.0, "lr": 0.02}]},
    "sgd+adapt": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "adapt": {"lr_rule": "trend", "momentum_rule": "relative"}},
}
"""A config per algorithm (non-default settings, so more of the math runs) and per builder entry."""

CI_CASES = (
    ("adamw", ("fsdp2", "ddp", "zero-bucket", "dcp-flat")),
    ("adopt", ("zero-class",)),
    ("dag", ("fsdp2", "zero", "dcp")),
    ("adafactor", ("fsdp2", "tp", "dcp-full")),
    ("lars", ("fsdp2", "zero-resume")),
    ("autosgm", ("fsdp2",)),
    ("dag+clip+skip", ("fsdp2", "zero", "dcp-ddp")),
    ("adam+amp", ("fsdp2", "zero-bucket")),
    ("sgd+accumulate+ema", ("fsdp2", "dcp-flat")),
    ("adamw+schedule", ("dcp",)),
    ("adamw+param_groups", ("zero",)),
    ("sgd+adapt", ("fsdp2", "zero")),
)
"""The representative subset CI runs (the full matrix: every config in every mode)."""


@dataclass(frozen=True)
class Case:
    config: str
    """A key of :data:`CONFIGS`."""
    mode: str
    engine: str = "eager"

    @property
    def label(self) -> str:
        return f"{self.config} {self.mode}" + ("" if self.engine == "eager" else f" {self.engine}")


def cases(full: bool = False, engines: Sequence[str] = ("eager",)) -> list[Case]:
    """The cases of the full matrix (``full``) or of the CI subset, for each engine."""
    pairs = [(name, MODES) for name in CONFIGS] if full else CI_CASES
    return [Case(name, mode, engine) for engine in engines for name, modes in pairs for mode in modes
            if mode != "zero-class" or not _entries(CONFIGS[name])]


def _entries(config: dict[str, Any]) -> set[str]:
    """The builder entries (``schedule``, ``clip_grad_norm``, ...) of a config."""
    return set(config) & set(builder.ENTRY_KEYS)


@dataclass
class Result:
    diff: float = math.nan
    """Largest difference of the final parameters from the single-process run."""
    torch_diff: float | None = None
    """... from torch.optim's class in the same mode (where it has the algorithm)."""
    resume_diff: float | None = None
    """A resuming mode: from the same mode without a break."""
    init_step_change: float | None = None
    """DCP's state-creating step on a fresh optimizer: the largest change of a param or a counter."""
    comm: dict[str, int] = field(default_factory=dict)
    """Collectives one ``optimizer.step()`` made (the last step), by kind."""
    torch_comm: dict[str, int] | None = None
    torch_error: str | None = None
    """torch.optim's class failed in this mode (not a failure of optorch's)."""
    error: str | None = None

    def passed(self) -> bool:
        diffs = [self.diff, self.torch_diff]
        ok = self.error is None and all(d is None or d <= TOLERANCE for d in diffs)
        return ok and (self.resume_diff is None or self.resume_diff <= RESUME_TOLERANCE) and not self.init_step_change


# ------------------------------------------------------------------------------------------------
# the problem


def _model(device: torch.device, hidden: int = 7) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(device, torch.float64)


def _hidden(mode: str, world: int) -> int:
    """7 (shards of uneven sizes), but a multiple of the tensor-parallel size where tensor parallel
    splits the hidden layer (its layers need even shards)."""
    return 3 * world if mode == "tp" else 6 if mode == "fsdp2-tp" else 7


def _batch(device: torch.device) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=generator, dtype=torch.float64), torch.randn(8, 3, generator=generator, dtype=torch.float64)
    return x.to(device), y.to(device)


@dataclass
class _Run:
    """One training run: the model, the optimizer the loop steps, and the shim holding the entries."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    shim: Any = None
    adaptive: Any = None
    x: Tensor | None = None
    y: Tensor | None = None

    def __post_init__(self):
        self.shim = self.shim if self.shim is not None else self.optimizer
        if self.adaptive is None:
            self.adaptive = getattr(self.shim, "adaptive", None)


def _train(run: _Run, start: int, stop: int, poison: bool, comm: dict | None = None) -> None:
    for step in range(start, stop):
        run.optimizer.zero_grad()
        loss = nn.functional.mse_loss(run.model(run.x), run.y)
        combinators = getattr(run.shim, "combinators", None)
        scaled = combinators is not None and combinators.settings.amp is not None
        (run.shim.scale_loss(loss) if scaled else loss).backward()
        if poison and step == POISON_STEP:
            _poison(run.model)
        with _count(comm if step == stop - 1 else None, ignore=("broadcast",) if run.shim is not run.optimizer else ()):
            run.optimizer.step()
        if run.adaptive is not None:
            run.adaptive.step_loss(loss)


def _poison(model: nn.Module) -> None:
    """An inf in element 0 of the last parameter's gradient (only on the rank whose shard holds it)."""
    grad = list(model.parameters())[-1].grad
    if distributed.is_dtensor(grad):
        from torch.distributed.tensor import distribute_tensor

        whole = grad.full_tensor()
        whole.view(-1)[0] = math.inf
        grad.to_local().copy_(distribute_tensor(whole, grad.device_mesh, grad.placements).to_local())
    else:
        grad.view(-1)[0] = math.inf


@contextlib.contextmanager
def _count(comm: dict | None, ignore: Sequence[str] = ()):
    """Count the collectives inside by kind (``all_reduce``, ``all_gather``, ...), those of kinds in
    ``ignore`` left out (ZeRO's own broadcast of the stepped params is not the optimizer's)."""
    if comm is None:
        yield
        return
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as mode:
        yield
    for op, n in mode.get_comm_counts().items():
        kind = str(op).split(".")[-1].rstrip("_").replace("allreduce", "all_reduce").replace("allgather", "all_gather").replace("_into_tensor", "")
        if n and not kind.startswith(tuple(ignore)):
            comm[kind] = comm.get(kind, 0) + n


def _params(model: nn.Module) -> dict[str, Tensor]:
    module = getattr(model, "module", model)
    return {name: distributed.full(p.detach()).cpu() for name, p in module.named_parameters()}


def _diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


# ------------------------------------------------------------------------------------------------
# the modes


class _Context:
    def __init__(self, rank: int, world: int, device: torch.device, workdir: str):
        self.rank, self.world, self.device, self.workdir = rank, world, device, workdir
        x, y = _batch(device)
        self.x, self.y = x, y
        self.local = x.chunk(world)[rank], y.chunk(world)[rank]
        self._mesh = None

    @property
    def mesh(self):
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.device.type, (self.world,))
        return self._mesh


def _wants_poison(config: dict[str, Any]) -> bool:
    return bool(config.get("skip_nonfinite")) or "amp" in config


def _single(case: Case, ctx: _Context) -> _Run:
    """A fresh single-process run of ``case`` (the whole batch, not stepped yet)."""
    model = _model(ctx.device, _hidden(case.mode, ctx.world))
    return _Run(model, builder.build(CONFIGS[case.config], model, engine=case.engine), x=ctx.x, y=ctx.y)


def _fsdp2(model: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _tp(model: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    return parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})


def _wrapped(mode: str, ctx: _Context) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """The model of ``mode`` and this rank's batch."""
    model = _model(ctx.device, _hidden(mode, ctx.world))
    if mode in ("tp", "fsdp2-tp"):
        from torch.distributed.device_mesh import init_device_mesh

        if mode == "tp":
            return _tp(model, ctx.mesh), (ctx.x, ctx.y)  # tensor parallel: every rank sees the whole batch
        mesh = init_device_mesh(ctx.device.type, (ctx.world // 2, 2), mesh_dim_names=("dp", "tp"))
        model = _fsdp2(_tp(model, mesh["tp"]), mesh["dp"])
        dp = mesh["dp"].get_local_rank()
        return model, (ctx.x.chunk(ctx.world // 2)[dp], ctx.y.chunk(ctx.world // 2)[dp])
    if mode.startswith(("fsdp2", "dcp")) and mode != "dcp-ddp":
        return _fsdp2(model, ctx.mesh), ctx.local
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids), ctx.local


def _make(case: Case, ctx: _Context, torch_class: bool = False) -> _Run:
    """A fresh run of ``case`` (not stepped yet)."""
    config = CONFIGS[case.config]
    model, (x, y) = _wrapped(case.mode, ctx)
    module = getattr(model, "module", model)
    if torch_class:
        algorithm = registry.get(config["name"])
        kwargs = {key: value for key, value in config.items() if key != "name"}
        return _Run(model, algorithm.torch_optimizer(module.parameters(), **kwargs), x=x, y=y)
    if not case.mode.startswith("zero"):
        return _Run(model, builder.build(config, module, engine=case.engine), x=x, y=y)
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if case.mode == "zero-class":
        named = getattr(optim, optim.NAMES[config["name"]])
        local = functools.partial(named, engine=case.engine, partition_group=dist.group.WORLD)
        zero = ZeroRedundancyOptimizer(module.parameters(), optimizer_class=local, **{k: v for k, v in config.items() if k != "name"})
        return _Run(model, zero, shim=zero.optim, x=x, y=y)
    groups, rest = distributed.split_param_groups(config, module)
    rules = builder.parse_adaptive(config)
    rest.pop(builder.ADAPTIVE_KEY, None)  # the rules adapt ZeRO's own param groups (see docs/distributed.md)
    local = functools.partial(builder.build, rest, engine=case.engine, partition_group=dist.group.WORLD)
    zero = ZeroRedundancyOptimizer(groups, optimizer_class=local, parameters_as_bucket_view=case.mode == "zero-bucket")
    adaptive = None
    if rules is not None:
        from .adaptive import AdaptiveOpt

        adaptive = AdaptiveOpt(zero, config=rules)
    return _Run(model, zero, shim=zero.optim, adaptive=adaptive, x=x, y=y)


def _has_torch_class(case: Case) -> bool:
    config = CONFIGS[case.config]
    algorithm = registry.get(config["name"])
    return algorithm.torch_optimizer is not None and not _entries(config) and case.mode in ("fsdp2", "ddp", "tp", "fsdp2-tp")


def run_case(case: Case, ctx: _Context) -> Result:
    """Run ``case`` on every rank; every rank returns the same result."""
    result = Result()
    poison = _wants_poison(CONFIGS[case.config])
    single = _single(case, ctx)
    _train(single, 0, STEPS, poison)
    reference = _params(single.model)
    if case.mode in RESUMING:
        _resume(case, ctx, result, reference)
        return result
    run = _make(case, ctx)
    _train(run, 0, STEPS, poison, result.comm)
    result.diff = _diff(_params(run.model), reference)
    if _has_torch_class(case):
        try:
            theirs = _make(case, ctx, torch_class=True)
            result.torch_comm = {}
            _train(theirs, 0, STEPS, poison, result.torch_comm)
            result.torch_diff = _diff(_params(run.model), _params(theirs.model))
        except Exception as error:  # noqa: BLE001 - recorded: where torch.optim itself cannot run
            result.torch_error = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return result


def _resume(case: Case, ctx: _Context, result: Result, reference: dict[str, Tensor]) -> None:
    """A run saved and resumed halfway against the same mode without a break (``resume_diff``), and
    that against the single process (``diff``).

    Without a break, but through the optimizer's own ``load_state_dict(state_dict())`` at the same
    step: that is what a resume is, and for all but NAdam a no-op (bit for bit: test_shim.py). NAdam's
    float32 ``mu_product`` becomes the param's dtype on loading, by torch's load rule (so does
    torch.optim.NAdam's), and the run continues in float64 after any resume. ZeRO's resume assigns
    the state itself (no cast)."""
    poison, half = _wants_poison(CONFIGS[case.config]), RESUME_AT
    uninterrupted = _make(case, ctx)
    _train(uninterrupted, 0, half, poison)
    if case.mode != "zero-resume":
        uninterrupted.shim.load_state_dict(uninterrupted.shim.state_dict())
    _train(uninterrupted, half, STEPS, poison, result.comm)
    first = _make(case, ctx)
    _train(first, 0, half, poison)
    second = _make(case, ctx)
    if case.mode == "zero-resume":
        _zero_resume(first, second, ctx)
    else:
        result.init_step_change = _dcp_resume(case, first, second, ctx)
    _train(second, half, STEPS, poison)
    result.resume_diff = _diff(_params(second.model), _params(uninterrupted.model))
    result.diff = _diff(_params(uninterrupted.model), reference)
    if case.mode == "dcp-full":  # the same full checkpoint, resumed in a single process
        single = _single(case, ctx)
        _full_load(single, ctx)
        _train(single, half, STEPS, poison)
        result.diff = max(result.diff, _diff(_params(single.model), reference))


def _zero_resume(first: _Run, second: _Run, ctx: _Context) -> None:
    import torch.distributed as dist

    first.optimizer.consolidate_state_dict(to=0)
    state = [first.optimizer.state_dict() if ctx.rank == 0 else None]
    dist.broadcast_object_list(state, src=0)
    second.model.load_state_dict(first.model.state_dict())
    second.optimizer.load_state_dict(state[0])
    if first.adaptive is not None:
        second.adaptive.load_state_dict(first.adaptive.state_dict())


def _dcp_resume(case: Case, first: _Run, second: _Run, ctx: _Context) -> float:
    """Save ``first`` with torch.distributed.checkpoint and load it into ``second``; returns what
    DCP's state-creating step changed in ``second`` (it must change nothing)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    before = _snapshot(second)
    flat = StateDictOptions(flatten_optimizer_state_dict=case.mode == "dcp-flat")
    get_optimizer_state_dict(second.model, second.optimizer, options=flat)  # a fresh optimizer: DCP steps it to create its state
    change = _change(before, _snapshot(second))
    if case.mode == "dcp-full":
        path = os.path.join(ctx.workdir, "full.pt")
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_model_state_dict(first.model, options=full), get_optimizer_state_dict(first.model, first.optimizer, options=full)
        if ctx.rank == 0:
            torch.save({"model": model_sd, "optim": optim_sd}, path)
        torch.distributed.barrier()
        _full_load(second, ctx)
        return change
    path = os.path.join(ctx.workdir, f"dcp-{case.config}-{case.mode}-{case.engine}")
    state = {"model": get_model_state_dict(first.model), "optim": get_optimizer_state_dict(first.model, first.optimizer, options=flat)}
    dcp.save(state, checkpoint_id=path)
    target = {"model": get_model_state_dict(second.model), "optim": get_optimizer_state_dict(second.model, second.optimizer, options=flat)}
    dcp.load(target, checkpoint_id=path)
    set_model_state_dict(second.model, target["model"])
    set_optimizer_state_dict(second.model, second.optimizer, target["optim"], options=flat)
    return change


def _full_load(run: _Run, ctx: _Context) -> None:
    """Load the full checkpoint ``full.pt`` (rank 0 wrote it) into ``run``, sharded or not."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    saved = torch.load(os.path.join(ctx.workdir, "full.pt"), weights_only=True)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(run.model, saved["model"], options=options)
    set_optimizer_state_dict(run.model, run.optimizer, saved["optim"], options=options)


def _snapshot(run: _Run) -> list[Tensor]:
    """Every param and every tensor in the param groups (positions, counters, shared state)."""
    values = [distributed.full(p.detach()).clone() for p in run.model.parameters()]
    for group in run.shim.param_groups:
        values += [v.detach().clone() for k, v in group.items() if isinstance(v, Tensor)]
    return values


def _change(before: list[Tensor], after: list[Tensor]) -> float:
    return max(((a.double() - b.double()).abs().max().item() if a.numel() else 0.0) for a, b in zip(before, after))


# ------------------------------------------------------------------------------------------------
# processes


def _worker(rank: int, world: int, backend: str, init: str, workdir: str, todo: list[Case], out: str, extra: Callable[[], Any] | None) -> None:
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        results: dict[str, Any] = {case.label: vars(result) for case, result in _run_all(todo, workdir).items()}
        if extra is not None:
            results["extra"] = extra()
        if dist.get_rank() == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _run_all(todo: Sequence[Case], workdir: str) -> dict[Case, Result]:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    ctx = _Context(rank, world, device, workdir)
    results = {}
    for case in todo:
        if case.mode == "fsdp2-tp" and (world < 4 or world % 2):
            continue
        try:
            results[case] = run_case(case, ctx)
        except Exception as error:  # noqa: BLE001 - reported per case; every rank raises alike
            results[case] = Result(error=f"{type(error).__name__}: {error}")
    return results


def spawn(todo: Sequence[Case], world: int = 2, backend: str = "gloo", extra: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Run ``todo`` in ``world`` local processes; rank 0's results by case label. ``extra`` (a
    module-level function) runs on every rank after the cases, its rank 0's value under ``"extra"``
    (more checks in the same processes: starting them is most of the time)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as workdir:
        out = os.path.join(workdir, "results.pt")
        init = "file://" + os.path.join(workdir, "init")
        mp.spawn(_worker, args=(world, backend, init, workdir, list(todo), out, extra), nprocs=world, join=True)
        return torch.load(out, weights_only=False)


def _table(results: dict[str, dict[str, Any]]) -> str:
    rows = [f"{'case':<34} {'vs single':>10} {'vs torch':>10} {'resume':>10}  result  collectives per step"]
    for label, r in results.items():
        result = Result(**r)
        cells = [("-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1e}") for v in (r["diff"], r["torch_diff"], r["resume_diff"])]
        comm = ", ".join(f"{k} {v}" for k, v in sorted(r["comm"].items())) or "none"
        status = "ok" if result.passed() else "FAIL"
        notes = "".join(f"  {prefix}{r[key]}" for key, prefix in (("error", ""), ("torch_error", "(torch.optim fails: ") ) if r.get(key))
        rows.append(f"{label:<34} {cells[0]:>10} {cells[1]:>10} {cells[2]:>10}  {status:<6}  {comm}{notes}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optorch verify --distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes to start on this machine (default 2; ignored under torchrun)")
    parser.add_argument("--backend", default=None, help="gloo (CPU) or nccl (CUDA); default nccl where CUDA is available")
    parser.add_argument("--full", action="store_true", help="every config in every mode (default: the representative subset)")
    parser.add_argument("--engine", action="append", choices=("eager", "compiled", "auto", "torch"), help="engines (repeatable; default eager)")
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS), help="configs to run (repeatable; default per --full)")
    args = parser.parse_args(argv)
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    todo = cases(args.full or bool(args.config), tuple(args.engine or ("eager",)))
    if args.config:
        todo = [case for case in todo if case.config in args.config]
    started = time.perf_counter()
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # under torchrun
        import torch.distributed as dist

        dist.init_process_group(backend)
        with tempfile.TemporaryDirectory() as workdir:
            shared = [workdir]
            dist.broadcast_object_list(shared, src=0)  # rank 0's directory (ranks on other machines need a shared filesystem)
            results = {case.label: vars(result) for case, result in _run_all(todo, shared[0]).items()}
            rank = dist.get_rank()
            dist.destroy_process_group()
        if rank != 0:
            return 0
    else:
        results = spawn(todo, args.nproc, backend)
    print(_table(results))
    failed = [label for label, r in results.items() if not Result(**r).passed()]
    print(f"\n{len(results) - len(failed)} of {len(results)} cases within {TOLERANCE:g} (resume {RESUME_TOLERANCE:g}) "
          f"in {time.perf_counter() - started:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
