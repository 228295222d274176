"""The compiled engine's plans (params stepped as one flat tensor, as a stack, or copied into scratch
space) and the user's explicit contiguous layout (:func:`optorch.contiguous`), against the eager
engine stepping the same params one by one, in the same test.

The layout is the user's, so it can break under the engine at any time: a ``p.data = ...``, a dtype
conversion, a state tensor written from outside, a checkpoint loaded. Each of those is done here to
both optimizers mid-training, and the trajectories must stay equal: a stale plan stepping memory the
param no longer uses would show as an O(1) difference, a silent wrong result.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import optorch
from optorch.algorithms import registry
from optorch.shim.engines import JOIN_BELOW, UpdateEngine

pytestmark = pytest.mark.compile

STEPS = 12
# one large param (steps alone), runs of same-shaped small ones (flat batches; stacks when the
# algorithm reduces per tensor), and odd shapes between them
SHAPES = [(3, 4)] * 4 + [(6,)] * 3 + [(2, 3, 2)] * 2 + [(5,), (181, 200)]
assert JOIN_BELOW <= 181 * 200
# every registered algorithm at its defaults, plus the configs that reduce per tensor or share state
CONFIGS = {name: {"name": name, "lr": 0.01} for name in sorted(registry.ALGORITHMS)}
CONFIGS["autosgm-numerator-1"] = {"name": "autosgm", "lr": 0.01, "numerator": 1}
CONFIGS["dag-momentum"] = {"name": "dag", "lr": 0.05, "momentum": 0.9}
CONFIGS["adam-weight-decay"] = {"name": "adam", "lr": 0.01, "weight_decay": 0.1, "amsgrad": True}
REDUCING = ["dag", "lars", "adafactor", "autosgm-numerator-1"]


class Model(nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype)) for shape in SHAPES]
        )


def _grads(step: int, model: Model) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype) for p in model.parameters()]


def _backward(model: Model, grads: list[torch.Tensor], *, in_place: bool) -> None:
    for param, grad in zip(model.parameters(), grads):
        if in_place and param.grad is not None:
            param.grad.copy_(grad)  # keeps the grads where contiguous() put them
        else:
            param.grad = grad.clone()


def _tolerance(config: dict) -> float:
    algorithm = registry.get(config["name"])
    return (
        1e-10
        if not algorithm.is_elementwise(algorithm.as_config({k: v for k, v in config.items() if k != "name"}))
        else 1e-12
    )


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if a.numel() == 0:
        return 0.0
    return ((a - b).abs() / b.abs().clamp(min=1)).max().nan_to_num(float("inf")).item()


def _diff(a: optorch.Optimizer, b: optorch.Optimizer, model_a: Model, model_b: Model) -> float:
    """The largest difference, relative above 1, of params and of every state tensor."""
    worst = max(_relative(pa, pb) for pa, pb in zip(model_a.parameters(), model_b.parameters()))
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert a.state[pa].keys() == b.state[pb].keys()
        for key, value in a.state[pa].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                worst = max(worst, _relative(value, b.state[pb][key]))
    return worst


def _pair(config: dict, *, contiguous: bool, dtype=torch.float64):
    """The candidate (compiled engine, optionally on the explicit layout) and the reference (eager)."""
    model, reference_model = Model(dtype), Model(dtype)
    if contiguous:
        _backward(model, _grads(-1, model), in_place=False)
        optorch.contiguous(model)
    candidate = optorch.build(config, model.parameters(), engine="compiled")
    reference = optorch.build(config, reference_model.parameters(), engine="eager")
    return model, candidate, reference_model, reference


def _steps(model, candidate, reference_model, reference, steps: range, *, in_place: bool) -> None:
    for step in steps:
        grads = _grads(step, model)
        _backward(model, grads, in_place=in_place)
        _backward(reference_model, grads, in_place=False)
        candidate.step()
        reference.step()


def _engine(optimizer: optorch.Optimizer) -> UpdateEngine:
    engine = optimizer._engine
    assert isinstance(engine, UpdateEngine) and engine.compiled, "the compiled engine fell back to eager"
    return engine


def _batches(optimizer: optorch.Optimizer) -> list:
    return [batch for _, (batches, _, _) in _engine(optimizer)._plans.values() for batch in batches]


def test_contiguous_lays_params_and_grads_out_back_to_back_keeping_values():
    model = Model()
    _backward(model, _grads(0, model), in_place=False)
    values = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = optorch.contiguous(model)
    assert len(buffers) == 2 and buffers[0].numel() == sum(p.numel() for p in model.parameters())
    for param, value, grad in zip(model.parameters(), values, grads):
        assert torch.equal(param, value) and torch.equal(param.grad, grad)
        assert param.untyped_storage().data_ptr() == buffers[0].untyped_storage().data_ptr()
        assert param.grad.untyped_storage().data_ptr() == buffers[1].untyped_storage().data_ptr()
    # backward accumulates into the laid-out grads
    before = buffers[1].clone()
    sum((p * p).sum() for p in model.parameters()).backward()
    assert not torch.equal(before, buffers[1])


def test_contiguous_leaves_frozen_params_without_a_grad():
    """A frozen param given a zero grad would be stepped (decay, momentum): it keeps ``grad=None``,
    and the params that train stay back to back in front of it."""
    model = Model()
    model.weights[2].requires_grad_(False)
    frozen = model.weights[2].detach().clone()
    optorch.contiguous(model)
    assert model.weights[2].grad is None
    trained = [p for p in model.parameters() if p.requires_grad]
    assert optorch.shim.batching.back_to_back(sorted(trained, key=lambda p: p.data_ptr())) is not None
    optimizer = optorch.build({"name": "adamw", "lr": 0.1, "weight_decay": 0.5}, model.parameters(), engine="compiled")
    for step in range(3):
        for param, grad in zip(model.parameters(), _grads(step, model)):
            if param.grad is not None:
                param.grad.copy_(grad)
        optimizer.step()
    assert torch.equal(model.weights[2].detach(), frozen)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "scattered"])
@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_compiled_plans_follow_the_eager_engine_in_float64(case, contiguous):
    """Every algorithm: the compiled engine's batches (views of the user's layout, or copies into
    scratch space) and its laid-out state step as the eager engine does, param by param."""
    config = CONFIGS[case]
    model, candidate, reference_model, reference = _pair(config, contiguous=contiguous)
    pointers = [p.data_ptr() for p in model.parameters()]
    _steps(model, candidate, reference_model, reference, range(STEPS), in_place=contiguous)
    assert _diff(candidate, reference, model, reference_model) <= _tolerance(config)
    assert [p.data_ptr() for p in model.parameters()] == pointers, "the engine moved a param"
    assert _batches(candidate), "nothing was batched: the test does not test the plans"


@pytest.mark.parametrize("case", REDUCING)
def test_algorithms_that_reduce_per_tensor_step_same_shaped_params_as_stacks(case):
    config = CONFIGS[case]
    for contiguous in (True, False):
        model, candidate, reference_model, reference = _pair(config, contiguous=contiguous)
        _steps(model, candidate, reference_model, reference, range(STEPS), in_place=contiguous)
        stacks = [batch for batch in _batches(candidate) if not batch.flat]
        assert {len(batch.members) for batch in stacks} >= {4, 3, 2}
        assert _diff(candidate, reference, model, reference_model) <= _tolerance(config)


def _new_values(param: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(param.shape, generator=torch.Generator().manual_seed(seed), dtype=param.dtype)


BREAKS = {
    # a param in the middle of the buffer gets memory of its own, another new values and memory
    "p.data replaced": lambda model: [
        setattr(model.weights[1], "data", model.weights[1].data.clone()),
        setattr(model.weights[5], "data", _new_values(model.weights[5], 5)),
    ],
    # every param leaves the buffer, as a conversion of the model does
    "every p.data copied": lambda model: [setattr(p, "data", p.data.clone()) for p in model.parameters()],
    # the grads leave theirs (zero_grad(set_to_none=True), then backward assigns new tensors)
    "grads set to None": lambda model: [setattr(p, "grad", None) for p in model.parameters()],
    # a param's data replaced by a tensor laid out right after another param's, in a new buffer
    "two params in a new buffer": lambda model: _into_new_buffer(model.weights[0], model.weights[8]),
}


def _into_new_buffer(a: torch.Tensor, b: torch.Tensor) -> None:
    buffer = torch.cat([a.data.reshape(-1), b.data.reshape(-1)])
    a.data, b.data = buffer[: a.numel()].view(a.shape), buffer[a.numel() :].view(b.shape)


@pytest.mark.parametrize("name", ["adam", "adopt", "dag", "lars", "autosgm-numerator-1"])
@pytest.mark.parametrize("break_", sorted(BREAKS))
def test_a_layout_broken_mid_training_is_noticed(name, break_):
    config = CONFIGS[name]
    model, candidate, reference_model, reference = _pair(config, contiguous=True)
    _steps(model, candidate, reference_model, reference, range(4), in_place=True)
    BREAKS[break_](model)
    BREAKS[break_](reference_model)
    _steps(model, candidate, reference_model, reference, range(4, STEPS), in_place=True)
    assert _diff(candidate, reference, model, reference_model) <= _tolerance(config)


def test_batches_keep_their_state_and_step_counts_back_to_back():
    """What makes a batch's step cheap: its state, step counts included, lies back to back in one
    buffer (so each step joins views and writes one scalar back), whatever the params' layout."""
    for contiguous in (True, False):
        model, candidate, reference_model, reference = _pair(CONFIGS["adopt"], contiguous=contiguous)
        _steps(model, candidate, reference_model, reference, range(3), in_place=contiguous)
        params = list(model.parameters())
        for batch in _batches(candidate):
            for key in ("step", "exp_avg", "exp_avg_sq"):
                tensors = [candidate.state[params[i]][key] for i in batch.members]
                assert optorch.shim.batching.back_to_back(tensors) is not None, key
        assert _diff(candidate, reference, model, reference_model) <= _tolerance(CONFIGS["adopt"])


