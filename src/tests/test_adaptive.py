"""Adaptive-knob rules (optorch.adaptive, docs/rules.md): the rules' math, their directions on
synthetic loss sequences, composition, the cosine rules against torch's schedulers, the knob mapping
(torch, the optorch shim, bitsandbytes through fakes), bounds, skips, checkpoints, both forms, the
builder entry and compare."""

from __future__ import annotations

import copy
import math
import random
import statistics

import pytest
import torch

import optorch
from optorch import adaptive, builder
from optorch.adaptive import AdaptiveConfig, AdaptiveOpt, flatten_state

# --- synthetic loss sequences --------------------------------------------------------------------

N = 200


def improving(n=N):
    return [2.0 * math.exp(-0.02 * t) for t in range(n)]


def worsening(n=N):
    return [0.5 * math.exp(0.02 * t) for t in range(n)]


def plateau(n=N):
    return [1.3] * n


def noisy(n=N, amplitude=0.05, seed=0):
    """Uniform noise around 1, starting at the level: the EMAs start at the first loss, so a first
    loss off the level would read as a trend for ~1/(1 - slow_beta) steps (docs/rules.md, caveats)."""
    rng = random.Random(seed)
    return [1.0] + [1.0 + amplitude * rng.uniform(-1, 1) for _ in range(n - 1)]


SEQUENCES = {"improving": improving, "worsening": worsening, "plateau": plateau, "noisy": noisy}


def _param():
    return [torch.zeros(3, requires_grad=True)]


def _run(optimizer, losses, **keys) -> AdaptiveOpt:
    adapt = AdaptiveOpt(optimizer, **keys)
    for loss in losses:
        adapt.step_loss(torch.tensor(loss))
    return adapt


# --- an independent, plain-Python statement of the spec's rules ------------------------------------


def reference_factors(losses, rule, knob="lr", config=AdaptiveConfig()):  # noqa: B008 - a frozen config
    """The spec's formulas (§4, §6) with floats and branches: the factor of each term per loss."""
    c = config
    fast = slow = ref = None
    states = {"trend": 1.0, "relative": 1.0, "stable": 1.0}
    t_cur, t_i = 0, c.cycle_length
    out = []
    for t, loss in enumerate(losses):
        previous_fast = fast
        if t == 0:
            fast = slow = ref = loss
        else:
            fast = c.fast_beta * fast + (1 - c.fast_beta) * loss
            slow = c.slow_beta * slow + (1 - c.slow_beta) * loss
        window = losses[max(0, t + 1 - c.var_window) : t + 1]
        cv = statistics.stdev(window) / (abs(statistics.fmean(window)) + 1e-12) if len(window) >= 2 else 0.0
        r = (slow - fast) / (abs(slow) + 1e-12)
        if c.trend_signal == "fast_slow":
            better, worse = r > c.improve_tol, r < -c.improve_tol
        else:
            better = t > 0 and previous_fast - fast > c.ema_step_tol
            worse = t > 0 and fast - previous_fast > c.ema_step_tol
        clip = lambda v: min(max(v, c.factor_bounds[0]), c.factor_bounds[1])  # noqa: E731
        factors = {}
        for term in rule.split("+"):
            if term == "trend":
                states["trend"] = clip(states["trend"] * (c.trend_up if better else c.trend_down if worse else 1.0))
                factors[term] = 1 / states["trend"] if knob == "weight_decay" else states["trend"]
            elif term == "variance":
                factors[term] = 1 / (1 + c.var_gain * cv)
            elif term == "inverse":
                factors[term] = ref / max(fast, 1e-12) if ref > 0 and fast > 0 else 1.0
            elif term == "relative":
                states["relative"] = clip(
                    states["relative"] * (1 + c.relative_gain * min(max(r, -c.relative_clip), c.relative_clip))
                )
                factors[term] = states["relative"]
            elif term == "stable":
                states["stable"] = clip(c.stable_beta * states["stable"] + (1 - c.stable_beta) / (1 + c.var_gain * cv))
                factors[term] = states["stable"]
            elif term == "cosine":
                factors[term] = c.cos_floor + (1 - c.cos_floor) * 0.5 * (1 + math.cos(math.pi * t / c.cycle_length))
            elif term == "cosine_restart":
                factors[term] = c.cos_floor + (1 - c.cos_floor) * 0.5 * (1 + math.cos(math.pi * t_cur / t_i))
                t_cur += 1
                if t_cur >= t_i:
                    t_cur, t_i = 0, math.floor(t_i * c.cycle_mult)
        out.append(factors)
    return out


def functional_factors(losses, config, knob):
    state = adaptive.init(config)
    out = []
    for loss in losses:
        state, factors = adaptive.update(state, torch.tensor(loss, dtype=torch.float64), config)
        out.append(factors[knob].item())
    return out


@pytest.mark.parametrize("signal", ["fast_slow", "ema_step"])
@pytest.mark.parametrize("term", adaptive.TERMS)
@pytest.mark.parametrize("knob", ["lr", "weight_decay", "momentum"])
def test_each_rule_equals_the_spec_formulas_step_by_step(term, knob, signal):
    key = {"lr": "lr_rule", "weight_decay": "wd_rule", "momentum": "momentum_rule"}[knob]
    config = AdaptiveConfig(**{key: term}, cycle_length=7, cycle_mult=1.5, trend_signal=signal, improve_tol=1e-4)
    losses = improving(60) + noisy(60, amplitude=0.3) + worsening(60) + plateau(30)
    expected = [f[term] for f in reference_factors(losses, term, knob, config)]
    assert functional_factors(losses, config, knob) == pytest.approx(expected, rel=1e-12, abs=0)


