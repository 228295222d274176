"""An explicit contiguous layout of a model's parameters, chosen in user code.

The shim never moves a parameter's data (``docs/guide.md``, "The shim as a torch.optim citizen"), so
a model with many tensors pays for them: each tensor a call, or a copy into scratch space and back
(``docs/performance.md``). :func:`contiguous` is the user's own, visible choice to lay the parameters
out back to back, which lets the compiled engine step each run of them as one tensor, without a copy::

    optorch.contiguous(model)                       # before building the optimizer
    opt = optorch.build(config, model.parameters())
    ...
    opt.zero_grad(set_to_none=False)                # keeps the grads in their buffer too

The engine checks the layout at every step and steps whatever it finds: a param whose data was
replaced since (``p.data = ...``, ``model.to(...)``) is stepped on its own, never stale memory.
What the layout gives up, as any shared storage does: ``safetensors`` refuses to save tensors that
share storage (save a copy: ``{k: v.clone() for k, v in model.state_dict().items()}``), and
``torch.save`` of a single param or submodule writes the whole buffer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["contiguous"]


@torch.no_grad()
def contiguous(params: torch.nn.Module | Iterable[Tensor], *, grads: bool = True) -> list[Tensor]:
    """Lay ``params`` (a module's parameters, or tensors) out back to back, in place.

    Each (device, dtype) gets one buffer, with params of one shape next to each other (so an
    algorithm that reduces over each tensor can step them as one stack). Every param's data becomes
    a view of its buffer (``p.data = view``, values kept). With ``grads``, the ``.grad`` of every param
    that requires grad becomes a view of a second buffer laid out alike (its values kept, zeros where
    there were none), into which backward accumulates in place: keep it there with
    ``zero_grad(set_to_none=False)``. As with that call in torch, a trained param that backward never
    reaches then steps with a zero grad instead of being skipped; frozen params keep ``grad=None``.

    Returns the buffers (params first, then grads), e.g. to check or to free them.
    """
    tensors = list(params.parameters()) if isinstance(params, torch.nn.Module) else list(params)
    unique = list({id(t): t for t in tensors}.values())
    by_kind: dict[tuple, list[Tensor]] = {}
    for param in unique:
        by_kind.setdefault((param.device, param.dtype), []).append(param)
    buffers, grad_buffers = [], []
    for members in by_kind.values():
        # frozen params last, so the trained ones stay back to back; same shapes next to each other
        order = sorted(members, key=lambda p: (not p.requires_grad, tuple(p.shape)))
        buffers.append(_move(order, lambda p: p.data, lambda p, view: setattr(p, "data", view)))
        # a frozen param keeps grad None: a zero grad would make any optimizer step it (momentum, decay)
        trained = [p for p in order if p.requires_grad or p.grad is not None]
        if grads and trained:
            grad_buffers.append(_move(trained, lambda p: p.grad, lambda p, view: setattr(p, "grad", view)))
    return buffers + grad_buffers


def _move(params: list[Tensor], read, write) -> Tensor:
    first = params[0]
    buffer = torch.zeros(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
    offset = 0
    for param in params:
        view = buffer[offset : offset + param.numel()].view(param.shape)
        old = read(param)
        if old is not None:
            view.copy_(old)
        write(param, view)
        offset += param.numel()
    return buffer
