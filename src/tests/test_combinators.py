"""Combinators (optorch.combinators): each against its torch reference or a hand recurrence, in
float64, functionally and through ``optorch.build``; composition, torch.func, torch.compile."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import optorch
from optorch import combinators as C
from optorch import schedules
from optorch.tools import verify

DTYPE = torch.float64
NAMES = {"linear.weight": (3, 4), "linear.bias": (3,), "norm.weight": (3,), "norm.bias": (3,)}


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator, dtype=DTYPE) for name, shape in NAMES.items()}


def _grads(t: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + t)
    return {name: scale * torch.randn(shape, generator=generator, dtype=DTYPE) for name, shape in NAMES.items()}


def _with_nan(grads: dict[str, torch.Tensor], value: float = math.nan) -> dict[str, torch.Tensor]:
    bad = dict(grads)
    bad["linear.bias"] = bad["linear.bias"].clone()
    bad["linear.bias"][1] = value
    return bad


def _leaves(tree) -> list[torch.Tensor]:
    return torch.utils._pytree.tree_leaves(tree)


def _max_diff(a, b) -> float:
    return verify.max_abs_diff(_leaves(a), _leaves(b))


def _identical(a, b) -> bool:
    return len(_leaves(a)) == len(_leaves(b)) and all(
        x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(_leaves(a), _leaves(b))
    )


class _Reveal:
    """A stepper whose step returns the grads it receives as the new params: what a wrapper passes in."""

    def init(self, params):
        return {}

    def step(self, params, grads, state):
        return grads, state


ADAMW = {"lr": 0.05, "betas": (0.8, 0.95), "weight_decay": 0.1}


# -- clip_by_global_norm ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scale, max_norm", [(3.0, 1.0), (0.01, 1.0), (1.0, 0.5)], ids=["clips", "no-clip", "clips-half"]
)
def test_clip_equals_clip_grad_norm(scale, max_norm):
    grads = _grads(0, scale)
    clipped, _ = C.clip_by_global_norm(_Reveal(), max_norm).step(_params(), grads, {})
    tensors = [torch.zeros(shape, dtype=DTYPE, requires_grad=True) for shape in NAMES.values()]
    for tensor, grad in zip(tensors, grads.values()):
        tensor.grad = grad.clone()
    norm = torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    assert C.global_norm(list(grads.values())) == norm
    if scale == 0.01:
        assert norm < max_norm  # the no-clip case: multiplied by exactly 1
        assert _identical(clipped, grads)
    assert _max_diff(clipped, [t.grad for t in tensors]) == 0.0


def test_clipped_adamw_trajectory_equals_torch_with_clip_grad_norm():
    params, reference = _params(), {k: v.clone().requires_grad_() for k, v in _params().items()}
    stepper = C.clip_by_global_norm(C.bind("adamw", ADAMW), 1.0)
    state = stepper.init(params)
    torch_opt = torch.optim.AdamW(reference.values(), **ADAMW, foreach=False)
    for t in range(60):
        grads = _grads(t, scale=0.2 + 0.05 * t)  # norms from 0.2x to 3x: clipped and not clipped
        params, state = stepper.step(params, grads, state)
        for p, g in zip(reference.values(), grads.values()):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(reference.values(), 1.0)
        torch_opt.step()
    assert _max_diff(params, reference) <= 1e-14


# -- apply_if_finite --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_a_non_finite_step_changes_nothing_and_is_counted(bad):
    inner = C.bind("adamw", ADAMW)
    stepper = C.apply_if_finite(inner)
    params, state = _params(), stepper.init(_params())
    params, state = stepper.step(params, _grads(0), state)
    new_params, new_state = stepper.step(params, _with_nan(_grads(1), bad), state)
    assert _identical(new_params, params) and _identical(new_state["inner"], state["inner"])
    assert (int(new_state["notfinite_count"]), int(new_state["total_notfinite"]), bool(new_state["last_finite"])) == (
        1,
        1,
        False,
    )
    # A finite step after it is exactly the inner step, and resets the consecutive count.
    after, after_state = stepper.step(new_params, _grads(2), new_state)
    expected, expected_inner = inner.step(params, _grads(2), state["inner"])
    assert _identical(after, expected) and _identical(after_state["inner"], expected_inner)
    assert (
        int(after_state["notfinite_count"]),
        int(after_state["total_notfinite"]),
        bool(after_state["last_finite"]),
    ) == (0, 1, True)


def test_skipping_equals_running_only_the_finite_steps():
    inner = C.bind("adam", {"lr": 0.1, "amsgrad": True})
    stepper = C.apply_if_finite(inner)
    params, state = _params(), stepper.init(_params())
    expected, expected_state = _params(), inner.init(_params())
    bad_steps = {3, 4, 9}
    for t in range(15):
        grads = _with_nan(_grads(t)) if t in bad_steps else _grads(t)
        params, state = stepper.step(params, grads, state)
        if t not in bad_steps:
            expected, expected_state = inner.step(expected, grads, expected_state)
    assert _identical(params, expected) and _identical(state["inner"], expected_state)
    assert int(state["total_notfinite"]) == 3 and int(state["notfinite_count"]) == 0


def test_max_consecutive_errors_applies_the_step_after_that_many_skips():
    stepper = C.apply_if_finite(C.bind("sgd", {"lr": 0.1}), max_consecutive_errors=1)
    params, state = _params(), stepper.init(_params())
    first, state = stepper.step(params, _with_nan(_grads(0)), state)
    assert _identical(first, params)
    second, state = stepper.step(first, _with_nan(_grads(1)), state)  # the 2nd in a row: applied
    assert torch.isnan(second["linear.bias"][1]) and int(state["notfinite_count"]) == 2


# -- multi_steps ------------------------------------------------------------------------------------


def test_multi_steps_equals_one_inner_step_on_the_mean_gradient():
    k = 3
    inner = C.bind("adamw", ADAMW)
    stepper = C.multi_steps(inner, k)
    params, state = _params(), stepper.init(_params())
    expected, expected_state = _params(), inner.init(_params())
    for t in range(4 * k):
        before = params
        params, state = stepper.step(params, _grads(t), state)
        if (t + 1) % k:
            assert _identical(params, before) and _identical(state["inner"], expected_state)
        else:
            mean = {
                name: sum((_grads(s)[name] for s in range(t + 1 - k, t + 1)), torch.zeros(shape, dtype=DTYPE)) / k
                for name, shape in NAMES.items()
            }
            expected, expected_state = inner.step(expected, mean, expected_state)
            assert _identical(params, expected) and _identical(state["inner"], expected_state)
            assert int(state["mini_step"]) == 0 and all(not a.any() for a in _leaves(state["grad_acc"]))


def test_multi_steps_counts_a_missing_gradient_as_zero():
    stepper = C.multi_steps(_Reveal(), 2)
    params = _params()
    state = stepper.init(params)
    _, state = stepper.step(params, {**_grads(0), "norm.bias": None}, state)
    mean, _ = stepper.step(params, _grads(1), state)
    assert torch.equal(mean["norm.bias"], _grads(1)["norm.bias"] / 2)
    assert torch.equal(mean["linear.bias"], (_grads(0)["linear.bias"] + _grads(1)["linear.bias"]) / 2)


# -- partition --------------------------------------------------------------------------------------


def test_partition_equals_each_subset_run_alone():
    decay, no_decay = C.bind("adamw", ADAMW), C.bind("adamw", {**ADAMW, "weight_decay": 0.0})
    labels = lambda p: C.labels_from_patterns(p, {"no_decay": ["*.bias", "*norm*"]}, default="decay")  # noqa: E731
    assert labels(_params()) == {
        "linear.weight": "decay",
        "linear.bias": "no_decay",
        "norm.weight": "no_decay",
        "norm.bias": "no_decay",
    }
    stepper = C.partition({"decay": decay, "no_decay": no_decay}, labels)
    params, state = _params(), stepper.init(_params())
    alone = {
        "decay": {"linear.weight": _params()["linear.weight"]},
        "no_decay": {k: v for k, v in _params().items() if k != "linear.weight"},
    }
    alone_state = {"decay": decay.init(alone["decay"]), "no_decay": no_decay.init(alone["no_decay"])}
    for t in range(20):
        grads = _grads(t)
        params, state = stepper.step(params, grads, state)
        for label, stepper_ in (("decay", decay), ("no_decay", no_decay)):
            alone[label], alone_state[label] = stepper_.step(
                alone[label], {k: grads[k] for k in alone[label]}, alone_state[label]
            )
    assert list(params) == list(NAMES)  # the structure and order of the params are kept
    assert _identical(params, {k: {**alone["decay"], **alone["no_decay"]}[k] for k in NAMES})
    assert _identical(state, alone_state)


def test_partition_names_nested_dicts_by_their_path():
    params = {
        "encoder": {"norm": {"weight": torch.ones(2)}, "proj": {"weight": torch.ones(2, 2), "bias": torch.ones(2)}}
    }
    assert C.param_names(params) == ["encoder.norm.weight", "encoder.proj.weight", "encoder.proj.bias"]
    labels = C.labels_from_patterns(params, {"frozen": "encoder.norm.*"})
    stepper = C.partition({"frozen": C.bind("sgd", {"lr": 0.0}), "default": C.bind("sgd", {"lr": 0.5})}, labels)
    new, _ = stepper.step(params, torch.utils._pytree.tree_map(torch.ones_like, params), stepper.init(params))
    assert torch.equal(new["encoder"]["norm"]["weight"], torch.ones(2)) and torch.equal(
        new["encoder"]["proj"]["bias"], torch.full((2,), 0.5)
    )


def test_partition_errors_name_the_problem():
    with pytest.raises(
        ValueError, match=r"label 'no_decay': pattern '\*norm_\*' matches no parameter; names are: linear.weight"
    ):
        C.labels_from_patterns(_params(), {"no_decay": ["*.bias", "*norm_*"]})
    stepper = C.partition(
        {"decay": C.bind("sgd")}, lambda p: C.labels_from_patterns(p, {"no_decay": "*.bias"}, default="decay")
    )
    with pytest.raises(ValueError, match="no stepper for label.*'no_decay'"):
        stepper.init(_params())
    with pytest.raises(ValueError, match="labels must have the structure of params"):
        C.partition({"a": C.bind("sgd")}, {"linear.weight": "a"}).init(_params())


# -- ema --------------------------------------------------------------------------------------------


def test_ema_equals_averaged_model_with_get_ema_multi_avg_fn():
    decay = 0.9
    model = torch.nn.Linear(4, 3).to(DTYPE)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    averaged.update_parameters(model)  # the first call copies: the average starts at the initial params
    torch_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    stepper = C.ema(C.bind("sgd", {"lr": 0.1, "momentum": 0.9}), decay)
    state = stepper.init(params)
    for t in range(40):
        grads = {name: torch.sin(p * (t + 1)) for name, p in params.items()}
        params, state = stepper.step(params, grads, state)
        for name, p in model.named_parameters():
            p.grad = grads[name].clone()
        torch_opt.step()
        averaged.update_parameters(model)
    assert _max_diff(params, dict(model.named_parameters())) == 0.0
    diff = _max_diff(C.ema_params(state), dict(averaged.module.named_parameters()))
    assert diff <= 1e-15, diff
    assert int(state["count"]) == 40


def test_ema_warmup_follows_the_hand_recurrence():
    stepper = C.ema(_Reveal(), 0.99, warmup=True)
    params = {"w": torch.zeros(2, dtype=DTYPE)}
    state = stepper.init(params)
    average = torch.zeros(2, dtype=DTYPE)
    for t in range(1, 30):
        target = {"w": torch.full((2,), float(t), dtype=DTYPE)}  # _Reveal: the new params are the grads
        _, state = stepper.step(params, target, state)
        decay = min(0.99, (1 + t) / (10 + t))
        average = average * decay + target["w"] * (1 - decay)
        torch.testing.assert_close(state["ema_params"]["w"], average, rtol=0, atol=1e-13)


# -- composition, torch.func, torch.compile ---------------------------------------------------------


def _composed(k: int = 2):
    return C.multi_steps(C.apply_if_finite(C.clip_by_global_norm(C.ema(C.bind("adamw", ADAMW), 0.9), 1.0)), k)


def test_composition_applies_each_combinator_in_order():
    """multi_steps(apply_if_finite(clip(ema(adamw)))) equals the hand-composed torch loop: the mean of
    2 micro-steps, skipped if non-finite, clipped with clip_grad_norm_, AdamW, AveragedModel EMA."""
    stepper = _composed()
    params, state = _params(), stepper.init(_params())
    model = {k: v.clone().requires_grad_() for k, v in _params().items()}
    torch_opt = torch.optim.AdamW(model.values(), **ADAMW, foreach=False)
    averages = [p.detach().clone() for p in model.values()]
    ema_update = get_ema_multi_avg_fn(0.9)
    for t in range(20):
        grads = [_grads(2 * t, 2.0), _with_nan(_grads(2 * t + 1)) if t in (4, 5) else _grads(2 * t + 1, 2.0)]
        for g in grads:
            params, state = stepper.step(params, g, state)
        mean = [(g0 + g1) / 2 for g0, g1 in zip(grads[0].values(), grads[1].values())]
        if all(torch.isfinite(m).all() for m in mean):
            for p, m in zip(model.values(), mean):
                p.grad = m
            torch.nn.utils.clip_grad_norm_(model.values(), 1.0)
            torch_opt.step()
            ema_update(averages, [p.detach() for p in model.values()], None)
    assert _max_diff(params, model) <= 1e-14
    assert _max_diff(C.ema_params(state), averages) <= 1e-14
    assert int(state["inner"]["total_notfinite"]) == 2


def test_torch_func_differentiates_through_clipping_with_respect_to_the_lr():
    """d/d lr of sum(params after one clipped SGD step) is -sum(clipped grads): torch.func.grad
    through the injected hyperparameter and the combinators gives clip_grad_norm_'s grads."""
    params, grads = _params(), _grads(0, 3.0)
    stepper = C.apply_if_finite(
        C.clip_by_global_norm(optorch.inject_hyperparams(optorch.sgd.algorithm, {"lr": 0.1}), 1.0)
    )
    state = stepper.init(params)

    def loss(lr):
        inner = {**state["inner"], "hyperparams": {**state["inner"]["hyperparams"], "lr": lr}}
        new, _ = stepper.step(params, grads, {**state, "inner": inner})
        return sum(p.sum() for p in new.values())

    d_lr = torch.func.grad(loss)(torch.tensor(0.1, dtype=DTYPE))
    tensors = [torch.zeros(s, dtype=DTYPE, requires_grad=True) for s in NAMES.values()]
    for t, g in zip(tensors, grads.values()):
        t.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(tensors, 1.0)
    torch.testing.assert_close(d_lr, -sum(t.grad.sum() for t in tensors), rtol=0, atol=1e-14)


