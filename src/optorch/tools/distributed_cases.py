"""What ``optorch verify --distributed`` checks: the configs, the modes, the cases of the CI subset
and of the full matrix, and a case's result (the rule is :mod:`optorch.tools.verify_distributed`'s)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import builder

__all__ = ["CONFIGS", "Case", "MODES", "RESUME_TOLERANCE", "Result", "TOLERANCE", "cases", "entries"]

TOLERANCE = 1e-10
"""Distributed against single-process (float64): reductions are summed in another order."""
RESUME_TOLERANCE = 1e-12
"""A resumed run against the same mode without a break."""

MODES = (
    "fsdp2",
    "ddp",
    "zero",
    "zero-bucket",
    "zero-class",
    "zero-resume",
    "dcp",
    "dcp-flat",
    "dcp-full",
    "dcp-ddp",
    "tp",
    "fsdp2-tp",
)
RESUMING = ("zero-resume", "dcp", "dcp-flat", "dcp-full", "dcp-ddp")
STEPS = 8
POISON_STEP = 3
RESUME_AT = 3
"""Resuming modes save after this many steps (mid-window for accumulate_steps=2)."""
"""Cases with ``skip_nonfinite`` or ``amp`` get an inf in one gradient element at this step (on the
one rank whose shard holds it, under FSDP2 and ZeRO)."""

CONFIGS: dict[str, dict[str, Any]] = {
    "sgd": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
    "adam": {"name": "adam", "lr": 0.01, "amsgrad": True},
    "adamw": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
    "decoupled_adam": {"name": "decoupled_adam", "lr": 0.01, "weight_decay": 0.1},
    "rmsprop": {"name": "rmsprop", "lr": 0.01, "momentum": 0.5, "centered": True},
    "adagrad": {"name": "adagrad", "lr": 0.1},
    "nadam": {"name": "nadam", "lr": 0.01},
    "radam": {"name": "radam", "lr": 0.01},
    "adamax": {"name": "adamax", "lr": 0.01},
    "adadelta": {"name": "adadelta", "lr": 1.0},
    "rprop": {"name": "rprop", "lr": 0.01},
    "asgd": {"name": "asgd", "lr": 0.05, "t0": 3},
    "dag": {"name": "dag", "lr": 0.01, "momentum": 0.9, "sat_every": 2, "shrink": {"warmup_steps": 2}},
    "dag-exact-sigma": {
        "name": "dag",
        "lr": 0.01,
        "momentum": 0.5,
        "use_exact_sigma": True,
        "shrink": {"warmup_steps": 2},
    },
    "autosgm": {"name": "autosgm", "lr": 0.01, "numerator": 2},
    "lars": {"name": "lars", "lr": 0.1, "weight_decay": 0.01, "trust_coefficient": 0.02},
    "adopt": {"name": "adopt", "lr": 0.01},
    "adafactor": {"name": "adafactor", "lr": 0.01},
    # the builder's entries
    "adamw+schedule": {
        "name": "adamw",
        "lr": 0.01,
        "schedule": {"lr": {"name": "cosine", "init_value": 0.01, "decay_steps": STEPS}},
    },
    "dag+clip+skip": {
        "name": "dag",
        "lr": 0.01,
        "momentum": 0.5,
        "clip_grad_norm": 0.5,
        "skip_nonfinite": True,
        "shrink": {"warmup_steps": 2},
    },
    "adam+amp": {"name": "adam", "lr": 0.01, "amp": {"init_scale": 1024.0, "growth_interval": 2}},
    "lars+clip": {"name": "lars", "lr": 0.1, "clip_grad_norm": 0.5},
    "sgd+accumulate+ema": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "accumulate_steps": 2, "ema": {"decay": 0.9}},
    "adamw+param_groups": {
        "name": "adamw",
        "lr": 0.01,
        "weight_decay": 0.1,
        "param_groups": [{"match": "*.bias", "weight_decay": 0.0, "lr": 0.02}],
    },
    "sgd+adapt": {
        "name": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "adapt": {"lr_rule": "trend", "momentum_rule": "relative"},
    },
}
"""A config per algorithm (non-default settings, so more of the math runs) and per builder entry."""

CI_CASES = (
    ("adamw", ("fsdp2", "ddp", "zero-bucket", "dcp-flat")),
    ("adopt", ("zero-class",)),
    ("dag", ("fsdp2", "zero", "dcp")),
    ("adafactor", ("fsdp2", "tp", "dcp-full")),
    ("lars", ("fsdp2", "zero-resume")),
    ("autosgm", ("fsdp2",)),
    ("dag+clip+skip", ("fsdp2", "zero", "dcp-ddp")),
    ("adam+amp", ("fsdp2", "zero-bucket")),
    ("sgd+accumulate+ema", ("fsdp2", "dcp-flat")),
    ("adamw+schedule", ("dcp",)),
    ("adamw+param_groups", ("zero",)),
    ("sgd+adapt", ("fsdp2", "zero")),
)
"""The representative subset CI runs (the full matrix: every config in every mode)."""

CI_AUTO_CASES = (("adopt", ("fsdp2", "zero-bucket")), ("autosgm", ("fsdp2",)))
"""Also in the subset, with the engine ``build`` picks by default (``auto``: compiled kernels for these
on CPU): element-wise algorithms step a DTensor's local shards in batches, and ZeRO's bucket views."""


@dataclass(frozen=True)
class Case:
    config: str
    """A key of :data:`CONFIGS`."""
    mode: str
    engine: str = "eager"

    @property
    def label(self) -> str:
        return f"{self.config} {self.mode}" + ("" if self.engine == "eager" else f" {self.engine}")


def cases(full: bool = False, engines: Sequence[str] = ("eager",)) -> list[Case]:
    """The cases of the full matrix (``full``) or of the CI subset, for each engine (the subset also
    holds :data:`CI_AUTO_CASES` under the default engine)."""
    pairs = [(name, MODES) for name in CONFIGS] if full else CI_CASES
    chosen = [
        Case(name, mode, engine)
        for engine in engines
        for name, modes in pairs
        for mode in modes
        if mode != "zero-class" or not entries(CONFIGS[name])
    ]
    auto = [] if full else [Case(name, mode, "auto") for name, modes in CI_AUTO_CASES for mode in modes]
    return chosen + [case for case in auto if case not in chosen]


def entries(config: dict[str, Any]) -> set[str]:
    """The builder entries (``schedule``, ``clip_grad_norm``, ...) of a config."""
    return set(config) & set(builder.ENTRY_KEYS)


@dataclass
class Result:
    diff: float = math.nan
    """Largest difference of the final parameters from the single-process run."""
    torch_diff: float | None = None
    """... from torch.optim's class in the same mode (where it has the algorithm)."""
    resume_diff: float | None = None
    """A resuming mode: from the same mode without a break."""
    init_step_change: float | None = None
    """DCP's state-creating step on a fresh optimizer: the largest change of a param or a counter."""
    comm: dict[str, int] = field(default_factory=dict)
    """Collectives one ``optimizer.step()`` made (the last step), by kind."""
    torch_comm: dict[str, int] | None = None
    torch_error: str | None = None
    """torch.optim's class failed in this mode (not a failure of optorch's)."""
    error: str | None = None

    def passed(self) -> bool:
        diffs = [self.diff, self.torch_diff]
        ok = self.error is None and all(d is None or d <= TOLERANCE for d in diffs)
        return ok and (self.resume_diff is None or self.resume_diff <= RESUME_TOLERANCE) and not self.init_step_change
