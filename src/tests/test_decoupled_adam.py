"""Fully decoupled weight decay: theta <- (1 - weight_decay * lr / initial_lr) * theta, then Adam."""

from __future__ import annotations

import math

import pytest
import torch

import optorch
from optorch import decoupled_adam
from optorch.tools import verify


def _problem():
    generator = torch.Generator().manual_seed(3)
    target = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    start = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    return start, target


def _loss(param, target):
    return ((param - target) ** 2).sum()


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_equals_adamw_with_weight_decay_divided_by_initial_lr(amsgrad, maximize):
    """With a schedule lr_t = initial_lr * f(t), AdamW's factor 1 - lr_t * (wd / initial_lr) is ours."""
    start, target = _problem()
    initial_lr, wd = 0.05, 0.01
    reference = start.clone().requires_grad_()
    torch_opt = torch.optim.AdamW(
        [reference], lr=initial_lr, weight_decay=wd / initial_lr, amsgrad=amsgrad, maximize=maximize, betas=(0.8, 0.95)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda t: 0.5 ** (t // 20))
    params = {"w": start.clone()}
    config = decoupled_adam.Config(
        lr=initial_lr, weight_decay=wd, amsgrad=amsgrad, maximize=maximize, betas=(0.8, 0.95)
    )
    state = decoupled_adam.init(params, config)
    worst = 0.0
    for t in range(100):
        torch_opt.zero_grad()
        _loss(reference, target).backward()
        torch_opt.step()
        scheduler.step()
        grads = {"w": torch.func.grad(_loss)(params["w"], target)}
        params, state = decoupled_adam.step(
            params, grads, state, config.replace(lr=initial_lr * 0.5 ** (t // 20), initial_lr=initial_lr)
        )
        worst = max(worst, verify.max_abs_diff(params["w"], reference))
    # The only difference is the rounding of lr * (wd / initial_lr) against wd * (lr / initial_lr).
    assert worst <= 1e-14, worst


def test_zero_gradients_follow_the_closed_form_with_a_schedule():
    """Adam's step is exactly 0 for zero gradients, so theta_T = theta_0 * prod_t (1 - wd * s_t)."""
    start = torch.linspace(-2, 3, 7, dtype=torch.float64)
    wd, initial_lr = 0.1, 1e-3
    schedule = [1.0, 0.5, 0.25, 0.0, 0.75]
    params = {"w": start}
    config = decoupled_adam.Config(lr=initial_lr, weight_decay=wd)
    state = decoupled_adam.init(params, config)
    for s in schedule:
        params, state = decoupled_adam.step(
            params, {"w": torch.zeros(7, dtype=torch.float64)}, state, config.replace(lr=initial_lr * s)
        )
    expected = start * math.prod(1 - wd * s for s in schedule)
    torch.testing.assert_close(params["w"], expected, rtol=1e-15, atol=0)


def test_the_decay_does_not_scale_with_the_peak_learning_rate():
    """The original optorch's intent: with a constant schedule, the decay is (1 - wd) per step at any lr."""
    for lr in (1e-4, 1.0):
        config = decoupled_adam.Config(lr=lr, weight_decay=0.2)
        params = {"w": torch.ones(3, dtype=torch.float64)}
        params, _ = decoupled_adam.step(
            params, {"w": torch.zeros(3, dtype=torch.float64)}, decoupled_adam.init(params, config), config
        )
        torch.testing.assert_close(params["w"], torch.full((3,), 0.8, dtype=torch.float64), rtol=1e-15, atol=0)


@pytest.mark.parametrize("engine", ["eager", pytest.param("compiled", marks=pytest.mark.compile)])
def test_shim_takes_initial_lr_per_group_and_follows_a_torch_scheduler(engine):
    a, b = (
        torch.ones(4, dtype=torch.float64, requires_grad=True),
        torch.ones(3, dtype=torch.float64, requires_grad=True),
    )
    optimizer = optorch.build(
        {"name": "decoupled_adam", "lr": 0.1, "weight_decay": 0.1},
        [{"params": [a]}, {"params": [b], "lr": 0.01}],
        engine=engine,
    )
    assert [g["initial_lr"] for g in optimizer.param_groups] == [0.1, 0.01]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5**t)
    factors = []
    for t in range(4):
        a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
        optimizer.step()
        scheduler.step()
        factors.append(1 - 0.1 * 0.5**t)
    expected = math.prod(factors)
    torch.testing.assert_close(a.detach(), torch.full((4,), expected, dtype=torch.float64), rtol=1e-15, atol=0)
    torch.testing.assert_close(b.detach(), torch.full((3,), expected, dtype=torch.float64), rtol=1e-15, atol=0)


def test_initial_lr_must_be_positive_with_weight_decay():
    with pytest.raises(ValueError, match="initial_lr must be > 0"):
        decoupled_adam.Config(lr=0.1, initial_lr=0.0, weight_decay=0.1)