@pytest.mark.compile
def test_a_composed_step_compiles_to_one_graph_and_equals_eager():
    torch._dynamo.reset()
    stepper = _composed(k=2)
    compiled = torch.compile(stepper.step, fullgraph=True)
    eager_params, eager_state = _params(), stepper.init(_params())
    params, state = _params(), stepper.init(_params())
    for t in range(8):
        grads = _with_nan(_grads(t)) if t == 5 else _grads(t, 2.0)
        eager_params, eager_state = stepper.step(eager_params, grads, eager_state)
        params, state = compiled(params, grads, state)
    assert _max_diff(params, eager_params) <= 1e-14 and _max_diff(state, eager_state) <= 1e-14
    assert int(state["inner"]["total_notfinite"]) == 1
    torch._dynamo.reset()


# -- the builder and the shim -----------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.norm = torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)

    def forward(self, x):
        return self.norm(self.linear(x))


def _net(seed: int = 0) -> _Net:
    torch.manual_seed(seed)
    return _Net().to(DTYPE)


def _backward(model: torch.nn.Module, t: int, bad: bool = False) -> None:
    generator = torch.Generator().manual_seed(t)
    x, y = torch.randn(8, 4, generator=generator, dtype=DTYPE), torch.randn(8, 3, generator=generator, dtype=DTYPE)
    loss = torch.nn.functional.mse_loss(model(x), y) * 5
    loss.backward()
    if bad:
        model.linear.bias.grad[0] = math.nan


