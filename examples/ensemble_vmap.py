"""Training an ensemble with ``torch.func.vmap`` over the pure step: N models, N learning rates, one loop.

``torch.func.stack_module_state`` stacks the weights of N differently initialised copies of a model
along a new leading dimension. ``vmap`` then runs one training step of every member at once:
``functional_call`` for the forward pass, ``torch.func.grad`` for the gradients and
``optorch.adam.step`` for the update, with the optimizer state (``step``, ``exp_avg``, ...) stacked
the same way and each member's learning rate an element of a batched 0-dim tensor in its ``Config``.

At the end one member is trained alone, with a plain Python-float lr, and compared with its slot in
the ensemble: vmap changes how the work is batched, not the result.

Run: ``python examples/ensemble_vmap.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, stack_module_state, vmap

import optorch

LRS = [0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]


def make_data(seed: int = 0, n: int = 512):
    """Regression of a smooth function of 4 inputs."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    y = torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3] - 0.5 * x[:, 3:]
    return x, y


def main(steps: int = 150, seed: int = 0) -> dict:
    torch.set_num_threads(1)  # tiny tensors: more threads cost more than they give
    torch.manual_seed(seed)
    x, y = make_data(seed)
    members = [nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1)) for _ in LRS]
    base = copy.deepcopy(members[0]).to("meta")  # the architecture functional_call runs; no weights
    params, _ = stack_module_state(members)  # {"0.weight": (N, 32, 4), ...}
    params = {k: v.detach() for k, v in params.items()}
    lrs = torch.tensor(LRS)

    def loss_fn(p, xb, yb):
        return ((functional_call(base, p, (xb,)) - yb) ** 2).mean()

    def init_one(p, lr):
        return optorch.adam.init(p, optorch.adam.Config(lr=lr))

    def step_one(p, state, lr, xb, yb):
        config = optorch.adam.Config(lr=lr)  # lr: this member's 0-dim slice of the batched tensor
        grads, loss = grad_and_value(loss_fn)(p, xb, yb)
        p, state = optorch.adam.step(p, grads, state, config)
        return p, state, loss

    state = vmap(init_one)(params, lrs)
    # Every member sees the same batches (in_dims None): only the init and the lr differ.
    step_all = vmap(step_one, in_dims=(0, 0, 0, None, None))
    batches = torch.randint(0, len(y), (steps, 64), generator=torch.Generator().manual_seed(seed + 1))
    full_loss = vmap(loss_fn, in_dims=(0, None, None))  # every member's loss on the whole data set
    first = full_loss(params, x, y)
    for index in batches:
        params, state, _ = step_all(params, state, lrs, x[index], y[index])
    final = full_loss(params, x, y)

    # Check one member against a run of its own, with a Python-float lr (torch's fused kernels).
    check = 3
    alone = {k: v[check] for k, v in stack_module_state(members)[0].items()}
    alone = {k: v.detach() for k, v in alone.items()}
    config = optorch.adam.Config(lr=LRS[check])
    alone_state = optorch.adam.init(alone, config)
    for index in batches:
        alone, alone_state = optorch.adam.step(alone, grad(loss_fn)(alone, x[index], y[index]), alone_state, config)
    max_diff = max((alone[k] - params[k][check]).abs().max().item() for k in alone)

    print(f"ensemble of {len(LRS)} MLPs trained together with vmap over optorch.adam.step, {steps} steps:")
    for lr, a, b in zip(LRS, first.tolist(), final.tolist()):
        print(f"  lr {lr:<7g} loss {a:.4f} -> {b:.4f}")
    best = int(final.argmin())
    print(f"best lr {LRS[best]:g}; member {check} trained alone differs by at most {max_diff:.1e}")
    return {
        "lrs": LRS,
        "first_losses": first.tolist(),
        "final_losses": final.tolist(),
        "best_lr": LRS[best],
        "max_diff_vs_alone": max_diff,
    }


if __name__ == "__main__":
    main()
