"""Schedules: equal to torch.optim.lr_scheduler over 300 steps, the tensor path equal to the number
path, one compiled graph for every step, configs validated, the original optorch's bugs fixed.

Tolerances are in float64 ulps of the larger value, and come from measurements (torch 2.13, CPU):
- against torch's closed forms (``_get_closed_form_lr``, and the get_lr of OneCycleLR and
  CosineAnnealingWarmRestarts, which are closed forms): bit-exact with base lr 1; with base lr 0.05,
  LinearLR is 2 ulps off (torch multiplies base_lr by the factor last, optorch's ``init_value`` is the
  product), the others bit-exact: ``CLOSED_ULPS = 2``;
- against the lr torch's schedulers leave in ``param_group["lr"]`` (recursive, chainable get_lr for
  LinearLR, CosineAnnealingLR, ExponentialLR, PolynomialLR, SequentialLR): at most 19 ulps over 300
  steps, drift of the recursion: ``RECURSIVE_ULPS = 24``;
- tensor path against number path: at most 2 ulps (torch.cos and torch.pow against libm's):
  ``TENSOR_ULPS = 2``.
"""

from __future__ import annotations

import math
import warnings

import pydantic
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.optim import lr_scheduler as L

from optorch import schedules as S
from optorch.tools import verify

STEPS = 300
CLOSED_ULPS = 2
RECURSIVE_ULPS = 24
TENSOR_ULPS = 2


def _ulps(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / math.ulp(max(abs(a), abs(b)))


def _max_ulps(xs, ys) -> float:
    assert len(xs) == len(ys)
    return verify.worst(_ulps(float(x), float(y)) for x, y in zip(xs, ys))


def _drive(make_scheduler, lr: float, steps: int = STEPS):
    """The lr torch's scheduler sets at each step, and its closed form where it has one."""
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=lr, momentum=0.9)  # momentum: OneCycleLR cycles it
    scheduler = make_scheduler(optimizer)
    lrs, closed = [], []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        if hasattr(scheduler, "_get_closed_form_lr"):
            closed.append(scheduler._get_closed_form_lr()[0])
        optimizer.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SequentialLR's deprecation warnings
            scheduler.step()
    return lrs, closed or None


