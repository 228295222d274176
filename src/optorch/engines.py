"""Engines: how an :class:`optorch.Optimizer` step executes. The math is always the algorithm's.

Every engine steps the tensors the param groups hold *now*, with the state ``optimizer.state`` holds
now: nothing it keeps between steps can go stale when someone assigns ``p.data``, replaces a state
tensor, or loads a checkpoint (:class:`Engine` is the interface the shim calls).

* :class:`TorchEngine` (``"torch"``): torch.optim's own kernel, for algorithms whose math and state
  are exactly torch's. ``"auto"`` picks it only where :data:`TORCH_KERNELS` lists the kernel as
  verified equal to torch.optim's default for that device and dtype.
* :class:`UpdateEngine` (``"eager"`` and ``"compiled"``): the algorithm's pure per-tensor ``update``,
  its results copied into each param and its state in place. Compiled, the update and the copy are
  one kernel built once with dynamic shapes (hyperparameters enter as 0-dim tensors, so a schedule
  never recompiles); params that lie back to back in memory step as one tensor, small ones are
  copied into scratch space the optimizer owns to step with others, so many tensors cost few calls.
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
from collections import defaultdict
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor
from torch.optim.adagrad import adagrad as torch_adagrad
from torch.optim.adam import adam as torch_adam
from torch.optim.sgd import sgd as torch_sgd

from . import distributed, ops
from .algorithm import Algorithm, apply_update
from .config import Config

__all__ = ["ENGINES", "TORCH_KERNELS", "Engine", "Work", "TorchEngine", "UpdateEngine", "make_engine", "resolve_engine"]

ENGINES = ("auto", "torch", "compiled", "eager")

TORCH_KERNELS: dict[tuple[str, str], tuple[torch.dtype, ...]] = {
    ("sgd", "cpu"): (torch.float32, torch.float64),
    ("adam", "cpu"): (torch.float32, torch.float64),
    ("adamw", "cpu"): (torch.float32, torch.float64),
    ("adagrad", "cpu"): (torch.float32, torch.float64),
    ("sgd", "cuda"): (torch.float32, torch.float64),
    ("adam", "cuda"): (torch.float32, torch.float64),
    ("adamw", "cuda"): (torch.float32, torch.float64),
}
"""``(algorithm, device type) -> dtypes`` where torch's fused kernel equals torch.optim's default
kernel (checked by ``test_engines.py`` and ``optorch verify``); ``"auto"`` uses torch's kernel only
there. Not listed, for example: fused SGD in bfloat16/float16 on CPU, which torch 2.13 computes
wrongly (a difference of several units after 20 steps)."""

GATHER_BELOW = 1 << 15
"""Compiled: params with fewer elements than this that do not lie back to back with others step
together, copied into scratch space and back: below ~25k elements the copies (~1.5 ns per element for
Adam's param, grad and state, both ways) cost less than a call of its own (~30-50 us; measured, one
thread, torch 2.13)."""

GATHER_CHUNK = 1 << 18
"""The most elements one gathered call steps (bounds the scratch buffer)."""


class Work:
    """One param group's share of a step: its config and the params that have a gradient, with their
    gradients and their checked state (for the torch engine the params' whole state dicts, in
    torch's layout; for optorch's engines the algorithm's keys)."""

    __slots__ = ("config", "params", "grads", "states")

    def __init__(self, config: Config, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]]):
        self.config, self.params, self.grads, self.states = config, params, grads, states


class Engine(Protocol):
    name: str

    def add_group(self, group: dict[str, Any]) -> None:
        """Prepare for a param group added after construction (raise if it cannot be stepped)."""

    def step(self, optimizer: torch.optim.Optimizer, work: Sequence[Work], shared: tuple[dict[str, Tensor], ...],
             mask: Tensor | None = None) -> list[dict[str, Tensor]]:
        """Step every param of ``work`` in place (where ``mask`` holds, if given: only inside
        torch.compile, for engines that can); returns the contributions to the shared state."""