def test_composition_multiplies_the_factors_of_single_rule_runs():
    losses = improving(80) + noisy(80, amplitude=0.2) + worsening(40)
    composite = functional_factors(
        losses, AdaptiveConfig(lr_rule="trend+variance+cosine_restart", cycle_length=9), "lr"
    )
    singles = [
        functional_factors(losses, AdaptiveConfig(lr_rule=rule, cycle_length=9), "lr")
        for rule in ("trend", "variance", "cosine_restart")
    ]
    assert composite == [a * b * c for a, b, c in zip(*singles)]
    # and the knob is the bounded base times that product
    optimizer = torch.optim.SGD(_param(), lr=0.1)
    adapt = AdaptiveOpt(optimizer, lr_rule="trend+variance+cosine_restart", cycle_length=9)
    for loss, factor in zip(losses, composite):
        adapt.step_loss(loss)
        assert adapt.lr == min(max(0.1 * factor, 1e-4), 0.2)


# --- directions on synthetic sequences --------------------------------------------------------

UP, DOWN, SAME, NO_DRIFT = "up", "down", "same", "no drift"
# rule, knob, the optimizer and base, expected direction per sequence (docs/rules.md, "Directions").
DIRECTIONS = [
    ("trend", "lr", {"improving": UP, "worsening": DOWN, "plateau": SAME, "noisy": DOWN}),
    ("trend", "weight_decay", {"improving": DOWN, "worsening": UP, "plateau": SAME, "noisy": UP}),
    ("variance", "lr", {"improving": DOWN, "worsening": DOWN, "plateau": SAME, "noisy": DOWN}),
    ("inverse", "momentum", {"improving": UP, "worsening": DOWN, "plateau": SAME, "noisy": NO_DRIFT}),
    ("relative", "momentum", {"improving": UP, "worsening": DOWN, "plateau": SAME, "noisy": NO_DRIFT}),
    ("relative", "beta1", {"improving": UP, "worsening": DOWN, "plateau": SAME, "noisy": NO_DRIFT}),
    ("variance", "beta2", {"improving": DOWN, "worsening": DOWN, "plateau": SAME, "noisy": DOWN}),
    ("stable", "alpha", {"improving": DOWN, "worsening": DOWN, "plateau": SAME, "noisy": DOWN}),
]


