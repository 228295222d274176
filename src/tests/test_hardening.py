"""Bad input, case by case (issue 13): every bad config, file, tensor, checkpoint, call and command line
gets a clear error that names what is wrong, and changes nothing.

Each case is a :class:`Bad`: what to do, the error it must raise and a pattern its message must
match. Cases with an optimizer also check that it is bit-identical afterwards (its ``state_dict``, its
params, its param groups) and still usable: one more step gives exactly what an untouched twin gives.
``CASES`` lists them all; ``python src/tests/test_hardening.py`` prints how each one ends
(clear error, other error, silently accepted, crash), the count the issue asks for.
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch

import optorch
from optorch.tools import cli, compare

# ------------------------------------------------------------------------------------------------
# the harness


@dataclass(frozen=True)
class Bad:
    """A bad input: ``act()`` (or ``act(optimizer)`` with ``make``) must raise ``error`` matching
    ``match``, and leave the optimizer ``make()`` built exactly as it was."""

    id: str
    act: Callable[..., Any]
    error: type[BaseException] | tuple[type[BaseException], ...]
    match: str
    make: Callable[[], torch.optim.Optimizer] | None = None
    usable: bool = True
    """Whether the optimizer steps afterwards (not when ``make`` put the bad value in it)."""


def params(seed: int = 0) -> list[torch.nn.Parameter]:
    """A 2-D and a 1-D parameter (Adafactor factors the first, not the second)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(2, 3, generator=generator)),
        torch.nn.Parameter(torch.randn(3, generator=generator)),
    ]


def set_grads(optimizer: torch.optim.Optimizer, i: int) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.sin(3 * p.detach() + i) + 0.1


def trained(
    config: dict, steps: int = 3, engine: str = "eager", groups: bool = False
) -> Callable[[], optorch.Optimizer]:
    """A factory of the same optimizer after ``steps`` steps, deterministic (``groups``: each param
    in a param group of its own)."""

    def make() -> optorch.Optimizer:
        optimizer = optorch.build(config, [{"params": [p]} for p in params()] if groups else params(), engine=engine)
        for i in range(steps):
            set_grads(optimizer, i)
            optimizer.step()
        return optimizer

    return make


def snapshot(optimizer: torch.optim.Optimizer) -> dict:
    return {
        "state_dict": copy.deepcopy(optimizer.state_dict()),
        "params": [p.detach().clone() for g in optimizer.param_groups for p in g["params"]],
        "groups": [{k: (id(v) if k == "params" else v) for k, v in g.items()} for g in optimizer.param_groups],
        "group_params": [[id(p) for p in g["params"]] for g in optimizer.param_groups],
    }


def assert_same(a: Any, b: Any, where: str = "optimizer") -> None:
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, (
            f"{where}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(a, b) or (
            a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        ), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif a != a and b != b:  # NaN, in a param group value
        pass
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def check(case: Bad) -> None:
    """Run a case: the error, its message, and (with an optimizer) nothing changed, still usable."""
    if case.make is None:
        with pytest.raises(case.error, match=case.match):
            case.act()
        return
    optimizer, twin = case.make(), case.make()
    before = snapshot(optimizer)
    with pytest.raises(case.error, match=case.match):
        case.act(optimizer)
    assert_same(snapshot(optimizer), before)
    if not case.usable:
        return
    for opt in (optimizer, twin):
        set_grads(opt, 7)
        opt.step()
    assert_same(optimizer.state_dict(), twin.state_dict(), "after one more step")
    assert_same(
        [p.detach() for g in optimizer.param_groups for p in g["params"]],
        [p.detach() for g in twin.param_groups for p in g["params"]],
        "params",
    )


def edited(make: Callable[[], optorch.Optimizer], **values: Any) -> Callable[[], optorch.Optimizer]:
    """``make``, then its first param group's ``values`` written by hand (an optimizer a user broke)."""

    def edit() -> optorch.Optimizer:
        optimizer = make()
        optimizer.param_groups[0].update(values)
        return optimizer

    return edit


def step(optimizer: torch.optim.Optimizer) -> None:
    set_grads(optimizer, 5)
    optimizer.step()


def parse(config: dict) -> Callable[[], Any]:
    return lambda: optorch.parse_config(config)


def build(config: dict) -> Callable[[], Any]:
    return lambda: optorch.build(config, params(), engine="eager")


# ------------------------------------------------------------------------------------------------
# configs: values that cannot train, and values that are not what they seem

