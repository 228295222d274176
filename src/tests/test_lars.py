"""LARS: hand-checked steps, and live comparisons with pytorch_optimizer's LARS where our conventions
differ from it (where they agree, test_equivalence checks the grid through ``optorch.tools.references``)."""

from __future__ import annotations

import pydantic
import pytest
import torch
from pytorch_optimizer import LARS as TheirLARS

import optorch
from optorch import lars
from optorch.tools import references, verify

F64 = dict(dtype=torch.float64)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second intra-op thread only costs time (see test_equivalence)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_step(param, grad, **config):
    params, grads = {"p": torch.tensor(param, **F64)}, {"p": torch.tensor(grad, **F64)}
    cfg = lars.Config(**config)
    new, state = lars.step(params, grads, lars.init(params, cfg), cfg)
    return new["p"], state


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, **F64), rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# hand-checked single steps: ||w|| = 5, ||g|| = 1


def test_one_step_by_hand():
    # r = 0.5 * 5 / (1 + 0.1 * 5 + 0) = 5/3;  u = 5/3 * (g + 0.1 w) = 5/3 * [0.9, 1.2] = [1.5, 2.0]
    new, _ = one_step(
        [[3.0, 4.0]], [[0.6, 0.8]], lr=0.1, momentum=0.0, weight_decay=0.1, trust_coefficient=0.5, eps=0.0
    )
    close(new, [[3.0 - 0.15, 4.0 - 0.2]])


def test_eps_is_in_the_denominator():
    # r = 2.5 / (1 + 0.5 + 0.5) = 1.25;  u = 1.25 * [0.9, 1.2] = [1.125, 1.5]
    new, _ = one_step(
        [[3.0, 4.0]], [[0.6, 0.8]], lr=0.1, momentum=0.0, weight_decay=0.1, trust_coefficient=0.5, eps=0.5
    )
    close(new, [[3.0 - 0.1125, 4.0 - 0.15]])


def test_maximize_negates_the_gradient_before_decay():
    # d = -g, ||d|| = 1: r = 5/3, u = 5/3 * [-0.6 + 0.3, -0.8 + 0.4] = [-0.5, -2/3]
    new, _ = one_step(
        [[3.0, 4.0]],
        [[0.6, 0.8]],
        lr=0.1,
        momentum=0.0,
        weight_decay=0.1,
        trust_coefficient=0.5,
        eps=0.0,
        maximize=True,
    )
    close(new, [[3.0 + 0.05, 4.0 + 0.1 * 2 / 3]])


def test_zero_param_norm_falls_back_to_ratio_one():
    # ||w|| = 0: r = 1 (a zero-initialised tensor still moves), the decay term is zero
    new, _ = one_step(
        [[0.0, 0.0]], [[1.0, 2.0]], lr=0.1, momentum=0.0, weight_decay=0.1, trust_coefficient=0.5, eps=1e-8
    )
    close(new, [[-0.1, -0.2]])


def test_zero_grad_norm_falls_back_to_ratio_one():
    # ||g|| = 0: r = 1, u = 0.1 w: w (1 - 0.1 * 0.1)
    new, _ = one_step(
        [[3.0, 4.0]], [[0.0, 0.0]], lr=0.1, momentum=0.0, weight_decay=0.1, trust_coefficient=0.5, eps=1e-8
    )
    close(new, [[3.0 * 0.99, 4.0 * 0.99]])


def test_trust_ratio_by_hand():
    cfg = lars.Config(weight_decay=0.1, trust_coefficient=0.5, eps=0.0)
    w, g = torch.tensor([[3.0, 4.0]], **F64), torch.tensor([[0.6, 0.8]], **F64)
    assert lars.trust_ratio(w, g, cfg).item() == pytest.approx(5 / 3, rel=1e-15)
    assert lars.trust_ratio(torch.zeros(2, **F64), g, cfg).item() == 1.0
    assert lars.trust_ratio(w, torch.zeros(1, 2, **F64), cfg).item() == 1.0


def test_exclude_1d_leaves_vectors_and_scalars_to_plain_sgd():
    cfg = lars.Config(lr=0.1, momentum=0.0, weight_decay=0.1, trust_coefficient=0.5, eps=0.0, exclude_1d=True)
    params = {
        "w": torch.tensor([[3.0, 4.0]], **F64),
        "b": torch.tensor([1.0, 2.0], **F64),
        "s": torch.tensor(2.0, **F64),
    }
    grads = {
        "w": torch.tensor([[0.6, 0.8]], **F64),
        "b": torch.tensor([0.5, 0.5], **F64),
        "s": torch.tensor(0.25, **F64),
    }
    new, _ = lars.step(params, grads, lars.init(params, cfg), cfg)
    close(new["w"], [[2.85, 3.8]])  # adapted and decayed, as in test_one_step_by_hand
    close(new["b"], [1.0 - 0.05, 2.0 - 0.05])  # no ratio, no decay
    close(new["s"], 2.0 - 0.025)


