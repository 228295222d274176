"""torch.compile: the pure steppers compile to one graph, equal eager, and a learning rate that changes
every step (a 0-dim tensor) never recompiles; nor does the shim's compiled engine under an lr scheduler."""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import optorch
from optorch import verify

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
        grads = {k: torch.sin(v) + 0.1 * torch.randn(v.shape, generator=generator, dtype=DTYPE) for k, v in params.items()}
        params, state = step_fn(params, grads, state, module.Config(lr=_cosine(i), **flags))
    return params, state


@pytest.mark.parametrize("module, flags", CASES)
def test_compiled_step_equals_eager_and_never_recompiles(module, flags):
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
        diffs = [(x - y).abs().max().item() for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b))]
        assert max(diffs) <= verify.FLOAT64_TOLERANCE


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