# ------------------------------------------------------------------------------------------------
# choosing


def resolve_engine(engine: str, algorithm: Algorithm, params: Sequence[Tensor], configs: Sequence[Config]) -> str:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "torch" and algorithm.torch_optimizer is None:
        raise ValueError(f"engine 'torch' needs a torch.optim counterpart, and {algorithm.name} has none")
    if engine != "auto":
        return engine
    if torch_kernel_verified(algorithm, params, configs):
        return "torch"
    return "compiled" if compiler_available() else "eager"


def torch_kernel_verified(algorithm: Algorithm, params: Sequence[Tensor], configs: Sequence[Config]) -> bool:
    """Whether torch's fused kernel for ``algorithm`` is on :data:`TORCH_KERNELS` for every param."""
    if algorithm.torch_optimizer is None or not params or _any_dtensor(params):
        return False
    if algorithm.name == "sgd" and any(not _is_zero_number(c.dampening) for c in configs):
        # torch starts SGD's momentum buffer as a copy of the first gradient, marked by the buffer's
        # absence, which a checkpoint of a never-stepped param cannot express: only with zero
        # dampening is a zero buffer the same as none (see TorchEngine.create_state).
        return False
    return all(p.dtype in TORCH_KERNELS.get((algorithm.name, p.device.type), ()) for p in params)


def _is_zero_number(value: Any) -> bool:
    return not isinstance(value, Tensor) and value == 0


def compiler_available() -> bool:
    """Whether ``torch.compile`` can build CPU kernels here (Inductor needs a C++ compiler)."""
    global _COMPILER
    if _COMPILER is None:
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
            _COMPILER = True
        except Exception:  # noqa: BLE001 - any failure to find one means no compiling
            _COMPILER = False
    return _COMPILER


_COMPILER: bool | None = None


def make_engine(name: str, algorithm: Algorithm, param_groups: list[dict[str, Any]], defaults: dict[str, Any], extras: frozenset[str]) -> Engine:
    """The engine ``name`` (resolved already); ``extras`` are the per-parameter state keys that are not
    the algorithm's (a combinator's ``ema``, ``grad_acc``)."""
    if name == "torch":
        return TorchEngine(algorithm, param_groups, defaults, extras)
    return UpdateEngine(algorithm, compiled=name == "compiled")


def _any_dtensor(params: Sequence[Tensor]) -> bool:
    return any(_is_dtensor(p) for p in params)


_is_dtensor = distributed.is_dtensor


# ------------------------------------------------------------------------------------------------
# engine "torch"


EXECUTION_KEYS = ("foreach", "fused", "capturable", "differentiable")


