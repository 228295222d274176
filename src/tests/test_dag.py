"""DAG (Dynamic-Alpha Gradient): the spec's tests (specs/dag.md §12) with hand-derived expected values,
the fixed behaviours (§10), validation, and a compiled step without graph breaks.

The recorded trajectories of the original (``optorch/data/dag.json``) are replayed by ``test_reference.py``;
``test_maximize_without_momentum_equals_the_original`` below names the case that pins maximize.
"""

from __future__ import annotations

import math
import statistics

import pydantic
import pytest
import torch
from torch._dynamo.utils import counters

import optorch
from optorch import dag
from optorch.tools import recorded, verify

DTYPE = torch.float64


def _grad(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def _first_step_by_hand(g: torch.Tensor, config: dag.Config, d_total: int, sat_prev: float = 0.0):
    """alpha_1 and the direction u_1 = k tanh(alpha_1 g / (N + eps)) of a tensor's first step at s = 1."""
    h = config.hyper
    values = g.reshape(-1).tolist()
    d, norm = len(values), math.sqrt(sum(v * v for v in values))
    alpha_hat = (
        h.kappa
        * (norm + h.eps)
        / (norm / math.sqrt(d) + h.eps)
        * (d / d_total) ** h.beta
        * (h.p_star / (sat_prev + h.eps)) ** h.eta
    )
    alpha = (1 - h.rho) * 1.0 + h.rho * alpha_hat
    x = [alpha * v / (norm + h.eps) for v in values]
    return alpha, x, torch.tensor([config.k_val * math.tanh(v) for v in x], dtype=DTYPE).reshape(g.shape)


# ------------------------------------------------------------------------------------------------
# spec §12


def test_first_step_of_one_tensor():  # §12.1
    config = dag.Config(lr=0.1, k_val=1.5)
    p, g = _grad((5, 4), 0), _grad((5, 4), 1)
    new, state = dag.step({"w": p}, {"w": g}, dag.init({"w": p}, config), config)
    alpha, _, u = _first_step_by_hand(g, config, d_total=20)
    # S- = 0: the saturation factor is (p*/eps)^eta = 1e4^0.3 = 15.85 (spec §4 step 7)
    assert (config.hyper.p_star / config.hyper.eps) ** config.hyper.eta == pytest.approx(15.8489, abs=1e-4)
    assert state["alpha"]["w"].item() == pytest.approx(alpha, rel=1e-13)
    torch.testing.assert_close(new["w"], p - 0.1 * u, rtol=0, atol=1e-14)
    assert state["sigma"]["w"].item() == pytest.approx(
        g.norm().item() / math.sqrt(20), rel=1e-14
    )  # §12.7: sigma = |g|/sqrt(d)


def _run(config, params, steps, grads_at):
    state = dag.init(params, config)
    history = []
    for t in range(steps):
        new, state = dag.step(params, grads_at(t, params), state, config)
        history.append((params, new, state))
        params = new
    return history


def test_warmup_keeps_s_at_one_and_rms0_is_the_ema_of_the_ema():  # §12.2
    config = dag.Config(lr=0.05, shrink={"warmup_steps": 6, "ema_beta": 0.7})
    params = {"w": _grad((4, 3), 2), "b": _grad((3,), 3)}
    history = _run(config, params, 6, lambda t, p: {k: torch.sin(v * (t + 2)) for k, v in p.items()})
    rms_t = rms0 = None
    for t, (before, after, state) in enumerate(history):
        # m = wd = 0: u = (before - after) / lr, so the RMS follows from the parameters alone.
        squares = sum((((before[k] - after[k]) / 0.05) ** 2).sum().item() for k in before)
        rms = math.sqrt(squares / 15)
        rms_t = rms if rms_t is None else 0.7 * rms_t + 0.3 * rms
        rms0 = rms_t if rms0 is None else 0.7 * rms0 + 0.3 * rms_t
        shared = state["shared"]
        assert shared["s_t"].item() == 1.0
        assert shared["rms_t_ema"].item() == pytest.approx(rms_t, rel=1e-10)
        assert shared["rms0_ema"].item() == pytest.approx(rms0, rel=1e-10)
        assert shared["global_step"].item() == t + 1


@pytest.mark.parametrize("gamma, expected", [(1.0, 0.55), (2.0, 0.1 + 0.9 * 0.25), (0.5, 0.1 + 0.9 * math.sqrt(0.5))])
def test_shrink_formula(gamma, expected):  # §12.3: rms_t = 0.15 RMS0, lambda = 0.3, ratio 0.5
    config = dag.Config(shrink={"lambda_rms": 0.3, "s_min": 0.1, "ema_beta": 0.0, "warmup_steps": 0, "gamma": gamma})
    shared = dag.init_shared([torch.zeros(10, dtype=DTYPE)], config)
    shared = {
        **shared,
        "global_step": torch.tensor(7.0, dtype=DTYPE),
        "rms0_ema": torch.tensor(2.0, dtype=DTYPE),
        "rms_count": torch.tensor(7.0, dtype=DTYPE),
    }
    totals = {"sum_u2": torch.tensor(0.3**2 * 10, dtype=DTYPE), "numel": torch.tensor(10.0, dtype=DTYPE)}
    new = dag.finish(shared, totals, config)
    assert new["rms_t_ema"].item() == pytest.approx(0.3)
    assert new["rms0_ema"].item() == 2.0  # frozen after warmup
    assert new["s_t"].item() == pytest.approx(expected, rel=1e-14)
    # far below the baseline: the floor s_min; above it: no shrink
    assert dag.finish(shared, {**totals, "sum_u2": torch.tensor(0.0, dtype=DTYPE)}, config)[
        "s_t"
    ].item() == pytest.approx(0.1)
    assert dag.finish(shared, {**totals, "sum_u2": torch.tensor(10.0, dtype=DTYPE)}, config)["s_t"].item() == 1.0


def test_after_an_empty_warmup_rms0_is_the_first_measurement():  # §10 #14
    config = dag.Config(shrink={"warmup_steps": 0})
    shared = dag.init_shared([torch.zeros(4, dtype=DTYPE)], config)
    new = dag.finish(
        shared, {"sum_u2": torch.tensor(4.0, dtype=DTYPE), "numel": torch.tensor(4.0, dtype=DTYPE)}, config
    )
    assert new["rms_t_ema"].item() == new["rms0_ema"].item() == 1.0
    assert new["s_t"].item() == 1.0  # ratio 1 / 0.3 clipped to 1


def test_s_lags_one_step():  # §10 #16: the s set by a step's shrink is used by the next step
    config = dag.Config(lr=0.05, shrink={"warmup_steps": 1, "lambda_rms": 5.0, "s_min": 0.2})
    params = {"w": _grad((6,), 4)}
    history = _run(config, params, 3, lambda t, p: {"w": torch.sin(p["w"] * (t + 1))})
    s_after = [state["shared"]["s_t"].item() for _, _, state in history]
    assert s_after[0] == 1.0 and 0.2 <= s_after[1] < 1.0
    # |u| < k s elementwise: step 2 ran with s = s_after[1], step 1 still with s = 1.
    before, after, _ = history[2]
    assert ((before["w"] - after["w"]).abs() / 0.05).max().item() < 2.0 * s_after[1]


def test_saturation_refreshes_only_on_its_cadence():  # §12.4
    config = dag.Config(lr=0.05, sat_every=3, hyper={"tau": 0.05})
    params = {"w": _grad((8, 5), 5)}
    history = _run(config, params, 8, lambda t, p: {"w": torch.sin(3 * p["w"] + t)})
    sats = [0.0] + [state["sat_ratio"]["w"].item() for _, _, state in history]
    for t in range(8):
        if t % 3:
            assert sats[t + 1] == sats[t], t
    assert len({sats[1], sats[4], sats[7]}) > 1, "a vacuous check: the refreshed values never changed"
    # step 0's value, by hand: the fraction of |x| > tau, x = alpha_1 g / (N + eps)
    _, x, _ = _first_step_by_hand(torch.sin(3 * params["w"]), config, d_total=40)
    fraction = sum(abs(v) > 0.05 for v in x) / 40
    assert sats[1] == torch.tensor(fraction, dtype=torch.float32).item()  # a float32 mean, as in the original


def test_first_momentum_buffer_is_damped():  # §12.5 (torch.optim.SGD would start at u)
    config = dag.Config(lr=0.1, momentum=0.9, dampening=0.3)
    p, g = _grad((7,), 6), _grad((7,), 7)
    new, state = dag.step([p], [g], dag.init([p], config), config)
    _, _, u = _first_step_by_hand(g, config, d_total=7)
    torch.testing.assert_close(state["momentum_buffer"][0], 0.7 * u, rtol=0, atol=1e-14)
    torch.testing.assert_close(new[0], p - 0.1 * 0.7 * u, rtol=0, atol=1e-14)


def test_k_schedule_receives_the_optimizer_step_and_stops_at_zero():  # §12.6, §10 #17
    config = dag.Config(lr=0.1, k_val=9.0, k_sched={"name": "cosine", "k0": 2.0, "total_steps": 4})
    params = {"w": _grad((5,), 8)}
    state = dag.init(params, config)
    assert state["shared"]["k_val"].item() == 9.0  # k_val until the first step, as the original's opt.k_val
    g = {"w": _grad((5,), 9)}
    for t in range(6):
        new, state = dag.step(params, g, state, config)
        k = 2.0 * 0.5 * (1 + math.cos(math.pi * min(t, 4) / 4))
        assert state["shared"]["k_val"].item() == pytest.approx(k, abs=1e-15)
        # |u|_inf = k tanh(max|x|): the step used k(t), t = 0, 1, 2, ...
        step = ((params["w"] - new["w"]).abs().max() / 0.1).item()
        assert step == pytest.approx(
            k * math.tanh(state["alpha"]["w"].item() * g["w"].abs().max().item() / (g["w"].norm().item() + 1e-5)),
            abs=1e-14,
        )
        params = new
    assert t >= 4 and step == 0.0  # the hazard: from total_steps on, the update is zero
    # set_k_val(k) of the original: a config without the schedule
    fixed = config.replace(k_sched=None, k_val=0.5)
    assert dag._amplitude(fixed, state["shared"]["global_step"]) == 0.5


def test_d_total_and_the_rms_span_every_group_and_param():  # §12.8, §10 #9
    torch.manual_seed(0)
    a, b, frozen_out = (
        torch.randn(3, 4, dtype=DTYPE, requires_grad=True),
        torch.randn(5, dtype=DTYPE, requires_grad=True),
        torch.randn(2, dtype=DTYPE, requires_grad=True),
    )
    opt = optorch.build(
        {"name": "dag", "lr": 0.1}, [{"params": [a]}, {"params": [b, frozen_out], "lr": 0.05}], engine="eager"
    )
    assert opt.shared["d_total"].item() == 12 + 5 + 2  # counts a param that never gets a gradient
    before = [a.detach().clone(), b.detach().clone()]
    (a.sin().sum() + b.cos().sum()).backward()
    opt.step()
    squares = (((before[0] - a.detach()) / 0.1) ** 2).sum() + (((before[1] - b.detach()) / 0.05) ** 2).sum()
    assert opt.shared["rms_t_ema"].item() == pytest.approx(math.sqrt(squares.item() / 17), rel=1e-12)
    # first-step alpha of each tensor uses d_L / d_total with the shared total
    alpha_a, _, _ = _first_step_by_hand(torch.cos(before[0]), opt.group_config(opt.param_groups[0]), d_total=19)
    assert opt.state[a]["alpha"].item() == pytest.approx(alpha_a, rel=1e-12)
    opt.add_param_group({"params": [torch.zeros(10, dtype=DTYPE, requires_grad=True)]})
    assert opt.shared["d_total"].item() == 29  # recomputed (the original keeps its first count)
    assert opt.shared["global_step"].item() == 1


@pytest.mark.parametrize("tau, p_star, expected", [(1.25, 0.1, 0.7599), (1.5, 0.1, 0.9119), (1.25, 0.15, 0.8683)])
def test_kappa_auto_value(tau, p_star, expected):  # §12.9
    kappa = dag.Config(hyper={"tau": tau, "p_star": p_star}).hyper.kappa
    assert round(kappa, 4) == expected
    assert kappa == pytest.approx(tau / statistics.NormalDist().inv_cdf(1 - p_star / 2), rel=1e-6)  # float32 quantile
    assert dag.Config(hyper={"kappa": 0.5}).hyper.kappa == 0.5


def test_maximize_without_momentum_equals_the_original():  # §12.10
    case = recorded.case("dag", "hyper_maximize")
    assert case["config"]["maximize"] and not case["config"]["momentum"] and not case["config"]["weight_decay"]
    original = [
        [torch.tensor(values, dtype=torch.float64) for values in step] for step in case["trajectory"]
    ]  # its maximize, unfixed
    assert verify.max_abs_diff(recorded.replay("dag", case), original) <= 1e-12


@pytest.mark.parametrize(
    "flags", [{"momentum": 0.9, "nesterov": True}, {"momentum": 0.9, "dampening": 0.2}, {"weight_decay": 0.1}, {}]
)
def test_maximize_is_minimizing_the_negated_objective(flags):  # §10 #3-4
    params = {"w": _grad((4, 3), 10), "b": _grad((3,), 11)}
    grads_at = lambda t, p: {k: torch.sin(2 * v + t) for k, v in p.items()}  # noqa: E731
    up = _run(dag.Config(lr=0.05, maximize=True, **flags), params, 6, grads_at)
    down = _run(dag.Config(lr=0.05, **flags), params, 6, lambda t, p: {k: -v for k, v in grads_at(t, p).items()})
    for (_, a, _), (_, b, _) in zip(up, down):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_maximize_never_flips_the_momentum_buffer():  # §12.10: the original negates it every step
    config = dag.Config(lr=0.01, momentum=0.9, maximize=True)
    params, g = {"w": _grad((6,), 12)}, {"w": _grad((6,), 13)}
    state = dag.init(params, config)
    signs = []
    for _ in range(5):
        params, state = dag.step(params, g, state, config)
        signs.append(torch.sign(state["momentum_buffer"]["w"]))
    assert all(torch.equal(s, signs[0]) for s in signs)
    assert torch.equal(signs[0], -torch.sign(g["w"]))  # the buffer of -g's direction: p - lr buf climbs


def test_maximize_with_weight_decay_still_shrinks_the_weights():  # §10 #4
    config = dag.Config(lr=0.1, weight_decay=0.5, maximize=True)
    p = _grad((5,), 14)
    new, _ = dag.step([p], [torch.zeros_like(p)], dag.init([p], config), config)  # u = 0 + wd p
    torch.testing.assert_close(new[0], p * (1 - 0.1 * 0.5), rtol=0, atol=1e-15)


def test_exact_sigma_is_the_population_std_refreshed_on_its_cadence():  # §10 #8
    config = dag.Config(lr=0.05, use_exact_sigma=True, sigma_every=2)
    params = {"w": _grad((9,), 15)}
    grads = [_grad((9,), 16 + t) for t in range(4)]
    history = _run(config, params, 4, lambda t, p: {"w": grads[t]})
    sigmas = [state["sigma"]["w"].item() for _, _, state in history]
    assert sigmas[0] == pytest.approx(statistics.pstdev(grads[0].tolist()), rel=1e-13)
    assert sigmas[1] == sigmas[0]
    assert sigmas[2] == pytest.approx(statistics.pstdev(grads[2].tolist()), rel=1e-13)
    assert sigmas[3] == sigmas[2]
    alpha, _, u = _first_step_by_hand(grads[0], dag.Config(lr=0.05), d_total=9)
    assert history[0][2]["alpha"]["w"].item() != pytest.approx(alpha)  # the std entered alpha_hat


def test_global_step_advances_without_gradients_and_the_shrink_waits():  # §10 #16
    config = dag.Config()
    params = {"w": _grad((3,), 20)}
    state = dag.init(params, config)
    new, state = dag.step(params, {"w": None}, state, config)
    assert state["shared"]["global_step"].item() == 1 and state["shared"]["rms_count"].item() == 0
    assert torch.equal(new["w"], params["w"])
    _, state = dag.step(params, {"w": torch.ones(3, dtype=DTYPE)}, state, config)
    assert state["shared"]["global_step"].item() == 2 and state["shared"]["rms_count"].item() == 1
    assert state["shared"]["rms_t_ema"].item() == state["shared"]["rms0_ema"].item() > 0


def test_per_tensor_scalars_are_at_least_float32():  # §10 #12
    for dtype, expected in (
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
        (DTYPE, DTYPE),
    ):
        state = dag.init_leaf(torch.zeros(3, dtype=dtype), dag.Config())
        assert {v.dtype for v in state.values()} == {expected}
    params = {"w": torch.randn(4, 4).to(torch.bfloat16)}
    new, state = dag.step(
        params, {"w": torch.randn(4, 4).to(torch.bfloat16)}, dag.init(params, dag.Config(lr=0.1)), dag.Config(lr=0.1)
    )
    assert new["w"].dtype == torch.bfloat16 and state["alpha"]["w"].dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# config


def test_readme_quick_start_keys_are_accepted_and_override_shrink(tmp_path):  # §10 #18
    config = dag.Config(lambda_rms=0.4, s_min=0.2, shrink={"s_min": 0.5, "warmup_steps": 100})
    assert (config.shrink.lambda_rms, config.shrink.s_min, config.shrink.warmup_steps) == (0.4, 0.2, 100)
    path = tmp_path / "dag.yaml"
    path.write_text("name: dag\nlr: 3e-4\nlambda_rms: 0.25\nshrink:\n  gamma: 2.0\n")
    _, parsed = optorch.parse_config(path)
    assert (parsed.shrink.lambda_rms, parsed.shrink.gamma, parsed.shrink.s_min) == (0.25, 2.0, 0.1)


def test_nested_settings_merge_over_defaults_and_param_groups_hold_plain_dicts():
    config = dag.Config(hyper={"tau": 1.5}, shrink=None)
    assert config.hyper.tau == 1.5 and config.hyper.rho == 0.1 and config.shrink == dag.ShrinkSettings()
    values = config.hyperparameters()
    assert type(values["hyper"]) is dict and values["hyper"]["kappa"] == config.hyper.kappa
    assert dag.Config(**values) == config
    opt = optorch.build({"name": "dag", "hyper": {"tau": 1.5}}, [torch.zeros(2, requires_grad=True)], engine="eager")
    assert opt.param_groups[0]["hyper"] == values["hyper"]


@pytest.mark.parametrize("value, expected", [(0, 1), (-3, 1), (2.7, 2), (5, 5)])
def test_cadences_are_coerced_like_the_original(value, expected):  # §10 #6
    config = dag.Config(sigma_every=value, sat_every=value)
    assert config.sigma_every == config.sat_every == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hyper": {"p_star": 0.0}}, "p_star"),
        ({"hyper": {"p_star": 1.0}}, "p_star"),
        ({"hyper": {"tau": 0.0}}, "tau"),
        ({"hyper": {"eps": 0.0}}, "eps"),
        ({"hyper": {"rho": 1.5}}, "rho"),
        ({"hyper": {"eta": -0.1}}, "eta"),
        ({"hyper": {"alpha_min": 2.0, "alpha_max": 1.0}}, "alpha_min"),
        ({"hyper": {"kapa": 1.0}}, "'kapa'"),
        ({"shrink": {"s_minimum": 0.1}}, "'s_minimum'"),
        ({"shrink": {"s_min": 0.0}}, "s_min"),
        ({"shrink": {"lambda_rms": -1.0}}, "lambda_rms"),
        ({"shrink": {"ema_beta": 1.5}}, "ema_beta"),
        ({"shrink": {"warmup_steps": 2.5}}, "warmup_steps"),
        ({"s_min": 2.0}, "s_min"),
        ({"lr": -1.0}, "lr"),
        ({"momentum": -0.5}, "momentum"),
        ({"weight_decay": -0.5}, "weight_decay"),
        ({"k_val": -1.0}, "k_val"),
        ({"nesterov": True}, "nesterov"),
        ({"nesterov": True, "momentum": 0.9, "dampening": 0.1}, "nesterov"),
        ({"k_sched": {"name": "linear", "k0": 1.0, "total_steps": 5}}, "k_sched"),
        ({"k_sched": {"name": "cosine", "k0": 1.0, "total_steps": 0}}, "total_steps"),
        ({"k_sched": {"name": "cosine", "total_steps": 10}}, "k0"),
        ({"sat_every": "10"}, "sat_every"),
        ({"use_exact_sigma": 1}, "use_exact_sigma"),
    ],
)
def test_invalid_settings_are_refused_by_name(kwargs, match):  # §10 #5
    with pytest.raises(pydantic.ValidationError, match=match):
        dag.Config(**kwargs)