def _torch_cases(lr: float):
    """(id, torch scheduler factory, the same schedule in optorch, lr is a closed form in torch)."""
    return [
        (
            "linear",
            lambda o: L.LinearLR(o, start_factor=0.25, end_factor=0.75, total_iters=200),
            S.Linear(init_value=lr * 0.25, end_value=lr * 0.75, transition_steps=200),
            False,
        ),
        (
            "cosine",
            lambda o: L.CosineAnnealingLR(o, T_max=STEPS, eta_min=lr * 0.01),
            S.Cosine(init_value=lr, decay_steps=STEPS, end_value=lr * 0.01),
            False,
        ),
        ("exponential", lambda o: L.ExponentialLR(o, gamma=0.98), S.Exponential(init_value=lr, decay_rate=0.98), False),
        (
            "polynomial-2",
            lambda o: L.PolynomialLR(o, total_iters=250, power=2.0),
            S.Polynomial(init_value=lr, transition_steps=250, power=2.0),
            False,
        ),
        (
            "polynomial-1.5",
            lambda o: L.PolynomialLR(o, total_iters=250, power=1.5),
            S.Polynomial(init_value=lr, transition_steps=250, power=1.5),
            False,
        ),
        ("step", lambda o: L.StepLR(o, step_size=40, gamma=0.1), S.Step(init_value=lr, step_size=40, gamma=0.1), False),
        (
            "exponential-staircase",
            lambda o: L.StepLR(o, step_size=40, gamma=0.5),
            S.Exponential(init_value=lr, decay_rate=0.5, transition_steps=40, staircase=True),
            False,
        ),
        (
            "multistep",
            lambda o: L.MultiStepLR(o, milestones=[30, 80, 80, 200], gamma=0.3),
            S.MultiStep(init_value=lr, milestones=[200, 30, 80, 80], gamma=0.3),
            False,
        ),
        (
            "warm-restarts",
            lambda o: L.CosineAnnealingWarmRestarts(o, T_0=37, eta_min=lr * 0.1),
            S.CosineWarmRestarts(init_value=lr, T_0=37, end_value=lr * 0.1),
            True,
        ),
        (
            "warm-restarts-mult2",
            lambda o: L.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=2),
            S.CosineWarmRestarts(init_value=lr, T_0=5, T_mult=2),
            True,
        ),
        (
            "warm-restarts-mult3",
            lambda o: L.CosineAnnealingWarmRestarts(o, T_0=1, T_mult=3, eta_min=lr * 0.2),
            S.CosineWarmRestarts(init_value=lr, T_0=1, T_mult=3, end_value=lr * 0.2),
            True,
        ),
        (
            "one-cycle-cos",
            lambda o: L.OneCycleLR(o, max_lr=lr, total_steps=STEPS),
            S.OneCycle(max_lr=lr, total_steps=STEPS),
            True,
        ),
        (
            "one-cycle-linear-3",
            lambda o: L.OneCycleLR(
                o, max_lr=lr, total_steps=STEPS, anneal_strategy="linear", three_phase=True, pct_start=0.25
            ),
            S.OneCycle(max_lr=lr, total_steps=STEPS, anneal_strategy="linear", three_phase=True, pct_start=0.25),
            True,
        ),
        (
            "one-cycle-cos-3",
            lambda o: L.OneCycleLR(
                o,
                max_lr=lr,
                total_steps=STEPS,
                three_phase=True,
                pct_start=0.37,
                div_factor=10.0,
                final_div_factor=100.0,
            ),
            S.OneCycle(
                max_lr=lr, total_steps=STEPS, three_phase=True, pct_start=0.37, div_factor=10.0, final_div_factor=100.0
            ),
            True,
        ),
        (
            "join=sequential",
            lambda o: L.SequentialLR(
                o,
                [L.LinearLR(o, start_factor=0.1, total_iters=20), L.CosineAnnealingLR(o, T_max=STEPS - 20)],
                milestones=[20],
            ),
            S.Join(
                schedules=[
                    S.Linear(init_value=lr * 0.1, end_value=lr, transition_steps=20),
                    S.Cosine(init_value=lr, decay_steps=STEPS - 20),
                ],
                boundaries=[20],
            ),
            False,
        ),
        (
            "join=sequential-3",
            lambda o: L.SequentialLR(
                o,
                [
                    L.ExponentialLR(o, gamma=0.99),
                    L.StepLR(o, step_size=7, gamma=0.9),
                    L.PolynomialLR(o, total_iters=50),
                ],
                milestones=[100, 150],
            ),
            S.Join(
                schedules=[
                    S.Exponential(init_value=lr, decay_rate=0.99),
                    S.Step(init_value=lr, step_size=7, gamma=0.9),
                    S.Polynomial(init_value=lr, transition_steps=50),
                ],
                boundaries=[100, 150],
            ),
            False,
        ),
        (
            "warmup-stable-decay=sequential",
            lambda o: L.SequentialLR(
                o,
                [
                    L.LinearLR(o, start_factor=0.01, total_iters=30),
                    L.ConstantLR(o, factor=1.0, total_iters=1),
                    L.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=100),
                ],
                milestones=[30, 200],
            ),
            S.WarmupStableDecay(
                init_value=lr,
                warmup_start_value=lr * 0.01,
                warmup_steps=30,
                stable_steps=170,
                decay_steps=100,
                end_value=lr * 0.1,
            ),
            False,
        ),
    ]


TORCH_CASES = [
    pytest.param(lr, i, id=f"{case[0]}-lr{lr}") for lr in (1.0, 0.05) for i, case in enumerate(_torch_cases(1.0))
]


@pytest.mark.parametrize("lr, index", TORCH_CASES)
def test_equals_torch_lr_scheduler(lr, index):
    _, make, schedule, closed_in_get_lr = _torch_cases(lr)[index]
    lrs, closed = _drive(make, lr)
    ours = [schedule(t) for t in range(STEPS)]
    assert all(isinstance(v, float) for v in ours)
    if closed is not None:  # torch's closed form: bit-exact at lr 1, CLOSED_ULPS otherwise (see the docstring)
        assert _max_ulps(ours, closed) <= (0 if lr == 1.0 else CLOSED_ULPS)
    if closed_in_get_lr:
        assert ours == lrs  # get_lr is itself a closed form: bit-exact
    else:  # the chainable recursion drifts by ulps
        assert _max_ulps(ours, lrs) <= RECURSIVE_ULPS