VALUES = [
    Bad(
        "lr-inf",
        parse({"name": "adam", "lr": math.inf}),
        pydantic.ValidationError,
        r"lr\n.*must be a finite number, got inf",
    ),
    Bad(
        "lr-nan",
        parse({"name": "adam", "lr": math.nan}),
        pydantic.ValidationError,
        r"lr\n.*must be a finite number, got nan",
    ),
    Bad("lr-negative", parse({"name": "adam", "lr": -0.1}), pydantic.ValidationError, r"lr\n.*must be >= 0, got -0.1"),
    Bad(
        "lr-400-digits",
        parse({"name": "sgd", "lr": 10**400}),
        pydantic.ValidationError,
        r"lr\n.*must be a finite number, got 1000",
    ),
    Bad(
        "lr-string",
        parse({"name": "adam", "lr": "0.1"}),
        pydantic.ValidationError,
        r"lr\n.*expected a real number or a 0-dim tensor, got str '0.1'",
    ),
    Bad("lr-bool", parse({"name": "adam", "lr": True}), pydantic.ValidationError, r"lr\n.*got bool True"),
    Bad("lr-list", parse({"name": "adam", "lr": [0.1]}), pydantic.ValidationError, r"lr\n.*got list \[0.1\]"),
    Bad(
        "lr-huge-list-message-bounded",
        parse({"name": "adam", "lr": list(range(10**6))}),
        pydantic.ValidationError,
        r"^(?s:.{0,800})$",
    ),
    Bad(
        "sgd-momentum-1",
        parse({"name": "sgd", "lr": 0.1, "momentum": 1.0}),
        pydantic.ValidationError,
        r"momentum\n.*must be in \[0, 1\), got 1.0",
    ),
    Bad(
        "sgd-momentum-1.5",
        parse({"name": "sgd", "lr": 0.1, "momentum": 1.5}),
        pydantic.ValidationError,
        r"momentum\n.*in \[0, 1\)",
    ),
    Bad(
        "sgd-dampening-2",
        parse({"name": "sgd", "lr": 0.1, "momentum": 0.9, "dampening": 2.0}),
        pydantic.ValidationError,
        r"dampening\n.*in \[0, 1\]",
    ),
    Bad(
        "lars-momentum-1",
        parse({"name": "lars", "momentum": 1.0}),
        pydantic.ValidationError,
        r"momentum\n.*in \[0, 1\)",
    ),
    Bad(
        "dag-momentum-1", parse({"name": "dag", "momentum": 1.0}), pydantic.ValidationError, r"momentum\n.*in \[0, 1\)"
    ),
    Bad(
        "rmsprop-alpha-1.5",
        parse({"name": "rmsprop", "alpha": 1.5}),
        pydantic.ValidationError,
        r"alpha\n.*in \[0, 1\], got 1.5",
    ),
    Bad(
        "rmsprop-momentum-1",
        parse({"name": "rmsprop", "momentum": 1.0}),
        pydantic.ValidationError,
        r"momentum\n.*in \[0, 1\)",
    ),
    Bad(
        "adam-beta2-1",
        parse({"name": "adam", "betas": [0.9, 1.0]}),
        pydantic.ValidationError,
        r"betas.1\n.*in \[0, 1\), got 1.0",
    ),
    Bad(
        "adam-betas-one",
        parse({"name": "adam", "betas": [0.9]}),
        pydantic.ValidationError,
        r"betas.1\n.*Field required",
    ),
    Bad(
        "adam-beta1-nan",
        parse({"name": "adam", "betas": [math.nan, 0.9]}),
        pydantic.ValidationError,
        r"betas.0\n.*finite",
    ),
    Bad("asgd-lambd-negative", parse({"name": "asgd", "lambd": -1.0}), pydantic.ValidationError, r"lambd\n.*>= 0"),
    Bad(
        "asgd-alpha-negative",
        parse({"name": "asgd", "alpha": -0.5}),
        pydantic.ValidationError,
        r"alpha\n.*in \[0, 1\], got -0.5",
    ),
    Bad(
        "rprop-step-sizes-reversed",
        parse({"name": "rprop", "step_sizes": [1.0, 0.5]}),
        pydantic.ValidationError,
        r"step_sizes\n.*0 <= min <= max",
    ),
    Bad(
        "rprop-step-size-negative",
        parse({"name": "rprop", "step_sizes": [-1.0, 1.0]}),
        pydantic.ValidationError,
        r"step_sizes.0\n.*>= 0",
    ),
    Bad(
        "rprop-etas",
        parse({"name": "rprop", "etas": [1.5, 2.0]}),
        pydantic.ValidationError,
        r"etas\n.*0 < etaminus < 1 < etaplus",
    ),
    Bad("adafactor-d-inf", parse({"name": "adafactor", "d": math.inf}), pydantic.ValidationError, r"d\n.*finite"),
    Bad(
        "adafactor-eps-nan",
        parse({"name": "adafactor", "eps": [math.nan, 1e-3]}),
        pydantic.ValidationError,
        r"eps.0\n.*finite",
    ),
    Bad(
        "nadam-momentum-decay-inf",
        parse({"name": "nadam", "momentum_decay": math.inf}),
        pydantic.ValidationError,
        r"momentum_decay\n.*finite",
    ),
    Bad(
        "dag-tau-inf",
        parse({"name": "dag", "hyper": {"tau": math.inf}}),
        pydantic.ValidationError,
        r"hyper.tau\n.*finite",
    ),
    Bad(
        "dag-alpha-max-beyond-float32",
        parse({"name": "dag", "hyper": {"alpha_max": 1e39}}),
        pydantic.ValidationError,
        r"alpha_max must be finite and non-zero in float32",
    ),
    Bad(
        "dag-eps-0-in-float32",
        parse({"name": "dag", "hyper": {"eps": 1e-50}}),
        pydantic.ValidationError,
        r"eps must be finite and non-zero in float32",
    ),
    Bad(
        "dag-sigma-every-inf",
        parse({"name": "dag", "sigma_every": math.inf}),
        pydantic.ValidationError,
        r"sigma_every\n.*finite number of steps",
    ),
    Bad(
        "dag-cadence-beyond-2**53",
        parse({"name": "dag", "sat_every": 10**300}),
        pydantic.ValidationError,
        r"sat_every\n.*must be at most 2\*\*53, got 1000",
    ),
    Bad(
        "asgd-alpha-above-1",
        parse({"name": "asgd", "alpha": 2.0}),
        pydantic.ValidationError,
        r"alpha\n.*in \[0, 1\], got 2.0",
    ),
    Bad(
        "adopt-clip-exponent-overflows",
        parse({"name": "adopt", "clip_exponent": 1e300}),
        pydantic.ValidationError,
        r"clip_exponent\n.*in \[0, 19\]",
    ),
    Bad(
        "autosgm-logistic-overflows",
        parse({"name": "autosgm", "window": 6, "window_order": 2000.0}),
        pydantic.ValidationError,
        r"2 \*\* 1024 overflows float64",
    ),
    Bad(
        "dag-warmup-fraction",
        parse({"name": "dag", "shrink": {"warmup_steps": 1.5}}),
        pydantic.ValidationError,
        r"shrink.warmup_steps\n.*whole number",
    ),
    Bad(
        "amp-scale-0-in-float32",
        parse({"name": "adam", "amp": {"init_scale": 1e-50}}),
        optorch.ConfigError,
        r"amp.init_scale: must be in \[2\*\*-126",
    ),
    Bad(
        "amp-scale-reciprocal-inf",
        parse({"name": "adam", "amp": {"init_scale": 1e-40}}),
        optorch.ConfigError,
        r"amp.init_scale: must be in",
    ),
    Bad(
        "amp-scale-inf-in-float32",
        parse({"name": "adam", "amp": {"init_scale": 1e39}}),
        optorch.ConfigError,
        r"amp.init_scale: must be in",
    ),
    Bad(
        "amp-scale-bool",
        parse({"name": "adam", "amp": {"init_scale": True}}),
        optorch.ConfigError,
        r"amp.init_scale: Input should be a valid number, got True",
    ),
    Bad(
        "amp-interval-fraction",
        parse({"name": "adam", "amp": {"growth_interval": 2.5}}),
        optorch.ConfigError,
        r"amp.growth_interval: Input should be a valid integer",
    ),
    Bad(
        "clip-bool",
        parse({"name": "adam", "clip_grad_norm": True}),
        optorch.ConfigError,
        r"clip_grad_norm: Input should be a valid number, got True",
    ),
    Bad(
        "clip-string",
        parse({"name": "adam", "clip_grad_norm": "1.0"}),
        optorch.ConfigError,
        r"clip_grad_norm: Input should be a valid number, got '1.0'",
    ),
    Bad(
        "clip-nan",
        parse({"name": "adam", "clip_grad_norm": math.nan}),
        optorch.ConfigError,
        r"clip_grad_norm: Input should be a finite number",
    ),
    Bad(
        "accumulate-bool",
        parse({"name": "adam", "accumulate_steps": True}),
        optorch.ConfigError,
        r"accumulate_steps: Input should be a valid integer, got True",
    ),
    Bad(
        "accumulate-string",
        parse({"name": "adam", "accumulate_steps": "4"}),
        optorch.ConfigError,
        r"accumulate_steps: Input should be a valid integer, got '4'",
    ),
    Bad(
        "ema-decay-string",
        parse({"name": "adam", "ema": {"decay": "0.9"}}),
        optorch.ConfigError,
        r"ema.decay: Input should be a valid number, got '0.9'",
    ),
    Bad(
        "ema-decay-nan",
        parse({"name": "adam", "ema": math.nan}),
        optorch.ConfigError,
        r"ema.decay: Input should be a finite number",
    ),
    Bad(
        "schedule-steps-bool",
        parse({"name": "adam", "schedule": {"lr": {"name": "cosine", "init_value": 1e-3, "decay_steps": True}}}),
        optorch.ConfigError,
        r"'schedule.lr': decay_steps: Input should be a valid integer, got True",
    ),
    Bad(
        "schedule-value-inf",
        parse({"name": "adam", "schedule": {"lr": {"name": "constant", "value": math.inf}}}),
        optorch.ConfigError,
        r"'schedule.lr': value: Input should be a finite number",
    ),
    Bad(
        "schedule-flag-string",
        parse(
            {
                "name": "adam",
                "schedule": {"lr": {"name": "exponential", "init_value": 1e-3, "decay_rate": 0.9, "staircase": "yes"}},
            }
        ),
        optorch.ConfigError,
        r"'schedule.lr': staircase: Input should be a valid boolean, got 'yes'",
    ),
    Bad(
        "schedule-first-value-refused",
        parse({"name": "adam", "schedule": {"lr": {"name": "constant", "value": -1.0}}}),
        optorch.ConfigError,
        r"'schedule.lr': its value at step 0 is refused: lr: must be >= 0, got -1.0",
    ),
    Bad(
        "schedule-steps-beyond-2**53",
        parse({"name": "adam", "schedule": {"lr": {"name": "cosine", "init_value": 1e-3, "decay_steps": 10**400}}}),
        optorch.ConfigError,
        r"'schedule.lr': decay_steps: must be at most 2\*\*53",
    ),
    Bad(
        "amp-interval-beyond-2**53",
        parse({"name": "adam", "amp": {"growth_interval": 2**60}}),
        optorch.ConfigError,
        r"amp.growth_interval: must be at most 2\*\*53",
    ),
    Bad(
        "schedule-unknown",
        parse({"name": "adam", "schedule": {"lr": {"name": "cosin"}}}),
        optorch.ConfigError,
        r"unknown schedule 'cosin' \(did you mean 'cosine'\?\)",
    ),
    Bad(
        "adapt-count-fraction",
        parse({"name": "sgd", "lr": 0.1, "adapt": {"lr_rule": "trend", "cycle_length": 2.5}}),
        optorch.ConfigError,
        r"'adapt': cycle_length: Input should be a valid integer",
    ),
    Bad(
        "adapt-number-bool",
        parse({"name": "sgd", "lr": 0.1, "adapt": {"lr_rule": "trend", "fast_beta": True}}),
        optorch.ConfigError,
        r"'adapt': fast_beta: Input should be a valid number, got True",
    ),
    Bad(
        "name-not-a-string",
        parse({"name": 5}),
        optorch.ConfigError,
        r"'name' must be a string naming the optimizer, got 5",
    ),
    Bad("name-missing", parse({"lr": 0.1}), optorch.ConfigError, r"config needs a 'name' key"),
    Bad(
        "unknown-key",
        parse({"name": "adam", "betass": [0.9, 0.99]}),
        optorch.ConfigError,
        r"unknown key\(s\) for adam: 'betass' \(did you mean 'betas'\?\)",
    ),
    Bad(
        "group-override-momentum-1",
        lambda: optorch.build({"name": "sgd", "lr": 0.1}, [{"params": params(), "momentum": 1.0}]),
        pydantic.ValidationError,
        r"momentum\n.*in \[0, 1\)",
    ),
]

# ------------------------------------------------------------------------------------------------
# tensor hyperparameters: shape and dtype (their values may be traced or batched)