def _grads_at(shadow: torch.nn.Module, params: dict[str, torch.Tensor], backward) -> dict[str, torch.Tensor]:
    """The grads ``backward(shadow)`` leaves with ``shadow`` holding ``params`` (a pure stepper's grads)."""
    with torch.no_grad():
        for name, p in shadow.named_parameters():
            p.copy_(params[name])
    shadow.zero_grad()
    backward(shadow)
    return {name: p.grad.clone() for name, p in shadow.named_parameters()}


FULL = {
    "name": "adamw",
    **ADAMW,
    "schedule": {"lr": {"name": "cosine", "init_value": 0.05, "warmup_steps": 3, "decay_steps": 20}},
    "clip_grad_norm": 0.5,
    "skip_nonfinite": True,
    "accumulate_steps": 2,
    "ema": {"decay": 0.9, "warmup": True},
    "param_groups": [{"match": ["*.bias", "*norm*"], "weight_decay": 0.0}],
}


@pytest.mark.parametrize("engine", ["eager", "torch"])
def test_the_shim_steps_as_the_pure_stepper_from_the_same_config(engine):
    model = _net()
    optimizer = optorch.build(FULL, model, engine=engine)
    assert optimizer.engine == engine
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    stepper = optorch.build_stepper(FULL, params)
    state = stepper.init(params)
    shadow = _net()  # the same weights, to compute the pure stepper's grads
    for t in range(16):
        bad = t in (6, 7)
        _backward(model, t, bad)
        optimizer.step()
        optimizer.zero_grad()
        params, state = stepper.step(params, _grads_at(shadow, params, lambda m: _backward(m, t, bad)), state)  # noqa: B023 - run now
        assert _max_diff(params, dict(model.named_parameters())) <= 1e-14, t
    assert _max_diff(C.ema_params(state), optimizer.ema_params()) <= 1e-14
    assert optimizer.combinators.skipped == 1  # the non-finite mean of calls 6 and 7
    assert int(optimizer.param_groups[0]["schedule_step"]) == 7  # 8 updates of 2 calls, one skipped


