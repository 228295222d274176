"""Beyond one process: how an optorch optimizer takes its reductions across ranks.

torch spreads a model over ranks in three ways, and each needs something else of an optimizer
(``docs/distributed.md`` has examples and the communication each algorithm adds):

* **DDP**: every rank holds every parameter and the averaged gradient, and steps identically.
  Nothing more is needed.
* **FSDP2, tensor parallelism** (parameters are ``DTensor``s, each rank holding shards): an algorithm's
  ``update`` runs on the DTensors, so each reduction in it (a norm, a mean) covers the whole parameter
  through DTensor's own ops; an element-wise algorithm steps each rank's shard directly instead (the
  same numbers, no communication: :func:`local_shards`). A value that leaves DTensor (a 0-dim state
  entry, a contribution to shared state, a finiteness check) is read whole with :func:`full`: a
  DTensor reduction that is read as a plain number would give each rank its own shard's result.
* **ZeroRedundancyOptimizer** (each rank's optimizer holds a disjoint share of plain parameters):
  element-wise and per-tensor algorithms need nothing; what reduces across parameters (shared
  state such as DAG's shrink, ``clip_grad_norm``, ``skip_nonfinite``, ``amp``) must reduce across
  the ranks too, which the optimizer does over the ``partition_group`` it is built with
  (:class:`Partition`), and refuses to do without one (:func:`check_partition`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .compat import in_backward

__all__ = [
    "Partition",
    "check_layout",
    "check_partition",
    "finite_everywhere",
    "full",
    "in_backward",
    "is_dtensor",
    "local_shards",
    "meta_like",
    "zeros_reduced",
]


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (without importing it: a build of
    torch without distributed has none)."""
    return type(tensor).__name__ == "DTensor"


def full(value: Any) -> Any:
    """A DTensor's whole value as a plain tensor (a pending reduction done: one collective); anything
    else as it is. ``float()``, ``bool()`` or ``.item()`` of a DTensor reduction read this rank's
    partial result instead, silently different on each rank."""
    return value.full_tensor() if is_dtensor(value) else value


def finite_everywhere(grads: Sequence[Tensor]) -> Tensor:
    """Whether every element of ``grads`` (DTensors among them) is finite, decided alike on every
    rank: each rank checks its own shards, then one all-reduce per mesh dimension takes the minimum
    (a rank whose shard is empty has nothing to check, and still takes part)."""
    import torch.distributed as dist

    local = [g.to_local() if is_dtensor(g) else g for g in grads]
    flag = torch.stack([torch.isfinite(g).all().to(local[0].device) for g in local]).all().to(torch.float32)
    meshes = {id(g.device_mesh): g.device_mesh for g in grads if is_dtensor(g)}
    for mesh in meshes.values():
        for dim in range(mesh.ndim):
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=mesh.get_group(dim))
    return flag.bool()


def meta_like(param: Tensor) -> Tensor:
    """A meta tensor of ``param``'s dtype, shape and (for a DTensor) layout: what a fresh state made
    from it looks like, without memory."""
    if not is_dtensor(param):
        return torch.empty(param.shape, dtype=param.dtype, device="meta")
    from torch.distributed.tensor import DTensor

    local = torch.empty(param.to_local().shape, dtype=param.dtype, device="meta")
    return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())


def zeros_reduced(param: Tensor, dim: int) -> Tensor:
    """Zeros shaped like ``param`` reduced over ``dim`` (kept as size 1), e.g. a factored second
    moment; for a DTensor, sharded as ``param`` along the dims kept and whole along ``dim``."""
    shape = list(param.shape)
    shape[dim] = 1
    if not is_dtensor(param):
        return param.new_zeros(shape)
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor import zeros as dtensor_zeros

    dim %= param.dim()
    placements = [Replicate() if p.is_shard(dim) else p for p in param.placements]
    return dtensor_zeros(shape, dtype=param.dtype, device_mesh=param.device_mesh, placements=placements)


def _layout(tensor: Tensor) -> tuple | None:
    return (tensor.device_mesh, tuple(tensor.placements)) if is_dtensor(tensor) else None


def check_layout(name: str, key: str, value: Tensor, reference: Tensor) -> None:
    """A state tensor must be laid out as a fresh one would be (a DTensor of the same mesh and
    placements, or a plain tensor): stepped otherwise, its elements would meet the wrong shard."""
    if _layout(value) == _layout(reference):
        return
    expected = f"a DTensor with placements {tuple(reference.placements)}" if is_dtensor(reference) else "a plain tensor"
    got = f"a DTensor with placements {tuple(value.placements)}" if is_dtensor(value) else "a plain tensor"
    raise ValueError(
        f"{name}: state {key!r} is {got}, expected {expected} like its parameter's fresh state. A checkpoint of the "
        "whole model loads into a sharded one through torch.distributed.checkpoint (set_optimizer_state_dict with "
        "StateDictOptions(full_state_dict=True)), which shards each state tensor as its parameter."
    )


