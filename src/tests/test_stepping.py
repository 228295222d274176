"""The pure step's joined evaluation (core/stepping.py) against the per-tensor loop it replaces.

Table-driven over the registry: every element-wise algorithm, every flag combination of its grid, in
float64 and float32, with params of many shapes and sizes and some params missing gradients (so
their step counts, NAdam's mu_product, ASGD's eta, part ways). The joined path must give the loop's
results bit for bit, never alias, and stay out of the way where a graph is being built."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools

import pydantic
import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils import _pytree as pytree

import optorch
from optorch import registry
from optorch.core import opaque, stepping

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


# -- under torch.compile: traced regions (core/stepping.py) or opaque blocks (core/opaque.py) --------


def _recording():
    """A ``torch.compile`` backend that runs each FX graph as it is, and the list it keeps them in."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend, graphs


def _graph_of(step, *args):
    """The one FX graph ``torch.compile(step, fullgraph=True)`` makes of ``step(*args)``, and its result."""
    backend, graphs = _recording()
    torch._dynamo.reset()
    result = torch.compile(step, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    assert len(graphs) == 1
    return graphs[0], result


def _regions(graph):
    """Region calls and distinct regions in a graph (a region used once is inlined, and not counted)."""
    calls = [n for n in graph.graph.nodes if n.op == "call_function" and "invoke_subgraph" in str(n.target)]
    return len(calls), len({n.args[0].target for n in calls})


def _blocks(graph):
    return len([n for n in graph.graph.nodes if n.op == "call_function" and "step_block" in str(n.target)])


TRACED = [pytest.param(name, id=name) for name in registry.names() if registry.get(name).shared is None]


@pytest.mark.parametrize("name", TRACED)
def test_compiled_pure_step_equals_eager_with_each_design(name, design):
    """Params of two small shapes, three of each, a large one and a 0-dim one, with step counts apart.
    Regions: each kind traced once and stamped out (two regions, six calls; the shapes used once are
    inlined). Blocks: one operator call a block, no update traced, and the eager step's numbers bit
    for bit (the operator runs it). Float64, the graph run by Dynamo's eager backend."""
    algorithm = registry.get(name)
    config = algorithm.as_config(None)
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (3, 4), (5,), (3, 4), (5,), (stepping.JOIN_BELOW + 3,), ()]
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
    if design == "regions":
        assert _regions(graph) == (6, 2) and _blocks(graph) == 0
    else:
        leaf_states = [{k: v[i] for k, v in state.items()} for i in range(len(shapes))]
        blocks = stepping.blocks(params, grads, leaf_states, algorithm.is_elementwise(config))
        assert _blocks(graph) == len(blocks) and _regions(graph) == (0, 0)
        assert len(blocks) <= 3 if algorithm.is_elementwise(config) else len(blocks) == len(shapes)
    tolerance = 1e-15 if design == "regions" else 0
    for new, old in zip(new_params, expected_params):
        assert new.shape == old.shape
        torch.testing.assert_close(new, old, rtol=0, atol=tolerance)
    for key in expected_state:
        for new, old in zip(new_state[key], expected_state[key]):
            assert new.shape == old.shape and new.dtype == old.dtype
            torch.testing.assert_close(new, old, rtol=0, atol=tolerance)


@pytest.mark.parametrize("name, config", CASES)
def test_blocks_design_equals_eager_over_the_grid(name, config):
    """Every flag combination of every element-wise algorithm's grid through the operator (which
    rebuilds the config from its text): the eager step's numbers bit for bit, step counts apart."""
    algorithm = registry.get(name)
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (3, 4), ()]
    params = [torch.randn(s, dtype=torch.float64, generator=generator) for s in shapes]
    state = algorithm.init(params, config)
    grads = [torch.randn(s, dtype=torch.float64, generator=generator) for s in shapes]
    with torch.no_grad():
        params, state = algorithm.step(params, [grads[0], None, *grads[2:]], state, config)
    optorch.set_compiled_design("blocks")
    try:
        with torch.no_grad():
            graph, (new_params, new_state) = _graph_of(algorithm.step, params, grads, state, config)
    finally:
        optorch.set_compiled_design("regions")
    with torch.no_grad():
        expected_params, expected_state = algorithm.step(params, grads, state, config)
    assert _blocks(graph) >= 1
    for new, old in zip(
        [*new_params, *pytree.tree_leaves(new_state)], [*expected_params, *pytree.tree_leaves(expected_state)]
    ):
        assert new.shape == old.shape and new.dtype == old.dtype
        torch.testing.assert_close(new, old, rtol=0, atol=0)


