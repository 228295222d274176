"""``torch.compile(optimizer.step)`` and a compiled training step that calls it: the trajectory of the
eager shim, for every algorithm and every builder entry, singly and combined, and no more graph breaks
inside ``step`` than torch.optim's own (2 in torch 2.13).

Nothing that changes per step may live where Dynamo would freeze it (a Python attribute): schedule
positions, DAG's shared state and the combinators' counters are tensors in the param groups, so a
compiled step that froze one of them would drift from the eager run here. CI runs every algorithm
bare, every entry on Adam and everything combined on DAG, ADOPT and the torch engine; ``-m matrix``
runs every algorithm with every entry on every engine.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import optorch
from optorch.algorithms import registry

pytestmark = pytest.mark.compile

TOLERANCE = 1e-12  # float64; the compiled graph may fuse and reorder, eager and compiled agree to ~1e-16
MAX_GRAPH_BREAKS = 2  # torch.optim's own step in torch 2.13
STEPS = 8
NAN_STEP = 4  # a NaN gradient at this step exercises skip_nonfinite and amp

ENTRIES = {
    "schedule": {"schedule": {"lr": {"name": "cosine", "init_value": 0.01, "decay_steps": 10, "warmup_steps": 2}}},
    "clip_grad_norm": {"clip_grad_norm": 0.5},
    "skip_nonfinite": {"skip_nonfinite": True},
    "accumulate_steps": {"accumulate_steps": 2},
    "ema": {"ema": {"decay": 0.9, "warmup": True}},
    "param_groups": {"param_groups": [{"match": "norm.*", "weight_decay": 0.0}]},
    "amp": {"amp": {"init_scale": 256.0, "growth_interval": 3}},
}
ENTRIES["combined"] = {key: value for entry in ENTRIES.values() for key, value in entry.items()}
ALGORITHMS = sorted(registry.ALGORITHMS)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.out = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(torch.tanh(self.lin(x))))


def _config(name: str, entry: str) -> dict:
    # weight_decay in the base config gives param_groups' override something to change
    config = {"name": name, "lr": 0.01, **ENTRIES.get(entry, {})}
    if "weight_decay" in registry.get(name).config.model_fields:
        config["weight_decay"] = 0.01
    return config


def _loss(model: nn.Module, optimizer, i: int, config: dict) -> torch.Tensor:
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
    loss = model(x).square().sum()
    return optimizer.scale_loss(loss) if "amp" in config else loss


def _poison(model: nn.Module, i: int, config: dict) -> None:
    if i == NAN_STEP and ("skip_nonfinite" in config or "amp" in config):
        model.lin.weight.grad[0, 0] = math.nan


def _observed(model: nn.Module, optimizer, config: dict) -> list[torch.Tensor]:
    values = [p.detach().clone() for p in model.parameters()]
    if "ema" in config:
        values += [e.clone() for e in optimizer.ema_params()]
    values += [torch.as_tensor(v).clone() for v in (optimizer.shared or {}).values()]
    return values


def run_step(config: dict, engine: str, compiled: bool) -> list[torch.Tensor]:
    """``optimizer.step`` itself compiled."""
    model = Net().double()
    optimizer = optorch.build(config, model, engine=engine)
    step = torch.compile(optimizer.step) if compiled else optimizer.step
    for i in range(STEPS):
        optimizer.zero_grad()
        _loss(model, optimizer, i, config).backward()
        _poison(model, i, config)
        step()
    return _observed(model, optimizer, config)


def run_training_step(config: dict, engine: str, compiled: bool) -> list[torch.Tensor]:
    """A compiled training step (forward, backward, ``optimizer.step()``, ``zero_grad``)."""
    model = Net().double()
    optimizer = optorch.build(config, model, engine=engine)

    def train_step(i: int) -> None:
        _loss(model, optimizer, i, config).backward()
        _poison(model, i, config)
        optimizer.step()
        optimizer.zero_grad()

    step = torch.compile(train_step) if compiled else train_step
    for i in range(STEPS):
        step(i)
    return _observed(model, optimizer, config)


def graph_breaks(config: dict, engine: str) -> int:
    model = Net().double()
    optimizer = optorch.build(config, model, engine=engine)
    for i in range(3):  # state exists, so the step is the steady one
        _loss(model, optimizer, i, config).backward()
        if i < 2:
            optimizer.step()
    return torch._dynamo.explain(optimizer.step)().graph_break_count


def assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        difference = (a - e).abs().max().item() if a.numel() else 0.0
        assert difference <= TOLERANCE, f"compiled differs from eager by {difference}"  # NaN fails too


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _engines(name: str) -> list[str]:
    # Inside torch.compile both of optorch's engines run the same traced per-tensor code.
    return ["eager"] + (["torch"] if registry.get(name).torch_optimizer is not None else [])


def _cases(full: bool) -> list:
    cases = []
    for name in ALGORITHMS:
        for engine in _engines(name):
            for entry in ["none", *ENTRIES]:
                ci = (entry == "none" and engine == "eager") or (
                    entry == "combined" and (name in ("adam", "dag", "adopt") or (name, engine) == ("adam", "torch"))
                )
                if ci != full:
                    cases.append(
                        pytest.param(
                            name,
                            engine,
                            entry,
                            id=f"{name}-{engine}-{entry}",
                            marks=[pytest.mark.matrix] if full else [],
                        )
                    )
    return cases


@pytest.mark.parametrize("name, engine, entry", _cases(False) + _cases(True))
def test_compiled_step_follows_the_eager_step(name, engine, entry):
    config = _config(name, entry)
    eager = run_step(config, engine, compiled=False)
    assert_close(run_step(config, engine, compiled=True), eager)
    if entry == "combined" or registry.get(name).shared is not None:
        assert graph_breaks(config, engine) <= MAX_GRAPH_BREAKS


@pytest.mark.parametrize("name, entry", [("adam", "combined"), ("dag", "schedule"), ("adopt", "ema")])
def test_compiled_training_step_follows_the_eager_one(name, entry):
    config = _config(name, entry)
    assert_close(run_training_step(config, "eager", compiled=True), run_training_step(config, "eager", compiled=False))


def test_a_compiled_schedule_advances_and_shows_the_next_value():
    """The position is a tensor: the compiled step moves it, and the lr it leaves in the group is
    the schedule's next value (a 0-dim tensor inside compiled code, a float after an eager step)."""
    config = _config("adam", "schedule")
    model = Net().double()
    optimizer = optorch.build(config, model, engine="eager")
    schedule = optorch.schedules.from_config(config["schedule"]["lr"])
    step = torch.compile(optimizer.step)
    for i in range(5):
        _loss(model, optimizer, i, config).backward()
        step()
        optimizer.zero_grad()
        assert int(optimizer.param_groups[0]["schedule_step"]) == i + 1
        assert math.isclose(float(optimizer.param_groups[0]["lr"]), schedule(i + 1), rel_tol=1e-12)
    _loss(model, optimizer, 5, config).backward()
    optimizer.step()  # eager again: the check that nothing else drives lr accepts the compiled value
    assert optimizer.param_groups[0]["lr"] == schedule(6)
