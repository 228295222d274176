"""Which params a compiled step runs together: back-to-back runs of one buffer, small params gathered
into a scratch buffer, equal shapes stacked; each batch one call."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..core import distributed
from ..core.compat import unflatten_dense_tensors
from ..core.stepping import BLOCK, JOIN_BELOW, back_to_back, equal_scalars, runs
from .kernels import run_stacked, run_update
from .protocol import Work

__all__ = ["Batch", "all_contiguous", "plan_batches"]


class Batch:
    """Params of one kind that step in one call: ``flat`` (an element-wise algorithm, their per-tensor
    scalars equal, all of them one 1-D tensor) or stacked (same-shaped params, a new first dimension).

    Each of their buffers (params, grads, each state key) joins as a view of the memory the tensors
    occupy when they lie back to back in one storage (checked at every step, never assumed), else as
    a copy into scratch space kept with the batch, copied back after the step. A flat batch's
    per-tensor scalars (its step counts) step once: one scalar, written back into every tensor."""

    def __init__(self, members: list[int], flat: bool, scalar_keys: tuple[str, ...], scratch: dict[tuple, Tensor]):
        self.members, self.flat, self.scalar_keys = members, flat, scalar_keys
        self.kernel = run_update if flat else run_stacked
        self._scratch = scratch  # the engine's, shared by its batches (one after the other, so it stays in cache)
        self._slices: dict[str, tuple[Tensor, Tensor, list[Tensor]]] = {}  # by slot: (scratch, joined, views)
        self._back_to_back: dict[str, tuple[list[int], Tensor]] = {}  # by slot: (data pointers, view)
        # by slot, how write_back copies the step's result: not at all (None: the slot was a view),
        # into a scalar's back-to-back view, or from these sources, one per tensor
        self._copies: dict[str, Tensor | list[Tensor] | None] = {}

    def scalars_equal(self, item: Work) -> bool:
        """Whether the flat batch's per-tensor scalars are still equal (one host read per key)."""
        for key in self.scalar_keys:
            tensors = [item.states[i][key] for i in self.members]
            values = self._view(tensors, key)
            if values is None:
                values = torch.stack(tensors)
            if not bool((values == values[0]).all()):
                return False
        return True

    def join(
        self, tensors: list[Tensor], slot: str, lay_out: Callable[[], list[Tensor] | None] | None = None
    ) -> Tensor:
        """The batch's ``slot`` as one tensor: a view where ``tensors`` lie back to back, else (after
        ``lay_out``, which moves them back to back and returns them, or None where it may not) a copy."""
        view = self._view(tensors, slot)
        if view is None and lay_out is not None and (laid_out := lay_out()) is not None:
            tensors = laid_out
            view = self._view(tensors, slot)
        if tensors[0].dim() == 0 and self.flat:  # a per-tensor scalar, equal in the batch
            joined = tensors[0].clone()
            self._copies[slot] = view if view is not None else [joined] * len(tensors)
            return joined
        if view is not None:
            self._copies[slot] = None
            return view if self.flat else view.view(len(tensors), *tensors[0].shape)
        key = (slot, tensors[0].device, tensors[0].dtype)
        cached = self._slices.get(slot)
        if cached is None or cached[0] is not self._scratch.get(key):
            size = sum(t.numel() for t in tensors)
            scratch = self._scratch.get(key)
            if scratch is None or scratch.numel() < size:
                scratch = self._scratch[key] = torch.empty(
                    max(size, BLOCK), dtype=tensors[0].dtype, device=tensors[0].device
                )
            if self.flat:
                joined = scratch[:size]
                views = list(unflatten_dense_tensors(joined, tensors))
            else:
                joined = scratch[:size].view(len(tensors), *tensors[0].shape)
                views = list(joined.unbind())
            cached = self._slices[slot] = (scratch, joined, views)
        _, joined, views = cached
        torch._foreach_copy_(views, tensors)
        self._copies[slot] = views
        return joined

    def _view(self, tensors: list[Tensor], slot: str) -> Tensor | None:
        """:func:`back_to_back`, reading only data pointers and contiguity while they are those of the
        slot's last view: the sizes cannot have changed, as a param's shape is part of the plan, a
        grad's is checked against its param, and a state tensor's when it is replaced."""
        known = self._back_to_back.get(slot)
        pointers = list(map(Tensor.data_ptr, tensors))
        if known is not None and pointers == known[0] and all(map(Tensor.is_contiguous, tensors)):
            return known[1]
        view = back_to_back(tensors)
        if view is None:
            self._back_to_back.pop(slot, None)
        else:
            self._back_to_back[slot] = (pointers, view)
        return view

    def write_back(self, tensors: list[Tensor], slot: str, joined: Tensor) -> None:
        """Copy the step's result ``joined`` into ``tensors`` where they were not stepped in place."""
        copies = self._copies[slot]
        if isinstance(copies, Tensor):
            copies.copy_(joined)
        elif copies is not None:
            torch._foreach_copy_(tensors, copies)