TENSORS = [
    Bad(
        "tensor-lr-shape-1",
        lambda: optorch.adam.Config(lr=torch.tensor([0.1])),
        pydantic.ValidationError,
        r"lr\n.*must be 0-dim, got shape \(1,\)",
    ),
    Bad(
        "tensor-lr-int",
        lambda: optorch.adam.Config(lr=torch.tensor(1)),
        pydantic.ValidationError,
        r"lr\n.*floating-point tensor, got torch.int64",
    ),
    Bad(
        "tensor-beta-complex",
        lambda: optorch.adam.Config(betas=(torch.tensor(0.9 + 0j), 0.99)),
        pydantic.ValidationError,
        r"betas.0\n.*floating-point",
    ),
    Bad(
        "tensor-momentum-bool",
        lambda: optorch.sgd.Config(momentum=torch.tensor(True)),
        pydantic.ValidationError,
        r"momentum\n.*floating-point",
    ),
    Bad(
        "tensor-for-a-tuple",
        lambda: optorch.adam.Config(betas=torch.tensor([0.9, 0.99])),
        pydantic.ValidationError,
        r"betas\n.*expected a tuple \(of numbers or 0-dim tensors\), got a tensor of shape \(2,\)",
    ),
    Bad(
        "with-tensors-shape-1",
        lambda: optorch.adam.Config().with_tensors(lr=torch.tensor([0.1])),
        ValueError,
        r"with_tensors: 'lr': .*0-dim",
    ),
    Bad(
        "group-lr-tensor-shape-1",
        step,
        pydantic.ValidationError,
        r"lr\n.*0-dim",
        edited(trained({"name": "adam", "lr": 0.01}), lr=torch.tensor([0.1])),
        usable=False,
    ),
    Bad(
        "group-lr-negative-by-hand",
        step,
        pydantic.ValidationError,
        r"lr\n.*>= 0",
        edited(trained({"name": "adam", "lr": 0.01}), lr=-1.0),
        usable=False,
    ),
]

# ------------------------------------------------------------------------------------------------
# params: the same one twice, add_param_group that fails, gradients of the wrong shape


def _param_twice(optimizer):
    p = torch.nn.Parameter(torch.zeros(4))
    optimizer.add_param_group({"params": [p, p]})


def _bad_grad_shape(optimizer):
    set_grads(optimizer, 5)
    optimizer.param_groups[0]["params"][1].grad.data = torch.zeros(5)
    try:
        optimizer.step()
    finally:
        optimizer.zero_grad()


def _state_written(make):
    def write():
        optimizer = make()
        optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg"] = torch.zeros(3)
        return optimizer

    return write


PARAMS = [
    Bad(
        "build-param-twice",
        lambda: optorch.build({"name": "adam"}, [params()[0]] * 2),
        ValueError,
        r"lists the same parameter twice.*torch.optim only warns",
    ),
    Bad(
        "build-param-in-two-groups",
        lambda: optorch.build({"name": "adam"}, [{"params": [p]} for p in [params()[0]] * 2]),
        ValueError,
        r"more than one parameter group",
    ),
    Bad("build-set", lambda: optorch.build({"name": "adam"}, set(params())), TypeError, r"ordered collections"),
    Bad(
        "add-group-param-twice",
        _param_twice,
        ValueError,
        r"same parameter twice",
        trained({"name": "adam", "lr": 0.01}),
    ),
    Bad(
        "add-group-param-present",
        lambda o: o.add_param_group({"params": [o.param_groups[0]["params"][0]]}),
        ValueError,
        r"more than one parameter group",
        trained({"name": "adam", "lr": 0.01}),
    ),
    Bad(
        "add-group-set",
        lambda o: o.add_param_group({"params": {torch.nn.Parameter(torch.zeros(2))}}),
        TypeError,
        r"ordered collections",
        trained({"name": "adam", "lr": 0.01}),
    ),
    Bad(
        "add-group-non-leaf",
        lambda o: o.add_param_group({"params": [torch.zeros(2, requires_grad=True) * 2]}),
        ValueError,
        r"non-leaf",
        trained({"name": "adam", "lr": 0.01}),
    ),
    Bad(
        "add-group-not-tensors",
        lambda o: o.add_param_group({"params": [1.0]}),
        TypeError,
        r"can only optimize Tensors",
        trained({"name": "adam", "lr": 0.01}),
    ),
    Bad(
        "add-group-invalid-value",
        lambda o: o.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "momentum": 1.0}),
        pydantic.ValidationError,
        r"momentum\n.*in \[0, 1\)",
        trained({"name": "sgd", "lr": 0.1, "momentum": 0.9}),
    ),
    Bad(
        "add-group-global-key",
        lambda o: o.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "k_val": 3.0}),
        ValueError,
        r"'k_val' hold one value for all param groups",
        trained({"name": "dag", "lr": 0.01}),
    ),
    Bad(
        "add-group-scheduled",
        lambda o: o.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": -1.0}),
        pydantic.ValidationError,
        r"lr\n.*>= 0",
        trained(
            {"name": "adam", "lr": 0.01, "schedule": {"lr": {"name": "cosine", "init_value": 0.01, "decay_steps": 10}}}
        ),
    ),
    Bad(
        "grad-of-another-shape",
        _bad_grad_shape,
        RuntimeError,
        r"a parameter of shape \(3,\) has a gradient of shape \(5,\)",
        trained({"name": "adam", "lr": 0.01}),
    ),
    Bad(
        "state-written-with-wrong-shape",
        step,
        ValueError,
        r"'exp_avg' has shape \(3,\), expected \(2, 3\)",
        _state_written(trained({"name": "adam", "lr": 0.01})),
        usable=False,
    ),
]

# ------------------------------------------------------------------------------------------------
# a builder schedule and another writer of the same key


SCHEDULED = {"name": "sgd", "lr": 0.1, "schedule": {"lr": {"name": "cosine", "init_value": 0.1, "decay_steps": 100}}}


MISUSE = [
    Bad(
        "schedule-and-hand-edit",
        step,
        RuntimeError,
        r"'lr' is set by this optimizer's 'schedule' entry .* but the param group holds 0.05",
        edited(trained(SCHEDULED), lr=0.05),
        usable=False,
    ),
]


def test_a_group_added_after_a_rejected_one_follows_the_schedule():
    optimizer = trained(SCHEDULED)()
    with pytest.raises(pydantic.ValidationError):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "momentum": 1.0})
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    schedule = optorch.schedules.from_config(SCHEDULED["schedule"]["lr"])
    step(optimizer)
    assert [int(g["schedule_step"]) for g in optimizer.param_groups] == [4, 4]
    assert [g["lr"] for g in optimizer.param_groups] == [schedule(4), schedule(4)]


def test_schedule_and_torch_scheduler_on_the_same_key_raise_at_the_next_step_and_change_nothing():
    optimizer = trained(SCHEDULED)()
    params_before = [p.detach().clone() for p in optimizer.param_groups[0]["params"]]
    state_before = copy.deepcopy(optimizer.state_dict()["state"])
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)  # sets lr = 0.5 * initial_lr now
    set_grads(optimizer, 5)
    with pytest.raises(
        RuntimeError,
        match=(
            r"'lr' is set by this optimizer's 'schedule' entry .*something else \(a torch lr_scheduler\?\) "
            r"writes it too"
        ),
    ):
        optimizer.step()
    assert_same([p.detach() for p in optimizer.param_groups[0]["params"]], params_before)
    assert_same(optimizer.state_dict()["state"], state_before)


# ------------------------------------------------------------------------------------------------
# checkpoints: every corruption refused before anything changes

ALL = {
    "name": "adam",
    "lr": 0.01,
    "schedule": {"lr": {"name": "cosine", "init_value": 0.01, "decay_steps": 100}},
    "accumulate_steps": 2,
    "skip_nonfinite": True,
    "ema": 0.9,
    "amp": {},
}
"""An optimizer with every combinator: its checkpoint holds every kind of group value and extra."""
ADAPTIVE = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "adapt": {"lr_rule": "trend+cosine_restart"}}


def load(edit: Callable[[dict], Any]) -> Callable[[torch.optim.Optimizer], None]:
    """``act``: load the optimizer's own checkpoint, edited."""

    def act(optimizer):
        state_dict = copy.deepcopy(optimizer.state_dict())
        edit(state_dict)
        optimizer.load_state_dict(state_dict)

    return act


def state(key: str, value: Any, index: int = 0) -> Callable[[dict], Any]:
    return lambda sd: sd["state"][index].__setitem__(key, value(sd["state"][index][key]) if callable(value) else value)


def group(key: str, value: Any, groups: tuple[int, ...] | None = None) -> Callable[[dict], Any]:
    def edit(sd):
        for i, g in enumerate(sd["param_groups"]):
            if groups is None or i in groups:
                g[key] = value(g[key]) if callable(value) else value

    return edit


def drop(key: str, index: int | None = None) -> Callable[[dict], Any]:
    def edit(sd):
        for g in [sd["state"][index]] if index is not None else sd["param_groups"]:
            del g[key]

    return edit


def _meta(t):
    return torch.empty_like(t, device="meta")


