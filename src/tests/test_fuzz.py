"""Fuzzing (issue 13), for every algorithm: random configs, random corruptions of saved checkpoints
and random gradients. Two outcomes are allowed:

* a correct step: torch.optim's result (for algorithms it has, with the same config, checkpoint and
  gradients, NaN and inf ones included), else the pure stepper's (``combinators.from_config``, which
  ``optorch.build`` must equal), with a ``skip_nonfinite`` step skipped as it says;
* a clear error: its type (``pydantic.ValidationError``, ``ConfigError`` or ``UnknownOptimizerError``
  for a config, ``ValueError`` for a checkpoint, ``RuntimeError`` for a gradient), a bounded message
  that names what is wrong, and the optimizer bit-identical afterwards.

Bounded in CI: ``EXAMPLES`` per test and algorithm (a few seconds each); ``pytest --fuzz-examples N``
(see conftest.py) runs more.
"""

from __future__ import annotations

import copy
import math
import os

import pydantic
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_hardening import assert_same, snapshot

import optorch
from optorch import builder
from optorch.core.errors import first_location

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("OPTORCH_FUZZ_EXAMPLES", "20"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
ALGORITHMS = sorted(optorch.ALGORITHMS)
CONFIG_ERRORS = (pydantic.ValidationError, optorch.ConfigError, optorch.UnknownOptimizerError)


def named_params() -> dict[str, torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return {
        "w": torch.nn.Parameter(torch.randn(2, 3, generator=generator, dtype=torch.float64)),
        "b": torch.nn.Parameter(torch.randn(3, generator=generator, dtype=torch.float64)),
    }


def smooth_grads(values: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {name: torch.sin(3 * p.detach() + i) + 0.1 for name, p in values.items()}


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    # float64, a few steps: the same math in another order differs in the last bits only
    for name in expected:
        torch.testing.assert_close(
            actual[name].detach(), expected[name].detach(), rtol=1e-12, atol=1e-12, equal_nan=True, msg=name
        )


def is_plain(config: dict) -> bool:
    """No surroundings and no tensors: torch.optim takes the same keys."""
    return not any(key in config for key in builder.ENTRY_KEYS) and not any(
        isinstance(v, torch.Tensor) for v in _leaves(config)
    )


def _leaves(value):
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in _leaves(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    return [value]


def reference(name: str, config: dict, init: dict[str, torch.Tensor]):
    """``(params, step(grads, apply=True))``: torch.optim for a plain config of an algorithm it has,
    else the pure stepper ``optorch.build`` must equal."""
    algorithm = optorch.ALGORITHMS[name]
    if algorithm.torch_optimizer is not None and is_plain(config):
        params = {k: torch.nn.Parameter(v.detach().clone()) for k, v in init.items()}
        optimizer = algorithm.torch_optimizer(
            list(params.values()),
            **algorithm.config(**{k: v for k, v in config.items() if k != "name"}).hyperparameters(),
            foreach=False,
        )

        def step(grads):
            for k, p in params.items():
                p.grad = grads[k].clone()
            optimizer.step()

        return params, step, optimizer
    stepper = optorch.build_stepper(config, dict(init))
    current = {"params": {k: v.detach().clone() for k, v in init.items()}}
    current["state"] = stepper.init(current["params"])

    def step(grads):
        current["params"], current["state"] = stepper.step(current["params"], grads, current["state"])

    return current["params"], step, current


def params_of(ref) -> dict[str, torch.Tensor]:
    params, _, holder = ref
    return holder["params"] if isinstance(holder, dict) else params


def names_what_is_wrong(error: BaseException, config: dict) -> bool:
    message = builder.explain(error)
    location = first_location(error) if isinstance(error, pydantic.ValidationError) else getattr(error, "key", ())
    return (bool(location) and location[0] in config) or any(str(key) in message for key in config)


# ------------------------------------------------------------------------------------------------
# random configs

SPECIAL = [0.0, 1.0, -1.0, 0.5, 0.999, 1.5, 2.0, 1e-8, 1e-50, 1e300, -1e-3, 10**400, math.nan, math.inf, -math.inf]
JUNK = ["0.1", "yes", None, [0.1], {"a": 1}, True, b"1"]
# in the params' dtype: a float32 tensor hyperparameter computes in float32 in the eager engine (the
# user's tensor, as given) and in float64 in the references, a difference of precision, not of math
TENSORS = st.sampled_from([0.01, 0.9]).flatmap(
    lambda v: st.sampled_from(
        [
            torch.tensor(v, dtype=torch.float64),
            torch.tensor([v], dtype=torch.float64),
            torch.tensor(int(v)),
            torch.tensor(v + 0j),
        ]
    )
)


def value_like(default) -> st.SearchStrategy:
    """A value for a field with this default: often valid, often not."""
    if isinstance(default, bool):
        return st.one_of(st.booleans(), st.sampled_from(["yes", "true", 1, 0, None]))
    if isinstance(default, int):
        return st.one_of(st.integers(-2, 8), st.sampled_from([1.5, "1", True, None, 10**400]))
    if isinstance(default, float) or default is None:
        return st.one_of(st.floats(-3, 3), st.sampled_from(SPECIAL), st.sampled_from(JUNK), TENSORS)
    if isinstance(default, tuple):
        return st.one_of(
            st.tuples(*[value_like(d) for d in default]).map(list),
            st.tuples(*[value_like(d) for d in default]),
            st.sampled_from(JUNK),
        )
    return st.just(default)  # nested settings (DAG's hyper, shrink): their own tests


ENTRIES = {
    "clip_grad_norm": value_like(1.0),
    "skip_nonfinite": value_like(True),
    "accumulate_steps": st.one_of(st.integers(0, 3), st.sampled_from(JUNK)),
    "ema": st.one_of(value_like(0.9), st.fixed_dictionaries({"decay": value_like(0.9), "warmup": value_like(False)})),
    "amp": st.one_of(
        st.just({}), st.fixed_dictionaries({"init_scale": value_like(1024.0), "growth_interval": value_like(3)})
    ),
    "schedule": st.fixed_dictionaries(
        {
            "lr": st.fixed_dictionaries(
                {
                    "name": st.sampled_from(["cosine", "linear", "cosin"]),
                    "init_value": value_like(0.01),
                    "decay_steps": value_like(10),
                    "warmup_steps": value_like(2),
                }
            )
        }
    ),
}


@st.composite
def configs(draw, name: str) -> dict:
    fields = optorch.ALGORITHMS[name].config.model_fields
    chosen = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=4))
    config = {"name": name, **{key: draw(value_like(fields[key].default)) for key in chosen}}
    for key in draw(st.lists(st.sampled_from(sorted(ENTRIES)), unique=True, max_size=2)):
        config[key] = draw(ENTRIES[key])
    if draw(st.integers(0, 9)) == 0:
        config[draw(st.sampled_from(["lr_", "betas2", "foo"]))] = 0.1
    return config


@pytest.mark.parametrize("name", ALGORITHMS)
@FUZZ
@given(data=st.data())
def test_random_configs_build_and_step_correctly_or_fail_clearly(name, data):
    config = data.draw(configs(name), label="config")
    try:
        parsed = builder.parse(config)
    except CONFIG_ERRORS as error:
        message = builder.explain(error)
        assert "\n" not in message and len(message) < 2000, message
        assert names_what_is_wrong(error, config), message
        return
    filled = parsed.config.hyperparameters().get(
        {"adagrad": "initial_accumulator_value", "rprop": "lr"}.get(name, ""), 0.0
    )
    # Known, outside this suite: Algorithm.state_keys probes init_leaf with a float32 tensor, so the pure
    # init fails for a state filled from a value finite in float64 (these params) but not in float32.
    assume(isinstance(filled, torch.Tensor) or abs(filled) <= torch.finfo(torch.float32).max)
    init = named_params()
    optimizer = builder.assemble(list(init.items()), parsed, engine="eager")
    ref = reference(name, config, init)
    for i in range(3):
        grads = smooth_grads(init, i)
        for key, p in init.items():
            p.grad = grads[key].clone()
        before = snapshot(optimizer)
        try:
            optimizer.step()
        except (
            pydantic.ValidationError
        ) as error:  # a schedule that leaves the key's range later (step 0 is checked when parsed)
            assert first_location(error)[0] in config.get("schedule", {}), error
            assert_same(snapshot(optimizer), before)
            return
        ref[1](grads)
    assert_close(init, params_of(ref))


# ------------------------------------------------------------------------------------------------
# random corruptions of a saved checkpoint

CORRUPTIONS = (
    "drop",
    "rename",
    "nan",
    "inf",
    "negate",
    "huge",
    "zero",
    "shape",
    "int",
    "float16",
    "complex",
    "string",
    "none",
    "list",
    "bool",
    "number",
)


def corrupt(value, how: str):
    if how == "string":
        return "0.1"
    if how == "none":
        return None
    if how == "list":
        return [0.1, 0.2]
    if how == "bool":
        return True
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and how in ("nan", "inf", "negate", "huge", "zero")
    ):
        return {"nan": math.nan, "inf": math.inf, "negate": -1 - value, "huge": value + 1e300, "zero": 0}[
            how
        ]  # a number stays one
    if not isinstance(value, torch.Tensor):
        value = (
            torch.tensor(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else torch.zeros(())
        )
    if value.dtype == torch.bool:
        value = value.to(torch.int64)
    floating = value if value.is_floating_point() or value.is_complex() else value.double()
    return {
        "nan": lambda: floating * math.nan,
        "inf": lambda: floating + math.inf,
        "negate": lambda: -1 - floating,
        "huge": lambda: floating.double() + 1e300,
        "zero": lambda: torch.zeros_like(value),
        "shape": lambda: torch.zeros(*value.shape, 2, dtype=floating.dtype),
        "int": lambda: value.to(torch.int64),
        "float16": lambda: floating.to(torch.float16),
        "tensor": lambda: floating.double(),
        "complex": lambda: floating.to(torch.complex128),
        "number": lambda: float(floating.reshape(-1)[0]) if value.numel() else 0.5,
    }[how]()


FULL = {
    "lr": 0.01,
    "schedule": {"lr": {"name": "cosine", "init_value": 0.01, "decay_steps": 100}},
    "accumulate_steps": 2,
    "skip_nonfinite": True,
    "ema": 0.9,
    "amp": {},
}


@pytest.mark.parametrize("name", ALGORITHMS)
@FUZZ
@given(data=st.data())
def test_random_checkpoint_corruptions_load_correctly_or_fail_and_change_nothing(name, data):
    config = {"name": name, **(FULL if data.draw(st.booleans(), label="with every entry") else {})}
    init = named_params()
    optimizer = optorch.build(config, list(init.values()), engine="eager")
    for i in range(3):
        for key, p in init.items():
            p.grad = smooth_grads(init, i)[key]
        optimizer.step()
    checkpoint = copy.deepcopy(optimizer.state_dict())
    places = [("state", index, key) for index, leaf in checkpoint["state"].items() for key in leaf]
    places += [("param_groups", i, key) for i, group in enumerate(checkpoint["param_groups"]) for key in group]
    for _ in range(data.draw(st.integers(1, 2), label="corruptions")):
        where, index, key = data.draw(st.sampled_from(places), label="where")
        how = data.draw(st.sampled_from(CORRUPTIONS), label="how")
        if where == "param_groups" and how == "float16":
            how = "tensor"  # a hyperparameter as a tensor, in the params' dtype (see TENSORS)
        if name == "asgd" and key in ("lr", "lambd", "alpha", "t0") and how == "tensor":
            # documented (docs/algorithms/asgd.md): from a tensor torch computes eta and mu in its dtype, optorch as
            # from a number
            continue
        holder = checkpoint[where][index]
        if key not in holder:
            continue
        if how in ("drop", "rename"):
            value = holder.pop(key)
            if how == "rename":
                holder[key + "_"] = value
        else:
            holder[key] = corrupt(holder[key], how)
    torch_checkpoint = copy.deepcopy(checkpoint)
    for group in torch_checkpoint["param_groups"] if isinstance(torch_checkpoint.get("param_groups"), list) else []:
        for key, field in optorch.ALGORITHMS[
            name
        ].config.model_fields.items():  # a flag left out takes its default, in both
            if isinstance(group, dict) and isinstance(field.default, bool):
                group.setdefault(key, field.default)
    before = snapshot(optimizer)
    try:
        optimizer.load_state_dict(checkpoint)
    except ValueError as error:
        assert len(str(error)) < 2000, str(error)
        assert_same(snapshot(optimizer), before)
        return
    algorithm = optorch.ALGORITHMS[name]
    twin_params = {k: torch.nn.Parameter(v.detach().clone()) for k, v in init.items()}
    if algorithm.torch_optimizer is not None and is_plain(config):
        twin = algorithm.torch_optimizer(list(twin_params.values()), foreach=False)
    else:  # no reference to ask: the same checkpoint, loaded by another shim, steps the same
        twin = optorch.build(config, list(twin_params.values()), engine="eager")
    twin.load_state_dict(torch_checkpoint)
    if name == "adagrad" and not isinstance(twin, optorch.Optimizer) and len(twin.state) < len(twin_params):
        return  # torch's Adagrad creates its state when built, and cannot step a param a checkpoint left without
    for i in range(3, 5):
        for params in (init, twin_params):
            for key, p in params.items():
                p.grad = smooth_grads(init, i)[key]
        optimizer.step()
        twin.step()
    assert_close(init, twin_params)


# ------------------------------------------------------------------------------------------------
# random gradients: NaN, inf, huge, subnormal, the wrong shape

ELEMENTS = st.one_of(
    st.floats(-10, 10), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, 1e-310, 0.0, -0.0])
)