def test_compiled_pure_step_takes_tensor_hyperparameters_as_inputs(design):
    """inject_hyperparams' lr and beta1 are tensors of the graph: they enter the region or the
    operator as inputs, a new value never recompiles, and the result is eager's."""
    algorithm = registry.get("adam")
    stepper = optorch.inject_hyperparams(
        algorithm, algorithm.config(), lr=lambda t: 0.1 / (1 + t), betas=(lambda t: 0.9 - 0.01 * t, None)
    )
    params = [torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    state = stepper.init(params)
    compiled = torch.compile(stepper.step, fullgraph=True, backend="eager")
    eager_params, eager_state = params, state
    torch._dynamo.reset()
    counters.clear()
    for _ in range(4):
        grads = [torch.randn(4, dtype=torch.float64) for _ in params]
        with torch.no_grad():
            params, state = compiled(params, grads, state)
            eager_params, eager_state = stepper.step(eager_params, grads, eager_state)
    assert not counters["recompiles"]
    for new, old in zip(params, eager_params):
        torch.testing.assert_close(new, old, rtol=0, atol=1e-15)


def test_two_configs_in_one_graph_are_kept_apart(design):
    """A partition of the params (two steps with other configs, and another algorithm, in one compiled
    function): each step gets regions or operator calls of its own, and every result is eager's."""
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
    assert (_regions(graph), _blocks(graph)) == (((6, 3), 0) if design == "regions" else ((0, 0), 3))
    for new, old in zip(compiled, eager):
        for p, q in zip(new, old):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_python_float_that_changes_between_calls_keeps_the_step_right(design):
    """Dynamo makes a float field that changed between calls symbolic; each design pins it to the
    call's value (a guard), so ``fullgraph=True`` still compiles and every step is eager's."""
    algorithm = registry.get("adam")
    params = [torch.randn(3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)]
    state = algorithm.init(params, None)
    torch._dynamo.reset()
    compiled = torch.compile(algorithm.step, fullgraph=True, backend="eager")
    eager_params, eager_state = params, state
    for lr in (0.1, 0.2, 0.3, 0.2):
        config = algorithm.config(lr=lr, eps=lr / 10)
        grads = [torch.randn_like(p) for p in params]
        with torch.no_grad():
            params, state = compiled(params, grads, state, config)
            eager_params, eager_state = algorithm.step(eager_params, grads, eager_state, config)
        for new, old in zip(params, eager_params):
            torch.testing.assert_close(new, old, rtol=0, atol=1e-15)
    torch._dynamo.reset()


def test_step_block_passes_opcheck():
    """torch's own checks of a custom operator: schema, fake kernel against the real one (shapes,
    dtypes, strides), no aliasing between results and inputs, and AOT dispatch."""
    algorithm = registry.get("adam")
    params = [torch.randn(3, 4), torch.randn(5), torch.randn(())]
    grads = [torch.randn_like(p) for p in params]
    states = [algorithm.init_leaf(p, algorithm.config()) for p in params]
    kind, hyper = opaque._kind(algorithm, tuple(states[0]), algorithm.config(lr=torch.tensor(0.01)))
    flat_states = [v for state in states for v in state.values()]
    torch.library.opcheck(torch.ops.optorch.step_block.default, (kind, params, grads, flat_states, hyper))


def test_set_compiled_design_names_the_choices_and_a_change_recompiles():
    with pytest.raises(ValueError, match=r"'fast' is not one of 'regions', 'blocks'"):
        optorch.set_compiled_design("fast")
    assert optorch.compiled_design() == "regions"
    backend, graphs = _recording()
    algorithm = registry.get("adam")
    config = algorithm.config()
    params = [torch.randn(3), torch.randn(3)]  # two of one kind: a region used once is inlined
    state = algorithm.init(params, config)
    torch._dynamo.reset()
    compiled = torch.compile(algorithm.step, backend=backend, fullgraph=True)
    grads = [torch.randn_like(p) for p in params]
    try:
        with torch.no_grad():
            compiled(params, grads, state, config)
            optorch.set_compiled_design("blocks")
            compiled(params, grads, state, config)
    finally:
        optorch.set_compiled_design("regions")
        torch._dynamo.reset()
    assert [(_regions(g), _blocks(g)) for g in graphs] == [((2, 1), 0), ((0, 0), 1)]


def test_flat_is_a_view_of_adjacent_tensors_and_a_copy_otherwise():
    """A block's results read back as one tensor without a copy (the next step's join); anything else
    is copied, in order."""
    block = torch.arange(10.0)
    pieces = list(block.split([3, 0, 4, 3]))
    joined = stepping.flat(pieces)
    assert joined.data_ptr() == block.data_ptr() and torch.equal(joined, block)
    assert (
        torch.equal(stepping.flat(pieces[1:]), block[3:])
        and stepping.flat(pieces[2:]).data_ptr() == pieces[2].data_ptr()
    )
    for apart in (
        [pieces[2], pieces[0]],
        [block[:3], block[4:]],
        [torch.ones(2), torch.zeros(2)],
        [block[::2], block[1:3]],
    ):
        copied = stepping.flat(apart)
        assert torch.equal(copied, torch.cat([t.reshape(-1) for t in apart]))
        assert all(copied.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in apart)


# -- the step's flattening: flat containers skip pytree, with pytree's structure and messages --------


TREES = [
    pytest.param(lambda a, b, c: [a, b, c], id="list"),
    pytest.param(lambda a, b, c: (a, b, c), id="tuple"),
    pytest.param(lambda a, b, c: {"w": a, "b": b, "z": c}, id="dict"),
    pytest.param(lambda a, b, c: {"w": a, "more": [b, (c,)]}, id="nested"),
    pytest.param(lambda a, b, c: collections.OrderedDict(w=a, b=b, z=c), id="ordereddict"),
]


@pytest.mark.parametrize("tree", TREES)
def test_step_keeps_the_structure_of_any_pytree(tree):
    """A flat list, tuple or dict takes the shortcut, any other tree pytree: both return the params'
    structure and the numbers of the same step on a plain list."""
    algorithm = registry.get("adam")
    generator = torch.Generator().manual_seed(0)
    leaves = [torch.randn(s, dtype=torch.float64, generator=generator) for s in [(3,), (2, 2), ()]]
    grads = [torch.randn_like(p) for p in leaves]
    params = tree(*leaves)
    new, state = algorithm.step(params, tree(*grads), algorithm.init(params, None), None)
    plain, plain_state = algorithm.step(leaves, grads, algorithm.init(leaves, None), None)
    assert pytree.tree_structure(new) == pytree.tree_structure(params) and type(new) is type(params)
    assert all(pytree.tree_structure(v) == pytree.tree_structure(params) for v in state.values())
    for got, expected in zip(pytree.tree_leaves(new), plain):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for key in plain_state:
        for got, expected in zip(pytree.tree_leaves(state[key]), plain_state[key]):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "params, grads, error, message",
    [
        ({"w": 0, "b": 1}, {"b": 1, "w": 0}, ValueError, r"grads must have the structure of params"),
        ([0, 1], (0, 1), ValueError, r"grads must have the structure of params"),
        ({"w": 0, "b": 1}, {"w": 0, "b": "bad"}, TypeError, r"grad at \['b'\] is a str"),
        ([0, 1], [0, "wide"], ValueError, r"grad at \[1\] has shape \(2, 3\), param has \(2, 2\)"),
        ({"a": [0, 1]}, {"a": [0, "wide"]}, ValueError, r"grad at \['a'\]\[1\] has shape \(2, 3\)"),
    ],
)
def test_step_names_the_wrong_grad(params, grads, error, message):
    """The shortcut and pytree give the same errors, naming the grad by its path."""
    leaves = [torch.randn(3), torch.randn(2, 2)]
    fill = {0: leaves[0], 1: leaves[1], "bad": "bad", "wide": torch.randn(2, 3)}
    params = pytree.tree_map(fill.get, params)
    grads = pytree.tree_map(fill.get, grads)
    algorithm = registry.get("adam")
    state = algorithm.init(params, None)
    with pytest.raises(error, match=message):
        algorithm.step(params, grads, state, None)


def test_step_checks_the_state_against_the_params():
    algorithm = registry.get("adam")
    params = {"w": torch.randn(3), "b": torch.randn(2)}
    state = algorithm.init(params, None)
    swapped = {**state, "exp_avg": {"b": state["exp_avg"]["b"], "w": state["exp_avg"]["w"]}}
    with pytest.raises(ValueError, match=r"state\['exp_avg'\] must have the structure of params"):
        algorithm.step(params, {k: torch.ones_like(v) for k, v in params.items()}, swapped, None)