def test_the_recipe_equals_torch_adamw_with_clipping_no_decay_groups_and_a_scheduler():
    """configs/adamw_cosine_clip.yaml against the torch loop it stands for."""
    path = "configs/adamw_cosine_clip.yaml"
    raw = optorch.load_config(path)
    schedule = schedules.from_config(raw["schedule"]["lr"])
    model, reference = _net(), _net()
    optimizer = optorch.build(path, model)
    decay = [p for n, p in reference.named_parameters() if n == "linear.weight"]
    no_decay = [p for n, p in reference.named_parameters() if n != "linear.weight"]
    torch_opt = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=raw["lr"],
        betas=raw["betas"],
        weight_decay=raw["weight_decay"],
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda t: schedule(t) / raw["lr"])
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 3] and optimizer.param_groups[1][
        "weight_decay"
    ] == 0.0
    for t in range(30):
        _backward(model, t)
        optimizer.step()
        optimizer.zero_grad()
        _backward(reference, t)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), raw["clip_grad_norm"])
        torch_opt.step()
        torch_opt.zero_grad()
        scheduler.step()
    assert _max_diff(dict(model.named_parameters()), dict(reference.named_parameters())) <= 1e-14


def test_shim_clipping_is_clip_grad_norm_in_place():
    model, reference = _net(), _net()
    optimizer = optorch.build({"name": "sgd", "lr": 0.0, "clip_grad_norm": 0.1}, model.parameters(), engine="eager")
    _backward(model, 0)
    _backward(reference, 0)
    optimizer.step()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    assert optimizer.combinators.last_grad_norm == norm
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), reference.parameters()))