def _format_1(sd: dict) -> None:
    """Back to format 1 (the top-level ``combinators``), with a position that is not there."""
    for g in sd["param_groups"]:
        for key in [k for k in g if k.startswith(("accumulate.", "skip.", "amp.", "ema.", "optorch_format"))]:
            del g[key]
    sd["combinators"] = {"micro_step": 1, "accumulated": {7: torch.zeros(3)}}


def _torch_adam_checkpoint() -> dict:
    ps = params()
    reference = torch.optim.Adam(ps, lr=0.01)
    for i in range(2):
        for p in ps:
            p.grad = torch.sin(3 * p.detach() + i) + 0.1
        reference.step()
    return reference.state_dict()


CHECKPOINTS = [
    # structure
    Bad("ckpt-not-a-dict", lambda o: o.load_state_dict([]), ValueError, r"a state_dict is a dict", trained(ALL)),
    Bad(
        "ckpt-state-not-a-dict",
        load(lambda sd: sd.__setitem__("state", [])),
        ValueError,
        r"'state' \(a dict\)",
        trained(ALL),
    ),
    Bad(
        "ckpt-group-count",
        load(lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0]))),
        ValueError,
        r"2 param groups, this optimizer has 1",
        trained(ALL),
    ),
    Bad(
        "ckpt-group-size",
        load(lambda sd: sd["param_groups"][0]["params"].pop()),
        ValueError,
        r"has 1 params in the state_dict, 2 here",
        trained(ALL),
    ),
    Bad(
        "ckpt-group-not-a-dict",
        load(lambda sd: sd["param_groups"].__setitem__(0, [0, 1])),
        ValueError,
        r"not a dict with a 'params' list",
        trained(ALL),
    ),
    Bad(
        "ckpt-index-twice",
        load(lambda sd: sd["param_groups"][0].__setitem__("params", [0, 0])),
        ValueError,
        r"lists parameter 0 twice",
        trained(ALL),
    ),
    Bad(
        "ckpt-index-unhashable",
        load(lambda sd: sd["param_groups"][0].__setitem__("params", [[0], 1])),
        ValueError,
        r"lists \[0\] as a parameter",
        trained(ALL),
    ),
    Bad(
        "ckpt-unknown-index",
        load(lambda sd: sd["state"].__setitem__(9, sd["state"][0])),
        ValueError,
        r"state for parameter 9, which no param group lists",
        trained(ALL),
    ),
    Bad(
        "ckpt-leaf-not-a-dict",
        load(lambda sd: sd["state"].__setitem__(0, 3.0)),
        ValueError,
        r"state of parameter 0 is not a dict",
        trained(ALL),
    ),
    Bad(
        "ckpt-format-newer",
        load(group("optorch_format", 3)),
        ValueError,
        r"optorch_format=3: not a format this optorch reads",
        trained(ALL),
    ),
    Bad("ckpt-format-string", load(group("optorch_format", "2")), ValueError, r"optorch_format='2'", trained(ALL)),
    # the algorithm's state: keys, shapes, dtypes, values
    Bad("ckpt-key-dropped", load(drop("exp_avg", 0)), ValueError, r"has keys .*expected .*exp_avg", trained(ALL)),
    Bad(
        "ckpt-key-renamed",
        load(lambda sd: sd["state"][0].__setitem__("exp_avgg", sd["state"][0].pop("exp_avg"))),
        ValueError,
        r"has keys .*'exp_avgg'",
        trained(ALL),
    ),
    Bad(
        "ckpt-shape",
        load(state("exp_avg", torch.zeros(3, 2))),
        ValueError,
        r"'exp_avg' of parameter 0 has shape \(3, 2\), expected \(2, 3\)",
        trained(ALL),
    ),
    Bad(
        "ckpt-shape-broadcastable",
        load(state("exp_avg", torch.zeros(1, 3))),
        ValueError,
        r"'exp_avg' of parameter 0 has shape \(1, 3\)",
        trained(ALL),
    ),
    Bad(
        "ckpt-dtype-int",
        load(state("exp_avg", lambda t: t.long())),
        ValueError,
        r"'exp_avg' of parameter 0 is torch.int64, expected a floating-point",
        trained(ALL),
    ),
    Bad(
        "ckpt-dtype-complex",
        load(state("exp_avg", lambda t: t.to(torch.complex64))),
        ValueError,
        r"'exp_avg' of parameter 0 is torch.complex64.*imaginary",
        trained(ALL),
    ),
    Bad(
        "ckpt-not-a-tensor",
        load(state("exp_avg", [0.0] * 6)),
        ValueError,
        r"'exp_avg' of parameter 0 has shape list",
        trained(ALL),
    ),
    Bad(
        "ckpt-sparse",
        load(state("exp_avg", lambda t: t.to_sparse())),
        ValueError,
        r"'exp_avg' of parameter 0 is a torch.sparse_coo tensor",
        trained(ALL),
    ),
    Bad(
        "ckpt-meta",
        load(state("exp_avg", _meta)),
        ValueError,
        r"'exp_avg' of parameter 0 is a meta tensor",
        trained(ALL),
    ),
    Bad(
        "ckpt-nan",
        load(state("exp_avg", lambda t: t.index_fill(1, torch.tensor([1]), math.nan))),
        ValueError,
        r"'exp_avg' of parameter 0 holds values that are not finite",
        trained(ALL),
    ),
    Bad(
        "ckpt-inf",
        load(state("exp_avg_sq", lambda t: t + math.inf)),
        ValueError,
        r"'exp_avg_sq' of parameter 0 holds values that are not finite",
        trained(ALL),
    ),
    Bad(
        "ckpt-inf-once-cast",
        load(state("exp_avg", lambda t: t.double() + 1e300)),
        ValueError,
        r"'exp_avg' of parameter 0 holds values that are not finite",
        trained(ALL),
    ),
    Bad(
        "ckpt-second-moment-negative",
        load(state("exp_avg_sq", lambda t: -1 - t)),
        ValueError,
        r"'exp_avg_sq' of parameter 0 must hold values >= 0",
        trained(ALL),
    ),
    Bad(
        "ckpt-step-negative",
        load(state("step", torch.tensor(-1.0))),
        ValueError,
        r"'step' of parameter 0 must hold whole numbers >= 0",
        trained(ALL),
    ),
    Bad(
        "ckpt-step-fraction",
        load(state("step", torch.tensor(1.5))),
        ValueError,
        r"'step' of parameter 0 must hold whole numbers >= 0",
        trained(ALL),
    ),
    Bad(
        "ckpt-step-nan",
        load(state("step", math.nan)),
        ValueError,
        r"'step' of parameter 0 holds values that are not finite",
        trained(ALL),
    ),
    Bad(
        "ckpt-step-string",
        load(state("step", "3")),
        ValueError,
        r"'step' of parameter 0 must be a number or a one-element tensor, got str",
        trained(ALL),
    ),
    Bad(
        "ckpt-step-vector",
        load(state("step", torch.tensor([1.0, 2.0]))),
        ValueError,
        r"'step' of parameter 0 must be a number or a one-element tensor",
        trained(ALL),
    ),
    # the combinators' per-parameter state
    Bad(
        "ckpt-ema-nan",
        load(state("ema", lambda t: t * math.nan)),
        ValueError,
        r"'ema' of parameter 0 holds values that are not finite",
        trained(ALL),
    ),
    Bad(
        "ckpt-ema-shape",
        load(state("ema", torch.zeros(3))),
        ValueError,
        r"'ema' has shape \(3,\), expected \(2, 3\)",
        trained(ALL),
    ),
    Bad(
        "ckpt-ema-dropped",
        load(drop("ema", 0)),
        ValueError,
        r"state of parameter 0 lacks 'ema'.*complete_state_dict",
        trained(ALL),
    ),
    Bad(
        "ckpt-grad-acc-int",
        load(state("grad_acc", lambda t: t.long())),
        ValueError,
        r"'grad_acc' is torch.int64",
        trained(ALL),
    ),
    # per-group and shared values
    Bad(
        "ckpt-schedule-dropped",
        load(drop("schedule_step")),
        ValueError,
        r"no 'schedule_step'.*complete_state_dict\(optimizer, state_dict, schedule_step=N\)",
        trained(ALL),
    ),
    Bad(
        "ckpt-schedule-negative",
        load(group("schedule_step", -1)),
        ValueError,
        r"'schedule_step' must be a whole number >= 0, got -1",
        trained(ALL),
    ),
    Bad(
        "ckpt-schedule-fraction",
        load(group("schedule_step", 1.5)),
        ValueError,
        r"'schedule_step' must be a whole number >= 0, got 1.5",
        trained(ALL),
    ),
    Bad(
        "ckpt-schedule-nan",
        load(group("schedule_step", math.nan)),
        ValueError,
        r"'schedule_step' must be a whole number >= 0, got nan",
        trained(ALL),
    ),
    Bad(
        "ckpt-schedule-huge",
        load(group("schedule_step", 1e300)),
        ValueError,
        r"'schedule_step' must be a whole number >= 0, got 1e\+300",
        trained(ALL),
    ),
    Bad(
        "ckpt-schedule-string",
        load(group("schedule_step", "3")),
        ValueError,
        r"'schedule_step' must be a whole number >= 0, got '3'",
        trained(ALL),
    ),
    Bad(
        "ckpt-schedule-vector",
        load(group("schedule_step", torch.tensor([1, 2]))),
        ValueError,
        r"'schedule_step' must be a whole number >= 0",
        trained(ALL),
    ),
    Bad(
        "ckpt-loss-scale-0",
        load(group("amp.scale", torch.tensor(0.0))),
        ValueError,
        r"'amp.scale' must hold values >= 1.17549e-38, got \[0.0\]",
        trained(ALL),
    ),
    Bad(
        "ckpt-loss-scale-nan",
        load(group("amp.scale", torch.tensor(math.nan))),
        ValueError,
        r"'amp.scale' holds \[nan\] that are not finite",
        trained(ALL),
    ),
    Bad(
        "ckpt-loss-scale-negative",
        load(group("amp.scale", -1.0)),
        ValueError,
        r"'amp.scale' must hold values >= 1.17549e-38",
        trained(ALL),
    ),
    Bad(
        "ckpt-loss-scale-string",
        load(group("amp.scale", "65536")),
        ValueError,
        r"'amp.scale' must be a number or a tensor, got str",
        trained(ALL),
    ),
    Bad(
        "ckpt-loss-scale-vector",
        load(group("amp.scale", torch.ones(2))),
        ValueError,
        r"'amp.scale' has shape \(2,\), expected \(\)",
        trained(ALL),
    ),
    Bad(
        "ckpt-loss-scale-dropped",
        load(drop("amp.scale")),
        ValueError,
        r"has no 'amp.scale'.*complete_state_dict",
        trained(ALL),
    ),
    Bad(
        "ckpt-groups-disagree",
        load(group("amp.scale", 2.0, groups=(1,))),
        ValueError,
        r"param groups 0 and 1 of the state_dict disagree on 'amp.scale'",
        trained(ALL, groups=True),
    ),
    Bad(
        "ckpt-tracker-negative",
        load(group("amp.growth_tracker", -1)),
        ValueError,
        r"'amp.growth_tracker' must hold whole numbers >= 0, got \[-1.0\]",
        trained(ALL),
    ),
    Bad(
        "ckpt-tracker-fraction",
        load(group("amp.growth_tracker", 1.5)),
        ValueError,
        r"'amp.growth_tracker' must hold whole numbers >= 0",
        trained(ALL),
    ),
    Bad(
        "ckpt-tracker-beyond-int32",
        load(group("amp.growth_tracker", 2**40)),
        ValueError,
        r"'amp.growth_tracker' holds \[1099511627776.0\], which torch.int32 cannot hold",
        trained(ALL),
    ),
    Bad(
        "ckpt-micro-step-negative",
        load(group("accumulate.micro_step", -1)),
        ValueError,
        r"'accumulate.micro_step' must hold whole numbers >= 0",
        trained(ALL),
    ),
    Bad(
        "ckpt-micro-step-past-the-window",
        load(group("accumulate.micro_step", 2)),
        ValueError,
        r"'accumulate.micro_step' is \[2.0\], but accumulate_steps is 2",
        trained(ALL),
    ),
    Bad(
        "ckpt-last-finite-2",
        load(group("skip.last_finite", 2)),
        ValueError,
        r"'skip.last_finite' must hold whole numbers in \[0, 1\]",
        trained(ALL),
    ),
    Bad(
        "ckpt-skip-count-fraction",
        load(group("skip.notfinite_count", 0.5)),
        ValueError,
        r"'skip.notfinite_count' must hold whole numbers >= 0",
        trained(ALL),
    ),
    Bad(
        "ckpt-ema-count-negative",
        load(group("ema.count", torch.tensor(-3))),
        ValueError,
        r"'ema.count' must hold whole numbers >= 0",
        trained(ALL),
    ),
    Bad(
        "ckpt-foreign-key",
        load(group("skip.bogus", 1)),
        ValueError,
        r"holds 'skip.bogus', which this optimizer does not keep",
        trained(ALL),
    ),
    Bad(
        "ckpt-hyperparameter-dropped",
        load(drop("betas")),
        ValueError,
        r"param group 0 of the state_dict has no 'betas', which torch.optim saves with every checkpoint: a checkpoint "
        r"of another optimizer\?",
        trained(ALL),
    ),
    Bad(
        "ckpt-lr-negative",
        load(group("lr", -1.0)),
        ValueError,
        r"invalid hyperparameters: lr: must be >= 0, got -1.0",
        trained(ALL),
    ),
    Bad(
        "ckpt-lr-nan",
        load(group("lr", math.nan)),
        ValueError,
        r"invalid hyperparameters: lr: must be a finite number",
        trained(ALL),
    ),
    Bad(
        "ckpt-beta2-1",
        load(group("betas", (0.9, 1.0))),
        ValueError,
        r"invalid hyperparameters: betas.1: must be in \[0, 1\)",
        trained(ALL),
    ),
    Bad(
        "ckpt-lr-tensor-inf",
        load(group("lr", torch.tensor(math.inf))),
        ValueError,
        r"invalid hyperparameters: lr: must be a finite number, got inf",
        trained(ALL),
    ),
    Bad(
        "ckpt-beta-tensor-1",
        load(group("betas", (0.9, torch.tensor(1.0)))),
        ValueError,
        r"invalid hyperparameters: betas.1: must be in \[0, 1\), got 1.0",
        trained(ALL),
    ),
    Bad(
        "ckpt-lr-tensor-shape-1",
        load(group("lr", torch.tensor([0.01]))),
        ValueError,
        r"invalid hyperparameters: lr: a tensor hyperparameter must be 0-dim",
        trained(ALL),
    ),
    # DAG's shared state
    Bad(
        "ckpt-dag-shrink-nan",
        load(group("shared.s_t", lambda t: t * math.nan)),
        ValueError,
        r"'shared.s_t' holds \[nan\] that are not finite",
        trained({"name": "dag", "lr": 0.01}),
    ),
    Bad(
        "ckpt-dag-shrink-0",
        load(group("shared.s_t", lambda t: t * 0)),
        ValueError,
        r"'shared.s_t' must hold values in \(0, 1\]",
        trained({"name": "dag", "lr": 0.01}),
    ),
    Bad(
        "ckpt-dag-shrink-2",
        load(group("shared.s_t", lambda t: t * 2)),
        ValueError,
        r"'shared.s_t' must hold values in \(0, 1\]",
        trained({"name": "dag", "lr": 0.01}),
    ),
    Bad(
        "ckpt-dag-step-negative",
        load(group("shared.global_step", lambda t: -t)),
        ValueError,
        r"'shared.global_step' must hold whole numbers >= 0",
        trained({"name": "dag", "lr": 0.01}),
    ),
    Bad(
        "ckpt-dag-count-fraction",
        load(group("shared.rms_count", lambda t: t + 0.5)),
        ValueError,
        r"'shared.rms_count' must hold whole numbers",
        trained({"name": "dag", "lr": 0.01}),
    ),
    Bad(
        "ckpt-dag-k-negative",
        load(group("shared.k_val", lambda t: -t)),
        ValueError,
        r"'shared.k_val' must hold values >= 0",
        trained({"name": "dag", "lr": 0.01}),
    ),
    Bad(
        "ckpt-dag-shared-dropped",
        load(drop("shared.s_t")),
        ValueError,
        r"has no 'shared.s_t'.*another algorithm",
        trained({"name": "dag", "lr": 0.01}),
    ),
    Bad(
        "ckpt-dag-alpha-negative",
        load(state("alpha", lambda t: -t)),
        ValueError,
        r"'alpha' of parameter 0 must hold values >= 0",
        trained({"name": "dag", "lr": 0.01}),
    ),
    Bad(
        "ckpt-dag-saturation-1.5",
        load(state("sat_ratio", torch.tensor(1.5))),
        ValueError,
        r"'sat_ratio' of parameter 0 must hold values in \[0, 1\]",
        trained({"name": "dag", "lr": 0.01}),
    ),
    # Adafactor's factors, NAdam's and ASGD's scalars
    Bad(
        "ckpt-adafactor-factor-dropped",
        load(drop("row_var", 0)),
        ValueError,
        r"'row_var' of parameter 0 has shape \(0,\), expected \(2, 1\)",
        trained({"name": "adafactor"}),
    ),
    Bad(
        "ckpt-adafactor-factor-shape",
        load(state("col_var", torch.zeros(1, 2))),
        ValueError,
        r"'col_var' of parameter 0 has shape \(1, 2\), expected \(1, 3\)",
        trained({"name": "adafactor"}),
    ),
    Bad(
        "ckpt-adafactor-variance-negative",
        load(state("variance", lambda t: -1 - t, index=1)),
        ValueError,
        r"'variance' of parameter 1 must hold values >= 0",
        trained({"name": "adafactor"}),
    ),
    Bad(
        "ckpt-adafactor-extra-factor",
        load(lambda sd: sd["state"][1].__setitem__("row_var", torch.zeros(3, 1))),
        ValueError,
        r"'row_var' of parameter 1 has shape \(3, 1\), expected \(0,\)",
        trained({"name": "adafactor"}),
    ),
    Bad(
        "ckpt-nadam-product-1.5",
        load(state("mu_product", torch.tensor(1.5))),
        ValueError,
        r"'mu_product' of parameter 0 must hold values in \[0, 1\]",
        trained({"name": "nadam"}),
    ),
    Bad(
        "ckpt-asgd-mu-0",
        load(state("mu", torch.tensor(0.0))),
        ValueError,
        r"'mu' of parameter 0 must hold values in \(0, 1\]",
        trained({"name": "asgd", "t0": 1.0}),
    ),
    Bad(
        "ckpt-asgd-eta-negative",
        load(state("eta", torch.tensor(-0.01))),
        ValueError,
        r"'eta' of parameter 0 must hold values >= 0",
        trained({"name": "asgd", "t0": 1.0}),
    ),
    # the adaptive rules' state
    Bad(
        "ckpt-adapt-count-negative",
        load(group("adapt.t", torch.tensor(-1))),
        ValueError,
        r"'adapt.t' must hold whole numbers >= 0",
        trained(ADAPTIVE),
    ),
    Bad(
        "ckpt-adapt-factor-0",
        load(group("adapt.terms.lr.trend.value", lambda t: t * 0)),
        ValueError,
        r"'adapt.terms.lr.trend.value' must hold values > 0",
        trained(ADAPTIVE),
    ),
    Bad(
        "ckpt-adapt-cycle-0",
        load(group("adapt.terms.lr.cosine_restart.t_i", lambda t: t * 0)),
        ValueError,
        r"'adapt.terms.lr.cosine_restart.t_i' must hold whole numbers >= 1",
        trained(ADAPTIVE),
    ),
    Bad(
        "ckpt-adapt-base-nan",
        load(group("adapt.base.lr", math.nan)),
        ValueError,
        r"'adapt.base.lr' of param group 0 holds \[nan\] that are not finite",
        trained(ADAPTIVE),
    ),
    # older and foreign checkpoints
    Bad(
        "ckpt-format-1-bad-position",
        load(_format_1),
        ValueError,
        r"'combinators.accumulated' names position 7, but its param groups list 2 params",
        trained(ALL),
    ),
    Bad(
        "ckpt-format-1-not-a-dict",
        load(lambda sd: sd.__setitem__("combinators", [1])),
        ValueError,
        r"'combinators' must be a dict",
        trained(ALL),
    ),
    Bad(
        "ckpt-torch-into-scheduled",
        lambda o: o.load_state_dict(_torch_adam_checkpoint()),
        ValueError,
        r"no 'schedule_step'.*a torch.optim checkpoint\?",
        trained(
            {"name": "adam", "lr": 0.01, "schedule": {"lr": {"name": "cosine", "init_value": 0.01, "decay_steps": 100}}}
        ),
    ),
    Bad(
        "ckpt-torch-into-ema",
        lambda o: o.load_state_dict(_torch_adam_checkpoint()),
        ValueError,
        r"has no 'ema.count'.*complete_state_dict",
        trained({"name": "adam", "lr": 0.01, "ema": 0.9}),
    ),
    Bad(
        "complete-step-negative",
        lambda o: optorch.complete_state_dict(o, _torch_adam_checkpoint(), schedule_step=-1),
        ValueError,
        r"schedule_step must be a whole number of steps >= 0, got -1",
        trained(
            {"name": "adam", "lr": 0.01, "schedule": {"lr": {"name": "cosine", "init_value": 0.01, "decay_steps": 100}}}
        ),
    ),
    Bad(
        "complete-step-fraction",
        lambda o: optorch.complete_state_dict(o, _torch_adam_checkpoint(), schedule_step=1.5),
        ValueError,
        r"got 1.5",
        trained(
            {"name": "adam", "lr": 0.01, "schedule": {"lr": {"name": "cosine", "init_value": 0.01, "decay_steps": 100}}}
        ),
    ),
    Bad(
        "complete-step-missing",
        lambda o: optorch.complete_state_dict(o, _torch_adam_checkpoint()),
        ValueError,
        r"pass schedule_step=",
        trained(
            {"name": "adam", "lr": 0.01, "schedule": {"lr": {"name": "cosine", "init_value": 0.01, "decay_steps": 100}}}
        ),
    ),
]

