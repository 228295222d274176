"""optorch equals its references: the checks of ``optorch verify``, judged by the same rule.

The suite runs every check ``optorch verify`` runs by default, so a machine where it passes is one where
``optorch verify`` passes, plus the whole float64 grid on the paths that compile nothing; ``pytest
--full`` runs everything ``optorch verify --full`` runs. The grids, the problem, the rule and the plan
live in :mod:`optorch.verify`; a newly registered algorithm is picked up by itself.
"""

from __future__ import annotations

import math

import pytest
import torch

import optorch
from optorch import adam, autosgm
from optorch.algorithms import registry
from optorch.tools import recorded, verify, verify_checks, verify_problem, verify_rule

EXPECTED_GRIDS = [
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "adopt",
    "asgd",
    "lars",
    "nadam",
    "radam",
    "rmsprop",
    "rprop",
    "sgd",
]
"""Every algorithm verified over a flag grid against a live reference: a reference package missing
(torch-adopt, pytorch_optimizer) must fail the suite, not shrink it."""


def _float64_grid() -> list[verify.Check]:
    return [
        verify.Check(
            "grid",
            name,
            tuple(sorted((k, v) for k, v in config.items() if k != "name")),
            path,
            intermittent=intermittent,
        )
        for name in verify.grid_algorithms()
        for config in verify.flag_grid(name)
        for intermittent in (False, True)
        for path in verify.paths_for(name, ("pure", "torch", "eager"))
    ]


def _param(check: verify.Check):
    marks = [pytest.mark.compile] if check.path == "compiled" else []
    if check.expected_failure:
        marks.append(pytest.mark.xfail(reason=check.expected_failure, strict=True))
    return pytest.param(check, id=check.id, marks=marks)


def pytest_generate_tests(metafunc):
    if "check" in metafunc.fixturenames:
        checks = (
            verify.plan(full=True).checks
            if metafunc.config.getoption("--full")
            else verify.plan().checks + _float64_grid()
        )
        metafunc.parametrize("check", [_param(check) for check in dict.fromkeys(checks)])


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, and one intra-op thread: the problem's tensors are tiny, and torch's fused CPU kernels
    spend milliseconds per call waking a second thread (30-60x slower under ``pytest -n 2``)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_check(check):
    result = check.run()
    assert result.passed or (not result.judged and result.dtype != "float64"), result


@pytest.mark.parametrize("name", verify.grid_algorithms())
def test_every_algorithm_is_judged_in_float32(name):
    """N/A (a reference too far from the truth to judge by) never hides an algorithm from float32: its
    first cover case is judged, and passes."""
    config, intermittent = verify.cover(name)[0]
    result = verify.check(name, config, dtype="float32", engine="eager", intermittent=intermittent)
    assert result.judged and result.passed, result


def test_every_grid_is_verified_and_every_algorithm_planned():
    assert verify.gridded_algorithms() == EXPECTED_GRIDS
    assert verify.grid_algorithms() == EXPECTED_GRIDS, "a reference package is missing: pip install -e '.[dev]'"
    assert recorded.algorithms() == ["adopt", "autosgm", "dag"]
    plan = verify.plan(devices=["cpu"])
    assert {check.algorithm for check in plan.checks} == set(registry.names())
    # nothing skipped but float16 where no reference runs in it (and the compiled engine without a compiler)
    assert all("float16 not checked" in note or "compiled" in note for note in plan.skipped), plan.skipped
    kinds = {(check.algorithm, check.kind) for check in plan.checks}
    assert {name for name, kind in kinds if kind == "estimated"} == {
        "autosgm",
        "dag",
    }  # no live low-precision reference


def test_cover_takes_every_flag_value_with_and_without_missing_grads():
    for name in verify.grid_algorithms():
        cases = verify.cover(name)
        axes = registry.get(name).grid.axes
        for key, values in axes.items():
            assert {config[key] for config, _ in cases} == set(values), (name, key)
        assert {intermittent for _, intermittent in cases} == {False, True}
        first, intermittent = cases[0]  # the grid's first combination, every gradient present
        assert first == verify.flag_grid(name)[0] and not intermittent, name