def test_shim_skip_leaves_params_state_and_schedule_untouched():
    model = _net()
    config = {
        "name": "adam",
        "lr": 0.1,
        "skip_nonfinite": True,
        "schedule": {"lr": {"name": "linear", "init_value": 0.1, "end_value": 0.0, "transition_steps": 10}},
    }
    optimizer = optorch.build(config, model, engine="eager")
    _backward(model, 0)
    optimizer.step()
    optimizer.zero_grad()
    params, state = [p.detach().clone() for p in model.parameters()], copy.deepcopy(optimizer.state_dict())
    for bad in (math.nan, math.inf):
        _backward(model, 1)
        model.norm.weight.grad[0] = bad
        optimizer.step()
        assert not optimizer.combinators.stepped
        optimizer.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = optimizer.state_dict()
    assert (
        int(after["param_groups"][0]["schedule_step"]) == 1
        and optimizer.param_groups[0]["lr"] == state["param_groups"][0]["lr"]
    )
    assert all(torch.equal(after["state"][i][k], v) for i, leaf in state["state"].items() for k, v in leaf.items())
    counters = {
        key: after["param_groups"][0][f"skip.{key}"].item()
        for key in ("notfinite_count", "total_notfinite", "last_finite")
    }
    assert counters == {"notfinite_count": 2, "total_notfinite": 2, "last_finite": False}
    assert optimizer.combinators.skipped == 2