def _optimizer_for(knob):
    if knob in ("beta1", "beta2"):
        return torch.optim.AdamW(_param(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01)
    if knob == "alpha":
        return torch.optim.RMSprop(_param(), lr=1e-2, alpha=0.95)
    return torch.optim.SGD(_param(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def _key(knob):
    return {"lr": "lr_rule", "weight_decay": "wd_rule", "momentum": "momentum_rule", "alpha": "alpha_rule"}.get(knob)


@pytest.mark.parametrize("sequence", list(SEQUENCES))
@pytest.mark.parametrize("rule, knob, expected", DIRECTIONS, ids=[f"{r}-{k}" for r, k, _ in DIRECTIONS])
def test_each_rule_moves_its_knob_in_the_documented_direction(rule, knob, expected, sequence):
    keys = (
        {"betas_rule": (rule, None) if knob == "beta1" else (None, rule)}
        if knob.startswith("beta")
        else {_key(knob): rule}
    )
    # decay-type knobs compare horizons 1/(1 - v): the space the rules scale
    measure = (lambda v: 1 / (1 - v)) if knob in adaptive.DECAY_KNOBS else (lambda v: v)

    def log_ratio(losses):
        adapt = AdaptiveOpt(_optimizer_for(knob), **keys)
        base = adapt.knobs()[knob]
        for loss in losses:
            adapt.step_loss(torch.tensor(loss))
        value = adapt.knobs()[knob]
        assert sequence != "plateau" or value == pytest.approx(base, rel=1e-15, abs=0)  # a constant loss: no change
        return math.log(measure(value) / measure(base))

    expected = expected[sequence]
    if expected == NO_DRIFT:
        # a random walk without drift: its mean over 20 noise draws is near 0 (the draws' spread is
        # ~0.2 for relative; 3.5 standard errors allowed), and no single draw runs off to a bound
        logs = [log_ratio(noisy(seed=seed)) for seed in range(20)]
        assert abs(statistics.fmean(logs)) < 0.15 and max(map(abs, logs)) < 0.7, logs
        return
    value = log_ratio(SEQUENCES[sequence]())
    if expected == UP:
        assert value > math.log(1.01)
    elif expected == DOWN:
        assert value < math.log(0.99)
    else:
        assert value == pytest.approx(0.0, abs=1e-14)


def test_stable_returns_alpha_to_its_base_once_the_loss_is_steady():
    optimizer = torch.optim.RMSprop(_param(), lr=1e-2, alpha=0.95)
    adapt = _run(optimizer, noisy(100, amplitude=0.3), alpha_rule="stable")
    shortened = adapt.alpha
    assert 1 / (1 - shortened) < 0.95 * 1 / (1 - 0.95)  # the horizon shortened by over 5%
    for _ in range(600):  # the window fills with a constant loss: CV 0, E relaxes back to 1
        adapt.step_loss(1.0)
    assert shortened < adapt.alpha and adapt.alpha == pytest.approx(0.95, abs=1e-3)


def test_the_ema_step_signal_ignores_moves_below_its_threshold():
    slow_descent = [1.0 - 1e-5 * t for t in range(100)]  # the fast EMA moves ~1e-5 a step < 1e-4
    fast_descent = [1.0 - 1e-3 * t for t in range(100)]
    for losses, moved in ((slow_descent, False), (fast_descent, True)):
        adapt = _run(torch.optim.SGD(_param(), lr=0.1), losses, lr_rule="trend", trend_signal="ema_step")
        assert (adapt.lr > 0.1) == moved and adapt.lr >= 0.1


# --- the cosine rules against torch's schedulers ------------------------------------------------


@pytest.mark.parametrize("cycle_length, cycle_mult", [(5, 2), (4, 1), (3, 3)])
def test_cosine_restart_equals_torch_cosine_annealing_warm_restarts(cycle_length, cycle_mult):
    base, floor = 0.3, 0.1
    reference = torch.optim.SGD(_param(), lr=base)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        reference, T_0=cycle_length, T_mult=cycle_mult, eta_min=floor * base
    )
    optimizer = torch.optim.SGD(_param(), lr=base)
    adapt = AdaptiveOpt(
        optimizer, lr_rule="cosine_restart", cycle_length=cycle_length, cycle_mult=cycle_mult, cos_floor=floor
    )
    losses = noisy(120, amplitude=0.5)  # the loss plays no part
    restarts = 0
    for loss in losses:
        adapt.step_loss(loss)
        expected = reference.param_groups[0]["lr"]
        assert adapt.lr == pytest.approx(expected, rel=1e-14, abs=0)
        assert adapt.last_factors["lr"] == pytest.approx(expected / base, rel=1e-14, abs=0)
        restarts += expected == pytest.approx(base, rel=1e-15)
        scheduler.step()
    assert restarts >= 3  # several cycles covered


def test_cosine_equals_torch_cosine_annealing_past_its_end():
    base, cycle = 0.5, 6
    reference = torch.optim.SGD(_param(), lr=base)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=cycle, eta_min=0.1 * base)
    adapt = AdaptiveOpt(torch.optim.SGD(_param(), lr=base), lr_rule="cosine", cycle_length=cycle)
    for loss in worsening(5 * cycle):
        adapt.step_loss(loss)
        assert adapt.lr == pytest.approx(reference.param_groups[0]["lr"], rel=1e-12, abs=0)
        scheduler.step()


# --- knob spaces ---------------------------------------------------------------------------------


def test_inverse_on_a_decay_knob_makes_one_minus_the_value_proportional_to_the_fast_ema():
    losses = [1.0 * math.exp(-0.01 * t) for t in range(150)]  # F falls to ~0.25: 1 - v stays in bounds
    adapt = AdaptiveOpt(torch.optim.SGD(_param(), lr=0.1, momentum=0.9), momentum_rule="inverse")
    fast = None
    for t, loss in enumerate(losses):
        adapt.step_loss(loss)
        fast = loss if t == 0 else 0.9 * fast + 0.1 * loss
        assert (1 - adapt.momentum) / fast == pytest.approx((1 - 0.9) / losses[0], rel=1e-12)
    assert 0.97 < adapt.momentum < 0.99


def test_knob_value_bounds():
    config = AdaptiveConfig()
    value = lambda knob, base, factor: adaptive.knob_value(knob, base, factor, config).item()  # noqa: E731
    assert value("lr", 0.1, 100.0) == pytest.approx(0.2) and value("lr", 0.1, 1e-9) == pytest.approx(1e-4)
    assert value("weight_decay", 0.01, 50.0) == pytest.approx(0.1) and value("weight_decay", 0.0, 5.0) == 0.0
    assert value("momentum", 0.9, 1e6) == 0.99 and value("momentum", 0.9, 1e-6) == 0.5
    assert value("momentum", 0.995, 1e6) == 0.995 and value("momentum", 0.3, 1e-6) == 0.3  # the base widens its bounds
    assert value("beta2", 0.999, 1e6) == 0.9999 and value("alpha", 0.99, 1e-6) == 0.9
    assert value("momentum", 0.0, 3.0) == 0.0 and value("beta1", 1.0, 0.5) == 1.0  # not adaptable: the base
    assert value("momentum", 0.9, 2.0) == pytest.approx(1 - 0.1 / 2)  # the horizon doubles
    limited = config.replace(lr_limits=(None, 0.15))
    assert adaptive.knob_value("lr", 0.1, 100.0, limited).item() == 0.15


def test_bounds_hold_every_step_under_extreme_losses():
    losses = (
        [10.0 ** (-t / 10) for t in range(200)]
        + [1e-20 * 10.0 ** (t / 5) for t in range(150)]
        + noisy(60, amplitude=0.9)
    )
    rule = "trend+relative+inverse+variance"
    optimizers = {
        "sgd": torch.optim.SGD(_param(), lr=0.1, momentum=0.9, weight_decay=0.01),
        "adamw": torch.optim.AdamW(_param(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01),
        "rmsprop": torch.optim.RMSprop(_param(), lr=1e-2, alpha=0.99, momentum=0.8, weight_decay=0.01),
    }
    bounds = {
        "lr": lambda b: (1e-3 * b, 2 * b),
        "weight_decay": lambda b: (0.0, 10 * b),
        "momentum": lambda b: (min(0.5, b), max(0.99, b)),
        "beta1": lambda b: (min(0.5, b), max(0.99, b)),
        "beta2": lambda b: (min(0.9, b), max(0.9999, b)),
        "alpha": lambda b: (min(0.9, b), max(0.9999, b)),
    }
    for optimizer in optimizers.values():
        adapt = AdaptiveOpt(optimizer, lr_rule=rule, momentum_rule=rule, betas_rule=rule, alpha_rule=rule, wd_rule=rule)
        base = adapt.knobs()
        seen = {knob: set() for knob in base}
        for loss in losses:
            adapt.step_loss(loss)
            for knob, value in adapt.knobs().items():
                low, high = bounds[knob](base[knob])
                assert (
                    low * (1 - 1e-15) <= value <= high * (1 + 1e-15) and value < 1
                    if knob in adaptive.DECAY_KNOBS
                    else True
                ), (knob, value)
                assert low * (1 - 1e-15) <= value <= high * (1 + 1e-15), (knob, value)
                seen[knob].add(value == pytest.approx(low, rel=1e-12) or value == pytest.approx(high, rel=1e-12))
            for terms in adapt.state["terms"].values():
                for term in terms.values():
                    if "value" in term:
                        assert 0.1 <= term["value"].item() <= 10.0
        assert all(True in hit for hit in seen.values()), seen  # every knob was pushed to a bound


# --- which keys are written ------------------------------------------------------------------


class _Recording(dict):
    """A param group that records every key written to it."""

    def __init__(self, group):
        super().__init__(group)
        self.writes = []

    def __setitem__(self, key, value):
        self.writes.append(key)
        super().__setitem__(key, value)


def _record_writes(optimizer):
    optimizer.param_groups[0] = _Recording(optimizer.param_groups[0])
    return optimizer.param_groups[0]


def _step(optimizer):
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    optimizer.step()


def test_a_decay_knob_with_base_zero_is_never_written():
    rmsprop = torch.optim.RMSprop(_param(), lr=1e-2, momentum=0)
    group = _record_writes(rmsprop)
    adapt = _run(rmsprop, improving(50), lr_rule="trend", momentum_rule="relative")
    assert "lr" in group.writes and "momentum" not in group.writes and adapt.momentum == 0
    _step(rmsprop)  # no momentum_buffer is needed: torch created none
    adam = torch.optim.Adam(_param(), lr=1e-3, betas=(0.0, 0.99))
    adapt = _run(adam, improving(50), betas_rule="relative")
    beta1, beta2 = adam.param_groups[0]["betas"]
    assert beta1 == 0.0 and beta2 > 0.99
    _step(adam)


def test_knobs_the_optimizer_lacks_are_ignored():
    adagrad = torch.optim.Adagrad(_param(), lr=0.1, weight_decay=0.01)
    group = _record_writes(adagrad)
    adapt = _run(
        adagrad,
        improving(30),
        lr_rule="trend",
        momentum_rule="relative",
        betas_rule="relative",
        alpha_rule="stable",
        wd_rule="trend",
    )
    assert set(adapt.knobs()) == {"lr", "weight_decay"} and set(group.writes) == {"lr", "weight_decay"}
    assert adapt.momentum is None and adapt.betas is None and adapt.alpha is None
    _step(adagrad)


@pytest.mark.parametrize(
    "make, knobs",
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3), {"lr", "momentum", "weight_decay"}),
        (lambda p: torch.optim.Adam(p, lr=1e-3), {"lr", "beta1", "beta2", "weight_decay"}),
        (lambda p: torch.optim.AdamW(p, lr=1e-3), {"lr", "beta1", "beta2", "weight_decay"}),
        (lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5), {"lr", "momentum", "alpha", "weight_decay"}),
        (lambda p: torch.optim.Adagrad(p, lr=0.1), {"lr", "weight_decay"}),
        (
            lambda p: optorch.build({"name": "sgd", "lr": 0.1, "momentum": 0.9}, p, engine="eager"),
            {"lr", "momentum", "weight_decay"},
        ),
        (
            lambda p: optorch.build({"name": "adamw", "lr": 1e-3}, p, engine="eager"),
            {"lr", "beta1", "beta2", "weight_decay"},
        ),
        (
            lambda p: optorch.build({"name": "rmsprop", "lr": 1e-2, "momentum": 0.5}, p, engine="eager"),
            {"lr", "momentum", "alpha", "weight_decay"},
        ),
        (lambda p: optorch.build({"name": "adagrad", "lr": 0.1}, p, engine="eager"), {"lr", "weight_decay"}),
        (
            lambda p: optorch.build({"name": "nadam", "lr": 1e-3}, p, engine="eager"),
            {"lr", "beta1", "beta2", "weight_decay"},
        ),
    ],
    ids=[
        "SGD",
        "Adam",
        "AdamW",
        "RMSprop",
        "Adagrad",
        "shim-sgd",
        "shim-adamw",
        "shim-rmsprop",
        "shim-adagrad",
        "shim-nadam",
    ],
)
def test_torch_optimizers_and_the_shim_get_their_knobs_adapted_and_still_step(make, knobs):
    optimizer = make(_param())
    adapt = AdaptiveOpt(
        optimizer,
        lr_rule="trend",
        momentum_rule="relative",
        betas_rule=("relative", "variance"),
        alpha_rule="stable",
        wd_rule="trend",
    )
    assert set(adapt.knobs()) == knobs
    before = adapt.knobs()
    for loss in improving(40):
        adapt.step_loss(loss)
        _step(optimizer)
    after = adapt.knobs()
    assert after["lr"] > before["lr"]
    changed = {k for k in knobs if after[k] != before[k]}
    assert changed == {k for k in knobs if before[k] != 0}  # weight decay 0 stays 0


