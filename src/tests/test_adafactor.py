"""Adafactor beyond the generic contract suite: shapes the shared problem lacks (3-D, 0-dim, a column
and a row vector as matrices), eps1's dtype-dependent default in float32, the placeholder state and its
checkpoint mapping, and the config's validation. The reference is torch.optim.Adafactor itself."""

from __future__ import annotations

import copy

import pydantic
import pytest
import torch
from torch import nn

import optorch
from optorch import adafactor

SHAPES = {"cube": (2, 3, 4), "column": (5, 1), "row": (1, 4), "scalar": (), "vector": (3,)}


def _params(dtype):
    generator = torch.Generator().manual_seed(7)
    return {k: torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) for k, s in SHAPES.items()}


def _grads(params, i):
    return {k: torch.sin(3 * p + i) + 0.1 * p for k, p in params.items()}


def _torch_run(params, flags, steps):
    live = {k: nn.Parameter(p.clone()) for k, p in params.items()}
    optimizer = torch.optim.Adafactor(list(live.values()), **flags)
    for i in range(steps):
        for k, g in _grads({k: p.detach() for k, p in live.items()}, i).items():
            live[k].grad = g
        optimizer.step()
    return {k: p.detach() for k, p in live.items()}, optimizer


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "flags",
    [
        {"lr": 0.3},
        {"lr": 0.05, "eps": (1e-3, 0.05), "d": 1.3, "weight_decay": 0.1, "beta2_decay": -0.6, "maximize": True},
    ],
)
def test_pure_stepper_equals_torch_on_every_shape(flags, dtype):
    params = _params(dtype)
    expected, _ = _torch_run(params, flags, 30)
    config = adafactor.Config(**flags)
    state = adafactor.init(params, config)
    for i in range(30):
        params, state = adafactor.step(params, _grads(params, i), state, config)
    for k in SHAPES:  # the host-number path is torch's single-tensor kernel, op for op
        assert torch.equal(params[k], expected[k]), (k, (params[k] - expected[k]).abs().max())


def test_state_has_every_key_with_empty_placeholders():
    state = adafactor.init(_params(torch.float64), adafactor.Config())
    assert set(state) == {"step", "row_var", "col_var", "variance"}
    assert state["row_var"]["cube"].shape == (2, 3, 1) and state["col_var"]["cube"].shape == (2, 1, 4)
    assert state["variance"]["cube"].shape == (0,)
    assert state["variance"]["scalar"].shape == () and state["variance"]["vector"].shape == (3,)
    assert state["row_var"]["vector"].shape == (0,) and state["col_var"]["scalar"].shape == (0,)
    assert state["variance"]["cube"].dtype == torch.float64


@pytest.mark.parametrize("engine", ["eager", "torch"])
def test_checkpoints_have_torchs_keys_and_interchange(engine):
    params = _params(torch.float64)
    _, reference = _torch_run(params, {"lr": 0.1}, 3)
    saved = reference.state_dict()
    live = [nn.Parameter(p.clone()) for p in params.values()]
    shim = optorch.build({"name": "adafactor", "lr": 0.1}, live, engine=engine)
    shim.load_state_dict(copy.deepcopy(saved))
    exported = shim.state_dict()["state"]
    for index in saved["state"]:
        assert set(exported[index]) == set(saved["state"][index])
        for key, value in saved["state"][index].items():
            assert torch.equal(torch.as_tensor(exported[index][key]), torch.as_tensor(value)), (index, key)
    wrong = copy.deepcopy(saved)
    wrong["state"][0]["variance"] = torch.zeros(2, 3, 4, dtype=torch.float64)  # the cube is factored
    with pytest.raises(ValueError, match="'variance' of parameter 0 has shape"):
        shim.load_state_dict(wrong)


def test_complex_params_are_refused():
    with pytest.raises(RuntimeError, match="adafactor does not support complex parameters"):
        adafactor.init({"z": torch.zeros(3, dtype=torch.complex64)}, adafactor.Config())


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"beta2_decay": 0.1}, "<= 0"),
        ({"d": 0.5}, ">= 1"),
        ({"eps": (-1e-3, 1e-3)}, ">= 0"),
        ({"eps": (None, -1.0)}, ">= 0"),
        ({"lr": -1.0}, ">= 0"),
    ],
)
def test_config_rejects_what_torch_rejects(flags, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        adafactor.Config(**flags)
    with pytest.raises(ValueError):
        torch.optim.Adafactor([nn.Parameter(torch.zeros(1))], **flags)


def test_eps_accepts_a_list_and_none():
    assert adafactor.Config(eps=[None, 0.01]).eps == (None, 0.01)
    assert adafactor.Config(eps=[1e-30, 0.01]).eps == (1e-30, 0.01)
