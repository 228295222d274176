"""ADOPT against torch-adopt 0.1.0 (``adopt.ADOPT``), the original implementation.

The whole flag grid runs in test_equivalence (via ``optorch.verify``) and the recorded trajectories in
test_reference; here: the quirks worked out by hand (first call, clip index, eps as a floor, decoupled
decay timing, the constant-gradient closed form), what the grid's problem does not reach (complex
params, a tensor lr, a parameter that first gets a gradient late, random configs), checkpoints
interchanged with torch-adopt mid-run, side effects, the config's validation and its mapping to
torch-adopt's constructor.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pydantic
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_shim import loss_at, make_model, params_of, through_bytes, train

import optorch
from optorch.tools import references, verify

ADOPT = pytest.importorskip("adopt").ADOPT
Reference = references.torch_adopt()
EXECUTION_FLAGS = {"foreach", "fused", "capturable", "differentiable"}

pytestmark = pytest.mark.filterwarnings("ignore:.*is_compiling.*:UserWarning")  # torch-adopt on torch 2.13


def run_pure(values, grads, steps, **config):
    """Scalar params (a list of floats) through the pure stepper with constant grads; theta per step."""
    config = optorch.adopt.Config(**config)
    params = [torch.tensor(v, dtype=torch.float64) for v in values]
    state = optorch.adopt.init(params, config)
    history = []
    for i in range(steps):
        g = [torch.tensor(grad(i) if callable(grad) else grad, dtype=torch.float64) for grad in grads]
        params, state = optorch.adopt.step(params, g, state, config)
        history.append([p.item() for p in params])
    return history


def run_reference(values, grads, steps, **config):
    params = [torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in values]
    optimizer = Reference(params, **config)
    history = []
    for i in range(steps):
        for p, grad in zip(params, grads):
            p.grad = torch.tensor(grad(i) if callable(grad) else grad, dtype=torch.float64)
        optimizer.step()
        history.append([p.item() for p in params])
    return history


# ------------------------------------------------------------------------------------------------
# quirks, worked out by hand (and confirmed against torch-adopt)


@pytest.mark.parametrize("wd, decouple, maximize", [(0.0, False, False), (0.3, False, True), (0.3, True, False)])
def test_first_call_only_initialises_v(wd, decouple, maximize):
    torch.manual_seed(0)
    param, grad = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    config = optorch.adopt.Config(lr=0.1, weight_decay=wd, decouple=decouple, maximize=maximize)
    new_param, state = optorch.adopt.step(param, grad, optorch.adopt.init(param, config), config)
    assert torch.equal(new_param, param)  # no move, and no decoupled decay either
    g = -grad if maximize else grad
    g = g if decouple else torch.add(g, param, alpha=wd)  # torch-adopt's g + wd*p, one rounding
    assert torch.equal(state["exp_avg_sq"], g * g)
    assert torch.equal(state["exp_avg"], torch.zeros_like(param))
    assert state["step"].item() == 1.0 and state["step"].dtype == torch.float32

    reference_param = torch.nn.Parameter(param.clone())
    reference_param.grad = grad.clone()
    reference = Reference([reference_param], lr=0.1, weight_decay=wd, decouple=decouple, maximize=maximize)
    reference.step()
    theirs = reference.state[reference_param]
    assert torch.equal(reference_param.detach(), new_param)
    assert all(torch.equal(theirs[key], state[key]) for key in ("exp_avg", "exp_avg_sq", "step"))


@pytest.mark.parametrize("magnitude", [1e-6, 1e-3, 1.0, 250.0])
def test_constant_gradient_closed_form(magnitude):
    # u = 1 at every update, so m_t = 1 - 0.9^t and theta_K = -lr * sum_{t<K} (1 - 0.9^t), whatever |c| >= eps.
    expected = [-0.1 * sum(1 - 0.9**t for t in range(1, k)) for k in range(1, 7)]
    assert [round(x, 12) for x in expected] == [0.0, -0.01, -0.029, -0.0561, -0.09049, -0.131441]
    ours = run_pure([0.0], [magnitude], 6, lr=0.1)
    assert [h[0] for h in ours] == pytest.approx(expected, abs=1e-15)
    assert ours == run_reference([0.0], [magnitude], 6, lr=0.1)


def test_clip_bound_is_one_at_the_first_update():
    # g = 1.0 then 1.1: u = 1.1 / 1.0 is clipped to 1^(1/4) = 1, so theta = -0.1 * 0.1 * 1 = -0.01
    # (an off-by-one bound 2^(1/4) would leave u = 1.1 and give -0.011).
    ours = run_pure([0.0], [lambda i: 1.0 + 0.1 * i], 2, lr=0.1)
    assert ours[1][0] == pytest.approx(-0.01, abs=1e-16)
    unclipped = run_pure([0.0], [lambda i: 1.0 + 0.1 * i], 2, lr=0.1, clip_exponent=None)
    assert unclipped[1][0] == pytest.approx(-0.011, abs=1e-16)
    assert ours == run_reference([0.0], [lambda i: 1.0 + 0.1 * i], 2, lr=0.1)


def test_clip_bound_grows_as_the_step_count_to_the_exponent():
    # g = 1, 10, 40 with betas (0, 0): m = u and v = the last g^2, so theta moves by -u per update.
    grads = [lambda i: [1.0, 10.0, 40.0][min(i, 2)]]
    for exponent, bound in ((0.25, 2**0.25), (0.5, 2**0.5), (0.0, 1.0)):
        ours = run_pure([0.0], grads, 3, lr=1.0, betas=(0.0, 0.0), clip_exponent=exponent)
        # k = 1: u = 10 / 1 clipped to 1. k = 2: v = 100, u = 40 / 10 = 4 clipped to 2^e.
        assert ours[1][0] == pytest.approx(-1.0, abs=1e-15)
        assert ours[2][0] == pytest.approx(-1.0 - bound, abs=1e-15)
        assert ours == run_reference([0.0], grads, 3, lr=1.0, betas=(0.0, 0.0), clip_exponent=exponent)


def test_eps_is_a_floor_not_a_summand():
    # |g| = 1e-7 < eps = 1e-6 with v = g^2: the denominator is eps, u = 0.1, theta = -0.01 * (0.1, 0.19).
    ours = run_pure([0.0], [1e-7], 3, lr=0.1)
    assert [h[0] for h in ours] == pytest.approx([0.0, -0.001, -0.0029], abs=1e-16)
    assert ours == run_reference([0.0], [1e-7], 3, lr=0.1)


def test_an_always_zero_gradient_never_moves():
    ours = run_pure([0.7], [0.0], 5, lr=0.1)
    assert ours == [[0.7]] * 5


@pytest.mark.parametrize("decouple, expected", [(True, [1.0, 0.94]), (False, [1.0, 0.99])])
def test_decoupled_decay_skips_the_first_call(decouple, expected):
    # decoupled: 1 * (1 - 0.1 * 0.5) - 0.1 * 0.1 * 1 = 0.94; coupled: g = 1.5 = sqrt(v0), u = 1, 1 - 0.01.
    ours = run_pure([1.0], [1.0], 2, lr=0.1, weight_decay=0.5, decouple=decouple)
    assert [h[0] for h in ours] == pytest.approx(expected, abs=1e-15)
    assert ours == run_reference([1.0], [1.0], 2, lr=0.1, weight_decay=0.5, decouple=decouple)


# ------------------------------------------------------------------------------------------------
# live against torch-adopt where the grid's problem does not reach


def _complex_problem():
    generator = torch.Generator().manual_seed(3)
    w = torch.randn(3, 2, dtype=torch.complex128, generator=generator)
    r = torch.randn(4, dtype=torch.float64, generator=generator)
    x = torch.randn(8, 3, dtype=torch.complex128, generator=generator)
    return [w, r], x


def _complex_loss(params, x):
    w, r = params
    out = x @ w
    return (out.real.tanh() ** 2).mean() + (out.imag.sin() * r[:2]).mean() + (r**2).sum() * 0.1


COMPLEX_CONFIGS = [
    {"lr": 0.05},
    {"lr": 0.05, "weight_decay": 0.1, "maximize": True, "clip_exponent": 0.5},
    {"lr": 0.05, "weight_decay": 0.1, "decouple": True, "clip_exponent": None},
]


@pytest.mark.parametrize("config", COMPLEX_CONFIGS, ids=lambda c: verify.describe({"name": "adopt", **c}))
@pytest.mark.parametrize("path", ["pure", "eager", pytest.param("compiled", marks=pytest.mark.compile)])
def test_complex_params_match_torch_adopt(config, path):
    (w, r), x = _complex_problem()
    theirs = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(r.clone())]
    reference = Reference(theirs, **config)
    if path == "pure":
        ours = [w.clone(), r.clone()]
        cfg = optorch.adopt.Config(**config)
        state = optorch.adopt.init(ours, cfg)
    else:
        ours = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(r.clone())]
        shim = optorch.build({"name": "adopt", **config}, ours, engine=path)
    worst = 0.0
    for _ in range(30):
        reference.zero_grad()
        _complex_loss(theirs, x).backward()
        reference.step()
        if path == "pure":
            grads = torch.func.grad(_complex_loss)(ours, x)
            ours, state = optorch.adopt.step(ours, grads, state, cfg)
        else:
            shim.zero_grad()
            _complex_loss(ours, x).backward()
            shim.step()
        worst = max(worst, verify.max_abs_diff(list(ours), list(theirs)))
    # torch-adopt adds coupled decay in complex arithmetic, wd*p then + g (two roundings); optorch adds
    # it to the real pairs, where torch's add(alpha=) is one fused multiply-add: an ulp apart.
    coupled = config.get("weight_decay", 0.0) and not config.get("decouple", False)
    assert worst <= (0.0 if path != "compiled" and not coupled else verify.FLOAT64_TOLERANCE)
    assert (theirs[0].detach() - w).abs().max() > 0.1  # the complex parameter did move
    if path == "pure":  # the state is complex, as torch-adopt keeps it, with re^2 and im^2 apart in v
        assert state["exp_avg_sq"][0].is_complex()
        theirs_sq = reference.state[theirs[0]]["exp_avg_sq"]
        torch.testing.assert_close(state["exp_avg_sq"][0], theirs_sq, rtol=0, atol=0 if not coupled else 1e-15)


@pytest.mark.parametrize("decouple", [False, True])
def test_tensor_lr_matches_torch_adopt(decouple):
    lr = torch.tensor(0.02, dtype=torch.float64)
    config = {"weight_decay": 0.1, "decouple": decouple}
    model_s, model_t = make_model(), make_model()
    shim = optorch.build({"name": "adopt", "lr": lr, **config}, model_s.parameters(), engine="eager")
    reference = Reference(model_t.parameters(), lr=lr.clone(), **config)
    train(model_s, shim, 8)
    train(model_t, reference, 8)
    for a, b in zip(params_of(model_s), params_of(model_t)):
        assert (a - b).abs().max() <= 1e-15


@pytest.mark.parametrize("engine", ["eager", pytest.param("compiled", marks=pytest.mark.compile)])
def test_a_parameter_first_stepped_late_gets_its_own_initialising_call(engine):
    """torch-adopt's default (single-tensor) path: a param that first gets a gradient at call 3 spends
    that call initialising v, whatever the other params' counts (its foreach path does not)."""
    model_s, model_t = make_model(), make_model()
    shim = optorch.build({"name": "adopt", "lr": 0.01}, model_s.parameters(), engine=engine)
    reference = Reference(model_t.parameters(), lr=0.01)
    late = lambda model: lambda i: [model[4].weight] if i < 2 else []  # noqa: E731
    train(model_s, shim, 3, drop=late(model_s))
    train(model_t, reference, 3, drop=late(model_t))
    assert torch.equal(model_s[4].weight.detach(), make_model()[4].weight.detach())  # its first call: no move
    train(model_s, shim, 5, start=3)
    train(model_t, reference, 5, start=3)
    for a, b in zip(params_of(model_s), params_of(model_t)):
        assert (a - b).abs().max() <= (0.0 if engine == "eager" else verify.FLOAT64_TOLERANCE)
    assert shim.state[model_s[4].weight]["step"].item() == 6 and shim.state[model_s[0].weight]["step"].item() == 8