# bitsandbytes' 8-bit optimizers, as their param groups look (bitsandbytes is not installed here):
# Optimizer1State/2State keep defaults dict(lr, betas, eps, weight_decay) and `optimizer_name`.


class _FakeBnb(torch.optim.Optimizer):
    def __init__(self, optimizer_name, params, lr, betas, eps, weight_decay, **extra):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **extra))
        self.optimizer_name = optimizer_name

    def step(self, closure=None):  # reads the group keys bitsandbytes' get_config reads
        for group in self.param_groups:
            assert all(0 <= b < 1 for b in group["betas"][:2]) and group["lr"] > 0


def SGD8bit(params, lr, momentum, dampening=0, weight_decay=0):
    return _FakeBnb("momentum", params, lr, (momentum, dampening), 0.0, weight_decay)


def RMSprop8bit(params, lr, alpha=0.99, momentum=0, eps=1e-8, weight_decay=0):
    return _FakeBnb("rmsprop", params, lr, (alpha, momentum), eps, weight_decay)


def AdamW8bit(params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, **extra):
    return _FakeBnb("adam", params, lr, betas, eps, weight_decay, **extra)


def Adagrad8bit(params, lr, eps=1e-10, weight_decay=0):
    return _FakeBnb("adagrad", params, lr, (0.0, 0.0), eps, weight_decay)


