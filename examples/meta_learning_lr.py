"""Meta-learning the learning rate: differentiate through K unrolled optimizer steps.

The inner optimizer is SGD with momentum, run as the pure stepper ``optorch.sgd.step``. Its learning
rate is a 0-dim tensor inside the frozen ``Config`` (configs accept tensors as well as numbers), so
``torch.func.grad`` follows it through every inner step: the meta-gradient is d(validation loss after
K steps) / d(log lr). The outer loop updates log lr with the pure ``optorch.adam.step``: optorch
optimizing optorch's hyperparameter.

The inner gradients come from ``torch.func.grad`` too, so the whole unrolled run is one
differentiable function of the learning rate (second-order terms included).

Run: ``python examples/meta_learning_lr.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import torch
from torch.func import grad, grad_and_value

import optorch

K = 15  # inner steps per meta-step


def make_task(seed: int = 0):
    """Noisy regression with a small tanh network; a training and a validation split."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=generator)
    teacher = torch.randn(8, 1, generator=generator)
    y = torch.tanh(x @ teacher) + 0.05 * torch.randn(256, 1, generator=generator)
    params = {
        "w1": torch.randn(8, 16, generator=generator) / 8**0.5,
        "b1": torch.zeros(16),
        "w2": torch.randn(16, 1, generator=generator) / 16**0.5,
    }
    return params, (x[:192], y[:192]), (x[192:], y[192:])


def loss(params, x, y):
    return ((torch.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] - y) ** 2).mean()


def main(meta_steps: int = 30, seed: int = 0) -> dict:
    torch.set_num_threads(1)  # tiny tensors: more threads cost more than they give
    params0, (x_train, y_train), (x_val, y_val) = make_task(seed)

    def meta_loss(log_lr):
        # lr is a 0-dim tensor that grad traces: every inner step depends on it.
        config = optorch.sgd.Config(lr=log_lr.exp(), momentum=0.9)
        params, state = params0, optorch.sgd.init(params0, config)
        for _ in range(K):
            params, state = optorch.sgd.step(params, grad(loss)(params, x_train, y_train), state, config)
        return loss(params, x_val, y_val)

    meta = {"log_lr": torch.tensor(0.001).log()}  # start far too small
    meta_config = optorch.adam.Config(lr=0.1)
    meta_state = optorch.adam.init(meta, meta_config)
    history = []
    for i in range(meta_steps):
        meta_grad, value = grad_and_value(lambda m: meta_loss(m["log_lr"]))(meta)
        history.append((value.item(), meta["log_lr"].exp().item()))
        if i % 5 == 0:
            print(f"meta-step {i:2d}: lr {history[-1][1]:.4f}  validation loss after {K} steps {history[-1][0]:.4f}")
        meta, meta_state = optorch.adam.step(meta, meta_grad, meta_state, meta_config)
    final = meta_loss(meta["log_lr"]).item()
    lr = meta["log_lr"].exp().item()
    print(f"learned lr {lr:.4f} (from 0.0010): validation loss after {K} steps {history[0][0]:.4f} -> {final:.4f}")
    return {"meta_losses": [v for v, _ in history] + [final], "lrs": [lr_ for _, lr_ in history] + [lr]}


if __name__ == "__main__":
    main()