def test_shim_accumulation_equals_torch_stepping_on_the_mean_gradient():
    k = 3
    model, reference = _net(), _net()
    optimizer = optorch.build({"name": "adam", "lr": 0.05, "accumulate_steps": k}, model, engine="eager")
    torch_opt = torch.optim.Adam(reference.parameters(), lr=0.05, foreach=False)
    grads = []
    for t in range(4 * k):
        before = [p.detach().clone() for p in model.parameters()]
        _backward(model, t)
        optimizer.step()
        optimizer.zero_grad()
        assert optimizer.combinators.stepped == (not (t + 1) % k)
        if (t + 1) % k:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        reference.zero_grad()
        _backward(reference, t)
        grads.append([p.grad.clone() for p in reference.parameters()])
        if not (t + 1) % k:
            for i, p in enumerate(reference.parameters()):
                p.grad = sum((g[i] for g in grads[-k:]), torch.zeros_like(p)) / k
            torch_opt.step()
    assert _max_diff(list(model.parameters()), list(reference.parameters())) <= 1e-14


def test_shim_ema_equals_averaged_model_and_swaps_in_and_out():
    model, reference = _net(), _net()
    optimizer = optorch.build({"name": "sgd", "lr": 0.1, "momentum": 0.9, "ema": 0.8}, model, engine="eager")
    averaged = AveragedModel(reference, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    averaged.update_parameters(reference)
    torch_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for t in range(25):
        for m, o in ((model, optimizer), (reference, torch_opt)):
            o.zero_grad()
            _backward(m, t)
            o.step()
        averaged.update_parameters(reference)
    assert _max_diff(optimizer.ema_params(), list(averaged.module.parameters())) <= 1e-15
    current = [p.detach().clone() for p in model.parameters()]
    with optimizer.swap_ema():
        assert all(torch.equal(p, e) for p, e in zip(model.parameters(), optimizer.ema_params()))
    assert all(torch.equal(p, c) for p, c in zip(model.parameters(), current))
    with pytest.raises(RuntimeError, match="keeps no EMA"):
        optorch.build({"name": "sgd", "clip_grad_norm": 1.0}, model.parameters()).ema_params()


@pytest.mark.parametrize("engine", ["eager", "torch"])
def test_shim_state_dict_round_trip_mid_accumulation(engine):
    config = {**FULL, "name": "adam", "weight_decay": 0.0, "param_groups": [{"match": "norm.*", "lr": 0.01}]}
    model = _net()
    optimizer = optorch.build(config, model, engine=engine)
    for t in range(5):  # 2 updates, one accumulated call pending; call 3 is non-finite
        _backward(model, t, bad=t == 3)
        optimizer.step()
        optimizer.zero_grad()
    checkpoint = copy.deepcopy(optimizer.state_dict())
    group = checkpoint["param_groups"][0]
    assert group["accumulate.micro_step"] == 1 and group["skip.total_notfinite"] == 1
    assert all({"ema", "grad_acc"} <= set(leaf) for leaf in checkpoint["state"].values())
    resumed_model = copy.deepcopy(model)
    resumed = optorch.build(config, resumed_model, engine=engine)
    resumed.load_state_dict(checkpoint)
    for m, o in ((model, optimizer), (resumed_model, resumed)):
        for t in range(5, 12):
            _backward(m, t)
            o.step()
            o.zero_grad()
    assert _max_diff(list(model.parameters()), list(resumed_model.parameters())) == 0.0
    assert _max_diff(optimizer.ema_params(), resumed.ema_params()) == 0.0
    assert (
        optimizer.state_dict()["param_groups"][0]["ema.count"]
        == resumed.state_dict()["param_groups"][0]["ema.count"]
        == 5
    )
    # A checkpoint of other combinators, or of other shapes, is refused before anything changes.
    lacking = copy.deepcopy(checkpoint)
    for group in lacking["param_groups"]:
        del group["skip.total_notfinite"]
    with pytest.raises(ValueError, match="has no 'skip.total_notfinite'"):
        resumed.load_state_dict(lacking)
    bad = copy.deepcopy(checkpoint)
    bad["state"][0]["ema"] = torch.zeros(7)
    with pytest.raises(ValueError, match="state 'ema' has shape"):
        resumed.load_state_dict(bad)


def test_lr_schedulers_keep_working_with_combinators():
    model = _net()
    optimizer = optorch.build({"name": "sgd", "lr": 0.1, "clip_grad_norm": 1.0, "ema": 0.5}, model, engine="eager")
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    lrs = []
    for t in range(6):
        _backward(model, t)
        optimizer.step()
        optimizer.zero_grad()
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    assert lrs == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]


