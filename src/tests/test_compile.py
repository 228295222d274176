"""torch.compile: the pure steppers compile to one graph, equal eager, and a learning rate that changes
every step (a 0-dim tensor) never recompiles; nor does the shim's compiled engine under an lr scheduler."""

from __future__ import annotations

import contextlib
import functools
import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch.utils import _pytree as pytree

import optorch
from optorch.tools import verify

pytestmark = pytest.mark.compile

DTYPE = torch.float64
CASES = [
    pytest.param(optorch.adam, {"betas": (0.8, 0.95), "amsgrad": True, "weight_decay": 0.1}, id="adam"),
    pytest.param(optorch.sgd, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}, id="sgd"),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _cosine(step: int, total: int = 100, base: float = 0.05) -> torch.Tensor:
    return torch.tensor(base * 0.5 * (1 + math.cos(math.pi * step / total)), dtype=DTYPE)


def _run(step_fn, module, flags, steps: int):
    """``steps`` steps on a fixed quadratic-ish problem, a fresh Config with a cosine lr each step."""
    params = {"w": torch.randn(4, 3, dtype=DTYPE), "b": torch.randn(3, dtype=DTYPE)}
    state = module.init(params, module.Config(lr=_cosine(0), **flags))
    generator = torch.Generator().manual_seed(1)
    for i in range(steps):
        grads = {
            k: torch.sin(v) + 0.1 * torch.randn(v.shape, generator=generator, dtype=DTYPE) for k, v in params.items()
        }
        params, state = step_fn(params, grads, state, module.Config(lr=_cosine(i), **flags))
    return params, state


@pytest.mark.parametrize("module, flags", CASES)
def test_compiled_step_equals_eager_and_never_recompiles(module, flags, design):
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(module.step, backend=counter, fullgraph=True)
    torch.manual_seed(0)
    first = _run(compiled, module, flags, steps=1)
    compiles_after_first_step = counter.frame_count
    torch.manual_seed(0)
    params, state = _run(compiled, module, flags, steps=100)
    assert counter.frame_count == compiles_after_first_step, "a new lr (a 0-dim tensor) caused a recompile"
    assert counters["stats"]["unique_graphs"] == 1

    torch.manual_seed(0)
    eager_first = _run(module.step, module, flags, steps=1)
    torch.manual_seed(0)
    eager_params, eager_state = _run(module.step, module, flags, steps=100)
    for a, b in ((first, eager_first), ((params, state), (eager_params, eager_state))):
        assert (
            verify.max_abs_diff(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b))
            <= verify.FLOAT64_TOLERANCE
        )


def test_shim_compiled_engine_compiles_once_under_a_cosine_scheduler():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    optimizer = optorch.build({"name": "adam", "lr": 0.01, "weight_decay": 0.1}, model.parameters(), engine="compiled")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    lrs = set()
    for _ in range(100):
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        lrs.add(optimizer.param_groups[0]["lr"])
        scheduler.step()
    assert len(lrs) > 50, "the schedule did not change the lr"
    assert counters["stats"]["unique_graphs"] == 1, "one compile for the one flat buffer, no recompiles"
    assert optimizer.engine == "compiled"


# Mixed shapes and ranks, a missing grad now and then: the compiled engine steps a non-element-wise
# algorithm param by param with one kernel per tensor rank (dynamic shapes), not one per shape.
MIXED_SHAPES = [(6, 4), (5,), (6, 4), (3, 4, 2), (5,), (6, 4), (7,), (2, 9), (3,)]


def _mixed_params(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=DTYPE).requires_grad_() for shape in MIXED_SHAPES]


def _mixed_grads(params, step: int, generator: torch.Generator) -> None:
    for i, param in enumerate(params):
        noise = torch.randn(param.shape, generator=generator, dtype=DTYPE)
        # Every 7th step the second param has no grad.
        param.grad = None if (step % 7 == 6 and i == 1) else torch.sin(param.detach()) + 0.1 * noise


def _side_by_side(config):
    """The eager and the compiled engine on equal params, and ``step_both(step, around)``: one step of
    each with equal grads, inside a fresh ``around()`` context."""
    eager_params, compiled_params = _mixed_params(), _mixed_params()
    eager = optorch.build(config, eager_params, engine="eager")
    compiled = optorch.build(config, compiled_params, engine="compiled")
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)]

    def step_both(step: int, around=contextlib.nullcontext) -> None:
        for params, optimizer, generator in zip((eager_params, compiled_params), (eager, compiled), generators):
            _mixed_grads(params, step, generator)
            with around():
                optimizer.step()

    return eager_params, compiled_params, eager, compiled, step_both


def _layout(state_dict) -> dict:
    state = {
        index: {key: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else type(v) for key, v in leaf.items()}
        for index, leaf in state_dict["state"].items()
    }
    groups = [sorted(group) for group in state_dict["param_groups"]]
    return {"state": state, "groups": groups, "top": sorted(state_dict)}


