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
  never recompiles); small params of an element-wise algorithm are gathered into a scratch buffer the
  optimizer owns, stepped as one, and written back, so many small tensors cost one call.
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

from ..core import distributed, ops
from ..core.algorithm import Algorithm, apply_update
from ..core.config import Config

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
"""Element-wise algorithms, compiled: params with fewer elements than this are gathered into one
scratch buffer per step (a compiled call costs ~30 us, a gather ~3 bytes moved per byte stepped)."""

GATHER_CHUNK = 1 << 22
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
    ops.assign(param, new_param)
    for key, value in new_state.items():
        ops.assign(state[key], value)
    return contribution[0] if contribution else None


class UpdateEngine:
    """The algorithm's pure ``update`` run in place (see the module docs); ``compiled`` selects the
    compiled kernel, with the eager path as its fallback where compiling is impossible."""

    def __init__(self, algorithm: Algorithm, *, compiled: bool):
        self.algorithm = algorithm
        self.compiled = compiled
        self.name = "compiled" if compiled else "eager"
        self._kernels: dict[tuple, Callable[..., Any]] = {}  # by (dtype, rank): see _call
        self._hyper: dict[tuple, Tensor] = {}  # hyperparameters as 0-dim tensors, refilled each step

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_kernels": {}}  # compiled code is rebuilt on first use

    def add_group(self, group: dict[str, Any]) -> None:
        pass

    def step(self, optimizer: torch.optim.Optimizer, work: Sequence[Work], shared: tuple[dict[str, Tensor], ...],
             mask: Tensor | None = None) -> list[dict[str, Tensor]]:
        contributions: list[dict[str, Tensor]] = []
        traced = torch.compiler.is_compiling()  # inside the user's torch.compile: plain per-tensor code
        for item in work:
            if self.algorithm.elementwise:  # each rank steps its shards: the same numbers, no communication
                item = Work(item.config, *distributed.local_shards(item.params, item.grads, item.states))
            if traced or not self.compiled:
                for param, grad, state in zip(item.params, item.grads, item.states):
                    contribution = run_update(self.algorithm.update, param, grad, state, item.config, *shared, mask=mask)
                    if contribution is not None:
                        contributions.append(contribution)
                continue
            contributions += self._compiled_step(item, shared)
        return contributions

    # -- compiled ------------------------------------------------------------------------------

    def _compiled_step(self, item: Work, shared: tuple[dict[str, Tensor], ...]) -> list[dict[str, Tensor]]:
        gathered, single = [], []
        for index, (param, grad) in enumerate(zip(item.params, item.grads)):
            if self.algorithm.elementwise and param.numel() < GATHER_BELOW and _gatherable(param, grad):
                gathered.append(index)
            else:
                single.append(index)
        contributions = []
        for index in single:
            param, grad, state = item.params[index], item.grads[index], item.states[index]
            if _is_dtensor(param):  # sharded: DTensor's own ops (whole-parameter reductions), eagerly
                contribution = run_update(self.algorithm.update, param, grad, state, item.config, *shared)
            else:
                contribution = self._call(*self._flat_if_elementwise(param, grad, state), item.config, shared)
            if contribution is not None:
                contributions.append(contribution)
        for indices in _runs(item, gathered):
            self._gathered_call([item.params[i] for i in indices], [item.grads[i] for i in indices],
                                [item.states[i] for i in indices], item.config, shared)
        return contributions

    def _flat_if_elementwise(self, param: Tensor, grad: Tensor, state: dict[str, Tensor]):
        # An element-wise update does not care about shapes: one 1-D graph serves every param.
        if not self.algorithm.elementwise or param.is_complex() or not _all_contiguous(param, grad, state):
            return param, grad, state
        return param.view(-1), grad.view(-1), {key: value if value.dim() == 0 else value.view(-1) for key, value in state.items()}

    def _gathered_call(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]], config: Config, shared: tuple) -> None:
        """Step several small params as one: gather param, grad and per-element state into flat
        buffers, step them, and write the results back. Their per-tensor scalars (``step``) are equal."""
        keys = list(states[0])
        scalars = [key for key in keys if states[0][key].dim() == 0]
        flat = {key: torch.cat([s[key].reshape(-1) for s in states]) for key in keys if key not in scalars}
        flat.update({key: states[0][key].clone() for key in scalars})
        param = torch.cat([p.reshape(-1) for p in params])
        grad = torch.cat([g.reshape(-1) for g in grads])
        self._call(param, grad, flat, config, shared)
        sizes = [p.numel() for p in params]
        torch._foreach_copy_(params, [chunk.view_as(p) for chunk, p in zip(param.split(sizes), params)])
        for key in keys:
            targets = [s[key] for s in states]
            if key in scalars:
                torch._foreach_copy_(targets, [flat[key]] * len(targets))
            else:
                torch._foreach_copy_(targets, [chunk.view_as(t) for chunk, t in zip(flat[key].split(sizes), targets)])

    def _call(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], config: Config, shared: tuple):
        # A kernel per dtype and rank, each with Dynamo's recompile budget of its own: sizes are
        # symbolic, but a size-1 dimension or a zero hyperparameter specialises a graph.
        key = (param.dtype, param.dim())
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = self._kernels[key] = _private_compile(run_update)
        tensor_config = self._tensor_config(config, param)
        try:
            return kernel(self.algorithm.update, param, grad, state, tensor_config, *shared)
        except Exception as error:  # noqa: BLE001 - no compiler, or an op Inductor cannot build
            if not self.compiled or not _is_compile_failure(error):
                raise
            warnings.warn(f"optorch: torch.compile failed ({type(error).__name__}: {error}); "
                          f"{self.algorithm.name} runs eagerly from now on", RuntimeWarning, stacklevel=5)
            self.compiled, self.name = False, "eager"
            return run_update(self.algorithm.update, param, grad, state, config, *shared)

    def _tensor_config(self, config: Config, like: Tensor) -> Config:
        """``config`` with its non-zero real numbers as 0-dim tensors refilled in place, so a compiled
        step sees a new value as data, never as a new constant. Zeros stay numbers: they drop terms
        exactly as torch.optim's kernels do (a change to or from zero recompiles once)."""
        dtype = _hyper_dtype(like)
        values = {}
        for name, value in config.hyperparameters().items():
            converted = self._as_tensors(value, (name, like.device, dtype), like.device, dtype)
            if converted is not value:
                values[name] = converted
        return config.with_tensors(**values) if values else config

    def _as_tensors(self, value: Any, key: tuple, device: torch.device, dtype: torch.dtype) -> Any:
        # Integers select code paths and cadences (DAG's sat_every, AutoSGM's window kind): they stay
        # Python values, as do flags and nested settings.
        if isinstance(value, tuple):
            parts = tuple(self._as_tensors(v, (*key, i), device, dtype) for i, v in enumerate(value))
            return parts if all(isinstance(p, Tensor) for p in parts) else value
        if isinstance(value, bool) or not isinstance(value, (float, Tensor)) or _is_zero_number(value):
            return value
        tensor = self._hyper.get(key)
        if tensor is None:
            tensor = self._hyper[key] = torch.zeros((), dtype=dtype, device=device)
        tensor.fill_(value)
        return tensor


