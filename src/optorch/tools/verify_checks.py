"""One check of one algorithm and config against its reference: a flag combination, torch's fused
kernel, a reduction, a recording, an estimate in low precision."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..algorithms import registry
from ..builder import build
from . import recorded
from .verify_grids import label
from .verify_problem import Setting, Trajectory, path_runner, pure_one_group, run_reference, train_one_group
from .verify_rule import FLOAT64_COMPILED_REDUCTION_TOLERANCE, FLOAT64_TOLERANCE, Judgement, judge, max_abs_diff


@dataclass(frozen=True)
class Result:
    algorithm: str
    flags: str
    steps: int
    dtype: str
    device: str
    path: str
    """``"pure"``, ``"shim:<engine>"`` or ``"torch:fused"``."""
    error: float
    """float64: the largest |candidate - reference|; lower precisions: |candidate - float64 truth|."""
    reference_error: float | None
    """Lower precisions: the reference's own |reference - float64 truth| (``basis`` says whether it was
    measured or estimated); None in float64."""
    tolerance: float
    movement: float | None = None
    """Lower precisions: how far the float64 truth moves from the initial params (the error of an
    optimizer that does nothing)."""
    basis: str = "reference"
    """``"reference"`` (torch.optim or an independent implementation, run live), ``"recording"`` (the
    original's recorded trajectory) or ``"sensitivity"`` (the reference error estimated)."""
    expected_failure: str | None = None
    """Why this check is known to fail (an issue), if it is."""

    @property
    def judged(self) -> bool:
        """Whether the check can tell a wrong optimizer: in low precision, only where the reference's
        own run approximates the truth closely enough that the tolerance stays below the movement
        (float16 Adam, whose second moment underflows, does not)."""
        return self.movement is None or self.tolerance < self.movement

    @property
    def passed(self) -> bool:
        return self.judged and self.error <= self.tolerance

    @property
    def verdict(self) -> str:
        if not self.judged:
            return "N/A"
        if self.expected_failure:
            return "XPASS" if self.passed else "XFAIL"
        return "PASS" if self.passed else "FAIL"

    @property
    def ok(self) -> bool:
        """Not a failure: passed, failed as expected, or not judged."""
        return self.verdict != "FAIL"


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``"float32"`` or ``torch.float32`` as ``torch.float32``."""
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` as ``"float32"``, as the results show it."""
    return str(dtype).removeprefix("torch.")


def path_label(engine: str) -> str:
    """A candidate's path as the results show it: ``pure`` or ``shim:<engine>``."""
    return "pure" if engine == "pure" else f"shim:{engine}"


def check(
    name: str,
    config: dict[str, Any],
    *,
    steps: int = 100,
    dtype: torch.dtype | str = torch.float64,
    device: str = "cpu",
    engine: str = "pure",
    intermittent: bool = False,
) -> Result:
    """Run ``name`` with ``config`` against its reference and judge it by the rule.

    ``engine`` is ``"pure"`` for the pure stepper or a shim engine (``"torch"``, ``"eager"``,
    ``"compiled"``, ``"auto"``). ``intermittent=True`` drops ``b1``'s gradient every third step.
    """
    algorithm = registry.get(name)
    config = {k: v for k, v in config.items() if k != "name"}
    items = tuple(sorted(config.items()))
    setting = Setting(steps, as_dtype(dtype), device, intermittent)
    limit = _float64_limit(algorithm, engine, config)
    run = path_runner(algorithm.name, engine)
    judgement = judge(lambda s: run(config, s), _GridReference(algorithm.name, items), setting, float64_tolerance=limit)
    return _result(
        algorithm.name, label({"name": algorithm.name, **config}, intermittent), setting, path_label(engine), judgement
    )


def _result(name: str, flags: str, setting: Setting, path: str, judgement: Judgement) -> Result:
    return Result(name, flags, setting.steps, dtype_name(setting.dtype), setting.device, path, *judgement)


def _one_group_candidate(name: str, config: dict[str, Any], engine: str) -> Callable[[Setting], Trajectory]:
    """The pure stepper or the shim's ``engine`` on all trainable params as one param group."""
    if engine == "pure":
        return functools.partial(pure_one_group, name, config)
    return functools.partial(train_one_group, lambda ps: build({"name": name, **config}, ps, engine=engine), None)


def _float64_limit(algorithm, engine: str, config: dict[str, Any]) -> float:
    """The float64 tolerance of a path: Inductor's reductions sum in another order (see the docs)."""
    reduces = not algorithm.is_elementwise(algorithm.as_config(config))
    return FLOAT64_COMPILED_REDUCTION_TOLERANCE if engine == "compiled" and reduces else FLOAT64_TOLERANCE


class _GridReference(NamedTuple):
    """The reference of a grid case as a hashable callable (the cache's key)."""

    name: str
    config: tuple

    def __call__(self, setting: Setting) -> Trajectory:
        return run_reference(self.name, dict(self.config), setting)


def check_kernel(
    name: str,
    config: dict[str, Any],
    *,
    steps: int = 100,
    dtype: torch.dtype | str = torch.float64,
    device: str = "cpu",
    intermittent: bool = False,
) -> Result:
    """torch's fused kernel against torch's default one, where ``engines.TORCH_KERNELS`` lets the shim's
    ``auto`` engine pick it: the list's claim, checked on this device."""
    config = {k: v for k, v in config.items() if k != "name"}
    setting = Setting(steps, as_dtype(dtype), device, intermittent)
    judgement = judge(
        lambda s: run_reference(name, config, s, fused=True),
        _GridReference(name, tuple(sorted(config.items()))),
        setting,
    )
    return _result(name, label({"name": name, **config}, intermittent), setting, "torch:fused", judgement)


class _ReductionReference(NamedTuple):
    name: str
    label: str

    def __call__(self, setting: Setting) -> Trajectory:
        reduction = find_reduction(self.name, self.label)
        torch_class = getattr(torch.optim, reduction.optimizer)
        return train_one_group(lambda params: torch_class(params, **reduction.kwargs), reduction.scheduler, setting)


def find_reduction(name: str, label: str):
    """The reduction ``label`` of algorithm ``name`` (an error lists its reductions when there is none)."""
    algorithm = registry.get(name)
    found = [r for r in algorithm.reductions if r.label == label]
    if not found:
        raise ValueError(
            f"{name} has no reduction {label!r}; it has {', '.join(r.label for r in algorithm.reductions) or 'none'}"
        )
    return found[0]


def check_reduction(
    name: str,
    label: str,
    *,
    steps: int = 100,
    dtype: torch.dtype | str = torch.float64,
    device: str = "cpu",
    engine: str = "pure",
) -> Result:
    """Run the reduction ``label`` of algorithm ``name`` (a config of it that equals a torch.optim
    optimizer and scheduler) against that torch.optim optimizer, all trainable params in one group."""
    algorithm = registry.get(name)
    reduction = find_reduction(algorithm.name, label)
    setting = Setting(steps, as_dtype(dtype), device)
    candidate = _one_group_candidate(algorithm.name, dict(reduction.config), engine)
    limit = _float64_limit(algorithm, engine, reduction.config)
    judgement = judge(candidate, _ReductionReference(algorithm.name, label), setting, float64_tolerance=limit)
    return _result(algorithm.name, f"= {reduction.optimizer}: {label}", setting, path_label(engine), judgement)


def check_recorded(name: str, case_id: str, *, engine: str = "pure") -> Result:
    """Replay the recorded case ``case_id`` of the original ``name`` (float64, on the CPU, as recorded)
    and compare with the recording optorch reproduces (``recorded.expected``), emulating the original's
    documented first-step nudge (:data:`recorded.NUDGED`)."""
    algorithm = registry.get(name)
    case = recorded.case(algorithm.name, case_id)
    error = max_abs_diff(
        recorded.replay(algorithm.name, case, engine),
        recorded.expected(algorithm.name, case, torch.get_default_dtype()),
    )
    limit = _float64_limit(algorithm, engine, _recorded_config(algorithm.name, case_id))
    return Result(
        algorithm.name,
        f"recorded: {case_id}",
        case["steps"],
        "float64",
        "cpu",
        path_label(engine),
        error,
        None,
        limit,
        basis="recording",
    )


class _PureReference(NamedTuple):
    """The pure stepper with a recorded case's config: the float64 truth of an algorithm that has no
    low-precision reference (the pure stepper is itself verified against the original's recording)."""

    name: str
    case_id: str

    def __call__(self, setting: Setting) -> Trajectory:
        return pure_one_group(self.name, _recorded_config(self.name, self.case_id), setting)


def _recorded_config(name: str, case_id: str) -> dict[str, Any]:
    return {k: v for k, v in recorded.config(recorded.case(name, case_id)).items() if k != "name"}


def check_estimated(
    name: str,
    case_id: str,
    *,
    steps: int = 100,
    dtype: torch.dtype | str = torch.float32,
    device: str = "cpu",
    engine: str = "pure",
    intermittent: bool = False,
) -> Result:
    """A low-precision check of an algorithm without a live reference (DAG, AutoSGM): the config of its
    recorded case ``case_id`` on verify's problem, all params in one group (DAG's state is shared by
    all of them), judged against its own float64 run (the pure stepper, verified against the
    recording), whose spread under rounding noise (:func:`sensitivity`) stands for the reference's
    error."""
    algorithm = registry.get(name)
    config = _recorded_config(algorithm.name, case_id)
    setting = Setting(steps, as_dtype(dtype), device, intermittent)
    if setting.dtype == torch.float64:
        raise ValueError("check_estimated judges low precision; in float64, check_recorded compares with the recording")
    candidate = _one_group_candidate(algorithm.name, config, engine)
    judgement = judge(candidate, _PureReference(algorithm.name, case_id), setting, live=False)
    flags = f"recorded: {case_id}{' +none-grads' if intermittent else ''}"
    return _result(algorithm.name, flags, setting, path_label(engine), judgement)


def available_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
