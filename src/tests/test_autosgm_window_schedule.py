"""AutoSGM's windows as schedules (``schedules.AutosgmWindow``, name ``autosgm_window``)."""

from __future__ import annotations

import pydantic
import pytest
import torch

import optorch
from optorch import autosgm, schedules

WINDOWS = [
    {"window": 0},
    {"window": 1, "window_epochs": 5, "window_steps_per_epoch": 6, "window_floor": 0.1},
    {"window": 2, "window_order": 1.5, "window_epochs": 4, "window_steps_per_epoch": 5, "window_full": True},
    {
        "window": 3,
        "window_order": 3.0,
        "window_epochs": 3,
        "window_steps_per_epoch": 7,
        "window_unit": 0,
        "window_flat_top": 0.2,
    },
    {"window": 4, "window_epochs": 10, "window_unit": 3, "window_floor": 0.05},
    {"window": 5, "window_order": 1.0, "window_epochs": 6, "window_steps_per_epoch": 4, "window_unit": 2},
    {"window": 6, "window_order": 4.0, "window_epochs": 12, "window_unit": 4, "window_full": True},
    {"window": 1, "window_epochs": 8, "window_flat_top": 1.0},
]
IDS = [f"kind{w['window']}-{i}" for i, w in enumerate(WINDOWS)]


@pytest.mark.parametrize("keys", WINDOWS, ids=IDS)
def test_the_schedule_is_autosgms_window_one_step_later(keys):
    """Step s (0-based, as every schedule) is AutoSGM's t = s + 1; values are autosgm.window's, exactly."""
    schedule = schedules.from_config({"name": "autosgm_window", **keys})
    config = autosgm.Config(**keys)
    steps = range(0, 130)
    for s in steps:
        assert schedule(s) == autosgm.window(s + 1, config), s
        assert schedule(torch.tensor(s)).item() == float(
            autosgm.window(torch.tensor(s + 1, dtype=torch.float64), config)
        ), s
    vector = schedule(torch.arange(130))  # element-wise over a tensor of steps
    expected = autosgm.window(torch.arange(1, 131, dtype=torch.float64), config)
    expected = torch.as_tensor(expected, dtype=torch.float64).expand(130)
    assert vector.dtype == torch.float64 and torch.equal(vector, expected)
    # the number path and the tensor path agree to rounding (libm against torch's cos and pow)
    torch.testing.assert_close(
        vector, torch.tensor([schedule(s) for s in steps], dtype=torch.float64), rtol=1e-14, atol=1e-15
    )
    scaled = schedules.from_config({"name": "autosgm_window", "init_value": 0.03, **keys})
    assert all(scaled(s) == 0.03 * autosgm.window(s + 1, config) for s in steps)


def test_the_windows_move():
    """Not a flat line by accident: the raised cosine falls from 1 to its floor in each frame of 30 steps."""
    schedule = schedules.from_config({"name": "autosgm_window", **WINDOWS[1]})
    values = [schedule(s) for s in range(60)]
    assert values[0] == values[30] == 1.0 and all(a > b for a, b in zip(values[:29], values[1:30]))
    assert 0.1 < values[29] < 0.11


def test_the_compiled_schedule_equals_eager():
    schedule = schedules.from_config({"name": "autosgm_window", **WINDOWS[3]})
    torch._dynamo.reset()
    compiled = torch.compile(schedule, fullgraph=True)
    for s in (0, 5, 17, 40):
        torch.testing.assert_close(compiled(torch.tensor(s)), schedule(torch.tensor(s)), rtol=1e-15, atol=0)


@pytest.mark.parametrize("keys", WINDOWS[1:4], ids=IDS[1:4])
def test_a_builder_schedule_entry_reproduces_autosgms_own_window(keys):
    """AutoSGM with window 0 and the window as an lr schedule is the same run as AutoSGM with the window."""
    lr = 0.05
    torch.manual_seed(0)
    start = [torch.randn(4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    windowed = [p.clone().requires_grad_() for p in start]
    scheduled = [p.clone().requires_grad_() for p in start]
    base = {"name": "autosgm", "lr": lr, "adaptive": False, "beta_i": 0.9}
    a = optorch.build({**base, **keys}, windowed, engine="eager")
    b = optorch.build(
        {**base, "schedule": {"lr": {"name": "autosgm_window", "init_value": lr, **keys}}}, scheduled, engine="eager"
    )
    for t in range(70):
        for optimizer, params in ((a, windowed), (b, scheduled)):
            optimizer.zero_grad()
            sum(((p - 0.1 * (t % 5)) ** 2).sum() for p in params).backward()
            optimizer.step()
        for p, q in zip(windowed, scheduled):
            assert torch.equal(p, q), t
    assert not torch.equal(windowed[0], start[0])


@pytest.mark.parametrize(
    "keys, field",
    [
        ({"window": 9}, "window"),
        ({"window": 1, "window_order": -1.0}, "window_order"),
        ({"window": 1, "window_floor": 2.0}, "window_floor"),
        ({"window": 1, "window_unit": -1}, "window_unit"),
        ({"window": 1, "window_epochs": 1}, "window_epochs"),
        ({"window": 1, "window_sequence": 0}, "window_sequence"),
        ({"window": 1.5}, "window"),
        ({}, "window"),
    ],
)
def test_bad_windows_name_the_key(keys, field):
    with pytest.raises(pydantic.ValidationError, match=field):
        schedules.from_config({"name": "autosgm_window", **keys})
    with pytest.raises(optorch.ConfigError, match=field):
        optorch.parse_config({"name": "sgd", "lr": 0.1, "schedule": {"lr": {"name": "autosgm_window", **keys}}})


def test_it_is_a_named_schedule_that_round_trips_and_joins():
    assert "autosgm_window" in schedules.names() and schedules.SCHEDULES["autosgm_window"] is schedules.AutosgmWindow
    schedule = schedules.from_config({"name": "autosgm_window", **WINDOWS[2]})
    assert schedules.from_config(schedule.model_dump()) == schedule
    joined = schedules.from_config(
        {"name": "join", "boundaries": [10], "schedules": [{"name": "constant", "value": 0.5}, schedule.model_dump()]}
    )
    assert joined(3) == 0.5 and joined(10) == schedule(0) and joined(27) == schedule(17)
