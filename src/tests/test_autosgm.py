"""AutoSGM: exact reductions to torch.optim (run live), the window shapes, the fixed quirks of the
original, and the config (tuples and named fields). The recorded trajectories of the original are
replayed by test_reference.py."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch

import optorch
from optorch import autosgm
from optorch.schedules import window as window_math

DTYPE = torch.float64
STEPS = 120
EXACT = 1e-12  # spec section 7: these reductions are exact up to float64 rounding


def _problem():
    generator = torch.Generator().manual_seed(7)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=DTYPE)  # noqa: E731
    params = {
        "w1": draw(4, 3) * 0.5,
        "b1": torch.zeros(3, dtype=DTYPE),
        "w2": draw(3, 2) * 0.5,
        "scale": torch.tensor(1.3, dtype=DTYPE),
    }
    return params, draw(16, 4), draw(16, 2) * 0.5


def _loss(params, x, y):
    hidden = torch.tanh(x @ params["w1"] + params["b1"])
    return ((torch.sin(hidden @ params["w2"] * params["scale"]) - y) ** 2).mean()


def _run_optimizer(make, make_scheduler=None, steps=STEPS, edit=None):
    initial, x, y = _problem()
    params = {n: p.clone().requires_grad_() for n, p in initial.items()}
    optimizer = make(list(params.values()))
    scheduler = make_scheduler(optimizer) if make_scheduler else None
    trajectory = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        _loss(params, x, y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        trajectory.append(torch.cat([p.detach().reshape(-1) for p in params.values()]).clone())
    return torch.stack(trajectory)


def _run_pure(config, steps=STEPS):
    params, x, y = _problem()
    config = autosgm.Config(**config)
    state = autosgm.init(params, config)
    trajectory = []
    for _ in range(steps):
        grads = torch.func.grad(_loss)(params, x, y)
        params, state = autosgm.step(params, grads, state, config)
        trajectory.append(torch.cat([p.reshape(-1) for p in params.values()]))
    return torch.stack(trajectory)


def _torch(reduction):
    torch_class = getattr(torch.optim, reduction.optimizer)
    return _run_optimizer(lambda ps: torch_class(ps, **reduction.kwargs), reduction.scheduler)


@pytest.mark.parametrize("reduction", autosgm.REDUCTIONS, ids=lambda r: r.label)
def test_reduces_exactly_to_torch_optim(reduction):
    expected = _torch(reduction)
    pure = _run_pure(reduction.config)
    shim = _run_optimizer(lambda ps: optorch.build({"name": "autosgm", **reduction.config}, ps, engine="eager"))
    assert expected.abs().max() < 100 and (expected[-1] - expected[0]).abs().max() > 1e-2  # it moved, stayed finite
    for got in (pure, shim):
        diff = (got - expected).abs().max().item()
        assert diff <= EXACT, f"{reduction.label}: max |diff| {diff:.3g}"


def test_reductions_are_not_trivially_equal():
    # The tolerance can fail: Nesterov without the first-step correction, or debias switched off.
    nesterov = next(r for r in autosgm.REDUCTIONS if r.label == "nesterov")
    uncorrected = _run_optimizer(lambda ps: torch.optim.SGD(ps, **nesterov.kwargs))
    assert (uncorrected - _run_pure(nesterov.config)).abs().max() > 1e-4


def test_torch_lr_schedulers_drive_the_shim():
    """The original has no 'lr' key (schedulers raise KeyError); here lr is a param-group key."""
    config = {"name": "autosgm", "adaptive": False, "lr": 0.125, "beta_i": 0.0}
    step_lr = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5)  # noqa: E731
    expected = _run_optimizer(lambda ps: torch.optim.SGD(ps, lr=0.125), step_lr, steps=30)
    got = _run_optimizer(lambda ps: optorch.build(config, ps, engine="eager"), step_lr, steps=30)
    unscheduled = _run_optimizer(lambda ps: optorch.build(config, ps, engine="eager"), steps=30)
    assert (got - expected).abs().max() <= EXACT
    assert (got - unscheduled).abs().max() > 1e-3


def test_the_parameter_itself_is_updated():
    """The original keeps a private copy of the weights and overwrites outside edits; here an edit stays."""
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=DTYPE))
    optimizer = optorch.build({"name": "autosgm", "lr": 0.0}, [param], engine="eager")
    param.grad = torch.ones_like(param)
    optimizer.step()
    with torch.no_grad():
        param.fill_(5.0)
    optimizer.step()
    assert param.tolist() == [5.0, 5.0]


def test_numerator_4_is_numerator_0():
    base = {"lr": 2.0**-7, "eps": 1e-8}
    assert torch.equal(_run_pure({**base, "numerator": 4}, steps=20), _run_pure({**base, "numerator": 0}, steps=20))


@pytest.mark.parametrize(
    "config, keys",
    [
        ({"adaptive": False, "numerator": 3}, {"step", "g_sm"}),
        ({"numerator": 0}, {"step", "g_sm", "g_var"}),
        ({"numerator": 1}, {"step", "g_sm", "g_var", "pc", "wsq", "lr_num"}),
        ({"numerator": 2}, {"step", "g_sm", "g_var", "pc", "wsq", "pcx", "lr_num"}),
        ({"numerator": 3}, {"step", "g_sm", "g_var", "pc", "lr_num"}),
    ],
)
def test_only_the_state_the_config_uses_is_allocated(config, keys):
    assert set(autosgm.algorithm.state_keys(autosgm.Config(**config))) == keys
    per_tensor = {
        key for key, value in autosgm.init_leaf(torch.zeros(3), autosgm.Config(**config)).items() if value.dim() == 0
    }
    assert per_tensor == keys & {"step", "lr_num"}


# ------------------------------------------------------------------------------------------------
# the window


def _rho(steps, **window):
    config = autosgm.Config(**window)
    return [autosgm.window(float(t), config) for t in range(1, steps + 1)]


def test_window_values_of_the_spec():
    # spec 5.5, checked against the original (L = 10, cfact = 1), three decimals
    half_cosine = [1, 0.976, 0.905, 0.794, 0.655, 0.5, 0.345, 0.206, 0.095, 0.024, 1]
    full_cosine = [0.1, 0.186, 0.411, 0.689, 0.914, 1, 0.914]
    linear = [1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 1]
    frame = {"window_epochs": 1, "window_steps_per_epoch": 10}
    assert _rho(11, window=1, window_order=2, **frame) == pytest.approx(half_cosine, abs=5e-4)
    assert _rho(7, window=1, window_order=2, window_full=True, window_floor=0.1, **frame) == pytest.approx(
        full_cosine, abs=5e-4
    )
    assert _rho(11, window=2, window_order=1, **frame) == pytest.approx(linear, abs=1e-12)


def test_logistic_late_window_is_not_normalised():
    # spec 5.3: n = 4 gives S(0) = 1.058 and S(1) = 0.311 (rho > 1 at the start, as in the original)
    assert window_math._shape(6, 0.0, 4.0, 1) == pytest.approx(1.058, abs=5e-4)
    assert window_math._shape(6, 1.0, 4.0, 1) == pytest.approx(0.311, abs=5e-4)


@pytest.mark.parametrize("kind", range(1, 7))
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("unit", [0, 1, 2, 3])
def test_window_with_tensor_step_equals_number_step(kind, full, unit):
    config = autosgm.Config(
        window=kind,
        window_full=full,
        window_unit=unit,
        window_order=0.5 if kind == 3 else 3.0,
        window_floor=0.1,
        window_flat_top=0.2,
        window_epochs=3,
        window_steps_per_epoch=4,
    )
    for t in range(1, 30):
        number = autosgm.window(float(t), config)
        tensor = autosgm.window(torch.tensor(float(t), dtype=DTYPE), config)
        assert tensor.item() == pytest.approx(number, abs=1e-15), t


def test_epoch_frames_count_epochs_of_spe_steps():
    """Fix: the original's epoch counter advances every tau steps (never when tau = 1) and, after the
    first frame, produces values with f > 1. Here the epoch is ceil(t / spe) and every frame repeats
    the first: tau = 2 epochs of spe = 3 steps, a linear half window (1 at f = 0, 0.5 at f = 1/2)."""
    assert (
        _rho(12, window=2, window_order=1, window_unit=0, window_epochs=2, window_steps_per_epoch=3)
        == [1, 1, 1, 0.5, 0.5, 0.5] * 2
    )


def test_frames_restart_inside_a_flat_top():
    """Fix: the original returns on the flat top before its end-of-frame check, so with e = 0.95 and a
    half window its frame never restarts and f grows past 1 (rho 0.5 at t = 12 here). Here the
    frame restarts, so a half window with e > (L - 1) / L stays flat."""
    assert _rho(35, window=1, window_flat_top=0.95, window_epochs=1, window_steps_per_epoch=10) == [1.0] * 35


def test_staircase_windows():
    # cfact >= 3: M copies of the shape scaled by 1/M inside one frame; rcm 2 ignores M
    frame = {"window_epochs": 1, "window_steps_per_epoch": 8, "window_unit": 4}
    poly = _rho(8, window=2, window_order=1, **frame)
    assert poly == pytest.approx([1 - k / 8 for k in range(8)], abs=1e-15)
    cosine = _rho(8, window=1, window_order=2, **frame)  # f = k/8, M f = k/2
    expected = [
        (4 - max(1, math.ceil(k / 2)) + math.cos(math.pi * (k / 2 - max(1, math.ceil(k / 2)) + 1) / 2) ** 2) / 4
        for k in range(8)
    ]
    assert cosine == pytest.approx(expected, abs=1e-15)
    assert cosine[2] == pytest.approx(0.75) and cosine[4] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------
# the config


ORIGINAL = {
    "lr_cfg": (True, 1e-2, 3),
    "beta_cfg": (0.9999, 0.999, 0.9, 0.5528, 0, True),
    "rc_cfg": (1, 0, 0, 2, 1, 1, 100000, 1, 0),
    "wd_cfg": (0.0, 0),
    "eps_cfg": (1e-10,),
}


def test_tuples_fill_the_named_fields():
    config = autosgm.Config(**ORIGINAL, mix_cfg=(False, False, 1e-2, 0.95, 0), maximize=False, dbg=False)
    assert config == optorch.parse_config("configs/autosgm.yaml")[1]
    assert set(config.hyperparameters()) == set(autosgm.Config.model_fields) and "lr" in config.hyperparameters()
    assert autosgm.Config(rc_cfg=(1, 0, 0, 2, 0, 1, 10, 1, 0), wd_cfg=(0.1, 1)).window_full is True
    assert autosgm.Config(wd_cfg=(0.1, 1)).decoupled_weight_decay is True


def test_builder_accepts_tuples_as_lists():
    optimizer = optorch.build(
        {"name": "autosgm", **{k: list(v) for k, v in ORIGINAL.items()}}, [torch.zeros(2, requires_grad=True)]
    )
    assert optimizer.param_groups[0]["lr"] == 1e-2 and optimizer.param_groups[0]["numerator"] == 3


@pytest.mark.parametrize(
    "values, match",
    [
        ({"lr_cfg": (True, 1e-2)}, "lr_cfg must have 3 entries"),
        ({"lr_cfg": (True, 1e-2, 0), "lr": 0.1}, "both given"),
        ({"numerator": 5}, "numerator"),
        ({"window": 7}, "window"),
        ({"window_unit": -1}, "window_unit"),
        ({"window_epochs": 1, "window_steps_per_epoch": 1}, "tau \\* spe"),
        ({"window_unit": 0, "window_epochs": 1, "window_steps_per_epoch": 5}, "window_epochs"),
        ({"window": 3, "window_order": 1.0}, "exponential"),
        ({"window_order": 0.0}, "window_order"),
        ({"beta_i": 1.0}, "beta_i"),
        ({"beta_a": -0.1}, "beta_a"),
        ({"eta_i": 1.5}, "eta_i"),
        ({"beta_i": 0.5, "gamma_i": 0.5}, "gamma_i"),
        ({"eps": -1.0}, "eps"),
        ({"lr": -1.0}, "lr"),
        ({"mix_cfg": (True, False, 1e-2, 0.95, 0)}, "2D mode"),
        ({"dbg": True}, "dbg"),
        ({"window_flat_top": 1.5}, "window_flat_top"),
        ({"numerator": 1.0}, "numerator"),
    ],
)
def test_bad_configs_are_refused_by_name(values, match):
    with pytest.raises(pydantic.ValidationError, match=match):
        autosgm.Config(**values)


def test_kronecker_sequence_warns_and_is_ignored():
    with pytest.warns(UserWarning, match="ignored"):
        config = autosgm.Config(window=1, window_sequence=1, window_epochs=1, window_steps_per_epoch=10)
    assert _rho(10, window=1, window_epochs=1, window_steps_per_epoch=10) == [
        autosgm.window(float(t), config) for t in range(1, 11)
    ]


def test_tensor_hyperparameters_match_numbers():
    numbers = {
        "lr": 2.0**-6,
        "numerator": 2,
        "beta_i": 0.8,
        "gamma_i": 0.3,
        "eta_i": 0.5,
        "debias": False,
        "weight_decay": 0.01,
        "decoupled_weight_decay": True,
        "window": 5,
        "window_order": 3.0,
        "window_floor": 0.1,
        "window_epochs": 1,
        "window_steps_per_epoch": 7,
        "eps": 1e-8,
    }
    tensors = {k: torch.tensor(v, dtype=DTYPE) if isinstance(v, float) else v for k, v in numbers.items()}
    diff = (_run_pure(numbers, steps=15) - _run_pure(tensors, steps=15)).abs().max().item()
    assert diff <= 1e-14
