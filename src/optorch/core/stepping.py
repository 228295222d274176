"""How the pure step runs its per-tensor updates: joined into blocks eagerly (CPU), each traced once
under ``torch.compile``. Both give the per-tensor loop's numbers.

**Joined blocks.** An element-wise update is the same function of each element, so it may run on any
slicing of the elements. :func:`step_in_blocks` joins small parameters whose per-tensor scalars
(``step``, NAdam's ``mu_product``, ...) are equal into flat blocks of up to :data:`BLOCK` elements and
runs the update once per block: two thousand 1k-element params cost a few dozen Python-level updates
instead of two thousand (each ~30 us, against ~1 ns per element of Adam's math). The new tensors of a
block's params are views of the block's results; each keeps scalars of its own. A block's next step
reads them, lying one after another in one storage, without a copy (:func:`flat`). Large params step
alone. Grouping reads the scalars on the host, which is free on CPU only: other devices keep the
per-tensor loop, as do autograd and ``torch.func`` transforms (a step being differentiated builds its
graph from the plain ops) and ``torch.compile`` (Inductor fuses the ops itself).

**Traced once.** Under ``torch.compile``, Dynamo traces the Python of every tensor's update again:
~160 ms a tensor, 32 s of the 58 s a 200-tensor step took to compile (measured, torch 2.13).
:func:`step_traced_once` calls each update through one ``torch.compiler.nested_compile_region``, which
Dynamo traces once per kind of input (shape, dtype, strides) and stamps out for the rest, keeping
``fullgraph=True`` and each tensor's own step count. A region's inputs may be tensors, constants and
modules only, so the update and its config reach it through a module (:data:`_SLOT`), the config's
tensor hyperparameters (``inject_hyperparams``' schedules) as inputs, and a constant naming the update
and the config's numbers and flags, so that steps with other configs in one graph never share a
region. A config with nested settings (DAG's), shared state, or symbolic sizes (``dynamic=True``:
torch 2.13 cannot reuse a region over them) keep the plain loop. :mod:`optorch.core.opaque` holds the
other design, which compiles faster and steps slower.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import compat, ops
from .compat import flatten_dense_tensors, in_functorch_transform, unflatten_dense_tensors
from .config import Config

__all__ = [
    "BLOCK",
    "apply_update",
    "back_to_back",
    "JOIN_BELOW",
    "LeafState",
    "PLAIN",
    "Update",
    "blocks",
    "eligible",
    "equal_scalars",
    "flat",
    "plain_cpu",
    "runs",
    "split_config",
    "step_in_blocks",
    "step_traced_once",
    "traceable_once",
    "with_tensors",
]

BLOCK = 1 << 18
"""The most elements one joined update steps (1 MB of float32 per buffer); also the most the shim's
compiled engine gathers into its scratch space for one call."""

JOIN_BELOW = 1 << 15
"""Params with fewer elements than this are joined: below ~25k elements the copies (~1.5 ns per element
for Adam's param, grad and state) cost less than an update call of their own (~30 us; measured, one
thread, torch 2.13)."""

PLAIN = (Tensor, torch.nn.Parameter)
"""The tensor types the fast paths take (subclasses such as DTensor keep the per-tensor loop)."""

LeafState = dict[str, Tensor]
Update = Callable[..., tuple]  # (param, grad, leaf_state, config[, shared]) -> (param, leaf_state[, contributions])


def _as_real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def apply_update(update: Update, param: Tensor, grad: Tensor, leaf_state: LeafState, config: Config, *shared: Any):
    """Run ``update`` on one tensor; complex tensors are stepped as pairs of reals, as torch.optim does.

    Returns ``(new_param, new_leaf_state)``, and the contributions too when a shared state is passed.
    """
    if not param.is_complex():
        new_param, new_state, *contributions = update(param, grad, leaf_state, config, *shared)
        # A 0-dim param meeting a 0-dim float64 hyperparameter would be promoted: keep each dtype.
        new_state = {k: ops.like(v, leaf_state[k]) for k, v in new_state.items()}
        return (ops.like(new_param, param), new_state, *contributions)
    real_state = {k: _as_real(v) for k, v in leaf_state.items()}
    new_param, new_state, *contributions = update(
        torch.view_as_real(param), _as_real(grad), real_state, config, *shared
    )
    to_complex = {k: torch.view_as_complex(v) if leaf_state[k].is_complex() else v for k, v in new_state.items()}
    return (torch.view_as_complex(new_param), to_complex, *contributions)


def eligible(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[LeafState]) -> bool:
    """Whether a pure step over these leaves may join them (see the module docs)."""
    return not (torch.compiler.is_compiling() or in_functorch_transform()) and plain_cpu(params, grads, states)


def plain_cpu(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[LeafState]) -> bool:
    """Whether there are leaves and every tensor is a plain CPU tensor that no autograd graph records:
    what the joined step, eager or behind the compiled step's operator, takes."""
    recording = torch.is_grad_enabled()
    tensors = [*params, *grads, *(v for state in states for v in state.values())]
    return bool(params) and all(type(t) in PLAIN and t.is_cpu and not (recording and t.requires_grad) for t in tensors)


def _joinable(param: Tensor, grad: Tensor, state: LeafState) -> bool:
    if param.numel() >= JOIN_BELOW or param.is_complex() or not (param.is_contiguous() and grad.is_contiguous()):
        return False
    return grad.dtype == param.dtype and all(
        v.dim() == 0 or (v.shape == param.shape and v.is_contiguous()) for v in state.values()
    )


def blocks(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[LeafState], elementwise: bool = True
) -> list[list[int]]:
    """The leaves' positions cut into blocks: joinable leaves of one kind (dtype and state layout) in
    runs of at most :data:`BLOCK` elements, any other leaf alone. Reads no values, only layouts."""
    alone, kinds = [], {}
    for i, (param, grad, state) in enumerate(zip(params, grads, states)):
        if elementwise and _joinable(param, grad, state):
            layout = tuple((k, v.dtype, v.dim() > 0) for k, v in state.items())
            kinds.setdefault((param.dtype, layout), []).append(i)
        else:
            alone.append([i])
    cut = [
        [members[j] for j in run]
        for members in kinds.values()
        for run in runs([params[i].numel() for i in members], BLOCK)
    ]
    return alone + cut


def step_in_blocks(
    update: Update, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[LeafState], config: Config
) -> list[tuple[Tensor, LeafState]]:
    """New ``(param, state)`` of each leaf, as the element-wise ``update`` gives them tensor by tensor:
    each block's leaves whose scalars agree are joined."""
    results: list = [None] * len(params)
    for block in blocks(params, grads, states):
        scalar_keys = [k for k, v in states[block[0]].items() if v.dim() == 0]
        for group in equal_scalars(states, block, scalar_keys):
            joined = _joined(
                update, [params[i] for i in group], [grads[i] for i in group], [states[i] for i in group], config
            )
            for i, result in zip(group, joined):
                results[i] = result
    return results


def _joined(update, params, grads, states, config) -> list[tuple[Tensor, LeafState]]:
    if len(params) == 1:
        return [apply_update(update, params[0], grads[0], states[0], config)]
    joined_state = {k: v if v.dim() == 0 else flat([s[k] for s in states]) for k, v in states[0].items()}
    new_param, new_state = apply_update(update, flat(params), flat(grads), joined_state, config)
    # each leaf gets scalars of its own (one storage, no aliasing), as the per-tensor loop gives them
    pieces = {
        k: unflatten_dense_tensors(v, params) if v.dim() > 0 else v.expand(len(params)).clone().unbind()
        for k, v in new_state.items()
    }
    return [(p, {k: v[j] for k, v in pieces.items()}) for j, p in enumerate(unflatten_dense_tensors(new_param, params))]


def flat(tensors: Sequence[Tensor]) -> Tensor:
    """``tensors`` as one flat tensor: a view when they lie back to back in one storage, as a block's
    results do (so its next step copies nothing), else a copy."""
    if len(tensors) == 1:
        return tensors[0].reshape(-1)
    view = back_to_back(tensors)
    return view if view is not None else flatten_dense_tensors(tensors)


def back_to_back(tensors: Sequence[Tensor]) -> Tensor | None:
    """One flat view of the memory ``tensors`` occupy when they lie back to back in one storage, in
    order, contiguous and of one dtype (a layout checked wherever it is used, never assumed); else None."""
    first = tensors[0]
    # offsets rather than data pointers: an empty tensor's pointer need not be where it lies
    storage, end = first.untyped_storage().data_ptr(), first.storage_offset()
    for t in tensors:
        adjacent = t.untyped_storage().data_ptr() == storage and t.storage_offset() == end and t.dtype == first.dtype
        if not (adjacent and t.is_contiguous()):
            return None
        end += t.numel()
    return first.as_strided((end - first.storage_offset(),), (1,))


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


class _Slot(torch.nn.Module):
    """What the traced region reads besides its tensors: the update, and the config with each tensor
    hyperparameter written ``...`` (a schedule's lr in ``inject_hyperparams``; they enter as inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.update: Update | None = None
        self.config: Config | None = None


_SLOT = _Slot()


@torch.compiler.nested_compile_region
def _region(
    slot: _Slot, identity: str, keys: tuple[str, ...], n_hyper: int, param: Tensor, grad: Tensor, *inputs: Tensor
) -> tuple[Tensor, ...]:
    hyper, values = inputs[:n_hyper], inputs[n_hyper:]
    config = with_tensors(slot.config, hyper)
    new_param, new_state = apply_update(slot.update, param, grad, dict(zip(keys, values)), config)
    # a region may not return its inputs (an unchanged state entry): those come back as copies
    inputs = (param, grad, *inputs)
    return tuple(o.clone() if any(o is i for i in inputs) else o for o in (new_param, *(new_state[k] for k in keys)))


def traceable_once(params: Sequence[Tensor], grads: Sequence[Tensor], config: Config) -> bool:
    """Whether a compiled pure step may trace its update once (see the module docs): static sizes,
    and a config of numbers, flags and tensors (a nested setting has no exact constant form)."""
    return (
        torch.compiler.is_compiling()
        and all(_is_constant(v) or _holds_tensor(v) for v in vars(config).values())
        and all(type(t) in PLAIN and all(isinstance(d, int) for d in t.shape) for t in (*params, *grads))
    )


def step_traced_once(
    update: Update, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[LeafState], config: Config
) -> list[tuple[Tensor, LeafState]]:
    """New ``(param, state)`` of each leaf, as ``update`` (without shared state) gives them tensor by
    tensor, each call a stamp of one traced region."""
    constants, hyper = split_config(config)
    _SLOT.update, _SLOT.config = update, config.unchecked(**dict(constants))
    # Dynamo reuses a region for inputs alike, and the slot's contents are not inputs: the update and
    # the config's numbers and flags are, as one exact string (one constant is matched far faster
    # than a tuple of them), so that two steps in one graph with other configs (a partition of the
    # params) never share a region
    identity = f"{id(update)} {constants!r}"
    results = []
    for param, grad, state in zip(params, grads, states):
        keys = tuple(state)
        new_param, *values = _region(_SLOT, identity, keys, len(hyper), param, grad, *hyper, *state.values())
        results.append((new_param, dict(zip(keys, values))))
    return results


def split_config(config: Config) -> tuple[list[tuple[str, Any]], list[Tensor]]:
    """A config of numbers, flags and tensors (:func:`traceable_once`) as its fields' constants, each
    tensor written ``...``, and its tensors in field order. ``repr`` of the constants is exact: it
    round-trips floats. A number Dynamo made symbolic (a float field that changed between calls) is
    pinned to this call's value under a guard, as a float constant of a graph is."""
    constants, tensors = [], []
    # the fields' values as stored (Dynamo cannot trace pydantic's field table, hyperparameters())
    for name, value in vars(config).items():
        parts = value if isinstance(value, tuple) else (value,)
        tensors += [v for v in parts if isinstance(v, Tensor)]
        pinned = tuple(
            ... if isinstance(v, Tensor) else compat.guard_scalar(v) if type(v) in (int, float) else v for v in parts
        )
        constants.append((name, pinned if isinstance(value, tuple) else pinned[0]))
    return constants, tensors


def with_tensors(config: Config, tensors: Sequence[Tensor]) -> Config:
    """``config`` with its fields' ``...`` filled, in field order, by ``tensors`` (:func:`split_config`)."""
    if not tensors:
        return config
    given, values = iter(tensors), {}
    for name, value in vars(config).items():
        if value is ... or (isinstance(value, tuple) and any(v is ... for v in value)):
            values[name] = next(given) if value is ... else tuple(next(given) if v is ... else v for v in value)
    return config.unchecked(**values)


def _is_constant(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(map(_is_constant, value))
    return value is None or type(value) in (bool, int, float, str)


def _holds_tensor(value: Any) -> bool:
    return isinstance(value, Tensor) or (isinstance(value, tuple) and any(isinstance(v, Tensor) for v in value))