class TorchEngine:
    """torch.optim's own step on the shim's param groups and state.

    An inner torch optimizer supplies the kernel; before each step it is pointed at the shim's
    ``param_groups`` and ``state`` as they are then, so both are always torch's own truth. State
    keys that are not torch's (a combinator's ``ema``, ``grad_acc``) are hidden from it while it steps.
    """

    name = "torch"

    def __init__(self, algorithm: Algorithm, param_groups: list[dict[str, Any]], defaults: dict[str, Any], extras: frozenset[str] = frozenset()):
        self.algorithm = algorithm
        self.extras = extras
        torch_class = algorithm.torch_optimizer
        signature = inspect.signature(torch_class.__init__).parameters
        # A checkpoint carries torch's default execution flags: how this shim runs is not part of the
        # optimizer's state, and a torch.optim optimizer loading it should run as it would anyway.
        self.exported_flags = {key: signature[key].default for key in EXECUTION_KEYS if key in signature}
        params = [p for group in param_groups for p in group["params"]]
        fused = "fused" in signature and self._verified(params)
        self.flags = {"fused": True} if fused else {}
        # The config's values as keyword arguments too: some torch optimizers (Adagrad) read them to
        # fill their state at construction.
        self.inner = _bare(torch_class, defaults, self.flags)
        self._fused_ok: bool | None = None  # the fused kernel verified for every param that stepped last
        self.unhooked_step = torch_class.step.__wrapped__  # the shim's own step already ran the hooks
        for group in param_groups:
            self._complete(group)

    def _complete(self, group: dict[str, Any]) -> None:
        # torch's step reads its execution keys (foreach, capturable, ...) from every group
        for key, value in self.inner.defaults.items():
            group.setdefault(key, value)
        group.update(self.flags)

    def _verified(self, params: Sequence[Tensor]) -> bool:
        # DTensors (FSDP2): torch's fused kernels have no sharding strategy; its default one runs them
        return not _any_dtensor(params) and all(p.dtype in TORCH_KERNELS.get((self.algorithm.name, p.device.type), ()) for p in params)

    def add_group(self, group: dict[str, Any]) -> None:
        if self.flags and not self._verified(group["params"]):
            raise ValueError("these params cannot run torch's fused kernel like the rest; build with engine='eager' or 'compiled'")
        self._complete(group)

    def step(self, optimizer: torch.optim.Optimizer, work: Sequence[Work], shared: tuple = (), mask: None = None,
             fresh: Callable[..., dict[str, Tensor]] | None = None, changed: bool = True) -> list:
        """``changed``: whether a param or its state may have changed since the last step (the
        shim's checks saw new data, or a param steps for the first time): the fused kernel's
        dtype check is then run again."""
        call = FUSED_CALLS.get(self.algorithm.name) if self.flags.get("fused") else None
        if call is not None and (changed or self._fused_ok is None):
            self._fused_ok = all(self._verified(item.params) for item in work)
        rest = []
        for item, group in zip(work, optimizer.param_groups):
            # torch's functional kernel on lists built from what the shim checked (the step of
            # torch's own optimizer would walk every param again to build them)
            done = call is not None and self._fused_ok and call(item.params, item.grads, item.states, group, functools.partial(fresh, config=item.config))
            if item.params and not done:
                rest.append(group)
        if rest:
            self._torch_step(optimizer, rest)
        return []

    def _torch_step(self, optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
        """torch's own ``step`` over ``groups``: its default kernel where the fused one is not
        verified for a param's dtype now (the model was converted after building) or cannot run
        (fused SGD cannot start momentum buffers for some params while others have them)."""
        inner = self.inner
        inner.param_groups = groups
        view = optimizer.state
        if self.extras:  # torch decides "no state yet" by an empty dict: it must not see the combinators' keys
            view = defaultdict(dict)
            for param, state in optimizer.state.items():
                view[param] = {key: value for key, value in state.items() if key not in self.extras}
        inner.state = view
        unfused = [g for g in groups if g.get("fused") and (not self._verified(g["params"]) or self._starts_some_state(g, view))]
        for group in unfused:
            group["fused"] = False
        try:
            self.unhooked_step(inner)
        finally:
            for group in unfused:
                group["fused"] = True
        if self.extras:
            for param, state in view.items():
                optimizer.state[param].update(state)

    @staticmethod
    def _starts_some_state(group: dict[str, Any], state: Any) -> bool:
        started = {bool(state.get(p)) for p in group["params"] if p.grad is not None}
        return len(started) == 2

    def export(self, group: dict[str, Any]) -> None:
        group.update(self.exported_flags)

    def step_dtype_device(self, param: Tensor) -> tuple[torch.dtype, torch.device]:
        """Where torch keeps a param's ``step`` under this engine's flags: float32 on the param's
        device for a fused kernel, else on the CPU in torch's scalar dtype (float64 when that is the
        default dtype)."""
        if self.flags.get("fused"):
            return torch.float32, param.device
        return ops.torch_scalar_dtype(), torch.device("cpu")


def _fused_adam(params: list[Tensor], grads: list[Tensor], states: list[dict], group: dict, fresh) -> bool:
    steps, exp_avgs, exp_avg_sqs, maxima = [], [], [], []
    for param, state in zip(params, states):
        if "step" not in state:
            state.update(fresh(param))
        steps.append(state["step"])
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        if group["amsgrad"]:
            maxima.append(state["max_exp_avg_sq"])
    beta1, beta2 = group["betas"]
    torch_adam(params, grads, exp_avgs, exp_avg_sqs, maxima, steps, fused=True, decoupled_weight_decay=group["decoupled_weight_decay"],
                  amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                  eps=group["eps"], maximize=group["maximize"])
    return True


def _fused_sgd(params: list[Tensor], grads: list[Tensor], states: list[dict], group: dict, fresh) -> bool:
    buffers = [state.get("momentum_buffer") for state in states] if group["momentum"] != 0 else []
    if len({buffer is None for buffer in buffers}) == 2:
        return False  # some buffers start now, others run: only torch's default kernel can (a layer unfrozen later)
    torch_sgd(params, grads, buffers, fused=True, weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
              dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"])
    for state, buffer in zip(states, buffers):
        state["momentum_buffer"] = buffer
    return True


def _fused_adagrad(params: list[Tensor], grads: list[Tensor], states: list[dict], group: dict, fresh) -> bool:
    sums, steps = [], []
    for param, state in zip(params, states):
        if "sum" not in state:
            state.update(fresh(param))
        sums.append(state["sum"])
        steps.append(state["step"])
    torch_adagrad(params, grads, sums, steps, fused=True, lr=group["lr"], weight_decay=group["weight_decay"],
                  lr_decay=group["lr_decay"], eps=group["eps"], maximize=group["maximize"])
    return True


FUSED_CALLS = {"adam": _fused_adam, "adamw": _fused_adam, "sgd": _fused_sgd, "adagrad": _fused_adagrad}
"""torch.optim's functional fused kernels for the algorithms on :data:`TORCH_KERNELS`, called as
torch's own ``step`` calls them; each returns False where it cannot run (then torch's ``step`` runs)."""


def _bare(torch_class: type[torch.optim.Optimizer], defaults: dict[str, Any], flags: dict[str, Any]) -> torch.optim.Optimizer:
    """A torch optimizer used only for its ``step``: built on a placeholder param, then emptied."""
    placeholder = torch.nn.Parameter(torch.zeros(1))
    accepted = inspect.signature(torch_class.__init__).parameters  # (an unpickled defaults has torch's "differentiable")
    inner = torch_class([placeholder], **{k: v for k, v in defaults.items() if k in accepted}, **flags)
    inner.state.clear()
    return inner


# ------------------------------------------------------------------------------------------------
# engines "eager" and "compiled"


def run_update(update: Callable[..., Any], param: Tensor, grad: Tensor, state: dict[str, Tensor], config: Config, *shared: Any,
               mask: Tensor | None = None):
    """One tensor's step in place: the pure ``update``'s results copied into ``param`` and ``state``
    (only where ``mask`` holds, when one is given: a skip decided inside a compiled graph).
    Returns the tensor's contribution to the shared state (None without one)."""
    new_param, new_state, *contribution = apply_update(update, param, grad, state, config, *shared)
    if mask is not None:
        new_param = torch.where(mask.to(param.device), new_param, param)
        new_state = {key: torch.where(mask.to(value.device), value, state[key]) for key, value in new_state.items()}
    _assign_all(param, new_param, state, new_state)
    return contribution[0] if contribution else None


def run_stacked(update: Callable[..., Any], param: Tensor, grad: Tensor, state: dict[str, Tensor], config: Config, *shared: Any):
    """:func:`run_update` over same-shaped tensors stacked along dimension 0 (their per-tensor scalars
    stacked too), each reducing over its own slice: one call steps them all. Returns the sum of their
    contributions to the shared state (None without one)."""

    def one(param: Tensor, grad: Tensor, state: dict[str, Tensor]):
        return apply_update(update, param, grad, state, config, *shared)

    new_param, new_state, *contribution = torch.vmap(one)(param, grad, state)
    _assign_all(param, new_param, state, new_state)
    return {key: value.sum(0) for key, value in contribution[0].items()} if contribution else None


def _assign_all(param: Tensor, new_param: Tensor, state: dict[str, Tensor], new_state: dict[str, Tensor]) -> None:
    ops.assign(param, new_param)
    for key, value in new_state.items():
        ops.assign(state[key], value)


class UpdateEngine:
    """The algorithm's pure ``update`` run in place (see the module docs); ``compiled`` selects the
    compiled kernels, with the eager path as their fallback where compiling is impossible.

    Compiled, a group's params step in as few calls as their layout allows (a call costs ~30 us; a
    copy in and out of scratch space ~1.5 ns per element of Adam's param, grad and state: measured,
    one thread):

    * params that lie back to back in one buffer (an explicit contiguous layout, see
      :func:`optorch.contiguous`) step as one tensor, without a copy: element-wise algorithms on the
      flat memory, others on a stack of same-shaped params (each reducing over its own slice);
    * other params below :data:`GATHER_BELOW` elements are copied into scratch space this engine
      owns, stepped as one and copied back;
    * the rest step one call each.

    Grads and per-element state take the same path as their params: a view where they too lie back to
    back, else a copy. The params' state is this engine's to place: a batch's per-element state is
    moved into one buffer of its own before it first steps (so no step copies it); params and grads
    are never moved. Which params step together is planned
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

    def step(self, optimizer: torch.optim.Optimizer, work: Sequence[Work], shared: tuple[dict[str, Tensor], ...],
             mask: Tensor | None = None) -> list[dict[str, Tensor]]:
        contributions: list[dict[str, Tensor]] = []
        traced = torch.compiler.is_compiling()  # inside the user's torch.compile: plain per-tensor code
        for index, item in enumerate(work):
            if self.algorithm.is_elementwise(item.config):  # each rank steps its shards: the same numbers, no communication
                item = Work(item.config, *distributed.local_shards(item.params, item.grads, item.states))
            if traced or not self.compiled:
                for param, grad, state in zip(item.params, item.grads, item.states):
                    contributions.append(run_update(self.algorithm.update, param, grad, state, item.config, *shared, mask=mask))
            else:
                contributions += self._compiled_step(optimizer, index, item, shared)
        return [c for c in contributions if c is not None]

    # -- compiled ------------------------------------------------------------------------------

    def _compiled_step(self, optimizer: torch.optim.Optimizer, index: int, item: Work, shared: tuple) -> list:
        elementwise = self.algorithm.is_elementwise(item.config)
        # what a plan depends on; the memory of each batch is checked again at every step anyway
        key = (elementwise, tuple(map(id, item.states)), tuple((p.data_ptr(), p.shape) for p in item.params))
        cached = self._plans.get(index)
        plan = cached[1] if cached is not None and cached[0] == key else None
        if plan is not None and not all(batch.scalars_equal(item) for batch in plan[0]):
            plan = None  # a per-tensor scalar was written in place: plan again
        if plan is None:
            plan = _plan(item, elementwise, self._scratch)
            self._plans[index] = (key, plan)
        batches, alone, eager = plan
        contributions = [run_update(self.algorithm.update, item.params[i], item.grads[i], item.states[i], item.config, *shared) for i in eager]
        contributions += [self._single(index, item, i, shared, elementwise) for i in alone]
        contributions += [self._batch(optimizer, index, item, batch, shared) for batch in batches]
        return contributions

    def _single(self, index: int, item: Work, i: int, shared: tuple, elementwise: bool):
        param, grad, state = item.params[i], item.grads[i], item.states[i]
        if elementwise and _all_contiguous(param, grad, state):  # one 1-D graph serves every shape
            param, grad, state = param.view(-1), grad.view(-1), {key: v if v.dim() == 0 else v.view(-1) for key, v in state.items()}
        return self._call(run_update, index, param, grad, state, item.config, shared)

    def _batch(self, optimizer: torch.optim.Optimizer, index: int, item: Work, batch: "_Batch", shared: tuple):
        """Step the params of ``batch`` as one tensor (see :class:`_Batch`)."""
        params = [item.params[i] for i in batch.members]
        states = [item.states[i] for i in batch.members]
        for key, value in states[0].items():
            # The state is the optimizer's own memory: laid out as the batch steps it before the
            # first call, so no step copies it, and the kernel sees one layout from its first compile
            # (a layout changed after it would recompile: Dynamo guards on the sizes of views' bases).
            if value.dim() > 0 and value.numel() > 0 and _back_to_back([s[key] for s in states]) is None:
                _lay_out_state(optimizer, params, states, key, batch.flat)
        param = batch.join(params, "param")
        grad = batch.join([item.grads[i] for i in batch.members], "grad")
        state = {key: batch.join([s[key] for s in states], key) for key in states[0]}
        contribution = self._call(batch.kernel, index, param, grad, state, item.config, shared)
        batch.write_back(params, "param", param)
        for key, value in state.items():
            batch.write_back([s[key] for s in states], key, value)
        return contribution

    def _call(self, kernel: Callable[..., Any], index: int, param: Tensor, grad: Tensor, state: dict[str, Tensor], config: Config, shared: tuple):
        if not self.compiled:  # compiling failed earlier in this step
            return kernel(self.algorithm.update, param, grad, state, config, *shared)
        # A kernel per dtype and rank, each with Dynamo's recompile budget of its own: sizes are
        # symbolic, but a size-1 dimension or a zero hyperparameter specialises a graph. Stacks get
        # one per shape, with only the number of tensors symbolic: torch 2.13's vmap cannot trace
        # scalars computed from symbolic sizes (DAG's 1 / sqrt(numel), Adafactor's RMS).
        stacked = kernel is run_stacked
        key = (kernel.__name__, param.dtype, tuple(param.shape[1:]) if stacked else param.dim())
        compiled = self._kernels.get(key)
        if compiled is None:
            compiled = self._kernels[key] = _private_compile(kernel, dynamic=not stacked)
        if stacked:
            for tensor in (param, grad, *state.values()):
                torch._dynamo.mark_dynamic(tensor, 0)
        try:
            return compiled(self.algorithm.update, param, grad, state, self._tensor_config(index, config, param), *shared)
        except Exception as error:  # noqa: BLE001 - no compiler, or an op Inductor cannot build
            if not _is_compile_failure(error):
                raise
            warnings.warn(f"optorch: torch.compile failed ({type(error).__name__}: {error}); "
                          f"{self.algorithm.name} runs eagerly from now on", RuntimeWarning, stacklevel=5)
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


class _Batch:
    """Params of one kind that step in one call: ``flat`` (an element-wise algorithm, their per-tensor
    scalars equal, all of them one 1-D tensor) or stacked (same-shaped params, a new first dimension).

    Each of their buffers (params, grads, each state key) joins as a view of the memory the tensors
    occupy when they lie back to back in one storage (checked at every step, never assumed), else as
    a copy into scratch space kept with the batch (``views``: slices of it, one per tensor), copied
    back after the step."""

    def __init__(self, members: list[int], flat: bool, scalar_keys: tuple[str, ...], scratch: dict[tuple, Tensor]):
        self.members, self.flat, self.scalar_keys = members, flat, scalar_keys
        self.kernel = run_update if flat else run_stacked
        self.views: dict[str, list[Tensor] | None] = {}
        self._scratch = scratch  # the engine's, shared by its batches (one after the other, so it stays in cache)
        self._slices: dict[str, tuple[Tensor, Tensor, list[Tensor]]] = {}  # by slot: (scratch, joined, views)

    def scalars_equal(self, item: Work) -> bool:
        """Whether the flat batch's per-tensor scalars are still equal (one host read per key)."""
        for key in self.scalar_keys:
            values = torch.stack([item.states[i][key] for i in self.members])
            if not bool((values == values[0]).all()):
                return False
        return True

    def join(self, tensors: list[Tensor], slot: str) -> Tensor:
        if tensors[0].dim() == 0 and self.flat:  # a per-tensor scalar, equal in the batch
            self.views[slot] = [tensors[0]]
            return tensors[0].clone()
        view = _back_to_back(tensors)
        if view is not None:
            self.views[slot] = None
            return view if self.flat else view.view(len(tensors), *tensors[0].shape)
        key = (slot, tensors[0].device, tensors[0].dtype)
        cached = self._slices.get(slot)
        if cached is None or cached[0] is not self._scratch.get(key):
            size = sum(t.numel() for t in tensors)
            scratch = self._scratch.get(key)
            if scratch is None or scratch.numel() < size:
                scratch = self._scratch[key] = torch.empty(max(size, GATHER_CHUNK), dtype=tensors[0].dtype, device=tensors[0].device)
            if self.flat:
                joined = scratch[:size]
                views = list(torch._C._nn.unflatten_dense_tensors(joined, tensors))
            else:
                joined = scratch[:size].view(len(tensors), *tensors[0].shape)
                views = list(joined.unbind())
            cached = self._slices[slot] = (scratch, joined, views)
        _, joined, views = cached
        torch._foreach_copy_(views, tensors)
        self.views[slot] = views
        return joined

    def write_back(self, tensors: list[Tensor], slot: str, joined: Tensor) -> bool:
        """Copy the results into ``tensors`` where ``joined`` was a copy; whether it was."""
        views = self.views[slot]
        if views is None:
            return False
        torch._foreach_copy_(tensors, [joined] * len(tensors) if joined.dim() == 0 else views)
        return True


def _lay_out_state(optimizer: torch.optim.Optimizer, params: list[Tensor], states: list[dict[str, Tensor]], key: str, flat: bool) -> None:
    """Give state ``key`` of these params one buffer of its own (values kept), as views in
    ``optimizer.state``: flat, or a stack of same-shaped tensors."""
    tensors = [s[key] for s in states]
    if flat:
        chunks = torch._C._nn.unflatten_dense_tensors(torch.cat([t.reshape(-1) for t in tensors]), tensors)
    else:
        chunks = torch.stack(tensors).unbind()
    for param, state, chunk in zip(params, states, chunks):
        state[key] = chunk
        optimizer.state[param][key] = chunk


def _as_tensors(value: Any, name: Any, tensors: dict[Any, Tensor], device: torch.device, dtype: torch.dtype) -> Any:
    # Integers select code paths and cadences (DAG's sat_every, AutoSGM's window kind): they stay
    # Python values, as do flags and nested settings.
    if isinstance(value, tuple):
        parts = tuple(_as_tensors(v, (name, i), tensors, device, dtype) for i, v in enumerate(value))
        return parts if all(isinstance(p, Tensor) for p in parts) else value
    if isinstance(value, bool) or not isinstance(value, (float, Tensor)) or _is_zero_number(value):
        return value
    tensor = tensors.get(name)
    if tensor is None:
        tensor = tensors[name] = torch.zeros((), dtype=dtype, device=device)
    tensor.fill_(value)
    return tensor


def _private_compile(function: Callable[..., Any], dynamic: bool = True) -> Callable[..., Any]:
    # Dynamo keeps its compile cache (and its recompile limit) per code object: a private copy of the
    # code gives each engine graphs of its own, however many optimizers a process has.
    code = function.__code__.replace()
    copy = types.FunctionType(code, function.__globals__, function.__name__, function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    return torch.compile(copy, fullgraph=True, dynamic=dynamic)


def _is_compile_failure(error: Exception) -> bool:
    module = type(error).__module__
    return module.startswith(("torch._dynamo", "torch._inductor")) or "compile" in str(error).lower()


def _hyper_dtype(like: Tensor) -> torch.dtype:
    # The param's own precision, as torch.optim's kernels round a Python-number hyperparameter; but
    # never below float32 (a bfloat16 lr keeps three digits).
    dtype = like.real.dtype if like.is_complex() else like.dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _batchable(param: Tensor, grad: Tensor) -> bool:
    return not param.is_complex() and param.layout == torch.strided and grad.layout == torch.strided and param.dim() > 0


def _all_contiguous(param: Tensor, grad: Tensor, state: dict[str, Tensor]) -> bool:
    return param.is_contiguous() and grad.is_contiguous() and all(v.dim() == 0 or (v.is_contiguous() and v.shape == param.shape) for v in state.values())


def _plan(item: Work, elementwise: bool, scratch: dict[tuple, Tensor]) -> tuple[list[_Batch], list[int], list[int]]:
    """Which params of ``item`` step together: ``(batches, alone, eager)``.

    A batch holds params of one kind (device, dtype, state layout; and shape unless element-wise):
    params that lie back to back in one storage, or small ones (to be copied), at most
    :data:`GATHER_CHUNK` elements of them. Element-wise batches also hold equal per-tensor scalars
    (``step``; one host read per key and kind): they step as one flat tensor. DTensors step eagerly."""
    by_kind: dict[tuple, list[int]] = {}
    alone, eager = [], []
    for i, (param, grad) in enumerate(zip(item.params, item.grads)):
        state = item.states[i]
        if _is_dtensor(param):  # sharded: DTensor's own ops (whole-parameter reductions)
            eager.append(i)
        elif not _batchable(param, grad) or (elementwise and any(v.dim() > 0 and v.shape != param.shape for v in state.values())):
            alone.append(i)
        else:
            layout = tuple((key, value.dtype, value.device, value.dim() > 0) for key, value in state.items())
            by_kind.setdefault((param.device, param.dtype, layout, None if elementwise else param.shape), []).append(i)
    batches = []
    for members in by_kind.values():
        scalar_keys = tuple(key for key, value in item.states[members[0]].items() if value.dim() == 0) if elementwise else ()
        for group in _equal_scalars(item, members, scalar_keys):
            small = []
            for run in _runs_in_memory(item.params, group):
                if len(run) > 1:
                    batches.append(_Batch(run, elementwise, scalar_keys, scratch))
                else:
                    (small if item.params[run[0]].numel() < GATHER_BELOW else alone).append(run[0])
            for chunk in _chunks(item.params, small):
                if len(chunk) > 1:
                    batches.append(_Batch(chunk, elementwise, scalar_keys, scratch))
                else:
                    alone += chunk
    return batches, alone, eager


def _equal_scalars(item: Work, members: list[int], keys: tuple[str, ...]) -> list[list[int]]:
    if not keys or len(members) == 1:
        return [members]
    values = [torch.stack([item.states[i][k] for i in members]).tolist() for k in keys]
    by_value: dict[tuple, list[int]] = {}
    for position, i in enumerate(members):
        by_value.setdefault(tuple(v[position] for v in values), []).append(i)
    return list(by_value.values())


def _runs_in_memory(params: list[Tensor], members: list[int]) -> list[list[int]]:
    """``members`` split into runs of params that lie back to back in one storage, in address order."""
    order = sorted(members, key=lambda i: params[i].data_ptr())
    runs = [[order[0]]]
    for previous, i in zip(order, order[1:]):
        if _back_to_back([params[previous], params[i]]) is not None:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _back_to_back(tensors: list[Tensor]) -> Tensor | None:
    """One flat view of the memory ``tensors`` occupy when they lie back to back in one storage, in
    order and contiguous (a layout checked wherever it is used, never assumed); else None."""
    first = tensors[0]
    end = first.data_ptr()
    for tensor in tensors:
        if tensor.data_ptr() != end or not tensor.is_contiguous():
            return None
        end += tensor.nbytes
    storage = first.untyped_storage()
    if end > storage.data_ptr() + storage.nbytes():  # adjacent allocations, not one storage
        return None
    return first.as_strided(((end - first.data_ptr()) // first.element_size(),), (1,))


def _chunks(params: list[Tensor], indices: list[int]) -> list[list[int]]:
    chunks, chunk, size = [], [], 0
    for i in indices:
        if chunk and size + params[i].numel() > GATHER_CHUNK:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(i)
        size += params[i].numel()
    return chunks + [chunk] if chunk else chunks
