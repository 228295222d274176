"""Trajectories recorded from the original implementations (``src/tests/data/<name>.json``).

Every file describes the same problem (a float64 tanh MLP 6-4-3 with a mean squared error; see
``README`` in the data folder) and a list of cases: a builder config dict, the number of steps, and
the four parameters after each step. :func:`replay_pure` and :func:`replay_shim` rerun a case with
the pure stepper and with the shim built from the case's config, the way the recording was made:
``zero_grad(set_to_none=True)``, forward, backward, step.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

import optorch

DATA = Path(__file__).parent / "data"


@functools.cache
def load(name: str) -> dict[str, Any]:
    return json.loads((DATA / f"{name}.json").read_text())


def available() -> list[str]:
    """The algorithms that have a recorded-trajectory file."""
    return sorted(path.stem for path in DATA.glob("*.json"))


def cases(name: str) -> list[dict[str, Any]]:
    return load(name)["cases"]


def _problem(name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    problem = load(name)["problem"]
    dtype = getattr(torch, problem["dtype"])
    params = {
        param_name: torch.tensor(values, dtype=dtype).reshape(shape)
        for param_name, shape, values in zip(problem["param_names"], problem["shapes"], problem["init"])
    }
    return params, torch.tensor(problem["X"], dtype=dtype), torch.tensor(problem["Y"], dtype=dtype)


def loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    hidden = torch.tanh(x @ params["W1"].T + params["b1"])
    return ((hidden @ params["W2"].T + params["b2"] - y) ** 2).mean()


def _flat(params: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().reshape(-1).clone() for p in params.values()]


def replay_pure(name: str, case: dict[str, Any]) -> list[list[torch.Tensor]]:
    """The case through ``optorch.<algorithm>.init/step`` with the config the builder parses."""
    algorithm, config = optorch.parse_config(case["config"])
    params, x, y = _problem(name)
    state = algorithm.init(params, config)
    trajectory = []
    for _ in range(case["steps"]):
        grads = torch.func.grad(loss)(params, x, y)
        params, state = algorithm.step(params, grads, state, config)
        trajectory.append(_flat(params))
    return trajectory


def replay_shim(name: str, case: dict[str, Any], engine: str = "auto") -> list[list[torch.Tensor]]:
    """The case through ``optorch.build(case["config"], params)``: the torch.optim way."""
    initial, x, y = _problem(name)
    params = {n: p.clone().requires_grad_() for n, p in initial.items()}
    optimizer = optorch.build(case["config"], list(params.values()), engine=engine)
    trajectory = []
    for _ in range(case["steps"]):
        optimizer.zero_grad(set_to_none=True)
        loss(params, x, y).backward()
        optimizer.step()
        trajectory.append(_flat(params))
    return trajectory


def max_abs_diff(trajectory: list[list[torch.Tensor]], case: dict[str, Any]) -> float:
    expected = case["trajectory"]
    assert len(trajectory) == len(expected) == case["steps"]
    return max(
        (got - torch.tensor(want, dtype=got.dtype)).abs().max().item()
        for got_step, want_step in zip(trajectory, expected)
        for got, want in zip(got_step, want_step)
    )
