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

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..core import distributed
from ..core.algorithm import Algorithm
from ..core.compat import cpp_compiler_available
from ..core.config import Config
from ..core.scalars import is_zero
from ..core.stepping import BLOCK, JOIN_BELOW
from .protocol import Engine, Work
from .torch_engine import TORCH_KERNELS, TorchEngine
from .update_engine import UpdateEngine

__all__ = [
    "ENGINES",
    "BLOCK",
    "JOIN_BELOW",
    "TORCH_KERNELS",
    "Engine",
    "TorchEngine",
    "UpdateEngine",
    "Work",
    "compiler_available",
    "make_engine",
    "resolve_engine",
    "torch_kernel_verified",
]

ENGINES = ("auto", "torch", "compiled", "eager")


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
    if algorithm.torch_optimizer is None or not params or any(map(distributed.is_dtensor, params)):
        return False
    if algorithm.name == "sgd" and any(not is_zero(c.dampening) for c in configs):
        # torch starts SGD's momentum buffer as a copy of the first gradient, marked by the buffer's
        # absence, which a checkpoint of a never-stepped param cannot express: only with zero
        # dampening is a zero buffer the same as none (see TorchEngine.create_state).
        return False
    return all(p.dtype in TORCH_KERNELS.get((algorithm.name, p.device.type), ()) for p in params)


def compiler_available() -> bool:
    """Whether ``torch.compile`` can build CPU kernels here (Inductor needs a C++ compiler)."""
    global _COMPILER
    if _COMPILER is None:
        _COMPILER = cpp_compiler_available()
    return _COMPILER


_COMPILER: bool | None = None


def make_engine(
    name: str,
    algorithm: Algorithm,
    param_groups: list[dict[str, Any]],
    defaults: dict[str, Any],
    extras: frozenset[str],
) -> Engine:
    """The engine ``name`` (resolved already); ``extras`` are the per-parameter state keys that are not
    the algorithm's (a combinator's ``ema``, ``grad_acc``)."""
    if name == "torch":
        return TorchEngine(algorithm, param_groups, defaults, extras)
    return UpdateEngine(algorithm, compiled=name == "compiled")