def _private_compile(function: Callable[..., Any]) -> Callable[..., Any]:
    # Dynamo keeps its compile cache (and its recompile limit) per code object: a private copy of the
    # code gives each engine graphs of its own, however many optimizers a process has.
    code = function.__code__.replace()
    copy = types.FunctionType(code, function.__globals__, function.__name__, function.__defaults__)
    copy.__kwdefaults__ = function.__kwdefaults__
    return torch.compile(copy, fullgraph=True, dynamic=True)


def _is_compile_failure(error: Exception) -> bool:
    module = type(error).__module__
    return module.startswith(("torch._dynamo", "torch._inductor")) or "compile" in str(error).lower()


def _hyper_dtype(like: Tensor) -> torch.dtype:
    # The param's own precision, as torch.optim's kernels round a Python-number hyperparameter; but
    # never below float32 (a bfloat16 lr keeps three digits).
    dtype = like.real.dtype if like.is_complex() else like.dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _gatherable(param: Tensor, grad: Tensor) -> bool:
    return not param.is_complex() and not _is_dtensor(param) and param.layout == torch.strided and grad.layout == torch.strided


def _all_contiguous(param: Tensor, grad: Tensor, state: dict[str, Tensor]) -> bool:
    return param.is_contiguous() and grad.is_contiguous() and all(v.dim() == 0 or (v.is_contiguous() and v.shape == param.shape) for v in state.values())


def _runs(item: Work, indices: list[int]) -> list[list[int]]:
    """``indices`` split into sets that can step as one: same device and dtype, same state dtypes and
    equal per-tensor scalars (one host read per key and set), at most :data:`GATHER_CHUNK` elements."""
    by_kind: dict[tuple, list[int]] = {}
    for i in indices:
        param, state = item.params[i], item.states[i]
        kind = (param.device, param.dtype, tuple((k, v.dtype, v.device, v.dim() == 0) for k, v in state.items()))
        by_kind.setdefault(kind, []).append(i)
    runs = []
    for members in by_kind.values():
        scalar_keys = [k for k, v in item.states[members[0]].items() if v.dim() == 0]
        values = [torch.stack([item.states[i][k] for i in members]).tolist() for k in scalar_keys]
        by_value: dict[tuple, list[int]] = {}
        for position, i in enumerate(members):
            by_value.setdefault(tuple(v[position] for v in values), []).append(i)
        for same in by_value.values():
            run, size = [], 0
            for i in same:
                if run and size + item.params[i].numel() > GATHER_CHUNK:
                    runs.append(run)
                    run, size = [], 0
                run.append(i)
                size += item.params[i].numel()
            runs.append(run)
    return runs