@pytest.mark.parametrize(
    "entries, params, message",
    [
        ({"clip_grad_norm": 0}, None, r"clip_grad_norm: .*greater than 0"),
        ({"clip_grad_norm": math.inf}, None, r"clip_grad_norm: .*finite number"),
        ({"skip_nonfinite": "yes"}, None, r"skip_nonfinite: .*valid boolean"),
        ({"accumulate_steps": 0}, None, r"accumulate_steps: .*greater than or equal to 1"),
        ({"ema": 1.5}, None, r"ema.decay: .*less than or equal to 1"),
        ({"ema": {"decay": 0.9, "warmpu": True}}, None, r"ema.warmpu: .*Extra inputs"),
        ({"param_groups": [{"weight_decay": 0.0}]}, None, r"param_groups.0.match: .*Field required"),
        (
            {"param_groups": [{"match": "*.bias", "weight_decy": 0.0}]},
            None,
            r"param_groups\[0\]: unknown key\(s\) for adamw: 'weight_decy' \(did you mean 'weight_decay'\?\)",
        ),
        ({"param_groups": [{"match": "*.bias", "lr": -1.0}]}, None, r"param_groups\[0\]: lr: must be >= 0, got -1.0$"),
        (
            {"param_groups": [{"match": ["*.bias", "*nrom*"], "weight_decay": 0.0}]},
            "module",
            r"param_groups\[0\]: pattern '\*nrom\*' matches no parameter; names are: linear.weight, linear.bias, "
            r"norm.weight, norm.bias",
        ),
        (
            {"param_groups": [{"match": "*.bias"}, {"match": "linear.bias"}]},
            "module",
            r"param_groups\[1\]: every parameter it matches was taken by an earlier entry",
        ),
        (
            {"param_groups": [{"match": "*.bias"}]},
            "tensors",
            r"param_groups matches parameters by name: pass the model or model.named_parameters\(\), not unnamed "
            r"tensors",
        ),
        ({"param_groups": [{"match": "*.bias"}]}, "groups", "not param-group dicts"),
        ({"amp": {"growth_factor": 0.5}}, None, r"amp.growth_factor: .*greater than 1"),
        ({"amp": {"init_scale": 65536.0, "precision": "torch.bfloat16"}}, None, r"amp.precision: .*Extra inputs"),
    ],
)
def test_bad_entries_raise_config_errors_naming_the_entry(entries, params, message):
    model = _net()
    given = {"module": model, "tensors": model.parameters(), "groups": [{"params": list(model.parameters())}]}
    with pytest.raises(optorch.ConfigError, match=message):
        if params is None:
            optorch.parse_config({"name": "adamw", **entries})
        else:
            optorch.build({"name": "adamw", **entries}, given[params])


def test_a_config_file_error_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: sgd\naccumulate_steps: 1.5\n")
    with pytest.raises(
        optorch.ConfigError, match=r"bad.yaml, line 2: accumulate_steps: Input should be a valid integer, got 1.5$"
    ):
        optorch.build(path, [torch.zeros(2, requires_grad=True)])


def test_params_may_be_a_module_named_parameters_or_tensors():
    model = _net()
    for params in (model, model.named_parameters(), model.parameters(), list(model.parameters())):
        optimizer = optorch.build({"name": "adam", "lr": 0.1}, params)
        assert list(optimizer.param_groups[0]["params"]) == list(model.parameters())
    assert optorch.build({"name": "adam"}, model).combinators is None  # nothing wraps a plain config


def test_all_finite_eager_compiled_and_under_vmap():
    """The eager multi-tensor check, the compiled one and the per-tensor one under vmap agree."""
    from optorch.core.ops import all_finite

    nan, inf = float("nan"), float("inf")
    cases = [
        [torch.ones(3), torch.zeros(2, 2)],
        [torch.ones(3), torch.tensor([1.0, nan])],
        [torch.tensor([-inf]), torch.ones(2)],
    ]
    expected = [True, False, False]
    assert [bool(all_finite(c)) for c in cases] == expected
    compiled = torch.compile(all_finite, fullgraph=True, backend="eager")
    assert [bool(compiled(c)) for c in cases] == expected
    batched = torch.func.vmap(lambda a, b: all_finite([a, b]))(
        torch.stack([c[0][:1] for c in cases]), torch.stack([c[1].flatten()[:2] for c in cases])
    )
    assert batched.tolist() == expected