def test_the_default_plan_checks_every_path_and_dtype():
    plan = verify.plan(devices=["cpu"])
    for name in verify.grid_algorithms():
        mine = [check for check in plan.checks if check.algorithm == name and check.kind == "grid"]
        assert {check.dtype for check in mine} == set(verify.DTYPES), name
        assert {check.path for check in mine} >= {"pure", "eager"}, name
    compiled = {check.algorithm for check in plan.checks if check.path == "compiled"}
    assert compiled == set(verify.COMPILED_REPRESENTATIVES) or not optorch.shim.engines.compiler_available()
    assert {check.algorithm for check in plan.checks if check.default_dtype == "float64"} == set(
        verify.grid_algorithms()
    ) | {"adopt", "dag"}


def test_gradients_are_the_losss():
    params, x, y = verify.problem(torch.float64)
    params = {name: p + 0.1 * torch.randn_like(p) for name, p in params.items()}
    live = {name: p.clone().requires_grad_(name in verify_problem.TRAINABLE) for name, p in params.items()}
    expected = torch.autograd.grad(verify_problem._loss(live, x, y), [live[name] for name in verify_problem.TRAINABLE])
    grads = verify_problem._gradients(params, x, y, step=0, intermittent=False)
    for name, want in zip(verify_problem.TRAINABLE, expected):
        torch.testing.assert_close(grads[name], want, rtol=1e-13, atol=1e-15)
    assert grads["frozen"] is None and verify_problem._gradients(params, x, y, step=2, intermittent=True)["b1"] is None


@pytest.mark.parametrize("name", verify.grid_algorithms())
def test_the_problem_can_tell_a_wrong_optimizer(name):
    """Non-vacuous: every trainable parameter moves, the frozen one does not, and a 1e-4 relative change
    of lr moves the trajectory by more than 1e7 times the float64 tolerance."""
    config = verify.most_flags(name)
    kwargs = dict(steps=100, dtype=torch.float64, device="cpu")
    trajectory = verify.run_torch(name, config, **kwargs)
    initial, _, _ = verify.problem(torch.float64, "cpu")
    for param in verify_problem.TRAINABLE:
        assert (trajectory[-1][param] - initial[param]).abs().max() > 1e-2, param
    assert torch.equal(trajectory[-1]["frozen"], initial["frozen"])
    perturbed = verify.run_torch(name, {**config, "lr": config["lr"] * (1 + 1e-4)}, **kwargs)
    assert verify.max_abs_diff(trajectory, perturbed) > 1e7 * verify.FLOAT64_TOLERANCE


def test_grid_covers_every_flag_combination():
    sizes = {name: len(verify.flag_grid(name)) for name in ("sgd", "adam", "adamw", "rmsprop", "adagrad")}
    # sgd: 32 combinations, less the 12 with nesterov but no plain momentum, which the Config rejects.
    assert sizes == {"sgd": 20, "adam": 16, "adamw": 8, "rmsprop": 16, "adagrad": 16}


def test_an_algorithm_without_a_torch_counterpart_has_no_grid(monkeypatch):
    fake = optorch.Algorithm("fake", optorch.sgd.Config, optorch.sgd.init_leaf, optorch.sgd.update)
    monkeypatch.setitem(registry.ALGORITHMS, "fake", fake)
    assert "fake" not in verify.grid_algorithms()
    with pytest.raises(verify.NoGridError, match="fake has no reference implementation"):
        verify.flag_grid("fake")


# ------------------------------------------------------------------------------------------------
# the comparison and the rule


def test_max_abs_diff_sees_nan_and_mismatches():
    a = [{"w": torch.tensor([1.0, 2.0]), "s": torch.tensor(3.0)}]
    assert verify.max_abs_diff(a, [{"s": torch.tensor(3.5), "w": torch.tensor([1.0, 2.0])}]) == 0.5  # matched by key
    nan_late = [{"w": torch.tensor([1.0, math.nan]), "s": torch.tensor(3.0)}]
    assert verify.max_abs_diff(a, nan_late) == math.inf
    assert verify.max_abs_diff(a, a + a) == math.inf  # a step more
    assert verify.max_abs_diff(a, [{"w": torch.tensor([1.0]), "s": torch.tensor(3.0)}]) == math.inf  # a shape
    assert verify.worst([0.1, math.nan, 0.3]) == math.inf and max([0.1, math.nan, 0.3]) == 0.3  # what max() would say