def test_exclude_applies_to_every_tensor_of_its_config():
    new, _ = one_step(
        [[3.0, 4.0]], [[0.6, 0.8]], lr=0.1, momentum=0.0, weight_decay=0.1, trust_coefficient=0.5, exclude=True
    )
    close(new, [[3.0 - 0.06, 4.0 - 0.08]])


def test_momentum_and_dampening_by_hand():
    # step 1: u1 = [1.5, 2.0] (test_one_step_by_hand), b1 = u1 (torch.optim.SGD: no dampening at the first step)
    # step 2 at w1 = [2.85, 3.8] (||w1|| = 4.75), g2 = [0, 2] (||g2|| = 2):
    #   r2 = 0.5 * 4.75 / (2 + 0.1 * 4.75) = 2.375 / 2.475
    #   u2 = r2 * ([0, 2] + 0.1 w1) = r2 * [0.285, 2.38];  b2 = 0.9 b1 + 0.5 u2;  w2 = w1 - 0.1 b2
    cfg = lars.Config(lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1, trust_coefficient=0.5, eps=0.0)
    params = {"p": torch.tensor([[3.0, 4.0]], **F64)}
    state = lars.init(params, cfg)
    params, state = lars.step(params, {"p": torch.tensor([[0.6, 0.8]], **F64)}, state, cfg)
    close(state["momentum_buffer"]["p"], [[1.5, 2.0]])
    params, state = lars.step(params, {"p": torch.tensor([[0.0, 2.0]], **F64)}, state, cfg)
    r2 = 2.375 / 2.475
    b2 = [0.9 * 1.5 + 0.5 * r2 * 0.285, 0.9 * 2.0 + 0.5 * r2 * 2.38]
    close(state["momentum_buffer"]["p"], [b2])
    close(params["p"], [[2.85 - 0.1 * b2[0], 3.8 - 0.1 * b2[1]]])
    assert state["step"]["p"].item() == 2


def test_lars_changes_params_and_momentum():
    """The original optorch's LARS only rebound local names: params and momentum stayed untouched."""
    torch.manual_seed(0)
    params = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    cfg = lars.Config(weight_decay=1e-4)  # defaults: lr 0.1, momentum 0.9, trust_coefficient 1e-3
    new, state = lars.step(params, grads, lars.init(params, cfg), cfg)
    for key in params:
        assert (new[key] - params[key]).abs().min() > 0, key
        assert state["momentum_buffer"][key].abs().min() > 0, key


def test_fully_excluded_lars_is_sgd():
    torch.manual_seed(0)
    params = {"w": torch.randn(4, 3, **F64), "b": torch.randn(3, **F64)}
    ours = lars.Config(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.0, exclude=True)
    theirs = optorch.sgd.Config(lr=0.05, momentum=0.9, dampening=0.2)
    p1, s1, p2, s2 = params, lars.init(params, ours), params, optorch.sgd.init(params, theirs)
    for _ in range(20):
        grads = {k: torch.sin(3 * v) for k, v in p1.items()}
        p1, s1 = lars.step(p1, grads, s1, ours)
        p2, s2 = optorch.sgd.step(p2, {k: torch.sin(3 * v) for k, v in p2.items()}, s2, theirs)
    for key in params:
        assert torch.equal(p1[key], p2[key])


# ---------------------------------------------------------------------------------------------
# live comparisons with pytorch_optimizer's LARS


SHAPES = {"w": (4, 3), "v": (2, 2, 2), "b": (3,), "s": ()}


def _initial():
    generator = torch.Generator().manual_seed(7)
    return {k: torch.randn(shape, generator=generator, **F64) for k, shape in SHAPES.items()}


def _loss(params):
    return sum(torch.sin(p * (i + 1)).sum() + 0.3 * (p**2).sum() for i, p in enumerate(params.values()))


def run_ours(config, steps=100):
    params = _initial()
    state = lars.init(params, config)
    trajectory = []
    for _ in range(steps):
        grads = torch.func.grad(_loss)(params)
        params, state = lars.step(params, grads, state, config)
        trajectory.append(params)
    return trajectory