# ------------------------------------------------------------------------------------------------
# config files: YAML 1.2 and strict JSON, bounded, each error naming the file and (YAML) the line

_LAUGHS = (
    "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
    + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8))
    + "name: adam\nlr: *i\n"
)

FILES = [  # (file name, its content, the error's message after the path)
    ("duplicate.yaml", "name: adam\nlr: 0.1\nlr: 0.2\n", r", line 3: duplicate key 'lr' \(first on line 2\)"),
    (
        "duplicate-nested.yaml",
        "name: adam\nschedule:\n  lr: {name: constant, value: 0.1}\n  lr: {name: constant, value: 0.2}\n",
        r", line 4: duplicate key 'lr'",
    ),
    ("yes.yaml", "name: adam\namsgrad: yes\n", r", line 2: amsgrad: Input should be a valid boolean, got 'yes'"),
    (
        "on.yaml",
        "name: adam\nskip_nonfinite: on\n",
        r", line 2: skip_nonfinite: Input should be a valid boolean, got 'on'",
    ),
    (
        "sexagesimal.yaml",
        "name: adam\nlr: 1:30\n",
        r", line 2: lr: expected a real number or a 0-dim tensor, got str '1:30'",
    ),
    (
        "underscore.yaml",
        "name: adam\nlr: 1_0\n",
        r", line 2: lr: expected a real number or a 0-dim tensor, got str '1_0'",
    ),
    ("inf.yaml", "name: adam\nlr: .inf\n", r", line 2: lr: must be a finite number, got inf"),
    ("bool-tag.yaml", "name: adam\namsgrad: !!bool yes\n", r", line 2: 'yes' is not a YAML 1.2 boolean"),
    (
        "python-tag.yaml",
        "name: adam\nlr: !!python/object/apply:os.system [ls]\n",
        r", line 2: could not determine a constructor",
    ),
    ("int-key.yaml", "name: adam\n1: 2\n", r", line 2: keys must be names \(strings\), got '1'"),
    ("merge-key.yaml", "base: &b {lr: 0.1}\nname: adam\n<<: *b\n", r", line 1: unknown key\(s\) for adam: 'base'"),
    ("alias-bomb.yaml", _LAUGHS, r", line \d+: expands to more than 10000 values"),
    ("recursive-alias.yaml", "name: adam\nlr: &a [*a]\n", r", line 2: an alias refers to a value that contains it"),
    ("deep.yaml", "name: adam\nlr: " + "[" * 5000 + "]" * 5000 + "\n", r", line 2: nested more than 64 deep"),
    ("huge.yaml", "name: adam\n" + "# padding\n" * 7000, r": larger than 64 KiB"),
    ("latin-1.yaml", b"name: adam\n# caf\xe9\n", r": not UTF-8 text \(byte 0xe9 at offset 16\)"),
    ("tab.yaml", "name: adam\n\tlr: 0.1\n", r", line 2: .*found character '\\t' that cannot start any token"),
    ("unclosed.yaml", "name: adam\nlr: [0.1\n", r", line 3: while parsing a flow sequence"),
    ("digits.yaml", "name: adam\nlr: " + "9" * 5000 + "\n", r": Exceeds the limit \(4300 digits\)"),
    ("empty.yaml", "", r": expected a mapping at the top level, got NoneType"),
    ("list.yaml", "- name: adam\n", r": expected a mapping at the top level, got list"),
    ("unknown-name.yaml", "name: adma\n", r", line 1: unknown optimizer 'adma'. Did you mean"),
    (
        "schedule.yaml",
        "name: adam\nschedule:\n  lr:\n    name: cosine\n    init_value: 0.1\n    decay_steps: 0\n",
        r", line 6: 'schedule.lr': decay_steps: Input should be greater than or equal to 1",
    ),
    ("duplicate.json", '{"name": "adam", "lr": 0.1, "lr": 0.2}', r": duplicate key 'lr'"),
    ("nan.json", '{"name": "adam", "lr": NaN}', r": NaN is not JSON; numbers must be finite"),
    ("infinity.json", '{"name": "adam", "lr": -Infinity}', r": -Infinity is not JSON"),
    ("overflow.json", '{"name": "adam",\n "lr": 1e999}', r", line 2: lr: must be a finite number, got inf"),
    ("syntax.json", '{"name": "adam",\n "lr": 0.1,,}', r", line 2: Expecting property name enclosed in double quotes"),
    ("deep.json", '{"lr": ' + "[" * 30000 + "]" * 30000 + "}", r": nested too deeply"),
    ("latin-1.json", b'{"name": "adam\xe9"}', r": not UTF-8 text"),
    ("bad.toml", "name = 'adam'\n", r": config files must end in .yaml, .yml or .json"),
]


