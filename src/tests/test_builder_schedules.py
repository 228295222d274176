"""Schedules in builder configs: ``"schedule": {hyperparameter: schedule config}``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import optorch
from optorch import schedules

LR = {"name": "cosine", "init_value": 0.05, "warmup_steps": 5, "decay_steps": 40, "end_value": 0.005}
CONFIG = {"name": "adam", "lr": 0.05, "betas": [0.9, 0.95], "schedule": {"lr": LR}}


def _params():
    generator = torch.Generator().manual_seed(2)
    return [
        torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True),
        torch.randn(3, generator=generator, dtype=torch.float64, requires_grad=True),
    ]


def _train(optimizer, params, steps, start=0):
    for t in range(start, start + steps):
        optimizer.zero_grad()
        loss = sum(((p - 0.1 * (t % 7)) ** 2).sum() for p in params)
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("engine", ["torch", "eager"])
def test_a_scheduled_build_equals_torch_with_a_lambda_scheduler(engine):
    schedule = schedules.from_config(LR)
    ours, theirs = _params(), [p.detach().clone().requires_grad_() for p in _params()]
    optimizer = optorch.build(CONFIG, ours, engine=engine)
    reference = torch.optim.Adam(theirs, lr=0.05, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(reference, lambda t: schedule(t) / 0.05)
    for t in range(50):
        assert optimizer.param_groups[0]["lr"] == schedule(t)
        _train(optimizer, ours, 1, start=t)
        _train(reference, theirs, 1, start=t)
        scheduler.step()
    for a, b in zip(ours, theirs):  # lambda * base_lr against the value itself: an ulp per step
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def test_a_group_that_sets_the_key_keeps_its_value():
    a, b = _params()
    optimizer = optorch.build(CONFIG, [{"params": [a]}, {"params": [b], "lr": 0.001}], engine="eager")
    _train(optimizer, [a, b], 3)
    assert optimizer.param_groups[0]["lr"] == schedules.from_config(LR)(3)
    assert optimizer.param_groups[1]["lr"] == 0.001


def test_the_schedule_resumes_from_a_checkpoint():
    params = _params()
    optimizer = optorch.build(CONFIG, params, engine="eager")
    _train(optimizer, params, 12)
    checkpoint = copy.deepcopy(optimizer.state_dict())
    assert all(int(group["schedule_step"]) == 12 for group in checkpoint["param_groups"])
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = optorch.build(CONFIG, resumed_params, engine="eager")
    resumed.load_state_dict(checkpoint)
    assert resumed.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"] == schedules.from_config(LR)(12)
    _train(optimizer, params, 5, start=12)
    _train(resumed, resumed_params, 5, start=12)
    assert all(torch.equal(a, b) for a, b in zip(params, resumed_params))


@pytest.mark.parametrize(
    "schedule, message",
    [
        ({"learning_rate": LR}, "'learning_rate' is not a scalar hyperparameter"),
        ({"betas": LR}, "'betas' is not a scalar hyperparameter"),
        ({"lr": {"name": "cosin", "init_value": 1.0, "decay_steps": 10}}, "did you mean 'cosine'"),
        ({"lr": {"name": "cosine", "init_value": 1.0}}, "decay_steps"),
        ([LR], "must map hyperparameter names"),
    ],
)
def test_bad_schedule_entries_name_what_is_wrong(schedule, message):
    with pytest.raises(optorch.ConfigError, match=message):
        optorch.build({**CONFIG, "schedule": schedule}, _params())


def test_the_recipe_of_the_original_optorch_users():
    params = _params()
    optimizer = optorch.build(Path(__file__).parents[2] / "configs" / "adam_warmup_cosine.yaml", params)
    assert optimizer.param_groups[0]["lr"] == 0.0 and optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    _train(optimizer, params, 3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-4 * 3 / 500, rel=1e-12)
