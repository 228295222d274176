"""The one home of what optorch takes from torch that torch does not promise to keep.

Each name here is a private or semi-private torch API (a leading underscore, or a functional kernel
that torch.optim exposes without documenting). Kept in one module, a torch release that moves one is
a change to this file alone, and ``pyproject.toml``'s torch range says which releases were checked.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import guard_scalar  # a symbolic number pinned, under a guard
from torch.optim.adagrad import adagrad as torch_adagrad
from torch.optim.adam import adam as torch_adam
from torch.optim.sgd import sgd as torch_sgd
from torch.utils import _pytree as pytree

__all__ = [
    "cpp_compiler_available",
    "dynamo_would_skip",
    "flatten_dense_tensors",
    "guard_scalar",
    "in_backward",
    "in_functorch_transform",
    "is_functorch_wrapped",
    "mark_dynamic",
    "pytree",
    "torch_adagrad",
    "torch_adam",
    "torch_sgd",
    "unflatten_dense_tensors",
]

unflatten_dense_tensors = torch._C._nn.unflatten_dense_tensors
"""Views of one flat tensor shaped like the given tensors (what DDP's bucketing uses)."""

flatten_dense_tensors = torch._C._nn.flatten_dense_tensors
"""The given tensors joined into one new flat tensor, in order (its inverse's partner)."""


def is_functorch_wrapped(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``torch.func`` transform's wrapper (grad, vmap, jvp)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def in_functorch_transform() -> bool:
    """Whether this runs inside a ``torch.func`` transform (grad, vmap, jvp, functionalize)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def mark_dynamic(tensor: torch.Tensor, dim: int) -> None:
    """Tell ``torch.compile`` that ``tensor``'s size along ``dim`` varies (one graph for every size)."""
    torch._dynamo.mark_dynamic(tensor, dim)


def dynamo_would_skip() -> bool:
    """Whether Dynamo would run a compiled function's frame uncompiled and, with ``fullgraph=True``,
    raise after it has run (``"found no compiled frames"``): under a Python dispatch mode
    (``FlopCounterMode``, ``CommDebugMode``, ...). With Dynamo disabled it runs the function plainly
    and raises nothing (checked; reading that setting would cost 2.5 µs a call)."""
    return bool(torch._C._len_torch_dispatch_stack())


def in_backward() -> bool:
    """Whether this runs inside autograd's backward pass (e.g. a ``register_post_accumulate_grad_hook``
    that steps an optimizer per parameter)."""
    return torch._C._current_graph_task_id() != -1


def cpp_compiler_available() -> bool:
    """Whether Inductor finds a C++ compiler (raises nothing; any failure means none)."""
    try:
        # Inductor is heavy and only compiled engines need it: imported on first use
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
        return True
    except Exception:  # noqa: BLE001 - any failure to find one means no compiling
        return False