def _all_schedules() -> list[S.Schedule]:
    """At least one of each kind, with warmups, offsets, clips and nesting."""
    cases = [case[2] for case in _torch_cases(0.1)]
    cases += [
        S.Constant(value=3e-4),
        S.Linear(init_value=0.0, end_value=1.0, transition_steps=10, transition_begin=5),
        S.Cosine(init_value=1e-3, decay_steps=1000, warmup_steps=100, end_value=1e-5, warmup_start_value=1e-6),
        S.WarmupStableDecay(init_value=1.0, warmup_steps=10, stable_steps=20, decay_steps=30, decay_type="cosine"),
        S.WarmupStableDecay(init_value=1.0, stable_steps=20, decay_steps=30, decay_type="1-sqrt", end_value=0.1),
        S.Exponential(init_value=1.0, decay_rate=0.5, transition_steps=10, transition_begin=20, end_value=0.05),
        S.Exponential(init_value=1.0, decay_rate=1.1, transition_steps=3, staircase=True, end_value=5.0),
        S.Polynomial(init_value=1.0, end_value=0.1, power=0.5, transition_steps=40, transition_begin=10),
        S.CosineWarmRestarts(init_value=1.0, T_0=3, T_mult=4),
        S.OneCycle(max_lr=1.0, total_steps=100, pct_start=0.05),
        S.Rsqrt(init_value=1.0),
        S.Rsqrt(init_value=1.0, warmup_steps=16, warmup_start_value=0.1),
        S.Rsqrt(init_value=1.0, warmup_steps=16, timescale=4),
        S.LinearWarmdown(init_value=1.0, decay_steps=100, warmup_steps=10, end_value=0.0),
        S.Join(
            schedules=[
                S.Constant(value=1.0),
                S.Join(schedules=[S.Rsqrt(init_value=0.5), S.Constant(value=0.1)], boundaries=[50]),
            ],
            boundaries=[25],
        ),
        S.AutosgmWindow(window=1, window_epochs=5, window_steps_per_epoch=6, window_floor=0.1, window_flat_top=0.2),
        S.AutosgmWindow(window=5, window_order=1.5, window_epochs=40, window_unit=3, window_full=True, init_value=0.5),
    ]
    return cases


ALL = [pytest.param(s, id=f"{i}-{s.name}") for i, s in enumerate(_all_schedules())]
# one of each code path (warmups, staircase and clips, T_mult > 1, three phases, decay types, nesting),
# for the slower compile test
PATHS = [ALL[i] for i in (0, 1, 3, 5, 6, 7, 9, 12, 13, 15, 16, 17, 19, 20, 21, 22, 23, 25, 27, 29, 30, 31, 32, 33)]


def test_every_schedule_is_covered():
    assert {s.values[0].name for s in ALL} == {s.values[0].name for s in PATHS} == set(S.names()) == set(S.SCHEDULES)


@pytest.mark.parametrize("schedule", ALL)
def test_tensor_path_equals_number_path(schedule):
    steps = range(0, 3 * STEPS, 1)
    numbers = [schedule(t) for t in steps]
    assert all(math.isfinite(v) for v in numbers)
    for step_tensor in (torch.arange(len(steps)), torch.arange(len(steps), dtype=torch.float32)):
        values = schedule(step_tensor)  # any shape works element-wise
        assert values.dtype == torch.float64 and values.shape == step_tensor.shape
        assert _max_ulps(values.tolist(), numbers) <= TENSOR_ULPS
    zero_dim = [schedule(torch.tensor(t)) for t in (0, 7, 149, 600)]
    assert all(v.dim() == 0 for v in zero_dim)
    assert _max_ulps([v.item() for v in zero_dim], [numbers[t] for t in (0, 7, 149, 600)]) <= TENSOR_ULPS
    assert schedule(7.0) == schedule(7)
    assert schedule(-3) == schedule(0)  # negative steps count as 0


@pytest.mark.parametrize("schedule", PATHS)
def test_one_graph_for_every_step(schedule):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")  # dynamo: graphs and guards, no C++ compiler; inductor below
    compiled = torch.compile(schedule, backend=counter, fullgraph=True)
    steps = [0, 1, 2, 5, 9, 10, 11, 19, 20, 21, 29, 30, 31, 37, 40, 49, 50, 51, 80, 89] + list(range(90, 600, 17))
    values = [compiled(torch.tensor(step)) for step in steps]
    assert len(set(steps)) >= 50
    assert counter.frame_count == 1
    assert _max_ulps([v.item() for v in values], [schedule(s) for s in steps]) <= TENSOR_ULPS
    torch._dynamo.reset()


