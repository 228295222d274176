"""optorch.amp against torch.amp.GradScaler run live on CPU, and the original optorch's scaler bugs."""

from __future__ import annotations

import math
import random

import pydantic
import pytest
import torch
from torch.func import functional_call

import optorch
from optorch import amp

FLOAT32_MAX = torch.finfo(torch.float32).max


class Plain:
    """The smallest stepper: an algorithm with a fixed config (numbers, so torch.optim's kernels run)."""

    def __init__(self, algorithm, config):
        self.algorithm, self.config = algorithm, config

    def init(self, params):
        return self.algorithm.init(params, self.config)

    def step(self, params, grads, state):
        return self.algorithm.step(params, grads, state, self.config)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))


def _poison(grads: dict, kind: str, rng: random.Random):
    """Write an inf, -inf or NaN into one element of one gradient (in place)."""
    name = rng.choice(sorted(grads))
    flat = grads[name].view(-1)
    flat[rng.randrange(flat.numel())] = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}[kind]


FACTORS = [
    dict(init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=3),
    # factors that are not powers of two: the products round, and must round as torch's do
    dict(init_scale=3.7e4, growth_factor=1.7, backoff_factor=0.6, growth_interval=2),
    dict(init_scale=2.0**10, growth_factor=3.0, backoff_factor=0.75, growth_interval=1),
]


@pytest.mark.parametrize("factors", FACTORS, ids=["torch-defaults-interval-3", "odd-factors", "interval-1"])
def test_scale_grads_and_params_equal_grad_scaler_over_a_random_overflow_pattern(factors):
    config = amp.ScalerConfig(**factors)
    rng = random.Random(FACTORS.index(factors))  # a fixed overflow pattern per case
    # torch: a model, SGD with momentum, GradScaler; ours: the same math as a pure functional loop
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", **factors)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    stepper = amp.scaled(Plain(optorch.sgd.algorithm, optorch.sgd.Config(lr=0.05, momentum=0.9)), config)
    state = stepper.init(params)
    generator = torch.Generator().manual_seed(1)
    overflows = skipped_by_torch = 0
    scales = []
    for step in range(400):
        x = torch.randn(8, 4, generator=generator)
        kind = rng.choices(["clean", "inf", "-inf", "nan"], weights=[6, 1, 1, 1])[0]
        # torch's side
        optimizer.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        torch_grads = {name: p.grad for name, p in model.named_parameters()}
        if kind != "clean":
            _poison(torch_grads, kind, random.Random(step))
        # our side: the same scaled loss, differentiated functionally
        ours = {name: p.requires_grad_() for name, p in params.items()}
        loss = amp.scale_loss(functional_call(model, ours, (x,)).pow(2).mean(), state["scaler"])
        grads = dict(zip(ours, torch.autograd.grad(loss, list(ours.values()))))
        params = {name: p.detach() for name, p in ours.items()}
        if kind != "clean":
            _poison(grads, kind, random.Random(step))
        for name in grads:  # the scaled grads agree before anything else happens
            torch.testing.assert_close(grads[name], torch_grads[name], rtol=0, atol=0, equal_nan=True)
        unscaled, found_inf = amp.unscale(grads, state["scaler"])
        scale_before = scaler.get_scale()
        scaler.unscale_(optimizer)
        for name in grads:  # bit-exact, NaN where torch has NaN
            torch.testing.assert_close(unscaled[name], torch_grads[name], rtol=0, atol=0, equal_nan=True)
        assert found_inf.item() == (kind != "clean")
        overflows += kind != "clean"
        scaler.step(optimizer)
        scaler.update()
        params, state = stepper.step(params, grads, state)
        skipped_by_torch += scaler.get_scale() < scale_before
        scales.append(scaler.get_scale())
        assert state["scaler"].scale.dtype == torch.float32 and state["scaler"].growth_tracker.dtype == torch.int32
        assert state["scaler"].scale.item() == scaler.get_scale(), step
        assert state["scaler"].growth_tracker.item() == scaler.state_dict()["_growth_tracker"], step
        for name, p in model.named_parameters():
            assert torch.equal(params[name], p.detach()), (step, name)
    assert state["skipped"].item() == overflows == skipped_by_torch and 40 < overflows < 200
    assert all(torch.isfinite(p).all() for p in params.values())  # a run that trained, not one gone to NaN
    # the scale went both ways, many times
    assert sum(b > a for a, b in zip(scales, scales[1:])) > 20 and sum(b < a for a, b in zip(scales, scales[1:])) > 20