def test_bnb_sgd8bit_momentum_is_betas_0_and_no_momentum_key_appears():
    optimizer = SGD8bit(_param(), lr=0.1, momentum=0.9, dampening=0.1)
    adapt = _run(optimizer, improving(60), lr_rule="trend", momentum_rule="relative")
    group = optimizer.param_groups[0]
    assert "momentum" not in group
    assert 0.9 < group["betas"][0] <= 0.99 and group["betas"][1] == 0.1
    assert adapt.momentum == group["betas"][0] and adapt.betas is None
    optimizer.step()


def test_bnb_rmsprop8bit_alpha_is_betas_0_and_momentum_betas_1():
    optimizer = RMSprop8bit(_param(), lr=1e-2, alpha=0.95, momentum=0.5)
    descent = [0.5 * loss for loss in improving(120)]  # from the noise's level down
    adapt = _run(optimizer, noisy(60, amplitude=0.3) + descent, alpha_rule="stable", momentum_rule="relative")
    alpha, momentum = optimizer.param_groups[0]["betas"]
    assert alpha < 0.95 and momentum > 0.5
    assert (adapt.alpha, adapt.momentum) == (alpha, momentum) and "alpha" not in optimizer.param_groups[0]
    no_momentum = RMSprop8bit(_param(), lr=1e-2, alpha=0.95, momentum=0)
    _run(no_momentum, improving(60), momentum_rule="relative")
    assert no_momentum.param_groups[0]["betas"] == (0.95, 0)


def test_bnb_adam_betas_keep_a_third_element_and_its_alpha_is_never_touched():
    optimizer = AdamW8bit(_param(), lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0)  # AdEMAMix-style
    _run(optimizer, improving(60), betas_rule=("relative", None), alpha_rule="stable", wd_rule="trend")
    group = optimizer.param_groups[0]
    assert group["betas"][0] > 0.9 and group["betas"][1:] == (0.999, 0.9999)
    assert group["alpha"] == 5.0 and group["weight_decay"] < 1e-2
    adagrad = Adagrad8bit(_param(), lr=0.1, weight_decay=0.01)
    adapt = _run(adagrad, improving(60), lr_rule="trend", betas_rule="relative", momentum_rule="relative")
    assert adagrad.param_groups[0]["betas"] == (0.0, 0.0) and set(adapt.knobs()) == {"lr", "weight_decay"}


def test_tensor_lr_and_betas_are_filled_in_place():
    lr, betas = torch.tensor(1e-3), (torch.tensor(0.9), torch.tensor(0.99))
    optimizer = torch.optim.Adam(_param(), lr=lr, betas=betas, foreach=False)
    group = optimizer.param_groups[0]
    adapt = _run(optimizer, improving(40), lr_rule="trend", betas_rule=("relative", "variance"))
    assert group["lr"] is lr and group["betas"][0] is betas[0] and group["betas"][1] is betas[1]
    assert lr.item() > 1e-3 and betas[0].item() > 0.9 and betas[1].item() < 0.99
    assert adapt.lr == lr.item()
    _step(optimizer)


# --- skipping, groups, checkpoints ---------------------------------------------------------------