@pytest.mark.parametrize("name", ["adam", "dag", "adafactor"])
def test_model_converted_to_float64_after_the_layout_steps_in_float64(name):
    """``model.double()`` after ``contiguous`` and ``build``, before the first step: every param has
    new memory, the compiled engine steps it there."""
    config = CONFIGS[name]
    model, candidate, reference_model, reference = _pair(config, contiguous=True, dtype=torch.float32)
    model.double(), reference_model.double()
    _steps(model, candidate, reference_model, reference, range(STEPS), in_place=False)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert _diff(candidate, reference, model, reference_model) <= _tolerance(config)


@pytest.mark.parametrize("name", ["adam", "adopt", "dag", "lars"])
def test_model_converted_mid_training_with_its_state_dict_follows_the_eager_engine(name):
    """float32 steps, then the checkpoint round trip torch documents for a dtype change (state_dict,
    ``model.double()``, load_state_dict), then float64 steps: the same on both engines, to float32
    rounding of the first steps."""
    config = CONFIGS[name]
    model, candidate, reference_model, reference = _pair(config, contiguous=True, dtype=torch.float32)
    _steps(model, candidate, reference_model, reference, range(4), in_place=True)
    for optimizer, net in ((candidate, model), (reference, reference_model)):
        saved = optimizer.state_dict()
        net.double()
        optimizer.load_state_dict(saved)
    _steps(model, candidate, reference_model, reference, range(4, STEPS), in_place=False)
    assert _diff(candidate, reference, model, reference_model) <= 1e-4