def test_the_originals_documented_sequence_with_interval_3():
    """specs/optorch-origin.md appendix, as (found_inf, scale, tracker); the original only reached the
    overflow row because the test called update_scale by hand (its simulator never backs off)."""
    config = amp.ScalerConfig(growth_interval=3)
    state = amp.init(config)
    expected = [(0, 65536, 1), (0, 65536, 2), (0, 131072, 0), (1, 65536, 0), (0, 65536, 1)]
    for found, scale, tracker in expected:
        state = amp.update(state, torch.tensor(float(found)), config)
        assert (state.scale.item(), state.growth_tracker.item()) == (scale, tracker)


def test_nan_is_detected_where_the_original_saw_only_inf():
    state = amp.init()
    for bad in (math.nan, math.inf, -math.inf):
        grads = [torch.ones(3), torch.tensor([1.0, bad])]
        assert amp.unscale(grads, state)[1].item() == 1.0
    assert amp.unscale([torch.ones(3), torch.full((2,), 1e30)], state)[1].item() == 0.0


def test_overflow_backs_off_on_every_overflow():
    """The original's simulator called the update only on clean steps, so it never backed off."""
    config = amp.ScalerConfig(init_scale=1024.0, growth_interval=2)
    state = amp.init(config)
    scales = []
    for found in (1, 1, 0, 1, 0, 0, 1):
        state = amp.update(state, torch.tensor(float(found)), config)
        scales.append(state.scale.item())
    assert scales == [512, 256, 256, 128, 128, 256, 128]


@pytest.mark.parametrize(
    "init_scale, growth", [(2.0**126, 2.0), (FLOAT32_MAX, 1.0000001), (3e38, 1.1), (FLOAT32_MAX, 1.00000001)]
)
def test_the_scale_never_grows_to_inf_and_stops_where_grad_scaler_does(init_scale, growth):
    config = amp.ScalerConfig(init_scale=init_scale, growth_factor=growth, growth_interval=1)
    state = amp.init(config)
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_factor=growth, growth_interval=1)
    for _ in range(4):
        optimizer.zero_grad()
        scaler.scale(param.sum() * 0).backward()
        scaler.step(optimizer)
        scaler.update()
        state = amp.update(state, torch.tensor(0.0), config)
        assert state.scale.item() == scaler.get_scale() and math.isfinite(state.scale.item())
        assert state.growth_tracker.item() == 0
    assert state.scale.item() >= init_scale * (1 - 1e-7)


def test_unscale_is_out_of_place_keeps_the_structure_and_passes_none():
    state = amp.init(amp.ScalerConfig(init_scale=3.0))  # 1/3 rounds: float64 reciprocal, then float32
    a, b = torch.tensor([3.0, 6.0, 1e-3]), torch.tensor([[7.0]], dtype=torch.float64)
    grads = {"layer": [a, None], "other": (b, torch.tensor([2.0], dtype=torch.bfloat16))}
    copies = [a.clone(), b.clone()]
    unscaled, found_inf = amp.unscale(grads, state)
    assert torch.equal(a, copies[0]) and torch.equal(b, copies[1])  # inputs untouched
    assert unscaled["layer"][1] is None and isinstance(unscaled["other"], tuple)
    inv_scale = torch.tensor(3.0, dtype=torch.float64).reciprocal().float()
    assert torch.equal(unscaled["layer"][0], a * inv_scale)
    assert unscaled["other"][0].dtype == torch.float64 and torch.equal(unscaled["other"][0], b * inv_scale.double())
    assert unscaled["other"][1].dtype == torch.bfloat16 and torch.equal(
        unscaled["other"][1], (torch.tensor([2.0]) * inv_scale).bfloat16()
    )
    assert found_inf.dtype == torch.float32 and found_inf.item() == 0.0
    assert amp.unscale({"w": None}, state)[0] == {"w": None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_unscale_equals_grad_scaler_bit_for_bit_in_every_dtype(dtype):
    generator = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.zeros(n, dtype=dtype)) for n in (1, 17, 300)]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=generator, dtype=torch.float64) * 1e4).to(dtype)
    grads = [p.grad.clone() for p in params]
    for init_scale in (2.0**16, 3.0, 12345.678, 1e-3):
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer = torch.optim.SGD(params, lr=0.0)
        # GradScaler refuses fp16 in unscale_; its internal pass with allow_fp16 is the reference then
        inv_scale = scaler._scale.double().reciprocal().float()
        scaler._unscale_grads_(optimizer, inv_scale, torch.zeros(1), allow_fp16=True)
        unscaled, found_inf = amp.unscale(grads, amp.init(amp.ScalerConfig(init_scale=init_scale)), allow_fp16=True)
        for ours, p in zip(unscaled, params):
            assert ours.dtype == dtype and torch.equal(ours, p.grad), (dtype, init_scale)


