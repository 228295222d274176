"""The pure step's joined evaluation (core/blocks.py) against the per-tensor loop it replaces.

Table-driven over the registry: every element-wise algorithm, every flag combination of its grid, in
float64 and float32, with params of many shapes and sizes and some params missing gradients (so
their step counts, NAdam's mu_product, ASGD's eta, part ways). The joined path must give the loop's
results bit for bit, never alias, and stay out of the way where a graph is being built."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import pydantic
import pytest
import torch

from optorch import registry
from optorch.core import blocks

SHAPES = [(3, 4), (7,), (5, 2, 3), (), (1,), (blocks.JOIN_BELOW + 5,), (300,), (2, 0)]
STEPS = 9


def _configs(name):
    algorithm = registry.get(name)
    grid = algorithm.grid
    if grid is None:
        return [algorithm.as_config(None)]
    configs = []
    for values in itertools.product(*grid.axes.values()):
        with contextlib.suppress(pydantic.ValidationError):  # a combination the Config rules out
            configs.append(algorithm.as_config({**grid.fixed, **dict(zip(grid.axes, values))}))
    return configs


CASES = [
    pytest.param(name, config, id=f"{name}-{i}")
    for name in registry.names()
    for i, config in enumerate(_configs(name))
    if registry.get(name).shared is None and registry.get(name).is_elementwise(config)
]


def _counting(algorithm):
    calls = []

    def update(*args):
        calls.append(args[0].numel())
        return algorithm.update(*args)

    return dataclasses.replace(algorithm, update=update), calls


def _run(algorithm, config, dtype, joined, monkeypatch):
    with monkeypatch.context() as patch:
        if not joined:
            patch.setattr(blocks, "eligible", lambda *args: False)
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(shape, dtype=dtype, generator=generator) for shape in SHAPES]
        state = algorithm.init(params, config)
        for k in range(STEPS):
            grads = [torch.randn(shape, dtype=dtype, generator=generator) for shape in SHAPES]
            grads[1 + k % 3] = None if k % 2 else grads[1 + k % 3]  # counts part ways
            with torch.no_grad():
                params, state = algorithm.step(params, grads, state, config)
    return params, state


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name, config", CASES)
def test_joined_equals_loop(name, config, dtype, monkeypatch):
    algorithm, calls = _counting(registry.get(name))
    loop_params, loop_state = _run(algorithm, config, dtype, joined=False, monkeypatch=monkeypatch)
    loop_calls = len(calls)
    calls.clear()
    params, state = _run(algorithm, config, dtype, joined=True, monkeypatch=monkeypatch)
    assert len(calls) < loop_calls, "the joined path did not run"
    for new, old in zip(params, loop_params):
        assert new.shape == old.shape and new.dtype == old.dtype
        torch.testing.assert_close(new, old, rtol=0, atol=0)
    for key in loop_state:
        for new, old in zip(state[key], loop_state[key]):
            assert new.shape == old.shape and new.dtype == old.dtype, key
            torch.testing.assert_close(new, old, rtol=0, atol=0)


def test_joined_results_do_not_alias():
    """Each leaf's new scalars are tensors of their own; nothing returned is an input."""
    algorithm = registry.get("adam")
    params = [torch.randn(5), torch.randn(3, 2), torch.randn(4)]
    state = algorithm.init(params, None)
    with torch.no_grad():
        new_params, new_state = algorithm.step(params, [torch.ones_like(p) for p in params], state, None)
    steps = new_state["step"]
    steps[0].add_(5)
    assert [float(s) for s in steps] == [6.0, 1.0, 1.0]
    inputs = {t.data_ptr() for t in params + state["exp_avg"] + state["exp_avg_sq"]}
    assert not inputs & {t.data_ptr() for t in new_params + new_state["exp_avg"] + new_state["exp_avg_sq"]}
    assert all(float(s) == 0 for s in state["step"])


def test_joined_results_save_with_safetensors():
    """Views of one block, not overlapping: safetensors saves and loads each as a tensor of its own."""
    safetensors = pytest.importorskip("safetensors.torch")
    params = {"w": torch.randn(3, 4), "b": torch.randn(4), "big": torch.randn(blocks.JOIN_BELOW)}
    state = registry.get("adamw").init(params, None)
    with torch.no_grad():
        new, _ = registry.get("adamw").step(params, {k: torch.randn_like(v) for k, v in params.items()}, state, None)
    assert new["w"].untyped_storage().data_ptr() == new["b"].untyped_storage().data_ptr()
    loaded = safetensors.load(safetensors.save(new))
    assert loaded.keys() == new.keys() and all(torch.equal(loaded[k], new[k]) for k in new)


def test_not_joined_while_recording_or_transformed():
    """A step autograd records, or one inside a torch.func transform, runs the plain per-tensor ops."""
    algorithm, calls = _counting(registry.get("adam"))
    params = [torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)]
    state = algorithm.init(params, None)
    new_params, _ = algorithm.step(params, [torch.ones(4), torch.ones(3)], state, None)
    assert len(calls) == 2
    sum(p.sum() for p in new_params).backward()
    assert all(p.grad is not None for p in params)

    calls.clear()

    def loss(ps):
        new, _ = algorithm.step(ps, [torch.ones(4), torch.ones(3)], algorithm.init(ps, None), None)
        return sum(p.sum() for p in new)

    torch.func.grad(loss)([torch.randn(4), torch.randn(3)])
    assert len(calls) == 2


@pytest.mark.parametrize(
    "sizes, limit, expected",
    [([], 4, []), ([1, 2, 3], 3, [[0, 1], [2]]), ([5, 1], 3, [[0], [1]]), ([1, 1, 1], 10, [[0, 1, 2]])],
)
def test_runs(sizes, limit, expected):
    assert blocks.runs(sizes, limit) == expected
