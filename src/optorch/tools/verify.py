"""Equivalence checks against the reference implementations, shared by ``optorch verify`` and the tests.

Every check runs one algorithm and one config on a small problem and compares parameter trajectories,
step by step (the largest absolute difference over all steps and all params):

* the reference: torch.optim's own class with its default execution, or where torch.optim has none an
  independent implementation (:mod:`optorch.tools.references`: torch-adopt, pytorch_optimizer's LARS), or the
  torch.optim optimizer a config reduces to (``Algorithm.reductions``: AutoSGM, decoupled Adam), or the
  trajectory recorded from the original (:mod:`optorch.recorded`: ADOPT, DAG, AutoSGM);
* the candidate: the pure stepper ``optorch.<name>.step`` (path ``pure``), the shim
  ``optorch.build(config, groups, engine=E)`` (paths ``shim:torch``, ``shim:eager``,
  ``shim:compiled``), or torch's fused kernel wherever the shim's ``auto`` engine may pick it (path
  ``torch:fused``, see ``engines.TORCH_KERNELS``), against torch's default kernel.

**The rule.** In float64 a candidate must equal its reference to rounding: :data:`FLOAT64_TOLERANCE`.
In float32, bfloat16 and float16 no fixed threshold can say "equal": rounding fed back through 100
steps of gradients depends on the device's kernels and on how chaotic the configuration is. A
low-precision run is therefore judged against the float64 truth, the same problem (inputs rounded
alike) computed in float64 by the reference: the candidate's error must stay within :data:`FACTOR`
times the reference's own low-precision error, plus a floor of a few ulps of the values
(:func:`tolerance`). Where the candidate's error exceeds that, and where no reference runs in low
precision (DAG, AutoSGM outside its reductions), the float64 run's spread under rounding-sized noise
(:func:`sensitivity`) stands for the reference's error when it is larger. A check whose tolerance
reaches how far the truth moves cannot tell a wrong optimizer and says so (``N/A``). The numbers are
measured over the whole grid (docs/verification.md).

**The problem** is built to exercise what an optimizer can get wrong: several tensors of different
shapes (a 0-dim one included, and one long enough for kernels' vectorized loops), a parameter that
never gets a gradient, two param groups with different learning rates, gradients recomputed from the
current parameters (so an early error feeds back into every later step), and optionally a parameter
whose gradient is ``None`` every third step (torch skips it, and its step count falls behind the
others). The loss is bounded, so ``maximize=True`` climbs it without overflowing.

**The plan** (:func:`plan`) lists the checks ``optorch verify`` runs: by default a representative
subset that answers in about a minute, with ``full=True`` every combination of every grid.
"""

from __future__ import annotations

from .verify_checks import (
    Result,
    available_devices,
    check,
    check_estimated,
    check_kernel,
    check_recorded,
    check_reduction,
)
from .verify_grids import (
    NoGridError,
    cover,
    describe,
    flag_grid,
    grid_algorithms,
    gridded_algorithms,
    label,
    most_flags,
    reduction_algorithms,
)
from .verify_plan import COMPILED_REPRESENTATIVES, EXPECTED_FAILURES, Check, Crash, Plan, cores, plan, run
from .verify_problem import PATHS, paths_for, problem, run_pure, run_shim, run_torch
from .verify_rule import (
    DTYPES,
    FACTOR,
    FLOAT64_COMPILED_REDUCTION_TOLERANCE,
    FLOAT64_TOLERANCE,
    FLOOR_ULPS,
    SPREAD_TO_ERROR,
    max_abs_diff,
    sensitivity,
    tolerance,
    worst,
)

__all__ = [
    "COMPILED_REPRESENTATIVES",
    "DTYPES",
    "EXPECTED_FAILURES",
    "FACTOR",
    "FLOAT64_COMPILED_REDUCTION_TOLERANCE",
    "FLOAT64_TOLERANCE",
    "FLOOR_ULPS",
    "PATHS",
    "SPREAD_TO_ERROR",
    "Check",
    "Crash",
    "NoGridError",
    "Plan",
    "Result",
    "available_devices",
    "check",
    "check_estimated",
    "check_kernel",
    "check_recorded",
    "check_reduction",
    "cores",
    "cover",
    "describe",
    "flag_grid",
    "grid_algorithms",
    "gridded_algorithms",
    "label",
    "max_abs_diff",
    "most_flags",
    "paths_for",
    "plan",
    "problem",
    "reduction_algorithms",
    "run",
    "run_pure",
    "run_shim",
    "run_torch",
    "sensitivity",
    "tolerance",
    "worst",
]