def test_a_reference_that_fails_in_low_precision_judges_nothing():
    """torch's float16 Adam with a second moment that underflows is no approximation to the truth: the
    check says N/A, never PASS, however close optorch comes to it."""
    result = verify.Result(
        "adam",
        "-",
        100,
        "float16",
        "cpu",
        "shim:eager",
        80.0,
        80.0,
        verify.tolerance(torch.float16, 80.0),
        movement=1.0,
    )
    assert result.verdict == "N/A" and not result.passed and result.ok
    nan = verify.Result(
        "adam",
        "-",
        100,
        "float16",
        "cpu",
        "shim:eager",
        math.inf,
        math.inf,
        verify.tolerance(torch.float16, math.inf),
        movement=1.0,
    )
    assert nan.verdict == "N/A"
    broken = verify.Result(
        "adam",
        "-",
        100,
        "float32",
        "cpu",
        "shim:eager",
        math.inf,
        1e-7,
        verify.tolerance(torch.float32, 1e-7),
        movement=1.0,
    )
    assert broken.verdict == "FAIL" and not broken.ok


def _with_float32_bug(algorithm: optorch.Algorithm, update) -> optorch.Algorithm:
    return optorch.Algorithm(
        algorithm.name,
        algorithm.config,
        algorithm.init_leaf,
        update,
        algorithm.torch_optimizer,
        grid=algorithm.grid,
        elementwise=algorithm.elementwise,
        shared=algorithm.shared,
    )


def _half_in_float32(value: torch.Tensor) -> torch.Tensor:
    """The bug: a float32 computation that drops to float16 on the way (float64 runs are untouched)."""
    return value.to(torch.float16).to(value.dtype) if value.dtype == torch.float32 else value


def test_a_float32_bug_in_a_bias_correction_is_caught(monkeypatch):
    """A copy of Adam's update whose bias correction of the second moment is rounded to float16 in
    float32 runs: a mistake only low precision shows, caught against torch.optim.Adam by the float32
    rule on both paths and in every case, while the unchanged Adam passes the same checks."""

    def update(param, grad, state, config):
        lr, (beta1, beta2), wd = config.lr, config.betas, config.weight_decay
        g = -grad if config.maximize else grad
        step = state["step"] + 1
        param, g = optorch.core.ops.weight_decay(
            param, g, wd, config.decay_rate() if config.decoupled_weight_decay else None
        )
        exp_avg = optorch.core.ops.lerp(state["exp_avg"], g, 1 - beta1)
        exp_avg_sq = optorch.core.ops.addcmul(state["exp_avg_sq"] * beta2, g, g, 1 - beta2)
        new_state = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        if config.amsgrad:
            exp_avg_sq = new_state["max_exp_avg_sq"] = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq)
        t = optorch.core.ops.step_count(step, param)
        step_size = lr / (1 - beta1**t)
        bias_correction2_sqrt = _half_in_float32(torch.tensor((1 - beta2**t) ** 0.5, dtype=param.dtype))  # the bug
        denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + config.eps
        return optorch.core.ops.addcdiv(param, exp_avg, denom, -step_size), new_state

    verify_problem._cached.cache_clear()
    cases = verify.cover("adam")
    for config, intermittent in cases:
        assert verify.check("adam", config, dtype="float32", engine="eager", intermittent=intermittent).passed
    monkeypatch.setitem(registry.ALGORITHMS, "adam", _with_float32_bug(adam.algorithm, update))
    for config, intermittent in cases:
        assert verify.check(
            "adam", config, dtype="float64", engine="eager", intermittent=intermittent
        ).passed  # float64 is untouched
        for engine in ("pure", "eager"):
            result = verify.check("adam", config, dtype="float32", engine=engine, intermittent=intermittent)
            assert result.verdict == "FAIL" and result.error > 2 * result.tolerance, result
    verify_problem._cached.cache_clear()


