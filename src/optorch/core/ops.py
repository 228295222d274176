"""Out-of-place arithmetic whose scalar may be a number or a 0-dim tensor.

With a number, each helper is one fused torch kernel (what torch.optim uses); with a tensor (a
compiled step, ``torch.func``), it is the same formula in plain ops, evaluated in the order torch's CPU
kernels use. The two agree to within an ulp per operation (torch's kernels may use a fused
multiply-add), which keeps float64 trajectories ~1e-15 apart over hundreds of steps. Inductor fuses
the plain ops anyway.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .compat import is_functorch_wrapped, pytree
from .distributed import finite_everywhere, full, is_dtensor


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Number)


def add(a: Tensor, b: Tensor, alpha: Any = 1.0) -> Tensor:
    """a + alpha * b"""
    return torch.add(a, b, alpha=alpha) if _is_number(alpha) else a + alpha * b


def lerp(a: Tensor, b: Tensor, weight: Any) -> Tensor:
    """a + weight * (b - a)"""
    return torch.lerp(a, b, weight if _is_number(weight) else weight.to(a.dtype))


def addcmul(a: Tensor, b: Tensor, c: Tensor, value: Any = 1.0) -> Tensor:
    """a + value * b * c"""
    return torch.addcmul(a, b, c, value=value) if _is_number(value) else a + value * b * c


def addcdiv(a: Tensor, b: Tensor, c: Tensor, value: Any = 1.0) -> Tensor:
    """a + value * b / c"""
    return torch.addcdiv(a, b, c, value=value) if _is_number(value) else a + value * b / c


def tanh(x: Tensor) -> Tensor:
    """tanh, odd to the bit like ``torch.tanh`` (maximize is the negated objective exactly), at a
    fraction of its cost: measured on x86 CPUs with AVX-512 (torch 2.13, one thread), ``torch.tanh``
    costs 4-5 ns per element, eagerly and in Inductor's code, ten times a sigmoid, and DAG's whole
    step is a tanh.

    Eagerly, and compiled in float64: ``sign(x) (2 sigmoid(2|x|) - 1)``, within 1.5 float32 eps of
    the exact value (absolute). Compiled below float64: a rational function, within 3.4 eps of it
    relative to the value (so more accurate than the sigmoid's near 0): one division and no exp, a
    loop over 4M elements 0.85 ms faster (one thread; eagerly its ops would be 20 kernels).
    """
    if torch.compiler.is_compiling() and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return _rational_tanh(x)
    return torch.copysign(2 * torch.sigmoid(2 * x.abs()) - 1, x)


def _rational_tanh(x: Tensor) -> Tensor:
    # tanh(x) ~ x P(x^2) / Q(x^2), the [13/6] minimax rational approximation for float32 that Eigen's
    # fast tanh uses (Eigen 3.4, ``generic_fast_tanh_float``); beyond the clamp, float32's tanh is
    # within its error of 1. The coefficients are literals: Dynamo makes module-level floats inputs,
    # which the loop would then load for every vector.
    x = x.clamp(-7.90531110763549805, 7.90531110763549805)
    square = x * x
    numerator = _horner(
        square,
        (
            4.89352455891786e-03,
            6.37261928875436e-04,
            1.48572235717979e-05,
            5.12229709037114e-08,
            -8.60467152213735e-11,
            2.00018790482477e-13,
            -2.76076847742355e-16,
        ),
    )
    denominator = _horner(
        square, (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
    )
    return x * (numerator / denominator)  # x last: x P(0) would leave float32's normal range first


def _horner(x: Tensor, coefficients: tuple[float, ...]) -> Any:
    """The polynomial with ``coefficients`` (of x^0, x^1, ...) at ``x``."""
    result = coefficients[-1]
    for coefficient in reversed(coefficients[:-1]):
        result = result * x + coefficient
    return result


def weight_decay(param: Tensor, grad: Tensor, weight_decay: Any, decoupled_rate: Any = None) -> tuple[Tensor, Tensor]:
    """Weight decay as torch.optim applies it, returning ``(param, grad)``: decoupled,
    ``param * (1 - decoupled_rate)`` (AdamW's rate is ``lr * weight_decay``), when a rate is given;
    else coupled (L2), ``grad + weight_decay * param``. Nothing when ``weight_decay`` is the number 0."""
    if _is_number(weight_decay) and weight_decay == 0:
        return param, grad
    if decoupled_rate is not None:
        return param * (1 - decoupled_rate), grad
    return param, add(grad, param, weight_decay)


def norm(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The 2-norm of the whole tensor, 0-dim; of a sharded DTensor, over every shard and read whole
    on every rank (one all-reduce), so later scalar math is plain."""
    if torch.compiler.is_compiling() and not is_dtensor(x) and x.is_floating_point():
        # accumulate as sum_dtype says (Inductor's float32 sum is a slow cascade), then round once
        return torch.linalg.vector_norm(x, dtype=sum_dtype(x)).to(dtype or x.dtype)
    return full(torch.linalg.vector_norm(x, dtype=dtype))


def step_count(step: Tensor, like: Tensor) -> float | Tensor:
    """A step counter, ready for per-step scalar math (bias corrections, decayed learning rates).

    Where reading it is free (a plain CPU tensor, outside ``torch.compile`` and ``torch.func``
    transforms) it is a Python number, as torch.optim's for-loop kernels read it: the scalar math is
    then host arithmetic in double precision and the element-wise ops take it as a number, one fused
    kernel each. Elsewhere it stays a tensor (float64 where the device has it), so nothing syncs and
    nothing is baked into a graph. A DTensor (a norm of a sharded param) is read whole first.
    """
    if is_dtensor(step):
        step = full(step)
    if step.device.type == "cpu" and not torch.compiler.is_compiling() and not _is_transformed(step):
        return step.item()
    return step.to(scalar_dtype(like))


def _is_transformed(tensor: Tensor) -> bool:
    return is_functorch_wrapped(tensor) or tensor.requires_grad


def like(value: Any, reference: Tensor) -> Any:
    """``value`` in ``reference``'s dtype if it is a tensor (a number is left to the kernel, which
    rounds it to the op's precision as torch.optim's kernels do)."""
    if isinstance(value, Tensor) and value.dtype != reference.dtype:
        return value.to(reference.dtype)
    return value


def once(*scalars: Any) -> tuple[Any, ...]:
    """Per-step scalars (bias corrections, decayed learning rates), computed once per step.

    Inductor inlines 0-dim math into the element-wise loop that consumes it, so a compiled Adam
    would evaluate two float64 ``pow`` per vector of 16 elements (half the speed of torch's fused
    kernel); stacking the scalars into one small buffer makes it compute them once. Eagerly this is
    a no-op. The scalars must share dtype and device.
    """
    if not torch.compiler.is_compiling() or not all(isinstance(x, Tensor) for x in scalars):
        return scalars
    if len(scalars) == 1:  # Inductor folds a one-element stack back into the loop: give it a pair
        return torch.stack((scalars[0], scalars[0])).unbind()[:1]
    return tuple(torch.stack(scalars).unbind())


def scalar_dtype(param: Tensor) -> torch.dtype:
    """dtype for per-step scalars such as bias corrections: float64 like torch.optim's host math,
    except where the device has no float64."""
    return torch.float32 if param.device.type == "mps" else torch.float64


def sum_dtype(x: Tensor, fused: bool = False) -> torch.dtype:
    """The dtype a reduction over ``x`` accumulates in: eagerly ``x``'s own, at least float32 (ATen's
    float32 sums are pairwise and accurate, and a wider dtype would copy ``x``); inside torch.compile
    float64 where the device has it (more accurate, and in Inductor's CPU code 2.7x faster than a
    float32 sum, which runs a cascade of partial sums: measured, one thread).

    ``fused``: the sum shares its loop with element-wise work (DAG's statistics of its update), so
    its cost is compute, not memory. There the eager rule holds compiled too: Inductor's CPU code in
    torch 2.13 has no vectorised float32-to-float64 conversion for AVX-512 and converts element by
    element (DAG's step at one 4M float32 tensor: 6.2-6.6 ms with float64 statistics, 5.1-5.4 ms
    with an integer count and a float32 sum)."""
    if torch.compiler.is_compiling() and x.device.type != "mps" and not fused:
        return torch.float64
    return torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32


def torch_scalar_dtype() -> torch.dtype:
    """The dtype torch.optim keeps its per-parameter scalars in (``step``, NAdam's ``mu_product``,
    ASGD's ``eta`` and ``mu``): float64 when that is the default dtype, else float32
    (torch's ``_get_scalar_dtype``, read when the state is created)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def new_step(param: Tensor) -> Tensor:
    """A fresh per-parameter step counter, in the dtype torch.optim keeps it in (:func:`torch_scalar_dtype`)."""
    return torch.zeros((), dtype=torch_scalar_dtype(), device=param.device)


def all_finite(grads: Sequence[Tensor]) -> Tensor:
    """A 0-dim bool tensor on the first grad's device: no NaN and no inf in any of ``grads`` (no sync).

    Eagerly, one multi-tensor pass (max |g| is inf or NaN exactly when some element is: NaN
    propagates through the max). Compiled (Inductor fuses the checks anyway) and under ``torch.func``
    transforms (no batching rule for the multi-tensor kernel), one ``isfinite`` per tensor. DTensor
    gradients (FSDP2) are checked whole, so every rank decides alike."""
    if not grads:
        return torch.ones((), dtype=torch.bool)
    if any(is_dtensor(g) for g in grads):
        return finite_everywhere(grads)
    device = grads[0].device
    if torch.compiler.is_compiling() or any(_is_transformed(g) for g in grads):
        return torch.stack([torch.isfinite(g).all().to(device) for g in grads]).all()
    peaks = torch._foreach_norm(list(grads), float("inf"))
    # isfinite in each grad's own dtype: a float64 peak of 1e308 is finite, but inf in float32
    return torch.stack([torch.isfinite(p).to(device) for p in peaks]).all()


def assign(target: Tensor, value: Any) -> None:
    """``target.copy_(value)`` (or ``fill_`` for a number), a 0-dim target through a 1-element view:
    torch 2.13's Inductor turns a 0-dim float64 CPU input into a scalar and silently drops in-place
    writes to it, in a compiled kernel as in a compiled ``optimizer.step``. A DTensor value for a
    plain target (a sharded param's 0-dim statistic) is read whole, and one for a DTensor target is
    written in the target's layout."""
    if is_dtensor(value) and not is_dtensor(target):
        value = full(value)
    elif is_dtensor(value) and (value.device_mesh, value.placements) != (target.device_mesh, target.placements):
        value = value.redistribute(target.device_mesh, target.placements)
    if target.dim() == 0:
        target = target.view(1)
        value = value.reshape(1) if isinstance(value, Tensor) else value
    if isinstance(value, Tensor):
        target.copy_(value)
    else:
        target.fill_(value)


def select(condition: Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``condition`` holds, else ``old``, leaf by leaf (bit-identical either way)."""
    return pytree.tree_map(lambda a, b: torch.where(condition, a, b), new, old)