def _leaves_equal(a, b):
    from torch.utils import _pytree as pytree

    left, right = pytree.tree_leaves(a), pytree.tree_leaves(b)
    same = lambda x, y: torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y  # noqa: E731
    return len(left) == len(right) and all(same(x, y) for x, y in zip(left, right))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_changes_nothing(bad):
    optimizer = torch.optim.SGD(_param(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    rules = dict(lr_rule="trend+cosine_restart", momentum_rule="relative", wd_rule="variance", cycle_length=7)
    adapt = _run(optimizer, improving(30), **rules)
    state, knobs, factors = adapt.state_dict(), adapt.knobs(), dict(adapt.last_factors)
    adapt.step_loss(torch.tensor(bad))
    assert _leaves_equal(adapt.state_dict(), state) and adapt.knobs() == knobs and adapt.last_factors == factors
    assert math.isnan(adapt.history["loss"][-1]) if bad != bad else adapt.history["loss"][-1] == bad
    # the functional form: the same state back, and the last factors again
    config = AdaptiveConfig(**rules)
    fstate = adaptive.init(config)
    for loss in improving(30):
        fstate, last = adaptive.update(fstate, loss, config)
    skipped, again = adaptive.update(fstate, torch.tensor(bad), config)
    assert _leaves_equal(skipped, fstate) and _leaves_equal(again, last)


def test_groups_scale_their_own_bases_and_a_group_added_later_is_captured():
    a, b, c = _param(), _param(), _param()
    optimizer = torch.optim.SGD(
        [{"params": a}, {"params": b, "lr": 0.01, "weight_decay": 0.0}], lr=0.1, weight_decay=1e-3
    )
    adapt = _run(optimizer, improving(30), lr_rule="trend", wd_rule="trend")
    optimizer.add_param_group({"params": c, "lr": 1.0})
    for loss in improving(60)[30:]:
        adapt.step_loss(loss)
    factor = adapt.last_factors["lr"]
    lrs = [group["lr"] for group in optimizer.param_groups]
    assert lrs[0] == pytest.approx(0.1 * factor) and lrs[1] == pytest.approx(0.01 * factor)
    assert lrs[2] == pytest.approx(1.0 * factor) and adapt.bases[2] == {"lr": 1.0, "weight_decay": 1e-3}
    assert optimizer.param_groups[1]["weight_decay"] == 0.0 and optimizer.param_groups[0]["weight_decay"] < 1e-3


def _train(model, optimizer, adapt, losses_out, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=generator, dtype=torch.float64)
        loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        adapt.step_loss(loss)
        optimizer.step()
        losses_out.append((loss.item(), dict(adapt.knobs())))


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1).double()


RULES = dict(lr_rule="trend+cosine_restart", momentum_rule="relative", wd_rule="trend", cycle_length=6)


@pytest.mark.parametrize("kind", ["torch", "shim"])
def test_state_dict_round_trip_continues_like_an_uninterrupted_run(kind):
    def make(model):
        if kind == "torch":
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
            return optimizer, AdaptiveOpt(optimizer, **RULES)
        optimizer = optorch.build(
            {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, "adapt": RULES},
            model.parameters(),
            engine="eager",
        )
        return optimizer, optimizer.adaptive

    model = _model()
    optimizer, adapt = make(model)
    whole = []
    _train(model, optimizer, adapt, whole, 25, seed=1)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = copy.deepcopy((optimizer.state_dict(), adapt.state_dict()))  # torch's holds live tensors
    _train(model, optimizer, adapt, whole, 25, seed=2)

    resumed_model = _model()
    resumed_model.load_state_dict(saved_model)
    optimizer2, adapt2 = make(resumed_model)
    optimizer2.load_state_dict(saved[0])
    if kind == "torch":
        adapt2.load_state_dict(saved[1])
    else:
        assert any(key.startswith("adapt.") for key in saved[0]["param_groups"][0]) and adapt2.bases == adapt.bases
    resumed = whole[:25]
    _train(resumed_model, optimizer2, adapt2, resumed, 25, seed=2)
    assert resumed == whole
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_load_state_dict_rejects_a_checkpoint_of_other_rules():
    optimizer = torch.optim.SGD(_param(), lr=0.1, momentum=0.9)
    saved = _run(optimizer, improving(5), lr_rule="trend").state_dict()
    with pytest.raises(ValueError, match="rules"):
        AdaptiveOpt(optimizer, lr_rule="trend+cosine").load_state_dict(saved)  # the same layout, but other rules
    with pytest.raises(ValueError, match="another layout"):
        AdaptiveOpt(optimizer, lr_rule="trend", var_window=10).load_state_dict(saved)
    with pytest.raises(ValueError, match="'state', 'bases' and 'rules'"):
        AdaptiveOpt(optimizer, lr_rule="trend").load_state_dict({"state": saved["state"]})


# --- the functional form -----------------------------------------------------------------------


def test_functional_loop_with_inject_hyperparams_equals_adaptive_opt():
    """Form (a) and form (b) on the same model and losses: the same knob values every step."""
    rules = AdaptiveConfig(lr_rule="trend+cosine_restart", momentum_rule="relative", wd_rule="variance", cycle_length=5)
    torch.manual_seed(0)
    params = {"w": torch.randn(4, 1, dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)}
    data = [torch.randn(16, 4, dtype=torch.float64) for _ in range(30)]
    loss_of = lambda p, x: ((x @ p["w"] + p["b"] - x.sum(1, keepdim=True)) ** 2).mean()  # noqa: E731
    bad_steps = {7, 8}  # the loss handed to the rules is NaN there: adaptation skips

    stepper = optorch.inject_hyperparams(
        optorch.sgd.algorithm, optorch.sgd.Config(lr=0.05, momentum=0.9, weight_decay=1e-3)
    )
    state = stepper.init(params)
    rule_state, knob_bases = adaptive.init(rules), adaptive.bases(state["hyperparams"], rules)
    functional, losses = [], []
    for step, x in enumerate(data):
        grads, loss = torch.func.grad_and_value(loss_of)(params, x)
        loss = torch.tensor(math.nan) if step in bad_steps else loss
        losses.append(loss.item())
        rule_state, factors = adaptive.update(rule_state, loss, rules)
        state = adaptive.write_hyperparams(state, knob_bases, factors, rules)
        params, state = stepper.step(params, grads, state)
        functional.append(
            {k: float(v) for k, v in state["hyperparams"].items() if k in ("lr", "momentum", "weight_decay")}
        )

    torch.manual_seed(0)
    weights = {
        "w": torch.randn(4, 1, dtype=torch.float64).requires_grad_(),
        "b": torch.zeros(1, dtype=torch.float64, requires_grad=True),
    }
    optimizer = optorch.build(
        {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}, weights.values(), engine="eager"
    )
    adapt = AdaptiveOpt(optimizer, config=rules)
    wrapped = []
    for step, x in enumerate(data):
        optimizer.zero_grad()
        loss_of(weights, x).backward()
        # the rules see the same losses (the two loops' params agree to rounding: the shim's eager step
        # uses Python-number hyperparameters, the stepper 0-dim tensors, which round differently)
        adapt.step_loss(losses[step])
        optimizer.step()
        wrapped.append({k: adapt.knobs()[k] for k in ("lr", "momentum", "weight_decay")})

    assert functional == wrapped
    assert functional[8] == functional[6] and functional[9] != functional[8]
    assert len({v["lr"] for v in functional}) > 20
    for name in params:
        torch.testing.assert_close(params[name], weights[name].detach(), rtol=1e-13, atol=1e-15)


@pytest.mark.compile
def test_the_functional_update_compiles_without_graph_breaks():
    rules = AdaptiveConfig(
        lr_rule="trend+cosine_restart", betas_rule=("relative", "variance"), alpha_rule="stable+inverse"
    )
    compiled = torch.compile(adaptive.update, fullgraph=True, dynamic=False)
    state, eager_state = adaptive.init(rules), adaptive.init(rules)
    for loss in improving(4) + [math.nan] + noisy(3):
        state, factors = compiled(state, torch.tensor(loss, dtype=torch.float64), rules)
        eager_state, eager = adaptive.update(eager_state, torch.tensor(loss, dtype=torch.float64), rules)
        assert factors.keys() == eager.keys() and all(
            torch.allclose(factors[k], eager[k], rtol=1e-14, atol=0) for k in factors
        )


# --- configuration and errors ------------------------------------------------------------------


def test_rule_strings_are_parsed():
    config = AdaptiveConfig(lr_rule=" Trend + COSINE_restart ", momentum_rule="none", betas_rule="relative", wd_rule="")
    assert config.lr_rule == "trend+cosine_restart" and config.momentum_rule is None and config.wd_rule is None
    assert config.betas_rule == ("relative", "relative")
    assert config.rules() == {"lr": ("trend", "cosine_restart"), "beta1": ("relative",), "beta2": ("relative",)}
    assert AdaptiveConfig(betas_rule=["relative", None]).rules() == {"beta1": ("relative",)}


@pytest.mark.parametrize(
    "keys, message",
    [
        (
            {"lr_rule": "trend+cosin"},
            r"(?s)lr_rule.*unknown term 'cosin' in the rule 'trend\+cosin' for lr \(did you mean 'cosine'\?\)",
        ),
        ({"momentum_rule": "relative+relative"}, r"(?s)momentum_rule.*term 'relative' appears twice .* for momentum"),
        ({"betas_rule": ("relative", "varience")}, r"(?s)betas_rule.*unknown term 'varience' .* for beta2"),
        ({"betas_rule": ("relative",)}, r"(?s)betas_rule.*a pair"),
        ({"wd_rule": 3}, r"(?s)wd_rule.*must be a string"),
        ({"lr_rul": "trend"}, r"lr_rul\n.*Extra inputs are not permitted"),
        ({"fast_beta": 1.0}, r"fast_beta\n.*less than 1"),
        ({"var_window": 1}, r"var_window\n.*greater than or equal to 2"),
        ({"factor_bounds": (2.0, 10.0)}, r"(?s)factor_bounds.*low <= 1 <= high"),
        ({"trend_signal": "ema"}, r"trend_signal"),
        ({"relative_gain": 30.0}, r"(?s)relative_gain \* relative_clip must be below 1"),
    ],
)
def test_bad_keys_and_rules_raise_errors_naming_them(keys, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveConfig(**keys)
    with pytest.raises(ValueError, match=message):
        AdaptiveOpt(torch.optim.SGD(_param(), lr=0.1), **keys)


def test_config_and_keys_together_are_refused():
    with pytest.raises(TypeError, match="either config= or keys"):
        AdaptiveOpt(torch.optim.SGD(_param(), lr=0.1), config=AdaptiveConfig(), lr_rule="trend")


# --- the builder entry, compare, plotting --------------------------------------------------------

ADAPTIVE_SGD = {
    "name": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "adapt": {"lr_rule": "trend+cosine_restart", "momentum_rule": "relative", "cycle_length": 200},
}


def test_build_attaches_adaptive_opt_and_its_state_rides_in_the_checkpoint():
    model = torch.nn.Linear(3, 1)
    optimizer = optorch.build(ADAPTIVE_SGD, model.parameters())
    assert isinstance(optimizer.adaptive, AdaptiveOpt) and optimizer.adaptive.optimizer is optimizer
    assert optimizer.adaptive.config == AdaptiveConfig(**ADAPTIVE_SGD["adapt"])
    optimizer.adaptive.step_loss(1.0)
    saved = optimizer.state_dict()["param_groups"][0]
    state = optimizer.adaptive.state_dict()
    assert {key for key in saved if key.startswith("adapt.")} == set(flatten_state(state["state"])) | {
        f"adapt.base.{k}" for k in state["bases"][0]
    }
    assert all(saved[key] is value for key, value in flatten_state(optimizer.adaptive.state).items()), (
        "the live rule state"
    )
    plain = optorch.build({"name": "sgd", "lr": 0.1}, model.parameters())
    assert plain.adaptive is None and not any(key.startswith("adapt.") for key in plain.state_dict()["param_groups"][0])
    assert builder.parse_config(ADAPTIVE_SGD) == builder.parse_config(
        {k: v for k, v in ADAPTIVE_SGD.items() if k != "adapt"}
    )


def test_a_bad_shim_checkpoint_leaves_optimizer_and_rules_unchanged():
    model = torch.nn.Linear(3, 1)
    optimizer = optorch.build(ADAPTIVE_SGD, model.parameters())
    for loss in improving(5):
        optimizer.adaptive.step_loss(loss)
    saved = optimizer.state_dict()
    other = optorch.build({**ADAPTIVE_SGD, "adapt": {"lr_rule": "trend"}}, model.parameters())
    before = other.adaptive.state_dict()
    with pytest.raises(ValueError, match="'adapt.terms.lr.cosine_restart.t_cur', which this optimizer does not keep"):
        other.load_state_dict(saved)
    assert _leaves_equal(other.adaptive.state_dict(), before)


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            {"lr_rule": "trend", "cycle_lenght": 3},
            r"'adapt': unknown key\(s\) 'cycle_lenght' \(did you mean 'cycle_length'\?\)",
        ),
        ({"lr_rule": "tren"}, r"'adapt': lr_rule: unknown term 'tren'"),
        ({"alpha_rule": "stable"}, r"'adapt': a rule for alpha, which this optimizer does not have"),
        ("trend", r"'adapt' must map AdaptiveOpt keys"),
    ],
)
def test_builder_errors_name_the_entry_and_the_field(entry, message):
    with pytest.raises(builder.ConfigError, match=message):
        optorch.build({**ADAPTIVE_SGD, "adapt": entry}, [torch.zeros(2, requires_grad=True)])