def run_theirs(steps=100, as_2d=False, **kwargs):
    """pytorch_optimizer's LARS; with ``as_2d`` every tensor is held as a (1, n) leaf, so its
    ``ndim > 1`` rule adapts all of them (the norms are the same)."""
    leaves = {k: (p.reshape(1, -1) if as_2d else p).clone().requires_grad_() for k, p in _initial().items()}
    optimizer = TheirLARS(list(leaves.values()), **kwargs)
    trajectory = []
    for _ in range(steps):
        optimizer.zero_grad()
        _loss({k: leaf.reshape(SHAPES[k]) for k, leaf in leaves.items()}).backward()
        optimizer.step()
        trajectory.append({k: leaf.detach().reshape(SHAPES[k]).clone() for k, leaf in leaves.items()})
    return trajectory


def max_diff(a, b):
    return verify.max_abs_diff(a, b)


FLAGS = [
    dict(momentum=0.0, weight_decay=0.0),
    dict(momentum=0.9, weight_decay=0.0),
    dict(momentum=0.0, weight_decay=1e-2),
    dict(momentum=0.9, weight_decay=1e-2),
    dict(momentum=0.9, weight_decay=1e-2, nesterov=True),
    dict(momentum=0.9, weight_decay=1e-2, maximize=True),
]


@pytest.mark.parametrize("flags", FLAGS, ids=str)
@pytest.mark.parametrize("exclude_1d", [True, False])
def test_matches_pytorch_optimizer(flags, exclude_1d):
    """exclude_1d=True is its rule; exclude_1d=False is its LARS on 2-D views of every tensor."""
    common = dict(lr=0.1, trust_coefficient=0.05, **flags)
    ours = run_ours(lars.Config(eps=0.0, exclude_1d=exclude_1d, **common))
    theirs = run_theirs(as_2d=not exclude_1d, **common)
    assert max_diff(ours, theirs) <= 1e-12
    assert max_diff(ours, run_theirs(as_2d=exclude_1d, **common)) > 1e-3  # the exclusion matters here


def test_eps_differs_from_pytorch_optimizer():
    """It has no eps: ours with eps > 0 takes smaller steps."""
    common = dict(lr=0.1, trust_coefficient=0.05, momentum=0.9, weight_decay=1e-2)
    assert max_diff(run_ours(lars.Config(eps=1e-3, exclude_1d=True, **common)), run_theirs(**common)) > 1e-6


def test_zero_grad_with_decay_differs_from_pytorch_optimizer():
    """||g|| = 0, lambda > 0: its ratio is eta / lambda (its denominator lambda ||w|| is non-zero), so it
    steps by lr * eta * w; ours falls back to r = 1 and steps by lr * lambda * w."""
    w = torch.tensor([[3.0, 4.0]], **F64)
    leaf = w.clone().requires_grad_()
    leaf.grad = torch.zeros_like(w)
    TheirLARS([leaf], lr=0.1, momentum=0.0, weight_decay=0.1, trust_coefficient=0.5).step()
    close(leaf.detach(), [[3.0 * (1 - 0.1 * 0.5), 4.0 * (1 - 0.1 * 0.5)]])
    ours, _ = one_step(
        [[3.0, 4.0]], [[0.0, 0.0]], lr=0.1, momentum=0.0, weight_decay=0.1, trust_coefficient=0.5, eps=0.0
    )
    close(ours, [[3.0 * (1 - 0.1 * 0.1), 4.0 * (1 - 0.1 * 0.1)]])


def test_dampening_differs_from_pytorch_optimizer_at_the_first_step_only():
    """Its buffer starts at zero, so its first buffer is (1 - dampening) u1; ours is u1 (torch.optim.SGD's rule).
    After that both apply b = mu b + (1 - dampening) u."""
    common = dict(lr=0.1, trust_coefficient=0.05, momentum=0.9, dampening=0.5, weight_decay=1e-2)
    ours = run_ours(lars.Config(eps=0.0, exclude_1d=True, **common), steps=1)[0]
    theirs = run_theirs(steps=1, **common)[0]
    initial = _initial()
    for k in SHAPES:
        torch.testing.assert_close(theirs[k] - initial[k], 0.5 * (ours[k] - initial[k]), rtol=1e-13, atol=1e-15)


def test_reference_adapter_refuses_conventions_it_does_not_share():
    reference = references.reference_optimizer(lars.algorithm)
    params = [torch.zeros(2, 2, requires_grad=True)]
    reference(params, lr=0.1, eps=0.0, exclude_1d=True)  # accepted
    for bad in (
        dict(eps=1e-8, exclude_1d=True),
        dict(eps=0.0, exclude_1d=False),
        dict(eps=0.0, exclude_1d=True, dampening=0.1),
    ):
        with pytest.raises(ValueError, match="only with eps=0"):
            reference(params, lr=0.1, **bad)