# -- the amp entry: loss scaling in the shim, as torch.amp.GradScaler ---------------------------------

AMP = {"init_scale": 2.0**10, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3}
OVERFLOWS = {2: math.inf, 3: math.nan, 9: -math.inf, 10: math.inf, 11: math.nan}


def _scaled_backward(model: torch.nn.Module, t: int, scale_loss) -> None:
    generator = torch.Generator().manual_seed(t)
    x, y = torch.randn(8, 4, generator=generator, dtype=DTYPE), torch.randn(8, 3, generator=generator, dtype=DTYPE)
    scale_loss(torch.nn.functional.mse_loss(model(x), y)).backward()
    if t in OVERFLOWS:
        model.linear.weight.grad[1, 2] = OVERFLOWS[t]


@pytest.mark.parametrize("engine", ["eager", "torch"])
def test_shim_loss_scaling_equals_grad_scaler_with_torch_adam(engine):
    """The amp entry: params, scale and growth tracker equal torch Adam stepped by a live GradScaler."""
    model, reference = _net(), _net()
    optimizer = optorch.build({"name": "adam", "lr": 0.05, "amp": AMP}, model, engine=engine)
    torch_optimizer = torch.optim.Adam(reference.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", **AMP)
    for t in range(24):
        _scaled_backward(model, t, optimizer.scale_loss)
        optimizer.step()
        optimizer.zero_grad()
        _scaled_backward(reference, t, scaler.scale)
        scaler.step(torch_optimizer)
        scaler.update()
        torch_optimizer.zero_grad()
        # the torch engine runs torch's multi-tensor Adam, the reference its single-tensor one (1 ulp)
        assert _max_diff(list(model.parameters()), list(reference.parameters())) <= (
            0.0 if engine == "eager" else 1e-15
        ), t
        assert optimizer.combinators.scaler.scale.item() == scaler.get_scale(), t
        assert int(optimizer.combinators.scaler.growth_tracker) == scaler._get_growth_tracker(), t
    assert optimizer.combinators.overflows == len(OVERFLOWS)


def test_shim_loss_scaling_steps_as_the_pure_scaled_stepper_and_resumes():
    config = {"name": "adamw", **ADAMW, "amp": AMP, "clip_grad_norm": 0.5, "accumulate_steps": 2}
    model = _net()
    optimizer = optorch.build(config, model, engine="eager")
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    stepper = optorch.build_stepper(config, params)
    state = stepper.init(params)
    shadow = _net()
    for t in range(14):
        _scaled_backward(model, t, optimizer.scale_loss)
        optimizer.step()
        optimizer.zero_grad()
        scale = lambda loss: optorch.amp.scale_loss(loss, state["inner"]["scaler"])  # noqa: B023 - run now
        params, state = stepper.step(params, _grads_at(shadow, params, lambda m: _scaled_backward(m, t, scale)), state)  # noqa: B023
        assert _max_diff(params, dict(model.named_parameters())) <= 1e-14, t
        assert state["inner"]["scaler"].scale.item() == optimizer.combinators.scaler.scale.item(), t
    checkpoint = copy.deepcopy(optimizer.state_dict())
    assert {"amp.scale", "amp.growth_tracker", "amp.overflows"} <= set(checkpoint["param_groups"][0])
    resumed_model = copy.deepcopy(model)
    resumed = optorch.build(config, resumed_model, engine="eager")
    resumed.load_state_dict(checkpoint)
    for m, o in ((model, optimizer), (resumed_model, resumed)):
        for t in range(14, 20):
            _scaled_backward(m, t, o.scale_loss)
            o.step()
            o.zero_grad()
    assert _max_diff(list(model.parameters()), list(resumed_model.parameters())) == 0.0
    assert resumed.combinators.scaler.scale.item() == optimizer.combinators.scaler.scale.item()


def test_scale_loss_without_an_amp_entry_says_how_to_add_one():
    with pytest.raises(RuntimeError, match="add an 'amp' entry"):
        optorch.build({"name": "sgd", "ema": 0.9}, _net()).scale_loss(torch.ones(()))
    with pytest.raises(RuntimeError, match="add an 'amp' entry"):
        optorch.build({"name": "sgd"}, _net()).scale_loss(torch.ones(()))