def test_execution_flags_never_change_the_numbers():  # §10 #7
    params = {"w": _grad((4, 3), 30)}
    grads_at = lambda t, p: {"w": torch.sin(p["w"] + t)}  # noqa: E731
    plain = _run(dag.Config(lr=0.05, momentum=0.9), params, 4, grads_at)
    flagged = _run(
        dag.Config(lr=0.05, momentum=0.9, foreach=True, fused=False, differentiable=True), params, 4, grads_at
    )
    for (_, a, _), (_, b, _) in zip(plain, flagged):
        assert torch.equal(a["w"], b["w"])


# ------------------------------------------------------------------------------------------------
# shim observables and compiled steps


def test_shim_exposes_shared_and_per_tensor_observables_and_checkpoints_them():
    torch.manual_seed(0)
    w = torch.randn(4, 3, dtype=DTYPE, requires_grad=True)
    opt = optorch.build(
        {"name": "dag", "lr": 0.05, "shrink": {"warmup_steps": 2, "lambda_rms": 5.0}}, [w], engine="eager"
    )
    for _ in range(4):
        opt.zero_grad()
        w.sin().sum().backward()
        opt.step()
    assert set(opt.shared) == {"global_step", "k_val", "s_t", "rms_t_ema", "rms0_ema", "rms_count", "d_total"}
    assert opt.shared["global_step"].item() == 4 and opt.shared["s_t"].item() < 1.0
    assert set(opt.state[w]) == {"alpha", "sat_ratio", "sigma"}
    saved = opt.state_dict()
    assert saved["param_groups"][0]["shared.s_t"].item() == opt.shared["s_t"].item()
    assert opt.step(lambda: torch.tensor(3.0)) == 3.0  # §10 #10: the closure's loss comes back