def _file_case(name: str, text: str | bytes, message: str) -> Bad:
    def act():
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / name
            path.write_bytes(text if isinstance(text, bytes) else text.encode())
            try:
                optorch.build(path, params(), engine="eager")
            except pydantic.ValidationError as error:  # the contract's type, with the file and line in a note
                raise optorch.ConfigError(getattr(optorch.builder, "explain", str)(error)) from error

    return Bad(f"file-{name}", act, (optorch.ConfigError, optorch.UnknownOptimizerError), re.escape(name) + message)


CASES = VALUES + TENSORS + PARAMS + MISUSE + CHECKPOINTS + [_file_case(*f) for f in FILES]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_a_clear_error_and_changes_nothing(case):
    check(case)


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


# ------------------------------------------------------------------------------------------------
# what still loads, and the way to opt in


def test_yaml_reads_core_schema_scalars(tmp_path):
    path = tmp_path / "scalars.yaml"
    path.write_text(
        "a: true\nb: False\nc: TRUE\nd: ~\ne: 0o17\nf: 0x1F\ng: 1e-3\nh: -.inf\ni: 010\nj: yes\nk: 1:30\n"
        "l: 2001-12-14\nm: 1.\n"
    )
    values = optorch.load_config(path)
    assert values == {
        "a": True,
        "b": False,
        "c": True,
        "d": None,
        "e": 15,
        "f": 31,
        "g": 1e-3,
        "h": -math.inf,
        "i": 10,
        "j": "yes",
        "k": "1:30",
        "l": "2001-12-14",
        "m": 1.0,
    }