# ---------------------------------------------------------------------------------------------
# exclusion by name (param groups), config keys


def test_param_groups_exclude_by_name_through_the_shim():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"fc": torch.nn.Linear(3, 4), "norm": torch.nn.LayerNorm(4)}).double()
    groups = lars.param_groups(model.named_parameters(), weight_decay=0.1)  # excluded: fc.bias, norm.*
    assert [len(g["params"]) for g in groups] == [1, 3] and groups[1]["exclude"] is True
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = optorch.build({"name": "lars", "lr": 0.1, "trust_coefficient": 0.5, "eps": 0.0}, groups, engine="eager")
    model["norm"](model["fc"](torch.randn(5, 3, **F64))).sin().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    after = dict(model.named_parameters())
    for name in ("fc.bias", "norm.weight", "norm.bias"):  # plain SGD, first step: w - lr g, no decay
        torch.testing.assert_close(after[name].detach(), before[name] - 0.1 * grads[name], rtol=0, atol=1e-15)
    w, g = before["fc.weight"], grads["fc.weight"]
    ratio = 0.5 * w.norm() / (g.norm() + 0.1 * w.norm())
    torch.testing.assert_close(after["fc.weight"].detach(), w - 0.1 * ratio * (g + 0.1 * w), rtol=0, atol=1e-14)


def test_max_lr_is_the_original_name_of_lr():
    assert lars.Config(max_lr=0.2).lr == 0.2
    assert (
        optorch.build({"name": "lars", "max_lr": 0.2}, [torch.zeros(2, requires_grad=True)]).param_groups[0]["lr"]
        == 0.2
    )
    with pytest.raises(pydantic.ValidationError, match="not both"):
        lars.Config(lr=0.1, max_lr=0.2)


@pytest.mark.parametrize("key", ["lr", "trust_coefficient", "eps", "weight_decay", "momentum"])
def test_negative_values_are_refused_by_name(key):
    with pytest.raises(pydantic.ValidationError, match=key):
        lars.Config(**{key: -1.0})


def test_nesterov_needs_plain_momentum():
    with pytest.raises(pydantic.ValidationError, match="nesterov"):
        lars.Config(nesterov=True, momentum=0.0)


# ---------------------------------------------------------------------------------------------
# at LARS's own defaults (eps > 0, dampening), where no reference package agrees: a recurrence


def _recurrence(config: lars.Config, steps: int = 100) -> list[dict[str, torch.Tensor]]:
    """The module's equations, one tensor at a time in plain float64 arithmetic."""
    params, buffers, trajectory = _initial(), {}, []
    for _ in range(steps):
        grads = torch.func.grad(_loss)(params)
        new = {}
        for key, p in params.items():
            d = -grads[key] if config.maximize else grads[key]
            if config.exclude or (config.exclude_1d and p.dim() <= 1):
                u = d
            else:
                w_norm, d_norm = p.norm(), d.norm()
                ratio = (
                    config.trust_coefficient * w_norm / (d_norm + config.weight_decay * w_norm + config.eps)
                    if w_norm > 0 and d_norm > 0
                    else 1.0
                )
                u = ratio * (d + config.weight_decay * p)
            if config.momentum:
                buffers[key] = u if key not in buffers else config.momentum * buffers[key] + (1 - config.dampening) * u
                u = u + config.momentum * buffers[key] if config.nesterov else buffers[key]
            new[key] = p - config.lr * u
        params = new
        trajectory.append(params)
    return trajectory


@pytest.mark.parametrize(
    "flags",
    [
        {},
        {"dampening": 0.3, "weight_decay": 0.01},
        {"nesterov": True, "weight_decay": 0.01, "maximize": True},
        {"exclude_1d": True, "dampening": 0.5, "weight_decay": 0.01},
    ],
    ids=str,
)
def test_defaults_follow_the_recurrence_over_100_steps(flags):
    config = lars.Config(**flags)
    assert config.eps > 0 and config.momentum > 0 and config.trust_coefficient == 1e-3  # the defaults under test
    ours, expected = run_ours(config), _recurrence(config)
    assert max_diff(ours, expected) <= 1e-12
    assert max_diff(ours, [_initial()] * len(ours)) > 1e-2  # it moved
    assert (
        max_diff(_recurrence(config.replace(eps=10 * config.eps)), expected) > 1e3 * 1e-12
    )  # an eps 10x off would show