def test_a_knob_cannot_be_both_scheduled_and_adapted():
    config = {**ADAPTIVE_SGD, "schedule": {"lr": {"name": "cosine", "init_value": 0.1, "decay_steps": 100}}}
    with pytest.raises(builder.ConfigError, match="a rule for lr, which 'schedule' also sets"):
        builder.parse_config(config)


def test_the_entry_is_adapt_so_autosgm_keeps_its_own_adaptive_flag():
    algorithm, config = builder.parse_config(
        {"name": "autosgm", "lr": 1e-2, "adaptive": False, "adapt": {"lr_rule": "trend"}}
    )
    assert config.adaptive is False and builder.parse_adaptive({"name": "autosgm", "adaptive": False}) is None
    assert builder.parse_adaptive({"name": "autosgm", "adapt": {"lr_rule": "trend"}}).lr_rule == "trend"


def test_compare_steps_the_rules_and_records_the_adapted_knobs(tmp_path):
    compare = pytest.importorskip("optorch.tools.compare")
    compare_report = pytest.importorskip("optorch.tools.compare_report")
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    path = tmp_path / "sgd_adaptive.yaml"
    path.write_text(
        "name: sgd\nlr: 0.1\nmomentum: 0.9\nadapt:\n  lr_rule: trend+cosine_restart\n  momentum_rule: relative\n  "
        "cycle_length: 4\n"
    )
    (spec,) = compare.load_specs([path])
    (result,) = compare.compare([spec], steps=12, progress=False)
    # the knobs each step used are those an AdaptiveOpt computes from the same batch losses
    reference = AdaptiveOpt(torch.optim.SGD(_param(), lr=0.1, momentum=0.9), config=spec.adaptive)
    expected = {"lr": [], "momentum": []}
    for loss in result.batch_loss:
        reference.step_loss(loss)
        expected["lr"].append(reference.lr)
        expected["momentum"].append(reference.momentum)
    assert result.knobs["lr"] == expected["lr"] and result.knobs["momentum"] == expected["momentum"]
    assert set(result.changing_knobs()) == {"lr", "momentum"}
    assert {p.name for p in compare_report.plot_knobs([result], tmp_path)} == {"knob-lr.png", "knob-momentum.png"}


