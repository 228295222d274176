"""The pure step's joined evaluation (core/stepping.py) against the per-tensor loop it replaces.

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

import optorch
from optorch import registry
from optorch.core import stepping

SHAPES = [(3, 4), (7,), (5, 2, 3), (), (1,), (stepping.JOIN_BELOW + 5,), (300,), (2, 0)]
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
            patch.setattr(stepping, "eligible", lambda *args: False)
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
    params = {"w": torch.randn(3, 4), "b": torch.randn(4), "big": torch.randn(stepping.JOIN_BELOW)}
    state = registry.get("adamw").init(params, None)
    with torch.no_grad():
        new, _ = registry.get("adamw").step(params, {k: torch.randn_like(v) for k, v in params.items()}, state, None)
    assert new["w"].untyped_storage().data_ptr() == new["b"].untyped_storage().data_ptr()
    loaded = safetensors.load(safetensors.save(new))
    assert loaded.keys() == new.keys() and all(torch.equal(loaded[k], new[k]) for k in new)


def test_a_models_parameters_are_joined_under_no_grad():
    algorithm, calls = _counting(registry.get("adam"))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    params = dict(model.named_parameters())
    state = algorithm.init(params, None)
    with torch.no_grad():
        algorithm.step(params, {k: torch.ones_like(v) for k, v in params.items()}, state, None)
    assert len(calls) == 1


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
    assert stepping.runs(sizes, limit) == expected


# -- traced once under torch.compile ----------------------------------------------------------------


def _graph_of(step, *args):
    """The one FX graph ``torch.compile(step, fullgraph=True)`` makes of ``step(*args)``, and its result."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    result = torch.compile(step, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    assert len(graphs) == 1
    return graphs[0], result


def _regions(graph):
    calls = [n for n in graph.graph.nodes if n.op == "call_function" and "invoke_subgraph" in str(n.target)]
    return len(calls), len({n.args[0].target for n in calls})


TRACED = [pytest.param(name, id=name) for name in registry.names() if registry.get(name).shared is None]


@pytest.mark.parametrize("name", TRACED)
def test_compiled_pure_step_traces_each_kind_of_param_once(name):
    """Six params of two shapes: two traced regions, stamped six times; the numbers are the per-tensor
    loop's (float64, the compiled graph run by Dynamo's eager backend), step counts apart included."""
    algorithm = registry.get(name)
    config = algorithm.as_config(None)
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (3, 4), (5,), (3, 4), (5,)]
    params = [torch.randn(s, dtype=torch.float64, generator=generator) for s in shapes]
    state = algorithm.init(params, config)
    for k in range(3):  # counts part ways: param 1 misses two grads
        grads = [torch.randn(s, dtype=torch.float64, generator=generator) for s in shapes]
        grads[1] = grads[1] if k == 2 else None
        with torch.no_grad():
            params, state = algorithm.step(params, grads, state, config)
    grads = [torch.randn(s, dtype=torch.float64, generator=generator) for s in shapes]
    with torch.no_grad():
        graph, (new_params, new_state) = _graph_of(algorithm.step, params, grads, state, config)
        expected_params, expected_state = algorithm.step(params, grads, state, config)
    assert _regions(graph) == (6, 2)
    for new, old in zip(new_params, expected_params):
        torch.testing.assert_close(new, old, rtol=0, atol=1e-15)
    for key in expected_state:
        for new, old in zip(new_state[key], expected_state[key]):
            torch.testing.assert_close(new, old, rtol=0, atol=1e-15)


def test_compiled_pure_step_takes_tensor_hyperparameters_as_inputs():
    """inject_hyperparams' lr and beta1 are tensors of the graph: they enter the region as inputs, a
    new value never recompiles, and the result is eager's."""
    algorithm = registry.get("adam")
    stepper = optorch.inject_hyperparams(
        algorithm, algorithm.config(), lr=lambda t: 0.1 / (1 + t), betas=(lambda t: 0.9 - 0.01 * t, None)
    )
    params = [torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    state = stepper.init(params)
    compiled = torch.compile(stepper.step, fullgraph=True, backend="eager")
    eager_params, eager_state = params, state
    torch._dynamo.reset()
    for _ in range(4):
        grads = [torch.randn(4, dtype=torch.float64) for _ in params]
        with torch.no_grad():
            params, state = compiled(params, grads, state)
            eager_params, eager_state = stepper.step(eager_params, grads, eager_state)
    from torch._dynamo.utils import counters

    assert not counters["recompiles"]
    for new, old in zip(params, eager_params):
        torch.testing.assert_close(new, old, rtol=0, atol=1e-15)


def test_two_configs_in_one_graph_never_share_a_region():
    """A partition of the params (two steps with other configs, and another algorithm, in one compiled
    function): each step's region is its own, and every result is eager's."""
    adam, sgd = registry.get("adam"), registry.get("sgd")
    generator = torch.Generator().manual_seed(0)
    x, y, g = ([torch.randn(5, generator=generator) for _ in range(2)] for _ in range(3))
    a, b, c = adam.config(lr=0.1), adam.config(lr=0.5, weight_decay=0.3), sgd.config(lr=0.2)
    states = adam.init(x, a), adam.init(y, b), sgd.init(y, c)

    def three(x, y, g, sa, sb, sc):
        return adam.step(x, g, sa, a)[0], adam.step(y, g, sb, b)[0], sgd.step(y, g, sc, c)[0]

    with torch.no_grad():
        graph, compiled = _graph_of(three, x, y, g, *states)
        eager = three(x, y, g, *states)
    assert _regions(graph) == (6, 3)
    for new, old in zip(compiled, eager):
        for p, q in zip(new, old):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
