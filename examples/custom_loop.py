"""A training loop of your own with optorch's pure steppers and ``torch.func``.

The model's parameters live in a plain dict, outside the module; ``torch.func.functional_call`` runs
the module on them, ``torch.func.grad_and_value`` gives the gradients, and ``optorch.adam.step``
returns new parameters and a new state without modifying anything. The loop is ordinary Python:
no ``requires_grad`` bookkeeping, no ``zero_grad``, no in-place updates.

At the end the same training runs through ``optorch.build`` (a ``torch.optim.Optimizer``) from the
same start, and the two final models agree: one algorithm, two ways to drive it.

Run: ``python examples/custom_loop.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, grad_and_value

import optorch


def make_data(seed: int = 0, n: int = 512):
    """A two-class problem a linear model cannot solve: points inside or outside a circle."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=generator) * 4 - 2
    y = (x.norm(dim=1) < 1.2).long()
    return x, y


def main(steps: int = 200, seed: int = 0) -> dict:
    torch.set_num_threads(1)  # tiny tensors: more threads cost more than they give
    torch.manual_seed(seed)
    x, y = make_data(seed)
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))
    start = copy.deepcopy(model)

    # The functional side: params as a dict of plain tensors, a frozen config, a state pytree.
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = optorch.adam.Config(lr=0.02, betas=(0.9, 0.99), weight_decay=1e-4)
    state = optorch.adam.init(params, config)

    def loss_fn(params, xb, yb):
        return nn.functional.cross_entropy(functional_call(model, params, (xb,)), yb)

    batches = torch.randint(0, len(y), (steps, 64), generator=torch.Generator().manual_seed(seed + 1))
    losses = []
    for index in batches:
        grads, loss = grad_and_value(loss_fn)(params, x[index], y[index])
        params, state = optorch.adam.step(params, grads, state, config)
        losses.append(loss.item())

    with torch.no_grad():
        accuracy = (functional_call(model, params, (x,)).argmax(1) == y).float().mean().item()

    # The same run through the torch.optim shim, from the same initial weights, on the same batches.
    shim_model = start
    optimizer = optorch.build(config, shim_model.parameters())
    for index in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(shim_model(x[index]), y[index]).backward()
        optimizer.step()
    max_diff = max((params[name] - p.detach()).abs().max().item() for name, p in shim_model.named_parameters())

    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(
        f"custom loop with optorch.adam.step: {steps} steps, loss {first:.3f} -> {last:.3f}, "
        f"accuracy {100 * accuracy:.1f}%"
    )
    print(f"same run through optorch.build(...): largest difference in the final params {max_diff:.1e}")
    print(f"state after the loop: step {int(state['step']['0.weight'])}, keys {sorted(state)}")
    return {
        "first_loss": first,
        "last_loss": last,
        "accuracy": accuracy,
        "max_diff_vs_shim": max_diff,
        "steps": int(state["step"]["0.weight"]),
    }


if __name__ == "__main__":
    main()
