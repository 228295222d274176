"""How one distributed case runs: the problem (a small model, its batch, a poisoned step), each mode's
wrapping (FSDP2, DDP, ZeRO, DCP, tensor parallel) and the resumes, on one rank of the processes
:mod:`optorch.tools.verify_distributed` starts."""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import builder
from ..algorithms import registry
from ..builder import classes as optim
from ..core import distributed
from ..shim.adaptive import AdaptiveOpt
from .distributed_cases import CONFIGS, POISON_STEP, RESUME_AT, RESUMING, STEPS, Case, Result, entries

__all__ = ["Context", "run_case"]


def _model(device: torch.device, hidden: int = 7) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(device, torch.float64)


def _hidden(mode: str, world: int) -> int:
    """7 (shards of uneven sizes), but a multiple of the tensor-parallel size where tensor parallel
    splits the hidden layer (its layers need even shards)."""
    return 3 * world if mode == "tp" else 6 if mode == "fsdp2-tp" else 7


def _batch(device: torch.device) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(8, 5, generator=generator, dtype=torch.float64),
        torch.randn(8, 3, generator=generator, dtype=torch.float64),
    )
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
        kind = (
            str(op)
            .split(".")[-1]
            .rstrip("_")
            .replace("allreduce", "all_reduce")
            .replace("allgather", "all_gather")
            .replace("_into_tensor", "")
        )
        if n and not kind.startswith(tuple(ignore)):
            comm[kind] = comm.get(kind, 0) + n


def _params(model: nn.Module) -> dict[str, Tensor]:
    module = getattr(model, "module", model)
    return {name: distributed.full(p.detach()).cpu() for name, p in module.named_parameters()}


def _diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


# ------------------------------------------------------------------------------------------------
# the modes


class Context:
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


def _single(case: Case, ctx: Context) -> _Run:
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


def _wrapped(mode: str, ctx: Context) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
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


def _make(case: Case, ctx: Context, torch_class: bool = False) -> _Run:
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
        zero = ZeroRedundancyOptimizer(
            module.parameters(), optimizer_class=local, **{k: v for k, v in config.items() if k != "name"}
        )
        return _Run(model, zero, shim=zero.optim, x=x, y=y)
    groups, rest = builder.split_param_groups(config, module)
    rules = builder.parse_adaptive(config)
    rest.pop(builder.ADAPTIVE_KEY, None)  # the rules adapt ZeRO's own param groups (see docs/distributed.md)
    local = functools.partial(builder.build, rest, engine=case.engine, partition_group=dist.group.WORLD)
    zero = ZeroRedundancyOptimizer(groups, optimizer_class=local, parameters_as_bucket_view=case.mode == "zero-bucket")
    adaptive = None
    if rules is not None:
        adaptive = AdaptiveOpt(zero, config=rules)
    return _Run(model, zero, shim=zero.optim, adaptive=adaptive, x=x, y=y)


def _has_torch_class(case: Case) -> bool:
    config = CONFIGS[case.config]
    algorithm = registry.get(config["name"])
    return (
        algorithm.torch_optimizer is not None
        and not entries(config)
        and case.mode in ("fsdp2", "ddp", "tp", "fsdp2-tp")
    )


def run_case(case: Case, ctx: Context) -> Result:
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


def _resume(case: Case, ctx: Context, result: Result, reference: dict[str, Tensor]) -> None:
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


def _zero_resume(first: _Run, second: _Run, ctx: Context) -> None:
    import torch.distributed as dist

    first.optimizer.consolidate_state_dict(to=0)
    state = [first.optimizer.state_dict() if ctx.rank == 0 else None]
    dist.broadcast_object_list(state, src=0)
    second.model.load_state_dict(first.model.state_dict())
    second.optimizer.load_state_dict(state[0])
    if first.adaptive is not None:
        second.adaptive.load_state_dict(first.adaptive.state_dict())


def _dcp_resume(case: Case, first: _Run, second: _Run, ctx: Context) -> float:
    """Save ``first`` with torch.distributed.checkpoint and load it into ``second``; returns what
    DCP's state-creating step changed in ``second`` (it must change nothing)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    before = _snapshot(second)
    flat = StateDictOptions(flatten_optimizer_state_dict=case.mode == "dcp-flat")
    get_optimizer_state_dict(
        second.model, second.optimizer, options=flat
    )  # a fresh optimizer: DCP steps it to create its state
    change = _change(before, _snapshot(second))
    if case.mode == "dcp-full":
        path = os.path.join(ctx.workdir, "full.pt")
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = (
            get_model_state_dict(first.model, options=full),
            get_optimizer_state_dict(first.model, first.optimizer, options=full),
        )
        if ctx.rank == 0:
            torch.save({"model": model_sd, "optim": optim_sd}, path)
        torch.distributed.barrier()
        _full_load(second, ctx)
        return change
    path = os.path.join(ctx.workdir, f"dcp-{case.config}-{case.mode}-{case.engine}")
    state = {
        "model": get_model_state_dict(first.model),
        "optim": get_optimizer_state_dict(first.model, first.optimizer, options=flat),
    }
    dcp.save(state, checkpoint_id=path)
    target = {
        "model": get_model_state_dict(second.model),
        "optim": get_optimizer_state_dict(second.model, second.optimizer, options=flat),
    }
    dcp.load(target, checkpoint_id=path)
    set_model_state_dict(second.model, target["model"])
    set_optimizer_state_dict(second.model, second.optimizer, target["optim"], options=flat)
    return change


def _full_load(run: _Run, ctx: Context) -> None:
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