def _batchable(param: Tensor, grad: Tensor) -> bool:
    return not param.is_complex() and param.layout == torch.strided and grad.layout == torch.strided and param.dim() > 0


def all_contiguous(param: Tensor, grad: Tensor, state: dict[str, Tensor]) -> bool:
    return (
        param.is_contiguous()
        and grad.is_contiguous()
        and all(v.dim() == 0 or (v.is_contiguous() and v.shape == param.shape) for v in state.values())
    )


def plan_batches(
    item: Work, elementwise: bool, scratch: dict[tuple, Tensor]
) -> tuple[list[Batch], list[int], list[int]]:
    """Which params of ``item`` step together: ``(batches, alone, eager)``.

    A batch holds params of one kind (device, dtype, state layout; and shape unless element-wise):
    params that lie back to back in one storage, or small ones (to be copied), at most
    :data:`BLOCK` elements of them. Element-wise batches also hold equal per-tensor scalars
    (``step``; one host read per key and kind): they step as one flat tensor. DTensors step eagerly."""
    by_kind: dict[tuple, list[int]] = {}
    alone, eager = [], []
    for i, (param, grad) in enumerate(zip(item.params, item.grads)):
        state = item.states[i]
        if distributed.is_dtensor(param):  # sharded: DTensor's own ops (whole-parameter reductions)
            eager.append(i)
        elif not _batchable(param, grad) or (
            elementwise and any(v.dim() > 0 and v.shape != param.shape for v in state.values())
        ):
            alone.append(i)
        else:
            layout = tuple((key, value.dtype, value.device, value.dim() > 0) for key, value in state.items())
            by_kind.setdefault((param.device, param.dtype, layout, None if elementwise else param.shape), []).append(i)
    batches = []
    for members in by_kind.values():
        scalar_keys = (
            tuple(key for key, value in item.states[members[0]].items() if value.dim() == 0) if elementwise else ()
        )
        for group in equal_scalars(item.states, members, scalar_keys):
            small = []
            for run in _runs_in_memory(item.params, group):
                if len(run) > 1:
                    batches.append(Batch(run, elementwise, scalar_keys, scratch))
                else:
                    (small if item.params[run[0]].numel() < JOIN_BELOW else alone).append(run[0])
            for chunk in ([small[j] for j in run] for run in runs([item.params[i].numel() for i in small], BLOCK)):
                if len(chunk) > 1:
                    batches.append(Batch(chunk, elementwise, scalar_keys, scratch))
                else:
                    alone += chunk
    return batches, alone, eager


def _runs_in_memory(params: list[Tensor], members: list[int]) -> list[list[int]]:
    """``members`` split into runs of params that lie back to back in one storage, in address order."""
    order = sorted(members, key=lambda i: params[i].data_ptr())
    runs = [[order[0]]]
    for previous, i in zip(order, order[1:]):
        if back_to_back([params[previous], params[i]]) is not None:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs
