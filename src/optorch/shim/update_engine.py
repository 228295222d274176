"""Engines ``"eager"`` and ``"compiled"``: the algorithm's pure per-tensor ``update``, its results
copied into each param and its state in place; compiled, many params step in one call (the batches
:mod:`optorch.shim.batching` plans)."""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

from ..core import distributed
from ..core.algorithm import Algorithm
from ..core.compat import dynamo_would_skip, mark_dynamic, unflatten_dense_tensors
from ..core.config import Config
from ..core.scalars import scales
from .batching import Batch, all_contiguous, plan_batches
from .kernels import run_stacked, run_update
from .protocol import Work

__all__ = ["UpdateEngine"]

_shape = attrgetter("shape")


class UpdateEngine:
    """The algorithm's pure ``update`` run in place (see the module docs); ``compiled`` selects the
    compiled kernels, with the eager path as their fallback where compiling is impossible.

    Compiled, a group's params step in as few calls as their layout allows (a call costs ~30 us; a
    copy in and out of scratch space ~1.5 ns per element of Adam's param, grad and state: measured,
    one thread):

    * params that lie back to back in one buffer (an explicit contiguous layout, see
      :func:`optorch.contiguous`) step as one tensor, without a copy: element-wise algorithms on the
      flat memory, others on a stack of same-shaped params (each reducing over its own slice);
    * other params below :data:`JOIN_BELOW` elements are copied into scratch space this engine
      owns, stepped as one and copied back;
    * the rest step one call each.

    Grads and per-element state take the same path as their params: a view where they too lie back to
    back, else a copy. The params' state is this engine's to place: each state key of a batch (step
    counts included) is moved into one buffer of its own before it first steps (so no step copies
    it); params and grads are never moved. Which params step together is planned
    again whenever a group's params, their data or their state dicts change.
    """

    def __init__(self, algorithm: Algorithm, *, compiled: bool):
        self.algorithm = algorithm
        self.compiled = compiled
        self.name = "compiled" if compiled else "eager"
        self._kernels: dict[tuple, Callable[..., Any]] = {}  # by (kind, dtype, rank or shape): see _call
        self._hyper: dict[tuple, tuple] = {}  # by (group, device, dtype): the config and its tensor copy
        self._plans: dict[int, tuple] = {}  # by group: what the plan was made for, and the plan
        self._scratch: dict[tuple, Tensor] = {}  # by (slot, device, dtype): where batches are copied to step

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_kernels": {}, "_hyper": {}, "_plans": {}, "_scratch": {}}  # rebuilt on first use

    def add_group(self, group: dict[str, Any]) -> None:
        pass

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        work: Sequence[Work],
        shared: tuple[dict[str, Tensor], ...],
        mask: Tensor | None = None,
    ) -> list[dict[str, Tensor]]:
        contributions: list[dict[str, Tensor]] = []
        traced = torch.compiler.is_compiling()  # inside the user's torch.compile: plain per-tensor code
        for index, item in enumerate(work):
            if self.algorithm.is_elementwise(item.config):  # each rank steps its shards: the same numbers
                item = Work(item.config, *distributed.local_shards(item.params, item.grads, item.states))
            if traced or not self.compiled:
                for param, grad, state in zip(item.params, item.grads, item.states):
                    contributions.append(
                        run_update(self.algorithm.update, param, grad, state, item.config, *shared, mask=mask)
                    )
            else:
                contributions += self._compiled_step(optimizer, index, item, shared)
        return [c for c in contributions if c is not None]

    # -- compiled ------------------------------------------------------------------------------

    def _compiled_step(self, optimizer: torch.optim.Optimizer, index: int, item: Work, shared: tuple) -> list:
        elementwise = self.algorithm.is_elementwise(item.config)
        # what a plan depends on; the memory of each batch is checked again at every step anyway
        key = (
            elementwise,
            tuple(map(id, item.states)),
            tuple(map(Tensor.data_ptr, item.params)),
            tuple(map(_shape, item.params)),
        )
        cached = self._plans.get(index)
        plan = cached[1] if cached is not None and cached[0] == key else None
        if plan is not None and not all(batch.scalars_equal(item) for batch in plan[0]):
            plan = None  # a per-tensor scalar was written in place: plan again
        if plan is None:
            plan = plan_batches(item, elementwise, self._scratch)
            self._plans[index] = (key, plan)
        batches, alone, eager = plan
        contributions = [
            run_update(self.algorithm.update, item.params[i], item.grads[i], item.states[i], item.config, *shared)
            for i in eager
        ]
        contributions += [self._single(index, item, i, shared, elementwise) for i in alone]
        contributions += [self._batch(optimizer, index, item, batch, shared) for batch in batches]
        return contributions

    def _single(self, index: int, item: Work, i: int, shared: tuple, elementwise: bool):
        param, grad, state = item.params[i], item.grads[i], item.states[i]
        if elementwise and all_contiguous(param, grad, state):  # one 1-D graph serves every shape
            param, grad, state = (
                param.view(-1),
                grad.view(-1),
                {key: v if v.dim() == 0 else v.view(-1) for key, v in state.items()},
            )
        return self._call(run_update, index, param, grad, state, item.config, shared)

    def _batch(self, optimizer: torch.optim.Optimizer, index: int, item: Work, batch: Batch, shared: tuple):
        """Step the params of ``batch`` as one tensor (see :class:`Batch`)."""
        params = [item.params[i] for i in batch.members]
        states = [item.states[i] for i in batch.members]
        # The state, step counts included, is the optimizer's own memory: laid out as the batch steps
        # it before the first call, so no step copies it (a flat batch's step counts are then checked
        # equal with one host read and written back with one copy), and the kernel sees one layout
        # from its first compile (a layout changed after it would recompile: Dynamo guards on the
        # sizes of views' bases).
        state = {
            key: batch.join(
                [s[key] for s in states],
                key,
                partial(_lay_out_state, optimizer, params, states, key, batch.flat) if value.numel() else None,
            )
            for key, value in states[0].items()
        }
        param = batch.join(params, "param")
        grad = batch.join([item.grads[i] for i in batch.members], "grad")
        contribution = self._call(batch.kernel, index, param, grad, state, item.config, shared)
        batch.write_back(params, "param", param)
        for key, value in state.items():
            batch.write_back([s[key] for s in states], key, value)
        return contribution

    def _call(
        self,
        kernel: Callable[..., Any],
        index: int,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        config: Config,
        shared: tuple,
    ):
        # Where Dynamo would run the kernel uncompiled and then raise, this call runs eagerly: once.
        if not self.compiled or dynamo_would_skip():
            return kernel(self.algorithm.update, param, grad, state, config, *shared)
        # A kernel per dtype and rank, each with Dynamo's recompile budget of its own: sizes are
        # symbolic, but a size-1 dimension or a zero hyperparameter specialises a graph. Stacks get
        # one per shape, with only the number of tensors symbolic: torch 2.13's vmap cannot trace
        # scalars computed from symbolic sizes (DAG's 1 / sqrt(numel), Adafactor's RMS).
        stacked = kernel is run_stacked
        key = (kernel.__name__, param.dtype, tuple(param.shape[1:]) if stacked else param.dim())
        compiled = self._kernels.get(key)
        if compiled is None:
            compiled = self._kernels[key] = _private_compile(kernel, not stacked, self.algorithm.compile_options)
        if stacked:
            for tensor in (param, grad, *state.values()):
                mark_dynamic(tensor, 0)
        try:
            return compiled(
                self.algorithm.update, param, grad, state, self._tensor_config(index, config, param), *shared
            )
        except Exception as error:  # noqa: BLE001 - no compiler, or an op Inductor cannot build
            if not _is_compile_failure(error):
                raise
            if _NOT_COMPILED in str(error):  # the kernel ran eagerly first: stepping again would step twice
                self.compiled, self.name = False, "eager"
                raise RuntimeError(
                    f"optorch: torch.compile ran {self.algorithm.name}'s kernel without compiling it and then "
                    f"failed ({error}); its update is applied but the step is incomplete. "
                    f"The optimizer steps eagerly from now on."
                ) from error
            warnings.warn(
                f"optorch: torch.compile failed ({type(error).__name__}: {error}); "
                f"{self.algorithm.name} runs eagerly from now on",
                RuntimeWarning,
                stacklevel=5,
            )
            self.compiled, self.name = False, "eager"
            return kernel(self.algorithm.update, param, grad, state, config, *shared)

    def _tensor_config(self, index: int, config: Config, like: Tensor) -> Config:
        """``config`` with its non-zero real numbers as 0-dim tensors refilled in place, so a compiled
        step sees a new value as data, never as a new constant. Zeros stay numbers: they drop terms
        exactly as torch.optim's kernels do (a change to or from zero recompiles once). Kept per param
        group while its config is the same object (the shim makes a new one when a value changes)."""
        key = (index, like.device, _hyper_dtype(like))
        cached = self._hyper.get(key)
        if cached is not None and cached[0] is config:
            return cached[1]
        tensors = cached[2] if cached is not None else {}
        values = {}
        for name, value in config.hyperparameters().items():
            converted = _as_tensors(value, name, tensors, like.device, key[2])
            if converted is not value:
                values[name] = converted
        tensor_config = config.with_tensors(**values) if values else config
        self._hyper[key] = (config, tensor_config, tensors)
        return tensor_config


def _lay_out_state(
    optimizer: torch.optim.Optimizer, params: list[Tensor], states: list[dict[str, Tensor]], key: str, flat: bool
) -> list[Tensor] | None:
    """Give state ``key`` of these params one buffer of its own (values kept), as views in
    ``optimizer.state``: flat, or a stack of same-shaped tensors. Returns the views; None where a
    param is not the optimizer's (a DTensor's local shard, whose state dict is a copy holding views
    of the DTensor's memory: that memory stays where it is)."""
    if not all(param in optimizer.state for param in params):
        return None
    tensors = [s[key] for s in states]
    if flat:
        chunks = unflatten_dense_tensors(torch.cat([t.reshape(-1) for t in tensors]), tensors)
    else:
        chunks = torch.stack(tensors).unbind()
    for param, state, chunk in zip(params, states, chunks):
        state[key] = chunk
        optimizer.state[param][key] = chunk
    return list(chunks)


def _as_tensors(value: Any, name: Any, tensors: dict[Any, Tensor], device: torch.device, dtype: torch.dtype) -> Any:
    # Integers select code paths and cadences (DAG's sat_every, AutoSGM's window kind): they stay
    # Python values, as do flags and nested settings.
    if isinstance(value, tuple):
        parts = tuple(_as_tensors(v, (name, i), tensors, device, dtype) for i, v in enumerate(value))
        return parts if all(isinstance(p, Tensor) for p in parts) else value
    if not scales(value):
        return value
    tensor = tensors.get(name)
    if tensor is None:
        tensor = tensors[name] = torch.zeros((), dtype=dtype, device=device)
    tensor.fill_(value)
    return tensor


def _private_compile(function: Callable[..., Any], dynamic: bool, options: Mapping[str, Any]) -> Callable[..., Any]:
    # Dynamo keeps its compile cache (and its recompile limit) per code object: a private copy of the
    # code gives each engine graphs of its own, however many optimizers a process has.
    code = function.__code__.replace()
    copy = types.FunctionType(
        code, function.__globals__, function.__name__, function.__defaults__, function.__closure__
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    return torch.compile(copy, fullgraph=True, dynamic=dynamic, options=dict(options) or None)


_NOT_COMPILED = "found no compiled frames"
"""torch.compile's error (``fullgraph=True``) when Dynamo skipped a frame: it raises after running it."""


def _is_compile_failure(error: Exception) -> bool:
    module = type(error).__module__
    return module.startswith(("torch._dynamo", "torch._inductor")) or "compile" in str(error).lower()


def _hyper_dtype(like: Tensor) -> torch.dtype:
    # The param's own precision, as torch.optim's kernels round a Python-number hyperparameter; but
    # never below float32 (a bfloat16 lr keeps three digits).
    dtype = like.real.dtype if like.is_complex() else like.dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32