def test_fp16_grads_are_refused_as_grad_scaler_refuses_them():
    state = amp.init()
    with pytest.raises(ValueError, match="FP16"):
        amp.unscale([torch.ones(2), torch.ones(2, dtype=torch.float16)], state)
    param = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
    param.grad = torch.ones(2, dtype=torch.float16)
    torch_scaler = torch.amp.GradScaler("cpu")
    torch_scaler.scale(torch.ones(()))
    with pytest.raises(ValueError, match="FP16"):
        torch_scaler.unscale_(torch.optim.SGD([param], lr=0.1))


def test_a_skipped_step_leaves_params_and_state_bit_identical():
    params = {"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(2)}
    inner = optorch.inject_hyperparams(optorch.adam.algorithm, optorch.adam.Config(lr=1e-2))
    stepper = amp.scaled(inner, {"init_scale": 8.0, "growth_interval": 1})
    state = stepper.init(params)
    grads = {"w": torch.ones(3, 2, dtype=torch.float64), "b": torch.ones(2)}
    params, state = stepper.step(params, grads, state)  # one clean step: the Adam state is non-trivial
    assert state["scaler"].scale.item() == 16.0 and state["skipped"].item() == 0
    for bad in (math.nan, math.inf):
        poisoned = {"w": grads["w"], "b": torch.tensor([1.0, bad])}
        before = (params, state)
        params, state = stepper.step(params, poisoned, state)
        torch.utils._pytree.tree_map(lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0), before[0], params)
        torch.utils._pytree.tree_map(
            lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0), before[1]["inner"], state["inner"]
        )
    assert state["skipped"].item() == 2 and state["scaler"].scale.item() == 4.0
    moved, state = stepper.step(params, grads, state)
    assert not torch.equal(moved["w"], params["w"]) and state["inner"]["count"].item() == 2


def test_the_scaled_step_unscales_before_the_inner_step():
    params = [torch.zeros(3)]
    stepper = amp.scaled(Plain(optorch.sgd.algorithm, optorch.sgd.Config(lr=1.0)), amp.ScalerConfig(init_scale=4.0))
    state = stepper.init(params)
    params, state = stepper.step(params, [torch.full((3,), 4.0 * 0.25)], state)  # the grads of a loss scaled by 4
    assert torch.equal(params[0], torch.full((3,), -0.25))


def _run(update, config, found):
    state = amp.init(config)
    out = []
    for f in found:
        state = update(state, f, config)
        out.append(state)
    return out


