"""The contract's extensions, on a small algorithm defined here: an update that reduces over its
tensor (``elementwise=False``), per-tensor scalar state, and state shared by all parameters.

The toy is normalised SGD, p <- p - lr * s * g / ||g||, where s is a shared scale that halves
whenever the mean squared gradient norm of the last step exceeds ``limit``; each tensor keeps its
last gradient norm (a per-tensor scalar) and a running sum of |g| per row (state of its own shape,
as Adafactor's factors), and the shared state counts steps and parameters. The pure
stepper defines the expected trajectory; the shim's engines must follow it for every param layout.
"""

from __future__ import annotations

import copy

import pytest
import torch

import optorch
from optorch.core.algorithm import Shared
from optorch.core.config import NonNegative


class Config(optorch.Config):
    lr: NonNegative = 0.1
    limit: NonNegative = 0.5


def init_leaf(param, config):
    return {
        "grad_norm": torch.zeros((), dtype=param.dtype, device=param.device),
        "row_sums": param.new_zeros(param.shape[:1]),
    }


def update(param, grad, state, config, shared):
    norm = grad.norm()
    new_param = param - config.lr * shared["scale"] * grad / norm
    row_sums = state["row_sums"] + grad.abs().reshape(grad.shape[0], -1).sum(1)
    return (
        new_param,
        {"grad_norm": norm, "row_sums": row_sums},
        {
            "norm_sq": norm.square().to(shared["scale"].dtype),
            "tensors": torch.ones((), dtype=shared["scale"].dtype, device=norm.device),
        },
    )


def init_shared(params, config):
    like = dict(dtype=torch.float64, device=params[0].device if params else "cpu")
    return {
        "scale": torch.ones((), **like),
        "steps": torch.zeros((), **like),
        "numel": torch.tensor(float(sum(p.numel() for p in params)), **like),
    }


def finish(shared, totals, config):
    if totals is None:
        return {**shared, "steps": shared["steps"] + 1}
    too_big = totals["norm_sq"] / totals["tensors"] > config.limit
    return {**shared, "scale": torch.where(too_big, shared["scale"] / 2, shared["scale"]), "steps": shared["steps"] + 1}


TOY = optorch.Algorithm(
    "toy", Config, init_leaf, update, elementwise=False, shared=Shared(init_shared, finish, derived=("numel",))
)
CONFIG = Config(lr=0.05, limit=0.3)


def _grads(params, step):
    # Deterministic gradients with a different norm per tensor; b misses every third step.
    grads = {name: torch.sin(p * (step + 1) + i) for i, (name, p) in enumerate(params.items())}
    if step % 3 == 2:
        grads["b"] = None
    return grads


def _initial():
    generator = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 4, generator=generator, dtype=torch.float64),
        "b": torch.randn(4, generator=generator, dtype=torch.float64),
        "c": torch.randn(5, generator=generator, dtype=torch.float64),
    }


def _pure(steps):
    params = _initial()
    state = TOY.init(params, CONFIG)
    for step in range(steps):
        params, state = TOY.step(params, _grads(params, step), state, CONFIG)
    return params, state


def _shim(engine, steps, optimizer=None, params=None):
    if optimizer is None:
        params = {n: p.clone().requires_grad_() for n, p in _initial().items()}
        optimizer = optorch.Optimizer([params["w"], params["b"], params["c"]], TOY, CONFIG, engine=engine)
    for step in range(steps):
        for name, grad in _grads({n: p.detach() for n, p in params.items()}, step).items():
            params[name].grad = grad
        optimizer.step()
    return {n: p.detach() for n, p in params.items()}, optimizer


def test_pure_stepper_keeps_per_tensor_and_shared_state():
    params, state = _pure(7)
    assert set(state) == {"grad_norm", "row_sums", "shared"}
    assert state["row_sums"]["w"].shape == (3,)
    assert state["grad_norm"]["w"].shape == ()
    assert state["shared"]["steps"].item() == 7
    assert state["shared"]["numel"].item() == 12 + 4 + 5
    assert state["shared"]["scale"].item() < 1  # the limit was hit at least once


@pytest.mark.parametrize("engine", ["eager", pytest.param("compiled", marks=pytest.mark.compile)])
def test_shim_follows_the_pure_stepper(engine):
    expected, state = _pure(12)
    actual, optimizer = _shim(engine, 12)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-14)
    for key, value in state["shared"].items():
        torch.testing.assert_close(optimizer.shared[key], value, rtol=0, atol=1e-14)
    for key in ("grad_norm", "row_sums"):
        for param, name in zip(optimizer.param_groups[0]["params"], "wbc"):
            torch.testing.assert_close(optimizer.state[param][key], state[key][name], rtol=0, atol=1e-14)


def test_shared_state_round_trips_through_a_checkpoint():
    _, optimizer = _shim("eager", 5)
    checkpoint = copy.deepcopy(optimizer.state_dict())
    saved = {
        key[len("shared.") :]: value
        for key, value in checkpoint["param_groups"][0].items()
        if key.startswith("shared.")
    }
    assert set(saved) == set(optimizer.shared) and saved["steps"].item() == 5
    params = {n: p.clone().requires_grad_() for n, p in _initial().items()}
    fresh = optorch.Optimizer(list(params.values()), TOY, CONFIG, engine="eager")
    fresh.load_state_dict(checkpoint)
    assert all(torch.equal(fresh.shared[k], v) for k, v in saved.items())
    missing = copy.deepcopy(checkpoint)
    del missing["param_groups"][0]["shared.steps"]
    with pytest.raises(ValueError, match="has no 'shared.steps'"):
        fresh.load_state_dict(missing)


def test_adding_a_param_group_recomputes_only_derived_shared_state():
    _, optimizer = _shim("eager", 4)
    scale = optimizer.shared["scale"].clone()
    optimizer.add_param_group({"params": [torch.zeros(10, dtype=torch.float64, requires_grad=True)]})
    assert optimizer.shared["numel"].item() == 21 + 10
    assert torch.equal(optimizer.shared["scale"], scale) and optimizer.shared["steps"].item() == 4


def test_a_step_without_gradients_still_finishes():
    params = {n: p.clone().requires_grad_() for n, p in _initial().items()}
    optimizer = optorch.Optimizer(list(params.values()), TOY, CONFIG, engine="eager")
    optimizer.step()
    assert optimizer.shared["steps"].item() == 1 and optimizer.shared["scale"].item() == 1