def test_yaml_aliases_within_the_bound_load(tmp_path):
    path = tmp_path / "alias.yaml"
    path.write_text("name: adam\nlr: &lr 0.01\nschedule:\n  lr: {name: constant, value: *lr}\n")
    optimizer = optorch.build(path, params())
    assert optimizer.param_groups[0]["lr"] == 0.01


def test_a_file_error_names_the_line_of_the_key_in_a_note_and_keeps_its_type(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("name: sgd\n\nlr: -1\n")
    with pytest.raises(pydantic.ValidationError) as info:
        optorch.build(path, params())
    assert info.value.__notes__ == [f"{path}, line 3"]
    assert optorch.builder.explain(info.value) == f"{path}, line 3: lr: must be >= 0, got -1.0"


def test_a_torch_checkpoint_into_a_scheduled_shim_continues_the_schedule_where_told():
    config = {
        "name": "adam",
        "lr": 0.01,
        "schedule": {"lr": {"name": "cosine", "init_value": 0.01, "decay_steps": 100}},
    }
    optimizer = optorch.build(config, params(), engine="eager")
    checkpoint = _torch_adam_checkpoint()
    optimizer.load_state_dict(optorch.complete_state_dict(optimizer, checkpoint, schedule_step=40))
    schedule = optorch.schedules.from_config(config["schedule"]["lr"])
    assert int(optimizer.param_groups[0]["schedule_step"]) == 40 and optimizer.param_groups[0]["lr"] == schedule(40)
    assert_same(optimizer.state_dict()["state"][0]["exp_avg"], checkpoint["state"][0]["exp_avg"])
    assert "schedule_step" not in checkpoint["param_groups"][0]  # the given checkpoint is left as it was


def test_a_torch_checkpoint_into_an_ema_shim_starts_the_average_at_the_params():
    optimizer = optorch.build({"name": "adam", "lr": 0.01, "ema": 0.9, "accumulate_steps": 2}, params(), engine="eager")
    checkpoint = _torch_adam_checkpoint()
    optimizer.load_state_dict(optorch.complete_state_dict(optimizer, checkpoint))
    for p in optimizer.param_groups[0]["params"]:
        assert_same(optimizer.state[p]["ema"], p.detach())
        assert_same(optimizer.state[p]["grad_acc"], torch.zeros_like(p))
    assert int(optimizer.linked("accumulate.micro_step")) == 0 and int(optimizer.linked("ema.count")) == 0


def test_a_flag_an_older_torch_did_not_save_takes_its_default_as_in_torch():
    checkpoint = _torch_adam_checkpoint()
    del checkpoint["param_groups"][0]["decoupled_weight_decay"]  # as torch before 2.6 saved Adam's groups
    optimizer = optorch.build(
        {"name": "adam", "lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}, params(), engine="eager"
    )
    optimizer.load_state_dict(checkpoint)
    reference = torch.optim.Adam(params(), lr=0.01, foreach=False)
    reference.load_state_dict(checkpoint)
    assert (
        optimizer.param_groups[0]["decoupled_weight_decay"]
        is reference.param_groups[0]["decoupled_weight_decay"]
        is False
    )


def test_a_format_1_checkpoint_migrates_to_the_same_optimizer():
    make = trained(ALL, steps=3)
    optimizer, twin = make(), make()
    current = copy.deepcopy(optimizer.state_dict())
    old = copy.deepcopy(current)
    order = [i for g in old["param_groups"] for i in g["params"]]
    names = {
        "accumulate.micro_step": "micro_step",
        "skip.notfinite_count": "notfinite_count",
        "skip.total_notfinite": "total_notfinite",
        "skip.last_finite": "last_finite",
        "amp.scale": "scale",
        "amp.growth_tracker": "growth_tracker",
        "amp.overflows": "overflows",
        "ema.count": "ema_count",
    }
    old["combinators"] = {old_name: old["param_groups"][0][key] for key, old_name in names.items()}
    old["combinators"]["accumulated"] = {position: old["state"][i].pop("grad_acc") for position, i in enumerate(order)}
    old["combinators"]["ema"] = [old["state"][i].pop("ema") for i in order]
    old["schedule_step"] = old["param_groups"][0]["schedule_step"]
    for g in old["param_groups"]:
        for key in [*names, "schedule_step", "optorch_format"]:
            del g[key]
    twin.load_state_dict(old)
    assert_same(twin.state_dict(), current)


def test_the_loaded_checkpoint_stays_the_callers():
    optimizer = trained(ALL)()
    checkpoint = copy.deepcopy(optimizer.state_dict())
    kept = copy.deepcopy(checkpoint)
    optimizer.load_state_dict(checkpoint)
    set_grads(optimizer, 9)
    optimizer.step()
    assert_same(checkpoint, kept)


def test_a_huge_but_finite_float64_gradient_is_stepped_not_skipped_as_torch_steps_it():
    ours, theirs = ([torch.nn.Parameter(p.detach().double()) for p in params()] for _ in range(2))
    optimizer = optorch.build({"name": "sgd", "lr": 1e-310, "skip_nonfinite": True, "amp": {"init_scale": 1.0}}, ours)
    reference = torch.optim.SGD(theirs, lr=1e-310)
    for p, q in zip(ours, theirs):
        p.grad = torch.full_like(p, 1e308)  # finite in float64, inf in float32
        q.grad = p.grad.clone()
    optimizer.step()
    reference.step()
    assert not optimizer.step_was_skipped and int(optimizer.linked("amp.overflows")) == 0
    assert_same([p.detach() for p in ours], [q.detach() for q in theirs])


def test_decoupled_adam_without_decay_steps_with_an_initial_lr_of_zero():
    ours, theirs = params(), params()
    optimizer = optorch.build({"name": "decoupled_adam", "lr": 0.01, "initial_lr": 0.0}, ours, engine="eager")
    reference = optorch.build({"name": "adam", "lr": 0.01}, theirs, engine="eager")  # no decay: the same update
    for opt in (optimizer, reference):
        set_grads(opt, 0)
        opt.step()
    assert_same([p.detach() for p in ours], [q.detach() for q in theirs])


# ------------------------------------------------------------------------------------------------
# fidelity: torch's scalar dtype follows the default dtype


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize(
    "name, config, keys",
    [
        ("nadam", {"lr": 0.02, "momentum_decay": 0.01}, ("step", "mu_product")),
        ("asgd", {"lr": 0.02, "lambd": 0.01, "alpha": 0.6, "t0": 3.0}, ("step", "eta", "mu")),
    ],
)
@pytest.mark.parametrize("engine", ["pure", "eager", "torch"])
def test_scalar_state_is_float64_under_a_float64_default_as_torch_keeps_it(float64_default, name, config, keys, engine):
    algorithm = optorch.ALGORITHMS[name]
    init = params()
    reference = [torch.nn.Parameter(p.detach().clone()) for p in init]
    torch_optimizer = algorithm.torch_optimizer(reference, foreach=False, **config)
    ours = [torch.nn.Parameter(p.detach().clone()) for p in init]
    shim = optorch.build({"name": name, **config}, ours, engine=engine) if engine != "pure" else None
    pure, cfg = [p.detach().clone() for p in init], algorithm.config(**config)
    pure_state = algorithm.init(pure, cfg)
    for i in range(30):
        grads = [torch.sin(3 * p.detach() + i) + 0.1 for p in reference]
        for p, g in zip(reference, grads):
            p.grad = g.clone()
        torch_optimizer.step()
        if shim is None:
            pure, pure_state = algorithm.step(pure, [torch.sin(3 * p + i) + 0.1 for p in pure], pure_state, cfg)
        else:
            for p in ours:
                p.grad = torch.sin(3 * p.detach() + i) + 0.1
            shim.step()
    expected = torch_optimizer.state_dict()["state"]
    for index, p in enumerate(reference):
        for key in keys:
            got = pure_state[key][index] if shim is None else shim.state_dict()["state"][index][key]
            assert got.dtype == expected[index][key].dtype == torch.float64, key
            assert torch.equal(got, expected[index][key]), (
                f"{key}: {got.item()!r} != torch's {expected[index][key].item()!r}"
            )
        assert torch.equal((pure[index] if shim is None else ours[index]).detach(), p.detach())


# ------------------------------------------------------------------------------------------------
# the command line: one line, a non-zero exit code, nothing trained before it


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "sgd.yaml"
    path.write_text("name: sgd\nlr: 0.1\n")
    return str(path)


def _no_training(*args, **kwargs):
    raise AssertionError("training started")


def _write(path: Path, data: str | bytes) -> str:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


CLI = {  # argv after "compare" (tmp: the test's directory; config: a valid config) -> the one error line's pattern
    "out-is-a-file": (
        lambda tmp, config: [config, "--out", _write(tmp / "file", "x")],
        r"cannot write to .*file: it is not a directory",
    ),
    "out-under-a-file": (
        lambda tmp, config: [config, "--out", str(tmp / _write(tmp / "f", "x") / "sub")],
        r"cannot write to .*f/sub: Not a directory",
    ),
    "json-is-a-directory": (
        lambda tmp, config: [config, "--out", str(tmp / "o"), "--json", str(tmp)],
        r"cannot write to .*: it is not a directory|cannot write .*: it exists and is not a file",
    ),
    "json-under-a-file": (
        lambda tmp, config: [config, "--out", str(tmp / "o"), "--json", str(Path(_write(tmp / "f", "x")) / "r.json")],
        r"cannot write to .*f: it is not a directory",
    ),
    "table-is-a-directory": (
        lambda tmp, config: [config, "--out", str((tmp / "o" / "table.txt").mkdir(parents=True) or tmp / "o")],
        r"cannot write .*table.txt: it exists and is not a file",
    ),
    "unknown-device": (lambda tmp, config: [config, "--device", "gpu7"], r"--device gpu7: "),
    "config-not-utf8": (
        lambda tmp, config: [_write(tmp / "c.yaml", b"name: sgd\n# \xff\n")],
        r"c.yaml: not UTF-8 text",
    ),
    "config-yaml-error": (
        lambda tmp, config: [_write(tmp / "c.yaml", "name: sgd\nlr: [1\n")],
        r"c.yaml, line 3: while parsing a flow sequence",
    ),
    "config-duplicate-key": (
        lambda tmp, config: [_write(tmp / "c.yaml", "name: sgd\nlr: 1\nlr: 2\n")],
        r"c.yaml, line 3: duplicate key 'lr'",
    ),
    "config-json-nan": (
        lambda tmp, config: [_write(tmp / "c.json", '{"name": "sgd", "lr": NaN}')],
        r"c.json: NaN is not JSON",
    ),
    "config-value": (
        lambda tmp, config: [_write(tmp / "c.yaml", "name: sgd\nlr: 0.1\nmomentum: 1.0\n")],
        r"c.yaml, line 3: momentum: must be in \[0, 1\), got 1.0",
    ),
    "config-missing": (lambda tmp, config: [str(tmp / "nowhere.yaml")], r"nowhere.yaml"),
    "config-directory-empty": (
        lambda tmp, config: [str((tmp / "empty").mkdir() or tmp / "empty")],
        r"nothing to compare: no config files",
    ),
}


@pytest.mark.parametrize("name", sorted(CLI))
def test_a_command_line_mistake_is_one_line_and_exit_code_2_before_any_training(
    name, tmp_path, config_file, capsys, monkeypatch
):
    monkeypatch.setattr(compare, "_train", _no_training)
    argv, pattern = CLI[name]
    assert cli.main(["compare", *argv(tmp_path, config_file), "--steps", "2", "--no-progress"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("optorch compare: error: ") and captured.out == "", captured.err
    assert re.search(pattern, lines[0]), lines[0]


def test_ctrl_c_during_compare_writes_what_the_runs_recorded(tmp_path, capsys, monkeypatch):
    first, second = (
        _write(tmp_path / "a.yaml", "name: sgd\nlr: 0.1\n"),
        _write(tmp_path / "b.yaml", "name: adam\nlr: 0.01\n"),
    )
    train = compare._train

    def interrupted_later(result, *args):
        # The runs take turns, a step each here: b takes two, waits two turns (a finishes), then Ctrl-C.
        run = train(result, *args)
        if result.label == "a":
            yield from run
            return
        yield next(run)
        yield next(run)
        yield True
        yield True
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "_train", interrupted_later)
    out, report = tmp_path / "out", tmp_path / "report.json"
    code = cli.main(
        ["compare", first, second, "--steps", "4", "--no-progress", "--out", str(out), "--json", str(report)]
    )
    captured = capsys.readouterr()
    assert (
        code == 130
        and captured.err.strip().splitlines()[-1]
        == "optorch compare: interrupted: 1 of 2 runs finished; the others are reported up to the step they reached"
    )
    runs = {run["label"]: run for run in json.loads(report.read_text())["runs"]}
    assert runs["a"]["interrupted"] is False and runs["a"]["steps"] == 4 and runs["a"]["test_accuracy"] is not None
    assert runs["b"]["interrupted"] is True and runs["b"]["steps"] == 2 and runs["b"]["test_accuracy"] is None
    assert "interrupted after 2" in (out / "table.txt").read_text() and (out / "loss.png").is_file()


def test_a_config_that_fails_mid_run_stops_that_run_only_and_is_one_line(tmp_path, capsys):
    good = _write(tmp_path / "good.yaml", "name: sgd\nlr: 0.1\n")
    bad = _write(
        tmp_path / "bad.yaml",
        "name: sgd\nlr: 0.1\nschedule:\n  lr: {name: linear, init_value: 0.1, end_value: -0.1, transition_steps: 4}\n",
    )
    out = tmp_path / "out"
    assert cli.main(["compare", good, bad, "--steps", "4", "--no-progress", "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("optorch compare: error: ")]
    lr = optorch.schedules.Linear(init_value=0.1, end_value=-0.1, transition_steps=4)(3)  # 0.1, 0.05, 0.0, then below 0
    assert errors == [f"optorch compare: error: bad stopped at step 4: lr: must be >= 0, got {lr}"]
    rows = {line.split()[0]: line for line in (out / "table.txt").read_text().splitlines()[2:4]}
    assert "failed after 3" in rows["bad"] and re.search(r"^good\s+sgd\s+\d+\.\d{4}\s", rows["good"])


def test_ctrl_c_before_training_is_one_line_and_exit_code_130(config_file, tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "digits", interrupt)
    assert cli.main(["compare", config_file, "--no-progress", "--out", str(tmp_path / "o")]) == 130
    assert capsys.readouterr().err == "optorch compare: interrupted\n"


# ------------------------------------------------------------------------------------------------
# the count the issue asks for: python src/tests/test_hardening.py


def classify(case: Bad) -> str:
    """How a case ends: 'clear' (the error, its message, nothing changed, still usable), 'changed'
    (an error, but the optimizer was changed), 'obscure' (another error or message), 'silent' (no
    error) or 'crash' (exhausted recursion or memory)."""
    try:
        check(case)
        return "clear"
    except pytest.fail.Exception as failure:
        return "silent" if "DID NOT RAISE" in str(failure) else "obscure"
    except AssertionError as failure:
        return "obscure" if "Regex pattern did not match" in str(failure) else "changed"
    except (RecursionError, MemoryError):
        return "crash"
    except BaseException:  # noqa: BLE001 - an error of another type is the finding
        return "obscure"


if __name__ == "__main__":
    outcomes = {case.id: classify(case) for case in CASES}
    for outcome in ("clear", "obscure", "changed", "silent", "crash"):
        ids = [case_id for case_id, o in outcomes.items() if o == outcome]
        print(f"{outcome:8s} {len(ids):4d}  {' '.join(ids) if outcome != 'clear' else ''}")
    print(f"{'tried':8s} {len(outcomes):4d}")
    sys.exit(0)