@pytest.mark.compile
def test_inductor_compiles_once_under_a_cosine_schedule():
    torch._dynamo.reset()
    schedule = S.Cosine(init_value=1e-3, decay_steps=100, warmup_steps=10)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(lambda step: schedule(step) * 2.0, backend=counter, fullgraph=True)
    values = [compiled(torch.tensor(step, dtype=torch.float32)).item() for step in range(120)]
    assert counter.frame_count == 1
    assert _max_ulps(values, [2.0 * schedule(s) for s in range(120)]) <= TENSOR_ULPS
    torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("schedule", ALL)
def test_cuda_step_never_syncs(schedule):
    steps = torch.arange(0, 600, 7, device="cuda")
    expected = [schedule(int(s)) for s in range(0, 600, 7)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host copy raises
    try:
        values = [schedule(step) for step in steps.unbind()]
        vectorized = schedule(steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v.device.type == "cuda" for v in values)
    assert _max_ulps([v.item() for v in values], expected) <= TENSOR_ULPS
    assert _max_ulps(vectorized.tolist(), expected) <= TENSOR_ULPS


# --- values worked out by hand -------------------------------------------------------------------


def test_hand_values():
    wsd = S.WarmupStableDecay(init_value=1.0, warmup_steps=4, stable_steps=2, decay_steps=4, decay_type="1-sqrt")
    assert [wsd(s) for s in range(12)] == [
        0.0,
        0.25,
        0.5,
        0.75,
        1.0,
        1.0,
        1.0,
        1 - math.sqrt(0.25),
        1 - math.sqrt(0.5),
        1 - math.sqrt(0.75),
        0.0,
        0.0,
    ]
    exp = S.Exponential(init_value=1.0, decay_rate=0.5, transition_steps=10, transition_begin=20, end_value=0.2)
    assert [exp(s) for s in (0, 20, 30, 35, 40, 50, 1000)] == [1.0, 1.0, 0.5, 0.5**1.5, 0.25, 0.2, 0.2]
    grow = S.Exponential(init_value=1.0, decay_rate=2.0, transition_steps=3, staircase=True, end_value=5.0)
    assert [grow(s) for s in (0, 2, 3, 5, 6, 9, 100)] == [1.0, 1.0, 2.0, 2.0, 4.0, 5.0, 5.0]
    poly = S.Polynomial(init_value=1.0, end_value=0.5, power=2.0, transition_steps=4, transition_begin=2)
    assert [poly(s) for s in (0, 2, 4, 6, 100)] == [1.0, 1.0, 0.5 * 0.25 + 0.5, 0.5, 0.5]
    linear = S.Linear(init_value=2.0, end_value=1.0, transition_steps=4, transition_begin=10)
    assert [linear(s) for s in (0, 10, 12, 14, 99)] == [2.0, 2.0, 1.5, 1.0, 1.0]
    multistep = S.MultiStep(init_value=1.0, milestones=[3, 5, 5], gamma=0.5)
    assert [multistep(s) for s in range(7)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.125, 0.125]
    restarts = S.CosineWarmRestarts(init_value=1.0, T_0=2, T_mult=2)  # cycles start at 0, 2, 6, 14
    assert [restarts(s) for s in (0, 1, 2, 4, 6, 10, 14)] == [1.0, 0.5, 1.0, 0.5, 1.0, 0.5, 1.0]
    # join: each schedule sees steps counted from its boundary (optax.join_schedules)
    join = S.Join(
        schedules=[S.Constant(value=7.0), S.Linear(init_value=0.0, end_value=1.0, transition_steps=4)], boundaries=[10]
    )
    assert [join(s) for s in (0, 9, 10, 11, 14, 50)] == [7.0, 7.0, 0.0, 0.25, 1.0, 1.0]
    assert S.Constant(value=0.3)(torch.tensor(5)).item() == 0.3


def test_one_cycle_is_flat_after_its_end_where_torch_raises():
    schedule = S.OneCycle(max_lr=1.0, total_steps=100)
    low = 1.0 / 25.0 / 1e4
    assert schedule(99) == low
    assert [schedule(s) for s in (100, 101, 1000)] == [low] * 3


# --- the original optorch's schedules, bugs fixed --------------------------------------------------
# The original's formulas (specs/optorch-origin.md §4), with peak 1: warmup a + (1 - a)s/W for s < W;
# rsqrt sqrt(W)/sqrt(s); cosine e + (1 - e)·0.5·(1 + cos(πp)); linear_warmdown 1 + (e - 1)p, p = (s - W)/(T - W).


def _origin_warmup(s, w, a):
    return a + (1 - a) * s / w


def test_rsqrt_allows_no_warmup():
    schedule = S.Rsqrt(init_value=1.0, warmup_steps=0)  # the original asserts W > 0
    assert [schedule(s) for s in (0, 3, 8, 15)] == [1.0, 0.5, 1 / 3, 0.25]  # 1/sqrt(1 + s)


def test_rsqrt_equals_the_original_with_warmup():
    w, a = 16, 1e-3
    schedule = S.Rsqrt(init_value=1.0, warmup_steps=w, warmup_start_value=a)
    origin = [_origin_warmup(s, w, a) if s < w else math.sqrt(w) / math.sqrt(s) for s in range(1000)]
    assert _max_ulps([schedule(s) for s in range(1000)], origin) <= 2  # same value, other rounding


def test_cosine_stays_at_the_end_value_after_total_steps():
    w, t, a, e = 10, 100, 1e-5, 1e-5  # the simulator's config shape (warmup from 1e-5 to 1e-5)
    schedule = S.Cosine(init_value=1.0, warmup_steps=w, warmup_start_value=a, decay_steps=t, end_value=e)
    origin = [
        _origin_warmup(s, w, a) if s < w else e + (1 - e) * 0.5 * (1 + math.cos(math.pi * (s - w) / (t - w)))
        for s in range(t + 1)
    ]
    assert _max_ulps([schedule(s) for s in range(t + 1)], origin) <= 4
    assert origin[t] == e and e + (1 - e) * 0.5 * (1 + math.cos(math.pi * (200 - w) / (t - w))) > 0.9  # origin rises
    assert [schedule(s) for s in range(t, 3 * t)] == [e] * (2 * t)
    assert (schedule(torch.arange(t, 3 * t)) == e).all()
    values = [schedule(s) for s in range(w, 3 * t)]
    assert all(x >= y for x, y in zip(values, values[1:]))


def test_linear_warmdown_is_never_negative_and_flat_after_the_end():
    w, t = 10, 100
    for e in (0.0, 0.1):
        schedule = S.LinearWarmdown(init_value=1.0, warmup_steps=w, decay_steps=t, end_value=e)
        origin = [_origin_warmup(s, w, 0.0) if s < w else 1 + (e - 1) * (s - w) / (t - w) for s in range(3 * t)]
        ours = [schedule(s) for s in range(3 * t)]
        assert _max_ulps(ours[: t + 1], origin[: t + 1]) <= 2
        assert origin[150] < e  # the original keeps going down (negative for e = 0)
        assert ours[t:] == [e] * (2 * t)
        assert min(ours) >= 0.0 and (schedule(torch.arange(3 * t)) >= 0).all()
    # rounding never takes it below zero either, for any peak (the result is clamped)
    for peak in (0.3, 0.7, 1e-3, 3.3):
        schedule = S.LinearWarmdown(init_value=peak, decay_steps=7)
        assert min(schedule(s) for s in range(20)) == 0.0


def test_the_original_default_cosine_config_is_a_clear_error():
    # the original divides by zero with total_steps = warmup_steps = 0
    with pytest.raises(pydantic.ValidationError, match="decay_steps"):
        S.from_config({"name": "cosine", "init_value": 1.0, "decay_steps": 0})
    with pytest.raises(pydantic.ValidationError, match="greater than warmup_steps"):
        S.from_config({"name": "cosine", "init_value": 1.0, "decay_steps": 100, "warmup_steps": 100})


# --- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ALL)
def test_config_round_trip(schedule):
    config = schedule.model_dump()
    assert config["name"] == schedule.name
    rebuilt = S.from_config(config)
    assert rebuilt == schedule and type(rebuilt) is type(schedule)
    assert S.from_config(schedule) is schedule


def test_from_config_example():
    schedule = S.from_config(
        {"name": "cosine", "init_value": 1e-3, "decay_steps": 1000, "warmup_steps": 100, "end_value": 0.0}
    )
    assert isinstance(schedule, S.Cosine)
    assert (schedule(0), schedule(50), schedule(100), schedule(1000), schedule(5000)) == (0.0, 5e-4, 1e-3, 0.0, 0.0)
    join = S.from_config(
        {
            "name": "join",
            "boundaries": [10],
            "schedules": [
                {"name": "linear", "init_value": 0.0, "end_value": 1.0, "transition_steps": 10},
                {"name": "rsqrt", "init_value": 1.0},
            ],
        }
    )
    assert isinstance(join.schedules[1], S.Rsqrt) and join(13) == 0.5


@pytest.mark.parametrize(
    "config, error, match",
    [
        ({"name": "cosin", "init_value": 1.0}, S.UnknownScheduleError, "did you mean 'cosine'"),
        ({"init_value": 1.0}, S.UnknownScheduleError, "has no 'name'.*known schedules: .*constant, cosine"),
        ({"name": "cosine", "init_value": 1.0}, pydantic.ValidationError, "decay_steps\n  Field required"),
        (
            {"name": "cosine", "init_value": 1.0, "decay_steps": 10, "warmup": 3},
            pydantic.ValidationError,
            "warmup\n  Extra",
        ),
        ({"name": "cosine", "init_value": "high", "decay_steps": 10}, pydantic.ValidationError, "init_value"),
        ({"name": "cosine", "init_value": float("nan"), "decay_steps": 10}, pydantic.ValidationError, "init_value"),
        (
            {"name": "linear", "init_value": 1.0, "end_value": 0.0, "transition_steps": 2.5},
            pydantic.ValidationError,
            "transition_steps",
        ),
        ({"name": "step", "init_value": 1.0, "step_size": 0}, pydantic.ValidationError, "step_size"),
        ({"name": "exponential", "init_value": 1.0, "decay_rate": -0.5}, pydantic.ValidationError, "decay_rate"),
        ({"name": "multistep", "init_value": 1.0, "milestones": [3, -1]}, pydantic.ValidationError, "milestones"),
        (
            {"name": "cosine_warm_restarts", "init_value": 1.0, "T_0": 10, "T_mult": 0},
            pydantic.ValidationError,
            "T_mult",
        ),
        (
            {"name": "one_cycle", "max_lr": 1.0, "total_steps": 3},
            pydantic.ValidationError,
            "phase 1 of the cycle is empty",
        ),
        (
            {"name": "one_cycle", "max_lr": 1.0, "total_steps": 100, "anneal_strategy": "cosine"},
            pydantic.ValidationError,
            "anneal_strategy",
        ),
        (
            {
                "name": "warmup_stable_decay",
                "init_value": 1.0,
                "stable_steps": 5,
                "decay_steps": 5,
                "decay_type": "exp",
            },
            pydantic.ValidationError,
            "decay_type",
        ),
        (
            {"name": "linear_warmdown", "init_value": 1.0, "decay_steps": 10, "end_value": -0.1},
            pydantic.ValidationError,
            "end_value",
        ),
        (
            {"name": "join", "schedules": [{"name": "constant", "value": 1.0}], "boundaries": [3]},
            pydantic.ValidationError,
            "1 schedules need 0 boundaries",
        ),
        (
            {"name": "join", "schedules": [{"name": "constant", "value": 1.0}] * 3, "boundaries": [5, 5]},
            pydantic.ValidationError,
            "increase strictly",
        ),
        (
            {"name": "join", "schedules": [{"name": "constant", "value": 1.0}, {"name": "constnt"}], "boundaries": [5]},
            pydantic.ValidationError,
            "constnt",
        ),
    ],
)
def test_bad_configs_are_clear_errors(config, error, match):
    with pytest.raises(error, match=match):
        S.from_config(config)


def test_schedules_are_frozen_and_steps_typed():
    schedule = S.Constant(value=1.0)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        schedule.value = 2.0
    with pytest.raises(TypeError, match="a step must be"):
        schedule("3")
    with pytest.raises(TypeError, match="must be a mapping"):
        S.from_config("cosine")