@pytest.mark.compile
def test_pure_step_compiles_to_one_graph_and_equals_eager():
    """No graph break (so no host sync): cadences, warmup and the first-measurement logic run on tensors.
    Dynamo's own backend is enough to prove it (inductor runs in the shim's replays, test_reference.py)."""
    config = dag.Config(
        lr=0.05,
        momentum=0.9,
        nesterov=True,
        weight_decay=0.01,
        use_exact_sigma=True,
        sigma_every=2,
        sat_every=3,
        k_sched={"name": "cosine", "k0": 2.0, "total_steps": 5},
        shrink={"warmup_steps": 2, "lambda_rms": 5.0},
    )
    params = {"w": _grad((4, 3), 40), "b": _grad((3,), 41)}
    grads_at = lambda t, p: {k: torch.sin(3 * v + t) for k, v in p.items()}  # noqa: E731
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(dag.step, fullgraph=True, backend="eager")
    eager_params, eager_state = params, dag.init(params, config)
    compiled_params, compiled_state = params, dag.init(params, config)
    for t in range(7):
        eager_params, eager_state = dag.step(eager_params, grads_at(t, eager_params), eager_state, config)
        compiled_params, compiled_state = compiled(
            compiled_params, grads_at(t, compiled_params), compiled_state, config
        )
    assert counters["stats"]["unique_graphs"] == 1, "the step recompiled (a guard on a step-dependent value)"
    assert compiled_state["shared"]["s_t"].item() < 1.0  # the shrink ran after warmup
    for a, b in zip(
        torch.utils._pytree.tree_leaves((eager_params, eager_state)),
        torch.utils._pytree.tree_leaves((compiled_params, compiled_state)),
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch._dynamo.reset()


def test_global_keys_are_refused_in_param_groups():
    """k_val, hyper, shrink, ... feed the shared state once per step: a group cannot have its own."""
    params = [torch.nn.Parameter(torch.randn(3, dtype=DTYPE)), torch.nn.Parameter(torch.randn(2, dtype=DTYPE))]
    with pytest.raises(ValueError, match=r"'k_val'.*one value for all param groups"):
        optorch.build({"name": "dag", "lr": 0.1}, [{"params": params[:1]}, {"params": params[1:], "k_val": 3.0}])
    with pytest.raises(ValueError, match=r"'hyper'"):
        optorch.build({"name": "dag"}, [{"params": params, "hyper": {"tau": 2.0}}])
    # Per-group keys and a group repeating the optimizer's value stay allowed.
    opt = optorch.build(
        {"name": "dag", "k_val": 3.0}, [{"params": params[:1], "lr": 0.5, "k_val": 3.0}, {"params": params[1:]}]
    )
    saved = opt.state_dict()
    saved["param_groups"][1]["k_val"] = 4.0
    with pytest.raises(ValueError, match=r"param group 1 of the state_dict sets 'k_val'"):
        opt.load_state_dict(saved)
    assert opt.param_groups[1]["k_val"] == 3.0


def test_tanh_is_accurate_odd_and_bounded_eagerly_and_compiled():
    """``ops.tanh`` (DAG's direction) against float64's tanh over float32's range: eagerly the sigmoid
    form within 1.5 eps (absolute), compiled below float64 a rational function within 3.4 eps relative
    to the value (so exact-ish near 0, where the sigmoid form is only absolutely accurate). Both odd to
    the bit, |tanh| <= 1, NaN kept, +-inf to +-1; bfloat16 and float16 round to torch.tanh's values."""
    from optorch.core import ops

    torch._dynamo.reset()
    compiled = torch.compile(ops.tanh, fullgraph=True)
    x = torch.cat(
        [
            torch.linspace(-12, 12, 2_000_001),
            torch.logspace(-37, 1.2, 100_000),
            torch.tensor([0.0, 7.9, 8.0, 9.0, 1e30]),
        ]
    )
    x = torch.cat([x, -x]).to(torch.float32)
    truth = torch.tanh(x.double())
    eps = torch.finfo(torch.float32).eps
    for tanh, absolute, relative in ((ops.tanh, 1.5 * eps, None), (compiled, None, 3.4 * eps)):
        y = tanh(x)
        error = (y.double() - truth).abs()
        if absolute is not None:
            assert error.max() <= absolute
        else:
            assert (error <= relative * truth.abs()).all()
        assert torch.equal(tanh(-x), -y) and bool((y.abs() <= 1).all())
        assert torch.equal(torch.signbit(tanh(torch.tensor([0.0, -0.0]))), torch.tensor([False, True]))
        special = tanh(torch.tensor([float("inf"), -float("inf"), float("nan")]))
        assert special[:2].tolist() == [1.0, -1.0] and special[2].isnan()
    for dtype in (torch.bfloat16, torch.float16):
        low = torch.linspace(-10, 10, 20_001).to(dtype)
        assert torch.equal(compiled(low), torch.tanh(low.double()).to(dtype))
    torch._dynamo.reset()