def local_shards(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[Mapping[str, Tensor] | None]):
    """For an element-wise update: each DTensor param, its grad and its state as this rank's local
    shards, where all of them are laid out alike (then every element meets its own gradient and state
    on this rank, and the step is exactly the whole tensor's). Params laid out otherwise (a grad still
    partial, a replicated state) stay DTensors and step through DTensor's ops."""
    params, grads, states = list(params), list(grads), list(states)
    for i, (param, grad, state) in enumerate(zip(params, grads, states)):
        if not is_dtensor(param) or any(p.is_partial() for p in param.placements):
            continue
        layout = _layout(param)
        shaped = [value for value in (state or {}).values() if value.dim() > 0]
        if _layout(grad) != layout or any(_layout(value) != layout for value in shaped):
            continue
        params[i], grads[i] = param.to_local(), grad.to_local()
        if state is not None:
            states[i] = {key: value.to_local() if is_dtensor(value) else value for key, value in state.items()}
    return params, grads, states


# ------------------------------------------------------------------------------------------------
# a partition of the params over ranks (ZeroRedundancyOptimizer)


class Partition:
    """The ranks of ``group`` each step a disjoint share of the parameters; together, all of them.
    Reductions across parameters are completed across those ranks (an all-reduce each), so every rank
    takes the decisions and keeps the shared state of the whole model. Every rank must step together."""

    def __init__(self, group: Any):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("partition_group needs torch.distributed initialised (dist.init_process_group) first")
        self.group = group
        self.size = dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        # nccl reduces CUDA tensors only; gloo and mpi take CPU ones
        self.device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        self.collectives = 0
        """All-reduces made so far (what its reductions cost: docs/distributed.md)."""

    def __deepcopy__(self, memo: dict) -> Partition:
        return self  # a process group is a handle on the running job, shared by every copy

    def __reduce__(self):
        raise TypeError(
            "an optimizer built with partition_group holds a process group, which cannot be pickled; "
            "save its state_dict() instead"
        )

    def reduce(self, values: Tensor, op: str = "sum") -> Tensor:
        """``values`` (any shape) reduced over the group: ``"sum"``, ``"max"`` or ``"min"``, in float64
        (sums of counts and squares stay exact where the single process's are)."""
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        reduced = values.detach().to(self.device, torch.float64).clone()
        dist.all_reduce(reduced, op=ops[op], group=self.group)
        self.collectives += 1
        return reduced.to(values.device, values.dtype if values.is_floating_point() else torch.float64)

    def norm(self, local: Tensor) -> Tensor:
        """The 2-norm over the group of each rank's 2-norm (the global norm of disjoint shares)."""
        return self.reduce(local.to(torch.float64).square()).sqrt().to(local.dtype)

    def any(self, flag: Tensor | bool) -> bool:
        return bool(self.reduce(torch.as_tensor(flag, dtype=torch.float64), "max"))

    def totals(
        self, local: dict[str, Tensor] | None, keys: Sequence[str], device: torch.device
    ) -> dict[str, Tensor] | None:
        """The sums over every rank of the contributions to shared state (``local``: this rank's sums,
        None when none of its params stepped), None when no rank's did; one all-reduce."""
        if not keys:
            raise ValueError(
                "this algorithm's Shared declares no contribution keys, which a partition needs to reduce them"
            )
        dtype = next(iter(local.values())).dtype if local else torch.float64
        values = torch.zeros(len(keys) + 1, dtype=torch.float64, device=device)
        if local is not None:
            values[:-1] = torch.stack([local[key].to(device, torch.float64) for key in keys])
            values[-1] = 1
        reduced = self.reduce(values)
        if not bool(reduced[-1]):
            return None
        return {key: reduced[i].to(dtype) for i, key in enumerate(keys)}

    def check(self, zero: Any) -> None:
        """The group must be the one ZeroRedundancyOptimizer partitions over (else the reductions span
        other ranks than the partition)."""
        import torch.distributed as dist

        ours, theirs = dist.get_process_group_ranks(self.group), dist.get_process_group_ranks(zero.process_group)
        if ours != theirs:
            raise ValueError(
                f"partition_group spans ranks {ours}, but ZeroRedundancyOptimizer partitions the params over ranks "
                f"{theirs}: pass it the same process group"
            )


def zero_owner() -> Any:
    """The ZeroRedundancyOptimizer whose constructor is building the calling optimizer, or None.

    ZeRO hands its local optimizer a share of the params and nothing that says so; found here by
    its frame, this is only ever used to refuse a partial result with a clear error."""
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer
    except ImportError:
        return None
    code = getattr(ZeroRedundancyOptimizer, "_init_local_optimizer", None)
    frame = sys._getframe(1)
    while frame is not None and code is not None:
        if frame.f_code is code.__code__:
            return frame.f_locals.get("self")
        frame = frame.f_back
    return None


def check_partition(name: str, reductions: Sequence[str], partition: Partition | None) -> None:
    """Refuse to build, inside ZeroRedundancyOptimizer, an optimizer whose ``reductions`` (across all
    params) would each rank see only its share of, without a partition group to complete them."""
    zero = zero_owner()
    if zero is None:
        return
    if partition is not None:
        partition.check(zero)
    elif reductions:
        raise ValueError(
            f"{name}: {', '.join(reductions)} reduce(s) over all parameters, but inside ZeroRedundancyOptimizer this "
            "optimizer holds only this rank's share of them, and would compute a partial result. Build it with the "
            "ZeRO process group: optimizer_class=functools.partial(optorch.build, config, "
            "partition_group=dist.group.WORLD) (or functools.partial(optorch.optim.<Name>, partition_group=...)); its "
            "reductions then span every rank's share."
        )