@settings(max_examples=25, deadline=None)
@given(
    values=st.fixed_dictionaries(
        {
            "lr": st.floats(0.0, 0.5),
            "betas": st.tuples(st.floats(0.0, 0.999), st.floats(0.0, 0.999)),
            "eps": st.floats(0.0, 1e-1),
            "clip_exponent": st.one_of(st.none(), st.floats(0.0, 2.0)),
            "weight_decay": st.floats(0.0, 0.5),
            "decouple": st.booleans(),
            "maximize": st.booleans(),
        }
    ),
    seed=st.integers(0, 2**16),
)
def test_random_configs_match_torch_adopt_bit_for_bit(values, seed):
    generator = torch.Generator().manual_seed(seed)
    init = [
        torch.randn(5, 3, dtype=torch.float64, generator=generator),
        torch.randn(3, dtype=torch.float64, generator=generator),
    ]
    theirs = [torch.nn.Parameter(p.clone()) for p in init]
    reference = Reference(theirs, **values)
    config = optorch.adopt.Config(**values)
    params, state = list(init), optorch.adopt.init(init, config)
    for _ in range(8):
        grads = [torch.sin(3 * p) + 0.1 for p in params]  # bounded, so maximize cannot blow up
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        reference.step()
        params, state = optorch.adopt.step(params, grads, state, config)
    for ours, their in zip(params, theirs):
        torch.testing.assert_close(ours, their.detach(), rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------------
# checkpoints interchange with torch-adopt, mid-run


CHECKPOINT_CONFIGS = [
    {"lr": 0.01},
    {"lr": 0.01, "weight_decay": 0.1, "decouple": True, "maximize": True, "clip_exponent": None},
]


def _groups(model, config):
    """Two groups, the second at half the lr; no clip_exponent in them (torch-adopt keeps it apart)."""
    rest = [*model[2].parameters(), *model[4].parameters()]
    return [{"params": list(model[0].parameters())}, {"params": rest, "lr": config["lr"] / 2}]


def _assert_states_equal(shim, reference):
    ours, theirs = shim.state_dict()["state"], reference.state_dict()["state"]
    assert set(ours) == set(theirs)
    for index, leaf in theirs.items():
        assert set(ours[index]) == set(leaf) == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in leaf.items():
            assert ours[index][key].dtype == value.dtype and ours[index][key].shape == value.shape, (index, key)
            assert torch.equal(ours[index][key], value), (index, key)


@pytest.mark.parametrize("config", CHECKPOINT_CONFIGS, ids=lambda c: verify.describe({"name": "adopt", **c}))
def test_torch_adopt_checkpoint_continues_in_shim_bit_for_bit(config):
    model_t = make_model()
    reference = Reference(_groups(model_t, config), **config)
    train(model_t, reference, 4)
    checkpoint = through_bytes(reference.state_dict())
    model_s = copy.deepcopy(model_t)
    shim = optorch.build({"name": "adopt", **config}, _groups(model_s, config), engine="eager")
    shim.load_state_dict(checkpoint)
    _assert_states_equal(shim, reference)
    train(model_t, reference, 5, start=4)
    train(model_s, shim, 5, start=4)
    assert all(torch.equal(a, b) for a, b in zip(params_of(model_s), params_of(model_t)))
    _assert_states_equal(shim, reference)


@pytest.mark.parametrize("config", CHECKPOINT_CONFIGS, ids=lambda c: verify.describe({"name": "adopt", **c}))
def test_shim_checkpoint_continues_in_torch_adopt_bit_for_bit(config):
    model_s = make_model()
    shim = optorch.build({"name": "adopt", **config}, _groups(model_s, config), engine="eager")
    train(model_s, shim, 4)
    checkpoint = through_bytes(shim.state_dict())
    model_t = copy.deepcopy(model_s)
    # torch-adopt keeps the clip outside its state_dict: it is passed to the constructor again.
    reference = Reference(_groups(model_t, config), **config)
    reference.load_state_dict(checkpoint)
    _assert_states_equal(shim, reference)
    train(model_s, shim, 5, start=4)
    train(model_t, reference, 5, start=4)
    assert all(torch.equal(a, b) for a, b in zip(params_of(model_s), params_of(model_t)))
    _assert_states_equal(shim, reference)


def test_state_dict_layout_is_torch_adopts():
    model_s, model_t = make_model(), make_model()
    shim = optorch.build({"name": "adopt"}, model_s.parameters(), engine="eager")
    reference = ADOPT(model_t.parameters())
    train(model_s, shim, 2)
    train(model_t, reference, 2)
    ours, theirs = shim.state_dict(), reference.state_dict()
    _assert_states_equal(shim, reference)
    assert ours["state"][0]["step"].dtype == torch.float32 and ours["state"][0]["step"].dim() == 0
    # torch-adopt's group keys less its execution flags, plus clip_exponent (its clip_lambda lives on
    # the optimizer object and is not saved).
    their_keys = set(theirs["param_groups"][0]) - EXECUTION_FLAGS
    assert set(ours["param_groups"][0]) == their_keys | {"clip_exponent", "optorch_format"}


# ------------------------------------------------------------------------------------------------
# side effects, config, validation


def test_grads_are_left_as_they_were():
    model = make_model()
    shim = optorch.build({"name": "adopt", "weight_decay": 0.1, "maximize": True}, model.parameters(), engine="eager")
    for _ in range(3):
        shim.zero_grad()
        loss_at(model, 0).backward()
        before = [p.grad.clone() for p in model.parameters()]
        shim.step()
        assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


def test_config_keys_and_defaults_are_torch_adopts():
    """The config's keys are torch-adopt's keywords with clip_lambda as clip_exponent; the defaults agree,
    torch-adopt's default clip_lambda being step ** 0.25."""
    theirs = inspect.signature(ADOPT.__init__).parameters
    keys = set(theirs) - {"self", "params", "clip_lambda"} - EXECUTION_FLAGS
    assert set(optorch.adopt.Config.model_fields) == keys | {"clip_exponent"}
    config = optorch.adopt.Config()
    for key in keys:
        assert getattr(config, key) == theirs[key].default, key
    assert theirs["clip_lambda"].default(16.0) == 16.0**config.clip_exponent == 2.0
    translated = inspect.signature(Reference.__init__).parameters
    assert [k for k in translated if k != "clip_exponent"] == [k for k in theirs if k != "clip_lambda"]


@pytest.mark.parametrize(
    "values, field, torch_adopt_refuses",
    [
        ({"lr": -1e-3}, "lr", True),
        ({"eps": -1e-8}, "eps", True),
        ({"betas": (1.0, 0.9)}, "betas", True),
        ({"betas": (0.9, -0.1)}, "betas", True),
        ({"weight_decay": -0.1}, "weight_decay", True),
        ({"lr": torch.ones(2)}, "lr", True),
        ({"clip_exponent": -0.25}, "clip_exponent", False),  # torch-adopt takes any callable
        ({"clip_exponent": "0.25"}, "clip_exponent", False),
        ({"decouple": 1}, "decouple", False),  # torch-adopt does not check its flags
    ],
)
def test_invalid_values_are_refused_by_name(values, field, torch_adopt_refuses):
    with pytest.raises(pydantic.ValidationError, match=field):
        optorch.adopt.Config(**values)
    if torch_adopt_refuses:
        with pytest.raises(ValueError):
            Reference([torch.zeros(2, requires_grad=True)], **values)


def test_example_config_constructs_torch_adopt():
    """configs/adopt.yaml's keys are torch-adopt's (clip_exponent through the translating reference)."""
    values = optorch.load_config(Path(__file__).resolve().parents[2] / "configs" / "adopt.yaml")
    assert values.pop("name") == "adopt"
    Reference([torch.zeros(2, requires_grad=True)], **values)
    ADOPT([torch.zeros(2, requires_grad=True)], **{k: v for k, v in values.items() if k != "clip_exponent"})


def test_accepted_edge_values():
    config = optorch.adopt.Config(eps=0.0, clip_exponent=0.0, betas=[0.0, 0.0], lr=torch.tensor(0.1))
    assert config.betas == (0.0, 0.0) and config.clip_exponent == 0.0
    assert optorch.adopt.Config(clip_exponent=None).clip_exponent is None


@pytest.mark.parametrize("flag", sorted(EXECUTION_FLAGS))
def test_execution_flags_are_not_config_keys(flag):
    """torch-adopt's foreach/capturable/differentiable change numbers (per-group first-call branch and a
    float32 clip bound from a tensor step count), and fused raises: none is a config key."""
    with pytest.raises(optorch.ConfigError, match=flag):
        optorch.build({"name": "adopt", flag: False}, [torch.zeros(2, requires_grad=True)])


def test_sparse_gradients_are_refused():
    param = torch.zeros(3, requires_grad=True)
    shim = optorch.build({"name": "adopt"}, [param], engine="eager")
    param.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        shim.step()


# ------------------------------------------------------------------------------------------------
# the verification grid


def test_grid_has_every_combination():
    grid = verify.flag_grid("adopt")
    assert len(grid) == 2 * 2 * 2 * 3
    assert {c["clip_exponent"] for c in grid} == {0.25, 0.5, None}


def test_the_grid_problem_tells_the_flags_apart():
    """Non-vacuous grid: on verify's problem, each flag changes the trajectory by far more than the
    float64 tolerance (the clip binds, decoupled decay differs from coupled)."""
    base = {k: v for k, v in verify.flag_grid("adopt")[0].items() if k != "name"}
    kwargs = dict(steps=100, dtype=torch.float64, device="cpu")
    reference = verify.run_torch("adopt", base, **kwargs)
    for change in ({"clip_exponent": None}, {"clip_exponent": 0.5}, {"weight_decay": 0.1}, {"maximize": True}):
        other = verify.run_torch("adopt", {**base, **change}, **kwargs)
        assert verify.max_abs_diff(reference, other) > 1e6 * verify.FLOAT64_TOLERANCE, change
    coupled = verify.run_torch("adopt", {**base, "weight_decay": 0.1}, **kwargs)
    decoupled = verify.run_torch("adopt", {**base, "weight_decay": 0.1, "decouple": True}, **kwargs)
    assert verify.max_abs_diff(coupled, decoupled) > 1e6 * verify.FLOAT64_TOLERANCE