def _state_diff(a, b) -> float:
    diffs = [
        (torch.as_tensor(a["state"][i][k]) - torch.as_tensor(b["state"][i][k])).abs().max().item()
        for i in a["state"]
        for k in a["state"][i]
    ]
    diffs += [
        (torch.as_tensor(v) - torch.as_tensor(b["param_groups"][0][k])).abs().max().item()
        for k, v in a["param_groups"][0].items()
        if k.startswith("shared.")
    ]
    return verify.worst(diffs)


@pytest.mark.parametrize(
    "config",
    [
        {"name": "dag", "lr": 0.02, "momentum": 0.9, "weight_decay": 0.01},
        {"name": "lars", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
        {"name": "adafactor", "lr": 0.01, "weight_decay": 0.01},
    ],
    ids=lambda config: config["name"],
)
def test_shim_compiled_follows_eager_for_non_elementwise_algorithms(config):
    """A non-element-wise algorithm compiled (per tensor rank, dynamic shapes: one kernel for single
    tensors and one for stacks of same-shaped ones) follows the eager engine over 20 steps to verify's
    compiled-reduction tolerance, its state_dict has the eager one's layout, and mid-way the eager
    state_dict loads into the compiled shim and both go on alike. The graphs are compiled in the first
    step: none is added later."""
    eager_params, compiled_params, eager, compiled, step_both = _side_by_side(config)
    for step in range(20):
        step_both(step)
        if step == 0:
            graphs_after_first_step = counters["stats"]["unique_graphs"]
        if step == 9:
            compiled.load_state_dict(eager.state_dict())
            with torch.no_grad():
                for c, e in zip(compiled_params, eager_params):
                    c.copy_(e)
            assert _state_diff(compiled.state_dict(), eager.state_dict()) == 0
    diff = verify.max_abs_diff(compiled_params, eager_params)
    moved = verify.max_abs_diff(eager_params, _mixed_params())
    assert moved > 1e-3, "the params barely moved: the comparison would prove nothing"
    assert diff <= verify.FLOAT64_COMPILED_REDUCTION_TOLERANCE
    eager_state, compiled_state = eager.state_dict(), compiled.state_dict()
    assert _layout(compiled_state) == _layout(eager_state)
    assert _state_diff(compiled_state, eager_state) <= verify.FLOAT64_COMPILED_REDUCTION_TOLERANCE
    assert graphs_after_first_step <= 2 * len({len(shape) for shape in MIXED_SHAPES})
    assert counters["stats"]["unique_graphs"] == graphs_after_first_step, "a later step compiled again"


@pytest.mark.parametrize("name", ["adopt", "dag"])
def test_a_dispatch_mode_around_a_compiled_step_steps_once(name):
    """Under a Python dispatch mode (FlopCounterMode here, CommDebugMode in distributed checks) Dynamo
    runs a compiled function uncompiled and then raises: the compiled engine stepped that batch a second
    time. Now such a step runs eagerly, once, equal to the eager engine, and the next steps compile
    again."""
    from torch.utils.flop_counter import FlopCounterMode

    eager_params, compiled_params, _, compiled, step_both = _side_by_side({"name": name, "lr": 0.02})
    for step in range(8):
        step_both(step, functools.partial(FlopCounterMode, display=False) if step in (2, 5) else contextlib.nullcontext)
    assert verify.max_abs_diff(eager_params, _mixed_params()) > 1e-3, "the params barely moved"
    assert verify.max_abs_diff(compiled_params, eager_params) <= verify.FLOAT64_COMPILED_REDUCTION_TOLERANCE
    assert compiled._engine.name == "compiled"


def test_a_compiled_training_step_calls_the_pure_step_in_one_graph(design):
    """Forward, ``torch.func.grad`` and ``adam.step`` compiled together: one graph, no graph break,
    with either design, and the trajectory is eager's over 5 steps."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(DTYPE)
    adam = optorch.adam.algorithm
    config = adam.config(lr=0.01)

    def loss_fn(params, x, y):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)

    def train_step(params, state, x, y):
        grads, loss = torch.func.grad_and_value(loss_fn)(params, x, y)
        with torch.no_grad():
            params, state = adam.step(params, grads, state, config)
        return params, state, loss

    params = {k: v.detach() for k, v in model.named_parameters()}
    compiled = torch.compile(train_step, fullgraph=True)
    eager = (params, adam.init(params, config))
    ours = eager
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = (
            torch.randn(16, 4, dtype=DTYPE, generator=generator),
            torch.randn(16, 2, dtype=DTYPE, generator=generator),
        )
        *ours, loss = compiled(*ours, x, y)
        *eager, eager_loss = train_step(*eager, x, y)
        assert abs(float(loss - eager_loss)) <= verify.FLOAT64_TOLERANCE
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert verify.max_abs_diff(pytree.tree_leaves(ours), pytree.tree_leaves(eager)) <= verify.FLOAT64_TOLERANCE