WRITES = {
    "state tensor replaced": lambda state, key: state.__setitem__(key, torch.full_like(state[key], 0.25)),
    "state written in place": lambda state, key: state[key].mul_(0.5),
    "step written in place": lambda state, key: state["step"].fill_(7) if "step" in state else state[key].zero_(),
    # .data has a version counter of its own: only the value shows the write
    "step written through .data": lambda state, key: (state["step"] if "step" in state else state[key]).data.fill_(7),
    "step replaced": lambda state, key: state.__setitem__(
        "step" if "step" in state else key, torch.full_like(state["step" if "step" in state else key], 7)
    ),
    # new memory under the same tensor: only its data pointer shows it
    "state moved by set_": lambda state, key: state[key].set_(state[key].clone()),
}


@pytest.mark.parametrize("name", ["adam", "adopt", "rmsprop", "dag-momentum", "lars"])
@pytest.mark.parametrize("write", sorted(WRITES))
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "scattered"])
def test_state_written_by_the_user_is_honoured(name, write, contiguous):
    """After the engine laid the state out (views of a buffer of its own), the user writes into it
    for one param: the next steps see exactly that write, and no other param's state changes."""
    config = CONFIGS[name]
    model, candidate, reference_model, reference = _pair(config, contiguous=contiguous)
    _steps(model, candidate, reference_model, reference, range(4), in_place=contiguous)
    key = next(k for k, v in candidate.state[model.weights[0]].items() if isinstance(v, torch.Tensor) and v.dim() > 0)
    for optimizer, net in ((candidate, model), (reference, reference_model)):
        WRITES[write](optimizer.state[net.weights[1]], key)
    _steps(model, candidate, reference_model, reference, range(4, STEPS), in_place=contiguous)
    assert _diff(candidate, reference, model, reference_model) <= _tolerance(config)


