"""Trajectories recorded from the original implementations of ADOPT, DAG and AutoSGM, and their replay.

``data/<name>.json`` holds, for one small float64 problem (a tanh MLP 6-4-3 with a mean squared error,
see ``data/README.md``), a list of cases: a builder config dict, a number of steps, and the four
parameters after every step, as the original computed them. :func:`replay` reruns a case through the
pure stepper or the shim the way the recording was made (``zero_grad(set_to_none=True)``, forward,
backward, step) and :func:`expected` says which recording optorch must reproduce. ``optorch verify``
and the tests compare the two.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..builder import build, parse_config

__all__ = ["DATA", "algorithms", "cases", "case", "config", "expected", "replay", "loss"]

DATA = Path(__file__).parent.parent / "data"

Trajectory = list[list[Tensor]]
"""The params after each step, each flattened row-major, in the recording's order (W1, b1, W2, b2)."""

FLOAT64_SCALARS = frozenset({"autosgm"})
"""Originals whose float32 scalars optorch computes in the param's precision (a documented deviation:
AutoSGM's lr0 and numerator smoother), so optorch reproduces their recording made with float64 as
torch's default dtype. The others keep the original's scalar dtypes (DAG's float32 kappa, as torch's
default dtype makes them)."""

NUDGED = frozenset({"autosgm"})
"""Originals that add eps to every initial weight with |w| < eps at their first step, a deviation
optorch documents and leaves out (eps-scale differences; ``replay`` can emulate it)."""


@functools.cache
def _load(name: str) -> dict[str, Any]:
    return json.loads((DATA / f"{name}.json").read_text())


def algorithms() -> list[str]:
    """The algorithms that have a recording."""
    return sorted(path.stem for path in DATA.glob("*.json"))


def cases(name: str) -> list[dict[str, Any]]:
    return _load(name)["cases"]


def case(name: str, case_id: str) -> dict[str, Any]:
    found = [c for c in cases(name) if c["id"] == case_id]
    if not found:
        raise ValueError(f"{name} has no recorded case {case_id!r}; it has {', '.join(c['id'] for c in cases(name))}")
    return found[0]


def config(recorded: dict[str, Any]) -> dict[str, Any]:
    """A case's config as a dict of its algorithm's own field names (the recording uses the original's
    keys, e.g. AutoSGM's tuples), ready for ``Config(**...)`` with one value changed."""
    algorithm, parsed = parse_config(recorded["config"])
    return {"name": algorithm.name, "lr": parsed.lr, **parsed.model_dump(exclude_defaults=True)}


def expected(name: str, recorded: dict[str, Any], default_dtype: torch.dtype = torch.float32) -> Trajectory:
    """The recording optorch reproduces: the spec's fixed maximize where the original's is a bug
    (``trajectory_fixed``), made with float64 scalars (``_f64``) where optorch computes them so, or
    where torch's default dtype is float64 and the original's scalars follow it."""
    key = "trajectory_fixed" if "trajectory_fixed" in recorded else "trajectory"
    if (name in FLOAT64_SCALARS or default_dtype == torch.float64) and f"{key}_f64" in recorded:
        key += "_f64"
    return [[torch.tensor(values, dtype=torch.float64) for values in step] for step in recorded[key]]


def _problem() -> tuple[dict[str, Tensor], Tensor, Tensor]:
    problem = _load(algorithms()[0])["problem"]  # the same in every file
    dtype = getattr(torch, problem["dtype"])
    params = {
        param_name: torch.tensor(values, dtype=dtype).reshape(shape)
        for param_name, shape, values in zip(problem["param_names"], problem["shapes"], problem["init"])
    }
    return params, torch.tensor(problem["X"], dtype=dtype), torch.tensor(problem["Y"], dtype=dtype)


def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    hidden = torch.tanh(x @ params["W1"].T + params["b1"])
    return ((hidden @ params["W2"].T + params["b2"] - y) ** 2).mean()


def _flat(params: dict[str, Tensor]) -> list[Tensor]:
    return [p.detach().reshape(-1).clone() for p in params.values()]


def _nudged(params: dict[str, Tensor], eps: float) -> dict[str, Tensor]:
    return {name: torch.where(p.abs() < eps, p + eps, p) for name, p in params.items()}


def replay(
    name: str,
    recorded: dict[str, Any],
    engine: str = "pure",
    *,
    changes: dict[str, Any] | None = None,
    nudge: bool = True,
) -> Trajectory:
    """The case through the pure stepper (``engine="pure"``) or ``optorch.build(config, params,
    engine=engine)``. ``changes`` alter the config (mutation tests); ``nudge`` emulates the original's
    first-step nudge of small weights (:data:`NUDGED`): the first gradient is taken before it, as
    the original takes it."""
    values = {**config(recorded), **changes} if changes else recorded["config"]
    eps = parse_config(recorded["config"])[1].eps if nudge and name in NUDGED else None
    params, x, y = _problem()
    trajectory = []
    if engine == "pure":
        algorithm, parsed = parse_config(values)
        state = algorithm.init(params, parsed)
        for step in range(recorded["steps"]):
            grads = torch.func.grad(loss)(params, x, y)
            if step == 0 and eps is not None:
                params = _nudged(params, eps)
            params, state = algorithm.step(params, grads, state, parsed)
            trajectory.append(_flat(params))
        return trajectory
    params = {n: p.clone().requires_grad_() for n, p in params.items()}
    optimizer = build(values, list(params.values()), engine=engine)
    for step in range(recorded["steps"]):
        optimizer.zero_grad(set_to_none=True)
        loss(params, x, y).backward()
        if step == 0 and eps is not None:
            with torch.no_grad():
                for p, nudged in zip(params.values(), _nudged(params, eps).values()):
                    p.copy_(nudged)
        optimizer.step()
        trajectory.append(_flat(params))
    return trajectory
