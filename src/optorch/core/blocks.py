"""The pure step's eager evaluation of an element-wise ``update`` in blocks (CPU).

An element-wise update is the same function of each element, so it may run on any slicing of the
elements. :func:`step_in_blocks` joins small parameters whose per-tensor scalars (``step``, NAdam's
``mu_product``, ...) are equal into flat blocks of up to :data:`BLOCK` elements and runs the update
once per block: two thousand 1k-element params cost a few dozen Python-level updates instead of two
thousand (each ~30 us, against ~1 ns per element of Adam's math). The new tensors of a block's params
are views of the block's results; each keeps scalars of its own. Large params step alone.

Grouping reads the scalars on the host, which is free on CPU only: other devices keep the per-tensor
loop, as do autograd and ``torch.func`` transforms (a step being differentiated builds its graph from
the plain ops) and ``torch.compile`` (Inductor fuses the ops itself).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .compat import flatten_dense_tensors, in_functorch_transform, unflatten_dense_tensors

__all__ = ["BLOCK", "eligible", "equal_scalars", "runs", "step_in_blocks"]

BLOCK = 1 << 18
"""The most elements one joined update steps (1 MB of float32 per buffer): past ~30k elements a
tensor's own update costs less than copying it in and out of a joined one."""

JOIN_BELOW = 1 << 15
"""Params with fewer elements than this are joined: below ~25k elements the copies (~1.5 ns per element
for Adam's param, grad and state) cost less than an update call of their own (~30 us; measured, one
thread, torch 2.13)."""

LeafState = dict[str, Tensor]
One = Callable[[Tensor, Tensor, LeafState], tuple]


def eligible(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[LeafState]) -> bool:
    """Whether a pure step over these leaves may join them (see the module docs)."""
    if torch.compiler.is_compiling() or in_functorch_transform() or not params:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for s in states for t in (*s.values(),)):
        return False
    return all(
        type(p) is Tensor and type(g) is Tensor and p.is_cpu and not (p.requires_grad and torch.is_grad_enabled())
        for p, g in zip(params, grads)
    )


def _joinable(param: Tensor, grad: Tensor, state: LeafState) -> bool:
    if param.numel() >= JOIN_BELOW or param.is_complex() or not (param.is_contiguous() and grad.is_contiguous()):
        return False
    return grad.dtype == param.dtype and all(
        v.dim() == 0 or (v.shape == param.shape and v.is_contiguous()) for v in state.values()
    )


def step_in_blocks(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[LeafState], one: One
) -> list[tuple[Tensor, LeafState]]:
    """New ``(param, state)`` of each leaf, as ``one(param, grad, state)`` (an element-wise update on one
    tensor) gives them; ``one`` also steps each joined block."""
    results: list = [None] * len(params)
    kinds: dict[tuple, list[int]] = {}
    for i, (param, grad, state) in enumerate(zip(params, grads, states)):
        if _joinable(param, grad, state):
            layout = tuple((k, v.dtype, v.dim() > 0) for k, v in state.items())
            kinds.setdefault((param.dtype, layout), []).append(i)
        else:
            results[i] = one(param, grad, state)
    for members in kinds.values():
        scalar_keys = [k for k, v in states[members[0]].items() if v.dim() == 0]
        for group in equal_scalars(states, members, scalar_keys):
            for run in runs([params[i].numel() for i in group], BLOCK):
                run = [group[j] for j in run]
                joined = _joined([params[i] for i in run], [grads[i] for i in run], [states[i] for i in run], one)
                for i, result in zip(run, joined):
                    results[i] = result
    return results


def _joined(params, grads, states, one) -> list[tuple[Tensor, LeafState]]:
    if len(params) == 1:
        return [one(params[0], grads[0], states[0])]
    joined_state = {
        k: v if v.dim() == 0 else flatten_dense_tensors([s[k] for s in states]) for k, v in states[0].items()
    }
    new_param, new_state = one(flatten_dense_tensors(params), flatten_dense_tensors(grads), joined_state)
    # each leaf gets scalars of its own (one storage, no aliasing), as the per-tensor loop gives them
    pieces = {
        k: unflatten_dense_tensors(v, params) if v.dim() > 0 else v.expand(len(params)).clone().unbind()
        for k, v in new_state.items()
    }
    return [(p, {k: v[j] for k, v in pieces.items()}) for j, p in enumerate(unflatten_dense_tensors(new_param, params))]


def equal_scalars(states: Sequence[LeafState], members: list[int], keys: Sequence[str]) -> list[list[int]]:
    """``members`` grouped by the values of their 0-dim state entries ``keys`` (one host read per key)."""
    if not keys or len(members) == 1:
        return [members]
    values = [torch.stack([states[i][k] for i in members]).tolist() for k in keys]
    by_value: dict[tuple, list[int]] = {}
    for position, i in enumerate(members):
        by_value.setdefault(tuple(v[position] for v in values), []).append(i)
    return list(by_value.values())


def runs(sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Positions ``0..len(sizes)-1`` cut, in order, into runs of at most ``limit`` elements in all (a
    size past the limit runs alone)."""
    cut, run, total = [], [], 0
    for i, size in enumerate(sizes):
        if run and total + size > limit:
            cut.append(run)
            run, total = [], 0
        run.append(i)
        total += size
    return cut + [run] if run else cut