@pytest.mark.parametrize("name", ["adam", "adopt", "dag", "lars", "adafactor"])
@pytest.mark.parametrize("into", ["new optimizer", "same optimizer"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "scattered"])
def test_checkpoint_of_laid_out_state_round_trips(name, into, contiguous):
    """The state the engine laid out (views of one buffer) saves as plain per-param tensors and loads
    into a new optimizer or into the same one, which goes on as the eager engine does after the same
    round trip."""
    config = CONFIGS[name]
    model, candidate, reference_model, reference = _pair(config, contiguous=contiguous)
    _steps(model, candidate, reference_model, reference, range(5), in_place=contiguous)
    buffer = io.BytesIO()
    torch.save(candidate.state_dict(), buffer)
    for state in candidate.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                value.fill_(float("nan"))  # the loaded state must not alias the old buffers
    target = optorch.build(config, model.parameters(), engine="compiled") if into == "new optimizer" else candidate
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer, weights_only=True))
    # the reference makes the same round trip: what a checkpoint keeps is the algorithm's (LARS's
    # torch layout has no step count), the same on every engine
    reference_buffer = io.BytesIO()
    torch.save(reference.state_dict(), reference_buffer)
    reference_buffer.seek(0)
    reference.load_state_dict(torch.load(reference_buffer, weights_only=True))
    _steps(model, target, reference_model, reference, range(5, STEPS), in_place=contiguous)
    assert _diff(target, reference, model, reference_model) <= _tolerance(config)


def test_the_engine_never_moves_params_it_batches():
    """Issue 11's contract holds with batching: scattered params are copied in and out, never re-pointed."""
    model = Model(torch.float32)
    _backward(model, _grads(0, model), in_place=False)
    pointers = [(p.data_ptr(), p.grad.data_ptr()) for p in model.parameters()]
    optimizer = optorch.build({"name": "adam", "lr": 0.01}, model.parameters(), engine="compiled")
    for _ in range(3):
        optimizer.step()
    assert [(p.data_ptr(), p.grad.data_ptr()) for p in model.parameters()] == pointers