@st.composite
def gradients(draw, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    grads = {}
    for name, shape in shapes.items():
        count = math.prod(shape)
        finite = draw(st.booleans(), label=f"{name} finite")
        elements = st.floats(-10, 10) if finite else ELEMENTS
        grads[name] = torch.tensor(
            draw(st.lists(elements, min_size=count, max_size=count)), dtype=torch.float64
        ).reshape(shape)
    return grads


@pytest.mark.parametrize("name", ALGORITHMS)
@FUZZ
@given(data=st.data())
def test_random_gradients_step_like_the_reference_or_fail_and_change_nothing(name, data):
    skip = data.draw(st.booleans(), label="skip_nonfinite")
    config = {"name": name, **({"skip_nonfinite": True} if skip else {})}
    init = named_params()
    optimizer = optorch.build(config, list(init.values()), engine="eager")
    ref = reference(name, {"name": name}, init) if not skip else reference(name, config, init)
    shapes = {key: p.shape for key, p in init.items()}
    for _ in range(3):
        grads = data.draw(gradients(shapes), label="grads")
        for key, p in init.items():
            p.grad = grads[key].clone()
        if data.draw(st.integers(0, 5), label="wrong shape") == 0:
            key = data.draw(st.sampled_from(sorted(init)), label="which")
            init[key].grad.data = torch.zeros(4, dtype=torch.float64)
            before = snapshot(optimizer)
            with pytest.raises(RuntimeError, match=r"a parameter of shape .* has a gradient of shape \(4,\)"):
                optimizer.step()
            assert_same(snapshot(optimizer), before)
            continue
        optimizer.step()
        finite = all(bool(torch.isfinite(g).all()) for g in grads.values())
        assert optimizer.step_was_skipped == (skip and not finite)
        ref[1](grads)  # with skip_nonfinite, the pure stepper (apply_if_finite) skips it too
    assert_close(init, params_of(ref))
