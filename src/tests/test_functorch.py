"""The pure steppers compose with ``torch.func``: differentiate through unrolled steps (meta-learning the
learning rate), and ``vmap`` an ensemble of optimizers with different learning rates."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

from optorch.algorithms import registry
from optorch.tools import verify

DTYPE = torch.float64


def _flags(name: str) -> dict:
    """Every flag on where the algorithm has a grid (the hardest case), its defaults otherwise."""
    if name not in verify.grid_algorithms():
        return {}
    return {k: v for k, v in verify.most_flags(name).items() if k not in ("name", "lr")}


def _cases() -> list:
    cases = [pytest.param(name, _flags(name), id=f"{name}[all-flags]") for name in registry.names()]
    # SGD's flagship case: plain heavy-ball momentum (its all-flags case is Nesterov).
    return cases + [pytest.param("sgd", {"momentum": 0.9}, id="sgd[momentum]")]


@pytest.fixture
def problem():
    torch.manual_seed(0)
    params = {"w": torch.randn(4, 3, dtype=DTYPE) * 0.5, "b": torch.randn(3, dtype=DTYPE) * 0.1}
    x, y = torch.randn(16, 4, dtype=DTYPE), torch.randn(16, 3, dtype=DTYPE)
    return params, x, y


def _loss(params, x, y):
    return ((torch.tanh(x @ params["w"] + params["b"]) - y) ** 2).mean()


def _train(name, flags, lr, problem, steps):
    """Unrolled training: inner gradients by ``torch.func.grad``, so the whole run is differentiable."""
    algorithm = registry.get(name)
    params, x, y = problem
    config = algorithm.config(lr=lr, **flags)
    state = algorithm.init(params, config)
    for _ in range(steps):
        params, state = algorithm.step(params, grad(_loss)(params, x, y), state, config)
    return params


def _keeps_lr_in_float32(name: str, flags: dict) -> bool:
    """Whether the fresh state holds a value derived from lr in a dtype coarser than the params'."""
    algorithm = registry.get(name)
    lr = torch.tensor(0.01, dtype=DTYPE, requires_grad=True)
    state = algorithm.init_leaf(torch.zeros(2, dtype=DTYPE), algorithm.config(lr=lr, **flags))
    return any(v.requires_grad and torch.finfo(v.dtype).eps > torch.finfo(DTYPE).eps for v in state.values())


@pytest.mark.parametrize("name, flags", _cases())
def test_grad_through_unrolled_steps_wrt_lr_matches_finite_differences(name, flags, problem):
    _, x, y = problem

    def meta_loss(lr):
        return _loss(_train(name, flags, lr, problem, steps=5), x, y)

    lr = torch.tensor(0.01, dtype=DTYPE)
    analytic = grad(meta_loss)(lr)
    if _keeps_lr_in_float32(name, flags):
        # torch keeps this state in float32 (ASGD's eta), so the meta-loss is lr rounded to float32
        # steps: its ulp at 0.01 (9e-10) is 1e-3 of a step of 1e-6, and the central difference would
        # be that noisy. A step of 1e-3 shrinks the noise to ~1e-6 and a fourth-order stencil keeps
        # the truncation error below that (O(h^4)).
        h = 1e-3
        numeric = (8 * (meta_loss(lr + h) - meta_loss(lr - h)) - (meta_loss(lr + 2 * h) - meta_loss(lr - 2 * h))) / (
            12 * h
        )
    else:
        h = 1e-6
        numeric = (meta_loss(lr + h) - meta_loss(lr - h)) / (2 * h)
    assert analytic.abs() > 1e-3, "a vacuous check: the meta-loss barely depends on lr"
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("name, flags", _cases())
def test_vmap_over_an_ensemble_of_learning_rates_equals_separate_runs(name, flags, problem):
    lrs = torch.tensor([0.001, 0.01, 0.03, 0.1], dtype=DTYPE)
    ensemble = vmap(lambda lr: _train(name, flags, lr, problem, steps=10))(lrs)
    for i, lr in enumerate(lrs.tolist()):
        single = _train(name, flags, lr, problem, steps=10)  # a Python-float lr: torch's fused ops
        for key, value in single.items():
            assert (ensemble[key][i] - value).abs().max() <= verify.FLOAT64_TOLERANCE, (key, lr)
    assert not torch.equal(ensemble["w"][0], ensemble["w"][-1])
