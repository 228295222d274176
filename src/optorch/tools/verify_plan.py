"""What ``optorch verify`` runs (:func:`plan`: the representative subset or the full matrix) and
running it, in parallel processes where asked."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..algorithms import registry
from ..shim import engines
from . import recorded, verify_checks
from .references import REFERENCES, reference_optimizer
from .verify_checks import (
    Result,
    as_dtype,
    available_devices,
    check_estimated,
    check_kernel,
    check_recorded,
    check_reduction,
    dtype_name,
    find_reduction,
    path_label,
)
from .verify_grids import cover, flag_grid, label, most_flags
from .verify_problem import PATHS, paths_for
from .verify_rule import DTYPES

COMPILED_REPRESENTATIVES = {"adam": ("float32", "bfloat16"), "lars": ("float16",), "dag": ("float64",)}
"""The compiled engine's checks by default, one case each in these dtypes (each compiles from an empty
cache on a fresh machine, seconds apiece; ``full=True`` compiles everything): an element-wise algorithm
(its small params gathered into one scratch buffer), one that reduces over each tensor (stepped per
shape run), and one with state shared by all params (its recorded trajectories)."""

DEFAULT_FLOAT64 = "default float64"

EXPECTED_FAILURES: dict[tuple[str, str], str] = {}
"""Checks known to fail, by ``(algorithm, condition)``, with the issue that fixes them: reported as
XFAIL (not a failure) while they fail, XPASS once they pass (then remove the entry)."""


@dataclass(frozen=True)
class Check:
    """One check of the plan, ready to run: what it compares, under which conditions."""

    kind: str
    """``"grid"`` (a flag combination against the live reference), ``"kernel"`` (torch's fused kernel
    against its default one), ``"reduction"``, ``"recorded"`` (float64, against the original's recording)
    or ``"estimated"`` (low precision, no live reference: a recorded case's config on verify's problem)."""
    algorithm: str
    case: Any
    """The config's items (grid, kernel), the reduction's label, or the recorded case's id."""
    path: str = "pure"
    dtype: str = "float64"
    device: str = "cpu"
    steps: int = 100
    intermittent: bool = False
    default_dtype: str = "float32"
    """torch's default dtype while the check runs (``set_default_dtype``)."""

    @property
    def expected_failure(self) -> str | None:
        if self.default_dtype != "float64" or self.path == "torch":  # torch's engine runs torch's own code
            return None
        return EXPECTED_FAILURES.get((self.algorithm, DEFAULT_FLOAT64))

    @property
    def flags(self) -> str:
        if self.kind in ("grid", "kernel"):
            flags = label({"name": self.algorithm, **dict(self.case)}, self.intermittent)
        elif self.kind == "reduction":
            flags = f"= {find_reduction(self.algorithm, self.case).optimizer}: {self.case}"
        else:
            flags = f"recorded: {self.case}" + (" +none-grads" if self.intermittent else "")
        return flags + (f" ({DEFAULT_FLOAT64})" if self.default_dtype == "float64" else "")

    @property
    def shown_path(self) -> str:
        return "torch:fused" if self.kind == "kernel" else path_label(self.path)

    @property
    def id(self) -> str:
        return f"{self.algorithm}[{self.flags}]-{self.shown_path}-{self.dtype}-{self.device}".replace(" ", "")

    def run(self) -> Result:
        with _default_dtype(as_dtype(self.default_dtype)):
            result = self._run()
        return dataclasses.replace(result, flags=self.flags, expected_failure=self.expected_failure)

    def _run(self) -> Result:
        common = dict(steps=self.steps, dtype=self.dtype, device=self.device)
        if self.kind == "grid":
            return verify_checks.check(
                self.algorithm, dict(self.case), engine=self.path, intermittent=self.intermittent, **common
            )
        if self.kind == "kernel":
            return check_kernel(self.algorithm, dict(self.case), intermittent=self.intermittent, **common)
        if self.kind == "reduction":
            return check_reduction(self.algorithm, self.case, engine=self.path, **common)
        if self.kind == "recorded":
            return check_recorded(self.algorithm, self.case, engine=self.path)
        return check_estimated(self.algorithm, self.case, engine=self.path, intermittent=self.intermittent, **common)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@dataclass(frozen=True)
class Plan:
    checks: list[Check]
    skipped: list[str]
    """What this machine cannot check, and why (no compiler, no CUDA, a reference package missing)."""
    subset: list[str]
    """What the default subset leaves to ``full=True``."""


LOW_PRECISION_PATHS = ("eager", "compiled")
"""By default, bfloat16 and float16 run on the engines the shim's ``auto`` picks for them (torch's
kernel is on ``TORCH_KERNELS`` for float32/float64 only); ``full=True`` adds the pure stepper, whose
math is the eager engine's."""


def plan(
    *,
    full: bool = False,
    algorithms: Iterable[str] | None = None,
    dtypes: Iterable[str] = DTYPES,
    devices: Iterable[str] | None = None,
    paths: Iterable[str] = PATHS,
    steps: int = 100,
) -> Plan:
    """The checks ``optorch verify`` runs on this machine, and what it skips and why.

    By default a representative subset: every algorithm, its flag combinations chosen so that every flag
    takes each of its values (:func:`cover`), every dtype, every engine, the compiled one on
    :data:`COMPILED_REPRESENTATIVES`; ``full=True`` checks every combination on every path. Also one
    run per algorithm with float64 as torch's default dtype (its scalar dtypes follow it).
    """
    names = [registry.get(name).name for name in algorithms] if algorithms is not None else registry.names()
    dtypes, paths = [dtype_name(as_dtype(d)) for d in dtypes], list(paths)
    skipped, subset = [], []
    if devices is None:
        devices = available_devices()
        if "cuda" not in devices:
            skipped.append("device cuda: no CUDA device here")
    if "compiled" in paths and not engines.compiler_available():
        paths.remove("compiled")
        skipped.append("engine compiled: torch.compile finds no C++ compiler here (Inductor needs one)")
    if not full:
        subset.append(
            "flag combinations: a cover in which every flag takes each of its values (full: every combination)"
        )
        if "compiled" in paths:
            shown = "; ".join(f"{name} {', '.join(dtypes)}" for name, dtypes in COMPILED_REPRESENTATIVES.items())
            subset.append(f"engine compiled: one case of {shown} (full: every case)")
        subset.append(f"bfloat16 and float16: engines {' and '.join(LOW_PRECISION_PATHS)} (full: the pure stepper too)")
        subset.append(
            "reductions: float64 and float32 (full: all four dtypes); DAG and AutoSGM below float64: one recorded "
            "config (full: all)"
        )
    checks = []
    for name in names:
        found = _plan_algorithm(name, full, dtypes, list(devices), paths, steps, checks)
        if found:
            skipped.append(f"{name}: {found}")
    return Plan(checks, skipped, subset)


def _plan_algorithm(
    name: str, full: bool, dtypes: list[str], devices: list[str], paths: list[str], steps: int, checks: list[Check]
) -> str | None:
    """Append ``name``'s checks; returns why something of it cannot be checked here, if so."""
    algorithm = registry.get(name)
    compiled_dtypes = COMPILED_REPRESENTATIVES.get(name, ())

    def on(kind: str, cases: list[tuple[Any, bool]], dtype_list: list[str], path_list: list[str]) -> None:
        for device, (index, (case, intermittent)), dtype, path in itertools.product(
            devices, enumerate(cases), dtype_list, path_list
        ):
            if path == "compiled" and not full and (index > 0 or dtype not in compiled_dtypes):
                continue
            if dtype in ("bfloat16", "float16") and (path == "torch" or not full and path not in LOW_PRECISION_PATHS):
                continue  # torch's engine runs torch's own default kernel below float32: the reference itself
            checks.append(Check(kind, name, case, path, dtype, device, steps, intermittent))

    missing = None
    if algorithm.grid is not None and reference_optimizer(algorithm) is None:
        package = REFERENCES[name].package if name in REFERENCES else "its reference package"
        missing = f"reference not installed (pip install {package}): its grid is not checked"
    elif algorithm.grid is not None:
        cases = [
            (tuple(sorted((k, v) for k, v in config.items() if k != "name")), intermittent)
            for config, intermittent in (
                [(c, i) for c in flag_grid(name) for i in (False, True)] if full else cover(name)
            )
        ]
        on("grid", cases, dtypes, paths_for(name, paths))
        for device in devices:
            kernel_dtypes = [
                d for d in dtypes if as_dtype(d) in engines.TORCH_KERNELS.get((name, torch.device(device).type), ())
            ]
            for (case, intermittent), dtype in itertools.product(cases if full else cases[:1], kernel_dtypes):
                checks.append(Check("kernel", name, case, "fused", dtype, device, steps, intermittent))
        if "float64" in dtypes:
            most = tuple(sorted((k, v) for k, v in most_flags(name).items() if k != "name"))
            for path in paths_for(name, [p for p in paths if p != "compiled"]):
                checks.append(Check("grid", name, most, path, "float64", "cpu", steps, True, default_dtype="float64"))
    reductions = [(r.label, False) for r in algorithm.reductions]
    on(
        "reduction",
        reductions,
        [d for d in dtypes if full or d in ("float64", "float32")],
        [p for p in paths if p != "torch"],
    )
    if name in recorded.algorithms():
        cases = [c["id"] for c in recorded.cases(name)]
        if "float64" in dtypes and "cpu" in devices:  # recorded in float64 on the CPU
            compiled = paths if full or "float64" in compiled_dtypes else [p for p in paths if p != "compiled"]
            for case_id, path in itertools.product(cases, [p for p in compiled if p != "torch"]):
                if path != "compiled" or full or case_id == cases[0]:
                    checks.append(Check("recorded", name, case_id, path))
            if name not in recorded.FLOAT64_SCALARS:
                checks += [
                    Check("recorded", name, case_id, "pure", default_dtype="float64")
                    for case_id in cases
                    if "pure" in paths
                ]
        if algorithm.grid is None:  # no live reference in low precision: judged against its own float64 run
            estimated = [(c, i) for c in cases for i in (False, True)] if full else [(cases[0], True)]
            on(
                "estimated",
                estimated,
                [d for d in dtypes if d in ("float32", "bfloat16")],
                [p for p in paths if p != "torch"],
            )
            if "float16" in dtypes:
                missing = (
                    "float16 not checked: with no reference run in float16, nothing tells its range limits from a "
                    "mistake (torch's own float16 Adam overflows as its second moment underflows)"
                )
    return missing


# ------------------------------------------------------------------------------------------------
# running a plan


COMPILED_PER_TASK = 16


@dataclass(frozen=True)
class Crash:
    """A check that raised instead of returning a result (a failed check)."""

    error: str


def run(checks: list[Check], jobs: int = 1) -> Iterator[tuple[Check, Result | Crash]]:
    """Run ``checks``, yielding each with its result as it completes. With ``jobs`` > 1 they run in that
    many processes (checks of tiny tensors use one core each): the compiled engine's checks in runs of
    :data:`COMPILED_PER_TASK` (the default plan's few in one process, which alone pays Inductor's
    start-up), every other case whole, so that its references are computed once."""
    if jobs <= 1 or len(checks) < 2:
        yield from ((check, _outcome(check)) for check in checks)
        return
    import concurrent.futures
    import multiprocessing

    compiled = [check for check in checks if check.path == "compiled"]
    tasks = [compiled[i : i + COMPILED_PER_TASK] for i in range(0, len(compiled), COMPILED_PER_TASK)]
    for check in checks:
        if check.path != "compiled":
            if tasks and tasks[-1][-1].path != "compiled" and _case_key(tasks[-1][-1]) == _case_key(check):
                tasks[-1].append(check)
            else:
                tasks.append([check])
    # spawned workers: a forked copy of a process that has run torch may hold its thread pools' locks
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_one_thread) as pool:
        futures = {pool.submit(_outcomes, task): task for task in tasks if task}
        for future in concurrent.futures.as_completed(futures):
            yield from zip(futures[future], future.result())


def cores() -> int:
    """The CPU cores this process may use: how many processes ``run`` uses by default."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _one_thread() -> None:
    torch.set_num_threads(1)  # tiny tensors: a second intra-op thread only costs time


def _case_key(check: Check) -> tuple:
    return (check.kind, check.algorithm, check.case, check.intermittent, check.device, check.default_dtype)


def _outcomes(checks: list[Check]) -> list[Result | Crash]:
    return [_outcome(check) for check in checks]


def _outcome(check: Check) -> Result | Crash:
    try:
        return check.run()
    except Exception as error:  # a check that crashes is a failed check: reported, and the run goes on
        return Crash(f"{type(error).__name__}: {error}")
