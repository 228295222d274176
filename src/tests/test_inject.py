"""Hyperparameters as state (optorch.inject_hyperparams)."""

from __future__ import annotations

import pytest
import torch

import optorch
from optorch import adam, schedules, sgd


def _problem():
    generator = torch.Generator().manual_seed(1)
    target = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    params = {
        "w": torch.randn(6, 3, generator=generator, dtype=torch.float64),
        "b": torch.randn(3, generator=generator, dtype=torch.float64),
    }
    return params, target


def _loss(params, target):
    return ((params["w"] + params["b"] - target) ** 2).mean()


LR = schedules.Cosine(init_value=0.05, decay_steps=60, warmup_steps=5)
BETA1 = schedules.Linear(init_value=0.9, end_value=0.5, transition_steps=40)


def test_scheduled_steps_equal_the_plain_stepper_given_each_value():
    params, target = _problem()
    stepper = optorch.inject_hyperparams(adam.algorithm, adam.Config(weight_decay=0.01), lr=LR, betas=(BETA1, None))
    state = stepper.init(params)
    plain_params, plain_state = dict(params), adam.init(params, stepper.config)
    for t in range(60):
        grads = torch.func.grad(_loss)(params, target)
        params, state = stepper.step(params, grads, state)
        config = stepper.config.replace(lr=LR(t), betas=(BETA1(t), 0.999))
        plain_params, plain_state = adam.step(
            plain_params, torch.func.grad(_loss)(plain_params, target), plain_state, config
        )
        assert state["hyperparams"]["lr"].item() == LR(t)
        for name in params:  # 0-dim tensor hyperparameters against numbers: a few ulps
            torch.testing.assert_close(params[name], plain_params[name], rtol=0, atol=1e-14)
    assert state["count"].item() == 60
    assert state["hyperparams"]["betas"][1].item() == 0.999


@pytest.mark.compile
def test_changing_lr_and_beta_every_step_compiles_once():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    params, target = _problem()
    stepper = optorch.inject_hyperparams(adam.algorithm, adam.Config(), lr=LR, betas=(BETA1, None))
    state = stepper.init(params)
    compiled = torch.compile(stepper.step, fullgraph=True)
    for _ in range(100):
        params, state = compiled(params, torch.func.grad(_loss)(params, target), state)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"]


def test_grad_with_respect_to_the_learning_rate():
    """One SGD step: d loss(p - lr g) / d lr = -<grad loss(p1), g>, exactly."""
    params, target = _problem()
    stepper = optorch.inject_hyperparams(sgd.algorithm, sgd.Config(lr=0.1))
    state = stepper.init(params)
    grads = torch.func.grad(_loss)(params, target)

    def loss_after_step(lr):
        hyper = {**state["hyperparams"], "lr": lr}
        new_params, _ = stepper.step(params, grads, {**state, "hyperparams": hyper})
        return _loss(new_params, target)

    lr = torch.tensor(0.1, dtype=torch.float64)
    got = torch.func.grad(loss_after_step)(lr)
    stepped = {n: p - 0.1 * grads[n] for n, p in params.items()}
    after = torch.func.grad(_loss)(stepped, target)
    expected = -sum((after[n] * grads[n]).sum() for n in params)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)


def test_an_unscheduled_hyperparameter_can_be_set_in_the_state():
    params, target = _problem()
    stepper = optorch.inject_hyperparams(sgd.algorithm, sgd.Config(lr=0.1))
    state = stepper.init(params)
    state["hyperparams"]["lr"] = torch.tensor(0.0, dtype=torch.float64)
    new_params, state = stepper.step(params, torch.func.grad(_loss)(params, target), state)
    assert all(torch.equal(new_params[n], params[n]) for n in params)


@pytest.mark.parametrize(
    "schedules_, message",
    [
        ({"learning_rate": LR}, "no hyperparameter 'learning_rate'"),
        ({"maximize": LR}, "not a real-valued hyperparameter"),
        ({"betas": LR}, "tuple of 2"),
        ({"lr": 0.1}, "must be callable"),
    ],
)
def test_bad_schedules_are_rejected(schedules_, message):
    with pytest.raises(ValueError, match=message):
        optorch.inject_hyperparams(adam.algorithm, adam.Config(), **schedules_)


def test_with_tensors_rejects_numbers():
    with pytest.raises(TypeError, match="'lr' must be a field"):
        adam.Config().with_tensors(lr=0.1)