def test_a_float32_bug_in_a_step_is_caught_without_a_live_reference(monkeypatch):
    """The same where no reference runs in low precision and the allowance comes from the float64 run's
    spread under rounding noise: a copy of AutoSGM whose step is rounded to bfloat16 in float32 runs
    fails every estimated check, while AutoSGM itself passes them. (DAG's float32 noise on this problem
    is as large as 13% of how far it moves, its saturation counts flipping: there the same bug shows in
    the calm configurations only.)"""

    def update(param, grad, state, config):
        new_param, new_state = autosgm.update(param, grad, state, config)
        step = new_param - param
        return param + (step.to(torch.bfloat16).to(step.dtype) if step.dtype == torch.float32 else step), new_state

    verify_problem._cached.cache_clear()
    cases = [c["id"] for c in recorded.cases("autosgm")][:4]
    for case_id in cases:
        assert verify.check_estimated("autosgm", case_id, dtype="float32", engine="eager", intermittent=True).passed
    monkeypatch.setitem(registry.ALGORITHMS, "autosgm", _with_float32_bug(autosgm.algorithm, update))
    for case_id in cases:
        result = verify.check_estimated("autosgm", case_id, dtype="float32", engine="eager", intermittent=True)
        assert result.verdict == "FAIL" and result.error > 5 * result.tolerance, result
    verify_problem._cached.cache_clear()


@pytest.mark.skipif(not torch.__version__.startswith("2.13"), reason="measured on torch 2.13's CPU kernels")
def test_the_rule_catches_torch_2_13s_fused_sgd_in_bfloat16():
    """A genuine kernel bug, in the wild: torch 2.13's fused CPU SGD in bfloat16 (hence its absence from
    engines.TORCH_KERNELS). Its vectorized loop only: verify's problem has tensors long enough to run it."""
    config = {"name": "sgd", "lr": 0.05, "momentum": 0.9}
    results = [verify.check_kernel("sgd", config, dtype="bfloat16", intermittent=i) for i in (False, True)]
    assert all(result.verdict == "FAIL" for result in results), results


CHAOTIC = {"lr": 0.1, "eps": (1e-3, 0.1), "beta2_decay": -0.8, "d": 1.0, "weight_decay": 0.1}
"""An Adafactor config of the grid whose float64 trajectory on verify's problem is chaotic: torch's own
run moves by ~1 when every step's params take half an ulp of float64 noise."""
CALM = {"lr": 0.1, "eps": (None, 1e-3), "beta2_decay": -0.8, "d": 1.2}


def _judged_in_float64(config, candidate_config, nudge=None):
    """A candidate that rounds otherwise (the reference with float64 noise of seed ``nudge``), judged as
    the compiled engine on an algorithm that reduces is judged."""
    setting = verify_problem.Setting(steps=100)
    reference = verify_checks._GridReference("adafactor", tuple(sorted(config.items())))
    candidate = lambda s: verify_problem.run_reference(
        "adafactor", candidate_config, s._replace(nudge=nudge, inputs=torch.float64 if nudge is not None else None)
    )
    return verify_rule.judge(
        candidate, reference, setting, float64_tolerance=verify.FLOAT64_COMPILED_REDUCTION_TOLERANCE
    )


def test_float64_rounding_grown_by_a_chaotic_configuration_is_not_judged_and_a_real_difference_still_fails():
    chaotic = _judged_in_float64(CHAOTIC, CHAOTIC, nudge=99)
    assert (
        chaotic.error > 0.1 and chaotic.basis == "sensitivity" and chaotic.tolerance >= chaotic.movement
    )  # N/A: noise moves it as far as training
    calm = _judged_in_float64(CALM, CALM, nudge=99)
    assert calm.error <= calm.tolerance == verify.FLOAT64_COMPILED_REDUCTION_TOLERANCE  # its rounding stays rounding
    wrong = _judged_in_float64(CALM, {**CALM, "lr": 0.1 * (1 + 1e-6)})
    assert wrong.error > wrong.tolerance == verify.FLOAT64_COMPILED_REDUCTION_TOLERANCE  # a 1e-6 change of lr: caught