def test_plot_draws_the_loss_and_every_knob(tmp_path):
    pytest.importorskip("matplotlib")
    adapt = _run(
        torch.optim.SGD(_param(), lr=0.1, momentum=0.9),
        improving(30) + [math.nan] + noisy(20),
        lr_rule="trend+cosine",
        momentum_rule="relative",
        cycle_length=10,
    )
    assert set(adapt.history) == {"loss", "lr", "momentum", "weight_decay"} and all(
        len(v) == 51 for v in adapt.history.values()
    )
    path = adapt.plot(tmp_path / "knobs.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == 800 and height == 4 * 220  # four panels: loss, lr, momentum, weight_decay


def _ddp_rank(rank: int, world_size: int, init_file: str, losses: list[list[float]], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        optimizer = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1, momentum=0.9)
        adaptive = AdaptiveOpt(optimizer, lr_rule="trend+variance", momentum_rule="relative")
        for loss in losses[rank]:
            adaptive.step_loss(torch.tensor(loss))
        torch.save(adaptive.history, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_under_ddp_every_rank_adapts_to_the_mean_loss(tmp_path):
    """Ranks see different losses; each adapts to their mean, so the knobs agree across ranks."""
    import torch.multiprocessing as mp

    generator = torch.Generator().manual_seed(0)
    losses = [
        (2.0 * torch.exp(-0.05 * torch.arange(40.0)) + 0.1 * torch.rand(40, generator=generator)).tolist()
        for _ in range(2)
    ]
    out = str(tmp_path / "history")
    mp.spawn(_ddp_rank, args=(2, str(tmp_path / "init"), losses, out), nprocs=2, join=True)
    histories = [torch.load(f"{out}.{rank}") for rank in range(2)]
    assert histories[0] == histories[1]
    single = AdaptiveOpt(
        torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1, momentum=0.9),
        lr_rule="trend+variance",
        momentum_rule="relative",
    )
    for a, b in zip(*losses):
        single.step_loss(
            (torch.tensor(a).double() + torch.tensor(b).double()) / 2
        )  # the ranks' float32 losses, averaged in float64
    for name in ("lr", "momentum"):
        assert histories[0][name] == single.history[name], name
    assert histories[0]["lr"][-1] != histories[0]["lr"][0]


@pytest.mark.compile
def test_the_compiled_shim_runs_one_graph_while_the_rules_move_lr_and_momentum():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    config = {
        "name": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "adapt": {"lr_rule": "trend+cosine_restart", "momentum_rule": "relative", "cycle_length": 5},
    }
    optimizer = optorch.build(config, model, engine="compiled")
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.adaptive.step_loss(loss)
        optimizer.step()
        optimizer.zero_grad()
    assert len(set(optimizer.adaptive.history["lr"])) > 10 and len(set(optimizer.adaptive.history["momentum"])) > 10
    assert counters["stats"]["unique_graphs"] == 1