def test_compiled_fullgraph_update_and_unscale_equal_eager():
    config = amp.ScalerConfig(init_scale=3.7e4, growth_factor=1.7, backoff_factor=0.3, growth_interval=3)
    rng = random.Random(5)
    found = [torch.tensor(float(rng.random() < 0.3)) for _ in range(60)]
    torch._dynamo.reset()
    compiled = torch.compile(amp.update, fullgraph=True)
    for eager, fast in zip(_run(amp.update, config, found), _run(compiled, config, found)):
        assert torch.equal(eager.scale, fast.scale) and torch.equal(eager.growth_tracker, fast.growth_tracker)
    grads = {"a": torch.randn(5, 3), "b": [torch.tensor([1.0, math.nan]), None]}
    state = amp.init(config)
    eager, eager_inf = amp.unscale(grads, state)
    fast, fast_inf = torch.compile(amp.unscale, fullgraph=True)(grads, state)
    assert torch.equal(eager["a"], fast["a"]) and fast["b"][1] is None and eager_inf.item() == fast_inf.item() == 1.0


def test_a_compiled_fullgraph_scaled_step_skips_and_steps_as_eager():
    params = [torch.randn(4), torch.randn(2, 2)]
    stepper = amp.scaled(
        optorch.inject_hyperparams(optorch.sgd.algorithm, optorch.sgd.Config(lr=0.1, momentum=0.9)),
        amp.ScalerConfig(init_scale=2.0, growth_interval=2),
    )
    compiled = torch.compile(stepper.step, fullgraph=True)
    eager_state = fast_state = stepper.init(params)
    eager_params = fast_params = params
    for t in range(6):
        grads = [torch.full((4,), 0.5 * t), torch.full((2, 2), math.nan if t in (1, 4) else 1.0)]
        eager_params, eager_state = stepper.step(eager_params, grads, eager_state)
        fast_params, fast_state = compiled(fast_params, grads, fast_state)
        for a, b in zip(
            torch.utils._pytree.tree_leaves((eager_params, eager_state)),
            torch.utils._pytree.tree_leaves((fast_params, fast_state)),
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    # clean, NaN (back to 1), clean, clean (grows to 2), NaN (back to 1), clean
    assert fast_state["skipped"].item() == 2 and fast_state["scaler"].scale.item() == 1.0
    assert fast_state["scaler"].growth_tracker.item() == 1


@pytest.mark.parametrize(
    "field, value",
    [
        ("growth_factor", 1.0),
        ("growth_factor", 0.5),
        ("backoff_factor", 1.0),
        ("backoff_factor", 0.0),
        ("growth_interval", 0),
        ("growth_interval", 2.5),
        ("init_scale", 0.0),
        ("init_scale", math.inf),
        ("init_scale", 1e39),
        ("enabled", "yes"),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(pydantic.ValidationError, match=field):
        amp.ScalerConfig(**{field: value})
    with pytest.raises(pydantic.ValidationError, match=field):
        amp.scaled(Plain(optorch.sgd.algorithm, optorch.sgd.Config()), {field: value})


def test_config_is_frozen_and_rejects_unknown_keys():
    with pytest.raises(pydantic.ValidationError, match="precision"):
        amp.ScalerConfig(precision="torch.bfloat16")  # the original eval()-ed this string
    with pytest.raises(pydantic.ValidationError):
        amp.ScalerConfig().growth_factor = 3.0
    assert amp.ScalerConfig().model_dump() == {
        "init_scale": 65536.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "enabled": True,
    }


def test_a_disabled_scaler_is_an_identity_and_never_skips():
    config = amp.ScalerConfig(enabled=False)
    state = amp.init(config)
    loss = torch.tensor(0.1234567)
    assert state.scale.item() == 1.0 and torch.equal(amp.scale_loss(loss, state), loss)
    assert amp.update(state, torch.tensor(1.0), config) is state
    stepper = amp.scaled(Plain(optorch.sgd.algorithm, optorch.sgd.Config(lr=1.0)), config)
    params, s = stepper.step([torch.zeros(2)], [torch.tensor([1.0, math.nan])], stepper.init([torch.zeros(2)]))
    assert params[0][0].item() == -1.0 and math.isnan(params[0][1].item())  # as torch with GradScaler(enabled=False)


def test_scaled_needs_a_stepper():
    with pytest.raises(TypeError, match="stepper"):
        amp.scaled(optorch.sgd.algorithm.step)


def test_the_module_is_exported():
    assert optorch.amp is amp and "amp" in optorch.__all__
