"""Property tests: random valid hyperparameters agree with torch.optim; invalid ones are refused by name."""

from __future__ import annotations

import pydantic
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optorch

unit = st.floats(0.0, 0.999)
small = st.floats(0.0, 0.5)
flag = st.booleans()

# One strategy per algorithm: every field of its Config, drawn over its valid range.
CONFIGS = {
    "sgd": st.fixed_dictionaries(
        {"lr": small, "momentum": unit, "dampening": unit, "weight_decay": small, "maximize": flag}
    ),
    "adam": st.fixed_dictionaries(
        {
            "lr": small,
            "betas": st.tuples(unit, unit),
            "eps": st.floats(1e-10, 1e-2),
            "weight_decay": small,
            "amsgrad": flag,
            "maximize": flag,
            "decoupled_weight_decay": flag,
        }
    ),
    "adamw": st.fixed_dictionaries(
        {
            "lr": small,
            "betas": st.tuples(unit, unit),
            "eps": st.floats(1e-10, 1e-2),
            "weight_decay": small,
            "amsgrad": flag,
        }
    ),
    "rmsprop": st.fixed_dictionaries(
        {
            "lr": small,
            "alpha": unit,
            "eps": st.floats(1e-10, 1e-2),
            "weight_decay": small,
            "momentum": unit,
            "centered": flag,
        }
    ),
    "adagrad": st.fixed_dictionaries(
        {
            "lr": small,
            "lr_decay": small,
            "weight_decay": small,
            "initial_accumulator_value": small,
            "eps": st.floats(1e-10, 1e-2),
        }
    ),
    "nadam": st.fixed_dictionaries(
        {
            "lr": small,
            "betas": st.tuples(unit, unit),
            "eps": st.floats(1e-10, 1e-2),
            "weight_decay": small,
            "momentum_decay": st.floats(0.0, 0.1),
            "decoupled_weight_decay": flag,
            "maximize": flag,
        }
    ),
    "radam": st.fixed_dictionaries(
        {
            "lr": small,
            "betas": st.tuples(unit, unit),
            "eps": st.floats(1e-10, 1e-2),
            "weight_decay": small,
            "decoupled_weight_decay": flag,
            "maximize": flag,
        }
    ),
    "adamax": st.fixed_dictionaries(
        {
            "lr": small,
            "betas": st.tuples(unit, unit),
            "eps": st.floats(1e-10, 1e-2),
            "weight_decay": small,
            "maximize": flag,
        }
    ),
    "adadelta": st.fixed_dictionaries(
        {
            "lr": st.floats(0.0, 2.0),
            "rho": st.floats(0.0, 1.0),
            "eps": st.floats(1e-10, 1e-2),
            "weight_decay": small,
            "maximize": flag,
        }
    ),
    "rprop": st.fixed_dictionaries(
        {
            "lr": small,
            "etas": st.tuples(st.floats(0.01, 0.99), st.floats(1.01, 3.0)),
            "step_sizes": st.tuples(st.floats(0.0, 1e-3), st.floats(1e-3, 10.0)),
            "maximize": flag,
        }
    ),
    "asgd": st.fixed_dictionaries(
        {
            "lr": small,
            "lambd": st.floats(0.0, 0.1),
            "alpha": st.floats(0.0, 1.0),
            "t0": st.floats(0.0, 10.0),
            "weight_decay": small,
            "maximize": flag,
        }
    ),
    "adafactor": st.fixed_dictionaries(
        {
            "lr": small,
            "beta2_decay": st.floats(-1.0, -0.1),
            "eps": st.tuples(st.one_of(st.none(), st.floats(1e-10, 1e-2)), st.floats(1e-4, 1e-1)),
            "d": st.floats(1.0, 3.0),
            "weight_decay": small,
            "maximize": flag,
        }
    ),
}


def test_every_torch_algorithm_has_a_strategy():
    assert {n for n, a in optorch.ALGORITHMS.items() if a.torch_optimizer is not None} <= set(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_random_configs_match_torch(name, data):
    values = data.draw(CONFIGS[name])
    algorithm = optorch.ALGORITHMS[name]
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    init = [
        torch.randn(5, 3, dtype=torch.float64, generator=generator),
        torch.randn(3, dtype=torch.float64, generator=generator),
    ]
    reference = [torch.nn.Parameter(p.clone()) for p in init]
    torch_opt = algorithm.torch_optimizer(reference, **values)
    config = algorithm.config(**values)
    params, state = list(init), algorithm.init(init, config)
    for _ in range(8):
        grads = [torch.sin(3 * p) + 0.1 for p in params]  # bounded, so maximize cannot blow up
        for p, g in zip(reference, grads):
            p.grad = g.clone()
        torch_opt.step()
        params, state = algorithm.step(params, grads, state, config)
    for ours, theirs in zip(params, reference):
        # equal_nan: a degenerate draw (alpha=0, centered) takes sqrt of a rounding-negative number in torch too
        torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("name", sorted(optorch.ALGORITHMS))
@given(value=st.floats(max_value=-1e-12, allow_nan=False))
def test_negative_lr_is_refused_by_name(name, value):
    with pytest.raises(pydantic.ValidationError, match="lr"):
        optorch.ALGORITHMS[name].config(lr=value)


@given(
    beta=st.one_of(st.floats(min_value=1.0, allow_infinity=False), st.floats(max_value=-1e-12, allow_infinity=False))
)
def test_betas_outside_unit_interval_are_refused(beta):
    with pytest.raises(pydantic.ValidationError, match="betas"):
        optorch.adam.Config(betas=(beta, 0.9))
