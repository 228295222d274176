"""``optorch.Optimizer``, the torch.optim shim, against torch.optim itself.

Each behaviour runs for every registered algorithm (several flag combinations, so every state key is
exercised) and for the engines "torch" and "eager"; "compiled" joins where it is cheap (one flag
combination per algorithm, marked ``compile``).

Tolerances: engine "torch" runs torch's own kernel, fused where torch has a fused kernel for the
algorithm, so it is compared bit for bit against torch.optim with the same flag (``fused=True``);
engines "eager" and "compiled" run optorch's own math and are compared against the default torch class
to 1e-12 in float64, and bit for bit against themselves (checkpoint round trips).
"""

from __future__ import annotations

import copy
import inspect
import io
import itertools
from collections.abc import Callable, Iterable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import optorch
from optorch.algorithms import registry
from optorch.shim.engines import TORCH_KERNELS

# ------------------------------------------------------------------------------------------------
# cases: flag combinations per algorithm, chosen so every state key and branch is exercised

CASES: dict[str, list[dict]] = {
    "sgd": [
        {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "maximize": True},
        {"lr": 0.05},
    ],
    "adam": [
        {"lr": 0.01, "betas": (0.8, 0.99), "amsgrad": True, "weight_decay": 0.01},
        {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
    ],
    "adamw": [
        {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True},
        {"lr": 0.01},
    ],
    "rmsprop": [
        {"lr": 0.01, "momentum": 0.9, "centered": True, "weight_decay": 0.01},
        {"lr": 0.01, "alpha": 0.9},
    ],
    "adagrad": [
        {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01},
        {"lr": 0.1, "initial_accumulator_value": 0.1, "eps": 1e-8},
    ],
    "nadam": [
        {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.01, "momentum_decay": 0.01},
        {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
    ],
    "radam": [
        {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.01},
        {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
    ],
    "adamax": [
        {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.01},
        {"lr": 0.01, "eps": 1e-3, "maximize": True},
    ],
    "adadelta": [
        {"lr": 0.5, "rho": 0.8, "weight_decay": 0.01},
        {"lr": 1.0, "eps": 1e-4, "maximize": True},
    ],
    "rprop": [
        {"lr": 0.01, "etas": (0.4, 1.3), "step_sizes": (1e-4, 0.05)},
        {"lr": 0.01, "maximize": True},
    ],
    "asgd": [  # t0=2: the averaging (ax, mu) starts within the steps these tests take
        {"lr": 0.02, "lambd": 0.01, "alpha": 0.6, "t0": 2.0, "weight_decay": 0.01},
        {"lr": 0.02, "maximize": True},
    ],
    "adafactor": [
        {"lr": 0.01, "beta2_decay": -0.5, "d": 1.2, "weight_decay": 0.01},
        {"lr": 0.01, "eps": (1e-3, 1e-3), "maximize": True},
    ],
}
ALGORITHMS = sorted(registry.ALGORITHMS)
TORCH_ALGORITHMS = [name for name in ALGORITHMS if registry.get(name).torch_optimizer is not None]
ENGINES = ("torch", "eager", "compiled")
TOLERANCE = 1e-12  # engines "eager"/"compiled" against torch.optim, float64
N, M = 4, 4  # steps before and after a checkpoint


def describe(flags: dict) -> str:
    return "-".join(k if v is True else f"{k}={v}" for k, v in flags.items() if k != "lr") or "defaults"


def cases(
    algorithms: Iterable[str] = TORCH_ALGORITHMS,
    engines: Iterable[str] = ENGINES,
    *,
    first_only: bool = False,
    extra: Iterable = (None,),
) -> list:
    """pytest params ``(name, flags, engine[, extra])``; "compiled" gets the first flag combination only,
    marked ``compile``."""
    params = []
    for name in algorithms:
        combos = CASES.get(name, [{}])  # an algorithm without cases runs with its defaults
        for i, flags in enumerate(combos[:1] if first_only else combos):
            for engine in engines:
                if engine == "torch" and registry.get(name).torch_optimizer is None:
                    continue
                if engine == "compiled" and i > 0:
                    continue
                for e in extra:
                    marks = [pytest.mark.compile] if engine == "compiled" else []
                    values = (name, flags, engine) if e is None else (name, flags, engine, e)
                    suffix = "" if e is None else f"-{e}"
                    params.append(pytest.param(*values, id=f"{name}-{describe(flags)}-{engine}{suffix}", marks=marks))
    return params


ADAM_COMPILED = cases(("adam",), ("compiled",), first_only=True)  # where one compiled case is enough


# ------------------------------------------------------------------------------------------------
# helpers


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 1)).to(dtype)


def batch(i: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + i)
    return torch.randn(8, 4, generator=generator, dtype=dtype), torch.randn(8, 1, generator=generator, dtype=dtype)


def loss_at(model: nn.Module, i: int) -> torch.Tensor:
    x, y = batch(i, next(model.parameters()).dtype)
    return F.mse_loss(model(x), y)


def param_groups(name: str, flags: dict, model: nn.Sequential) -> list[dict]:
    """Two groups: the first layer with the config's values, the rest with half its lr (an override)."""
    rest = [*model[2].parameters(), *model[4].parameters()]
    config = registry.get(name).config(**flags)
    override = {"lr": config.lr / 2} if "lr" in type(config).model_fields else {}
    return [{"params": list(model[0].parameters())}, {"params": rest, **override}]


def make_shim(name: str, flags: dict, model: nn.Sequential, engine: str) -> optorch.Optimizer:
    return optorch.build({"name": name, **flags}, param_groups(name, flags, model), engine=engine)


def torch_flags(name: str, engine: str) -> dict:
    """The execution flags of the torch.optim run that the shim's ``engine`` must reproduce bit for bit:
    engine "torch" runs torch's fused kernel wherever torch has one for the algorithm (see shim._TorchRunner)."""
    signature = inspect.signature(registry.get(name).torch_optimizer.__init__).parameters
    return {"fused": True} if engine == "torch" and "fused" in signature else {}


def make_torch(name: str, flags: dict, model: nn.Sequential, engine: str) -> torch.optim.Optimizer:
    torch_class = registry.get(name).torch_optimizer
    return torch_class(param_groups(name, flags, model), **flags, **torch_flags(name, engine))


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    start: int = 0,
    drop: Callable | None = None,
    set_to_none: bool = True,
) -> None:
    """``steps`` steps on batches ``start, start+1, ...``; ``drop(i)`` names params whose grad is None at step i."""
    for i in range(start, start + steps):
        optimizer.zero_grad(set_to_none=set_to_none)
        loss_at(model, i).backward()
        for p in drop(i) if drop else ():
            p.grad = None
        optimizer.step()


def through_bytes(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only: a checkpoint must need nothing but tensors and plain values


TRANSPORTS = {"bytesio": through_bytes, "deepcopy": copy.deepcopy}


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in model.parameters()]


def assert_tensors(actual: list[torch.Tensor], expected: list[torch.Tensor], exact: bool, what: str = "params") -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape and a.dtype == e.dtype, f"{what}[{i}]: {a.shape} {a.dtype} vs {e.shape} {e.dtype}"
        if exact:
            assert torch.equal(a, e), f"{what}[{i}] differs by {(a - e).abs().max().item():.3g} (expected bit-exact)"
        else:
            diff = (a - e).abs().max().item() if a.numel() else 0.0
            assert diff <= TOLERANCE, f"{what}[{i}] differs by {diff:.3g} > {TOLERANCE}"


def assert_state_like_torch(shim: torch.optim.Optimizer, reference: torch.optim.Optimizer, exact: bool) -> None:
    """Per-parameter state equals torch's, key by key."""
    ours, theirs = shim.state_dict()["state"], reference.state_dict()["state"]
    assert set(ours) == set(theirs)
    for index in theirs:
        assert set(ours[index]) == set(theirs[index]), f"state[{index}]"
        for key in theirs[index]:
            a, e = ours[index][key], theirs[index][key]
            if key == "step":
                assert float(a) == float(e), f"step of parameter {index}: {float(a)} vs {float(e)}"
            else:
                assert_tensors([a], [e], exact, f"state[{index}][{key!r}]")


def resumed_torch(name: str, flags: dict, model: nn.Sequential, engine: str, checkpoint: dict) -> torch.optim.Optimizer:
    """torch.optim for ``model``, resumed from ``checkpoint`` with the kernel of ``engine`` (torch keeps
    the execution flags saved in a checkpoint, so they are set back after loading)."""
    optimizer = make_torch(name, flags, model, engine)
    optimizer.load_state_dict(copy.deepcopy(checkpoint))
    for group in optimizer.param_groups:
        group.update(torch_flags(name, engine))
    return optimizer


def _loader_changes_dtypes(name: str, checkpoint: dict, model: nn.Sequential) -> bool:
    """Whether torch.optim's load_state_dict would cast some saved state (other than ``step``)."""
    if registry.get(name).torch_optimizer is None:
        return False
    dtype = next(model.parameters()).dtype
    return any(
        isinstance(v, torch.Tensor) and k != "step" and v.is_floating_point() and v.dtype != dtype
        for leaf in checkpoint["state"].values()
        for k, v in leaf.items()
    )


def assert_same(a, b, path: str = "state_dict") -> None:
    """Recursive bit-exact equality of checkpoints (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), path
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a, key=str)} vs {sorted(b, key=str)}"
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def differs(a, b) -> bool:
    """Whether two checkpoints differ (``assert_same`` as a predicate)."""
    try:
        assert_same(a, b)
    except AssertionError:
        return True
    return False


def snapshot(optimizer: torch.optim.Optimizer) -> dict:
    """A deep copy of the state_dict, safe from later in-place steps."""
    return copy.deepcopy(optimizer.state_dict())


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


# ------------------------------------------------------------------------------------------------
# training matches torch.optim


@pytest.mark.parametrize("name, flags, engine", cases())
def test_training_matches_torch(name, flags, engine):
    model_s, model_t = make_model(), make_model()
    shim, reference = make_shim(name, flags, model_s, engine), make_torch(name, flags, model_t, engine)
    train(model_s, shim, N + M)
    train(model_t, reference, N + M)
    assert_tensors(params_of(model_s), params_of(model_t), exact=engine == "torch")
    assert_state_like_torch(shim, reference, exact=engine == "torch")


# ------------------------------------------------------------------------------------------------
# checkpoints interchange with torch.optim


# through torch.save/torch.load, and in memory (deep-copied: a state_dict holds live tensors); the
# compiled engine gets the first only
CHECKPOINT_CASES = [p for p in cases(extra=("bytesio", "deepcopy")) if p.values[2:] != ("compiled", "deepcopy")]


@pytest.mark.parametrize("name, flags, engine, transport", CHECKPOINT_CASES)
def test_torch_checkpoint_continues_in_shim(name, flags, engine, transport):
    model_t = make_model()
    saved = make_torch(name, flags, model_t, engine)
    train(model_t, saved, N)
    checkpoint = TRANSPORTS[transport](saved.state_dict())

    model_s = copy.deepcopy(model_t)
    shim = make_shim(name, flags, model_s, engine)
    shim.load_state_dict(checkpoint)
    # The reference is torch resumed from the same checkpoint (torch's loader may change dtypes:
    # NAdam's float32 mu_product becomes the param's dtype, so torch resumed != torch uninterrupted).
    reference = resumed_torch(name, flags, model_t, engine, checkpoint)
    assert_state_like_torch(shim, reference, exact=True)  # loaded as torch loads it

    train(model_t, reference, M, start=N)
    train(model_s, shim, M, start=N)
    exact = engine == "torch"
    assert_tensors(params_of(model_s), params_of(model_t), exact)
    assert_state_like_torch(shim, reference, exact)


@pytest.mark.parametrize("name, flags, engine, transport", CHECKPOINT_CASES)
def test_shim_checkpoint_continues_in_torch(name, flags, engine, transport):
    model_s = make_model()
    shim = make_shim(name, flags, model_s, engine)
    train(model_s, shim, N)
    checkpoint = TRANSPORTS[transport](shim.state_dict())

    # What a user gets: torch.optim with its defaults loads the checkpoint and goes on.
    model_d = copy.deepcopy(model_s)
    default = registry.get(name).torch_optimizer(param_groups(name, flags, model_d), **flags)
    default.load_state_dict(copy.deepcopy(checkpoint))
    # The very kernel the shim's engine runs: torch.optim keeps the flags saved in a checkpoint, so set
    # them back after loading.
    model_t = copy.deepcopy(model_s)
    reference = make_torch(name, flags, model_t, engine)
    reference.load_state_dict(checkpoint)
    for group in reference.param_groups:
        group.update(torch_flags(name, engine))

    # Compared with the shim resumed from the same checkpoint (see test_torch_checkpoint_continues_in_shim).
    model_r = copy.deepcopy(model_s)
    resumed = make_shim(name, flags, model_r, engine)
    resumed.load_state_dict(copy.deepcopy(checkpoint))

    train(model_r, resumed, M, start=N)
    train(model_t, reference, M, start=N)
    train(model_d, default, M, start=N)
    assert_tensors(params_of(model_t), params_of(model_r), exact=engine == "torch")
    assert_state_like_torch(resumed, reference, exact=engine == "torch")
    assert_tensors(params_of(model_d), params_of(model_r), exact=False)


@pytest.mark.parametrize("name, flags, engine", cases(first_only=True))
def test_torch_checkpoint_with_uneven_step_counts(name, flags, engine):
    """Params with different step counts in the checkpoint keep them, in torch and in the shim."""
    drop = lambda model: lambda i: [model[4].bias] if i % 2 else []  # noqa: E731
    model_t = make_model()
    reference = make_torch(name, flags, model_t, engine)
    train(model_t, reference, 5, drop=drop(model_t))
    model_s = copy.deepcopy(model_t)
    shim = make_shim(name, flags, model_s, engine)
    checkpoint = through_bytes(reference.state_dict())
    shim.load_state_dict(checkpoint)
    reference = resumed_torch(name, flags, model_t, engine, checkpoint)
    train(model_t, reference, 4, start=5, drop=drop(model_t))
    train(model_s, shim, 4, start=5, drop=drop(model_s))
    assert_tensors(params_of(model_s), params_of(model_t), exact=engine == "torch")
    assert_state_like_torch(shim, reference, exact=engine == "torch")


@pytest.mark.parametrize("name, flags, engine", cases(ALGORITHMS))
def test_shim_checkpoint_round_trip_is_bit_exact(name, flags, engine):
    """A shim run interrupted by save/load equals the same run uninterrupted, to the bit."""
    model_a = make_model()
    uninterrupted = make_shim(name, flags, model_a, engine)
    train(model_a, uninterrupted, N)
    checkpoint = through_bytes(uninterrupted.state_dict())

    model_b = copy.deepcopy(model_a)
    resumed = make_shim(name, flags, model_b, engine)
    resumed.load_state_dict(checkpoint)
    if _loader_changes_dtypes(name, checkpoint, model_a):
        # torch.optim's loader casts per-tensor scalars (NAdam's mu_product, ASGD's eta and mu) to the
        # param's dtype, so torch resumed differs from torch uninterrupted; the shim loads as torch
        # does, and is compared with torch resumed from the same checkpoint.
        model_t = copy.deepcopy(model_a)
        reference = resumed_torch(name, flags, model_t, engine, checkpoint)
        train(model_t, reference, M, start=N)
        train(model_b, resumed, M, start=N)
        assert_tensors(params_of(model_b), params_of(model_t), exact=engine == "torch")
        return
    assert_same(resumed.state_dict(), uninterrupted.state_dict())

    train(model_a, uninterrupted, M, start=N)
    train(model_b, resumed, M, start=N)
    assert_tensors(params_of(model_b), params_of(model_a), exact=True)
    assert_same(resumed.state_dict(), uninterrupted.state_dict())


@pytest.mark.parametrize("name, flags, engine", cases(first_only=True, engines=("torch", "eager")))
def test_checkpoint_crosses_engines(name, flags, engine):
    """A checkpoint of one engine loads into another; both continue within tolerance of each other."""
    other = "eager" if engine == "torch" else "torch"
    model_a = make_model()
    source = make_shim(name, flags, model_a, engine)
    train(model_a, source, N)
    model_b = copy.deepcopy(model_a)
    checkpoint = through_bytes(source.state_dict())
    target = make_shim(name, flags, model_b, other)
    target.load_state_dict(checkpoint)
    if _loader_changes_dtypes(name, checkpoint, model_a):  # compare resumed with resumed
        source = make_shim(name, flags, model_a, engine)
        source.load_state_dict(checkpoint)
    train(model_a, source, M, start=N)
    train(model_b, target, M, start=N)
    assert_tensors(params_of(model_b), params_of(model_a), exact=False)


# ------------------------------------------------------------------------------------------------
# state_dict layout


@pytest.mark.parametrize("name, flags, engine", cases(engines=("torch", "eager")))
def test_state_dict_has_torch_layout(name, flags, engine):
    model_s, model_t = make_model(), make_model()
    shim, reference = make_shim(name, flags, model_s, engine), make_torch(name, flags, model_t, engine)
    train(model_s, shim, 3)
    train(model_t, reference, 3)
    ours, theirs = shim.state_dict(), reference.state_dict()
    assert set(ours) == {"state", "param_groups"}
    assert all(isinstance(index, int) for index in ours["state"])
    assert set(ours["state"]) <= set(range(6))
    assert set(ours["state"]) == set(theirs["state"])
    assert (
        [g["params"] for g in ours["param_groups"]]
        == [g["params"] for g in theirs["param_groups"]]
        == [[0, 1], [2, 3, 4, 5]]
    )
    for ours_group, theirs_group in zip(ours["param_groups"], theirs["param_groups"]):
        for field in registry.get(name).config.model_fields:
            assert ours_group[field] == theirs_group[field], field
    for leaf in ours["state"].values():
        assert all(isinstance(v, torch.Tensor) for v in leaf.values())


@pytest.mark.parametrize("name, flags, engine", cases())
def test_state_keys_equal_torch(name, flags, engine):
    model_s, model_t = make_model(), make_model()
    shim, reference = make_shim(name, flags, model_s, engine), make_torch(name, flags, model_t, engine)
    train(model_s, shim, 2)
    train(model_t, reference, 2)
    ours, theirs = shim.state_dict()["state"], reference.state_dict()["state"]
    assert {i: sorted(s) for i, s in ours.items()} == {i: sorted(s) for i, s in theirs.items()}


# ------------------------------------------------------------------------------------------------
# load_state_dict rejects mismatches and changes nothing


def _checkpoint(name: str, flags: dict, groups_of: Callable) -> dict:
    model = make_model(seed=1)
    optimizer = optorch.build({"name": name, **flags}, groups_of(model), engine="eager")
    train(model, optimizer, 2)
    return through_bytes(optimizer.state_dict())


def _valid():
    return _checkpoint("adam", CASES["adam"][0], lambda m: param_groups("adam", CASES["adam"][0], m))


def _wrong_group_count():
    return _checkpoint("adam", CASES["adam"][0], lambda m: list(m.parameters()))


def _wrong_group_size():
    return _checkpoint(
        "adam",
        CASES["adam"][0],
        lambda m: [{"params": [*m[0].parameters(), *m[2].parameters()]}, {"params": list(m[4].parameters())}],
    )


def _from_sgd():
    return _checkpoint("sgd", CASES["sgd"][0], lambda m: param_groups("sgd", CASES["sgd"][0], m))


def _wrong_shape():
    checkpoint = _valid()
    checkpoint["state"][2]["exp_avg"] = torch.zeros(7, dtype=torch.float64)
    return checkpoint


def _invalid_lr():
    checkpoint = _valid()
    checkpoint["param_groups"][1]["lr"] = -0.5
    return checkpoint


def _invalid_betas():
    checkpoint = _valid()
    checkpoint["param_groups"][0]["betas"] = (0.9, 1.5)
    return checkpoint


def _unknown_index():
    checkpoint = _valid()
    checkpoint["state"][17] = checkpoint["state"][0]
    return checkpoint


def _missing_key():
    checkpoint = _valid()
    del checkpoint["state"][5]["max_exp_avg_sq"]
    return checkpoint


def _from_adam():
    return _valid()


# mismatch: (the shim's algorithm, a checkpoint that does not fit it, what the error must mention)
MISMATCHES = {
    "group-count": ("adam", _wrong_group_count, r"param groups"),
    "group-size": ("adam", _wrong_group_size, r"params"),
    "adam-into-sgd": ("sgd", _from_adam, r"another optimizer"),
    "sgd-into-adam": ("adam", _from_sgd, r"another optimizer"),
    "tensor-shape": ("adam", _wrong_shape, r"shape"),
    "invalid-lr": ("adam", _invalid_lr, r"lr"),
    "invalid-betas": ("adam", _invalid_betas, r"betas"),
    "unknown-index": ("adam", _unknown_index, r"17"),
    "missing-key": ("adam", _missing_key, r"max_exp_avg_sq"),
}


@pytest.mark.parametrize("mismatch", sorted(MISMATCHES))
@pytest.mark.parametrize("engine", ["torch", "eager"])
def test_load_state_dict_rejects_mismatch_and_changes_nothing(engine, mismatch):
    name, make_checkpoint, pattern = MISMATCHES[mismatch]
    flags = CASES[name][0]
    model, twin_model = make_model(), make_model()
    shim, twin = make_shim(name, flags, model, engine), make_shim(name, flags, twin_model, engine)
    train(model, shim, 2)
    train(twin_model, twin, 2)
    before = snapshot(shim)

    with pytest.raises(ValueError, match=pattern):
        shim.load_state_dict(make_checkpoint())

    assert_same(shim.state_dict(), before)
    train(model, shim, 2, start=2)
    train(twin_model, twin, 2, start=2)
    assert_tensors(params_of(model), params_of(twin_model), exact=True)
    assert_same(shim.state_dict(), twin.state_dict())


def test_load_state_dict_rejects_non_checkpoints():
    shim = make_shim("adam", {}, make_model(), "eager")
    for bad in ({}, {"state": {}}, [], {"param_groups": []}):
        with pytest.raises(ValueError):
            shim.load_state_dict(bad)


# ------------------------------------------------------------------------------------------------
# LR schedulers


def _step_lr(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.5)


def _cosine(optimizer):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20, eta_min=1e-4)


def _one_cycle(optimizer):
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[0.05, 0.02], total_steps=40, cycle_momentum=True, base_momentum=0.8, max_momentum=0.95
    )


SCHEDULERS = {"steplr": _step_lr, "cosine": _cosine, "onecycle": _one_cycle}
SCHEDULED_KEYS = ("lr", "momentum", "betas", "initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum")


def _scheduler_cases():
    params = cases(first_only=True, engines=("torch", "eager"), extra=("steplr", "cosine"))
    params += cases(("sgd", "adam", "adamw"), first_only=True, engines=("torch", "eager"), extra=("onecycle",))
    params += cases(("adam",), first_only=True, engines=("compiled",), extra=("onecycle",))
    return params


@pytest.mark.parametrize("name, flags, engine, scheduler", _scheduler_cases())
def test_lr_scheduler_matches_torch(name, flags, engine, scheduler):
    steps = 32
    model_s, model_t = make_model(), make_model()
    shim, reference = make_shim(name, flags, model_s, engine), make_torch(name, flags, model_t, engine)
    schedule_s, schedule_t = SCHEDULERS[scheduler](shim), SCHEDULERS[scheduler](reference)
    seen: dict[str, set] = {"lr": set(), "momentum": set(), "betas": set()}
    for i in range(steps):
        train(model_s, shim, 1, start=i)
        train(model_t, reference, 1, start=i)
        schedule_s.step()
        schedule_t.step()
        if i == 1:
            checks = shim._states.full_checks  # the state exists and was checked
        for ours, theirs in zip(shim.param_groups, reference.param_groups):
            for key in SCHEDULED_KEYS:
                assert ours.get(key) == theirs.get(key), f"step {i}: {key}"
        for key, values in seen.items():
            values.add(shim.param_groups[0].get(key))
    assert len(seen["lr"]) > 2, "the schedule should have changed the lr"
    if scheduler == "onecycle":
        assert len(seen["momentum" if name == "sgd" else "betas"]) > 10, (
            "OneCycleLR cycles the momentum (sgd) or beta1 (adam)"
        )
    assert schedule_s.get_last_lr() == schedule_t.get_last_lr()
    assert_tensors(params_of(model_s), params_of(model_t), exact=engine == "torch")
    assert_state_like_torch(shim, reference, exact=engine == "torch")
    # A scheduled value is not a new kind of state: checking every param's state again at each step
    # made a step with a scheduler ~10x slower (200 params of 2k).
    assert shim._states.full_checks == checks, "the schedule made the shim check the state again"


def _variants(config: optorch.Config) -> Iterable[tuple[str, optorch.Config]]:
    """``config`` with one non-zero real hyperparameter changed to another valid non-zero value."""
    for name, value in config.hyperparameters().items():
        parts = value if isinstance(value, tuple) else (value,)
        for i, part in enumerate(parts):
            if type(part) is not float or part == 0:
                continue
            for factor in (0.5, 0.9, 1.1):
                changed = tuple(part * factor if j == i else p for j, p in enumerate(parts))
                try:
                    yield f"{name}[{i}]", config.replace(**{name: changed if isinstance(value, tuple) else changed[0]})
                    break
                except ValueError:  # pydantic's ValidationError: out of the field's range
                    continue


def _layout(algorithm, config: optorch.Config, shape: tuple) -> dict:
    state = algorithm.init_leaf(torch.zeros(shape, dtype=torch.float64), config)
    return {key: (tuple(value.shape), value.dtype) for key, value in state.items()}


@pytest.mark.parametrize("name", registry.names())
def test_a_scheduled_value_never_changes_the_state_an_algorithm_needs(name):
    """What the shim's state check relies on (``Config.structure``): a non-zero real hyperparameter
    changed to another non-zero value (what a schedule does) leaves the config's structure and the
    state's keys, shapes and dtypes as they were, for every flag combination of the algorithm's grid."""
    algorithm = registry.get(name)
    configs = [algorithm.config()]
    if algorithm.grid is not None:
        for values in itertools.product(*algorithm.grid.axes.values()):
            try:
                configs.append(algorithm.config(**algorithm.grid.fixed, **dict(zip(algorithm.grid.axes, values))))
            except ValueError:
                continue
    changed = 0
    for config in configs:
        for field, variant in _variants(config):
            assert variant.structure() == config.structure(), field
            for shape in ((3, 4), (5,)):
                assert _layout(algorithm, variant, shape) == _layout(algorithm, config, shape), (field, shape)
            changed += 1
    assert changed, f"{name}: no non-zero real hyperparameter was changed"


def test_a_flag_or_a_zero_changes_a_config_s_structure():
    """The converse: what selects state keys changes the structure, so the state is checked again."""
    adam, sgd = registry.get("adam").config, registry.get("sgd").config
    assert adam(amsgrad=True).structure() != adam().structure()
    assert sgd(momentum=0.9).structure() != sgd(momentum=0.0).structure()
    assert sgd(lr=0.1, momentum=0.9).structure() == sgd(lr=0.2, momentum=0.8).structure()
    assert adam(lr=torch.tensor(0.1)).structure() == adam(lr=0.2).structure()  # a tensor's value is never read


# ------------------------------------------------------------------------------------------------
# zero_grad, step(closure), add_param_group


@pytest.mark.parametrize("name, flags, engine", cases(ALGORITHMS, ("torch", "eager"), first_only=True))
def test_zero_grad(name, flags, engine):
    model = make_model()
    shim = make_shim(name, flags, model, engine)
    train(model, shim, 2)
    shim.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    loss_at(model, 0).backward()
    shim.step()
    grads = [p.grad for p in model.parameters()]
    shim.zero_grad(set_to_none=False)
    for p, g in zip(model.parameters(), grads):
        assert p.grad is g and torch.count_nonzero(p.grad) == 0
    shim.zero_grad()  # torch's default: set_to_none=True
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name, flags, engine", cases(ALGORITHMS, ("torch", "eager"), first_only=True))
def test_step_with_closure(name, flags, engine):
    model, twin_model = make_model(), make_model()
    shim, twin = make_shim(name, flags, model, engine), make_shim(name, flags, twin_model, engine)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        shim.zero_grad()
        loss = loss_at(model, 0)
        loss.backward()
        return loss

    with torch.no_grad():  # the closure still runs with grad enabled, as in torch.optim
        loss = shim.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor) and torch.equal(loss.detach(), loss_at(twin_model, 0).detach())
    train(twin_model, twin, 1)
    assert_tensors(params_of(model), params_of(twin_model), exact=True)
    assert shim.step(lambda: 42.0) == 42.0
    assert shim.step() is None


@pytest.mark.parametrize("name, flags, engine", ADAM_COMPILED + cases(ALGORITHMS, ("torch", "eager"), first_only=True))
def test_add_param_group_after_construction(name, flags, engine):
    model_s, model_t = make_model(), make_model()
    groups_s = param_groups(name, flags, model_s)
    shim = optorch.build({"name": name, **flags}, groups_s[:1], engine=engine)
    train(model_s, shim, 2, drop=lambda i: groups_s[1]["params"])
    untouched = [p.detach().clone() for p in groups_s[1]["params"]]
    override = {k: v for k, v in groups_s[1].items() if k != "params"}
    shim.add_param_group(groups_s[1])
    assert shim.param_groups[1]["params"] == groups_s[1]["params"]
    assert all(torch.equal(p.detach(), v) for p, v in zip(groups_s[1]["params"], untouched))  # values kept
    assert shim.group_config(shim.param_groups[1]) == registry.get(name).config(**{**flags, **override})
    train(model_s, shim, 3, start=2)

    if registry.get(name).torch_optimizer is not None:
        groups_t = param_groups(name, flags, model_t)
        reference = registry.get(name).torch_optimizer(groups_t[:1], **flags, **torch_flags(name, engine))
        train(model_t, reference, 2, drop=lambda i: groups_t[1]["params"])
        reference.add_param_group(groups_t[1])
        train(model_t, reference, 3, start=2)
        assert_tensors(params_of(model_s), params_of(model_t), exact=engine == "torch")
    for p, before in zip(groups_s[1]["params"], untouched):
        assert not torch.equal(p.detach(), before), "the added group must be stepped"


@pytest.mark.parametrize("engine", ["torch", "eager"])
def test_add_param_group_with_a_param_already_present(engine):
    model = make_model()
    shim = make_shim("adam", {}, model, engine)
    before = [dict(g) for g in shim.param_groups]
    with pytest.raises(ValueError, match="more than one"):
        shim.add_param_group({"params": [model[0].weight]})
    assert shim.param_groups == before


# ------------------------------------------------------------------------------------------------
# hooks


@pytest.mark.parametrize("engine", ["torch", "eager"])
def test_step_hooks_fire_once_per_step(engine):
    model = make_model()
    shim = make_shim("adam", {"lr": 0.1}, model, engine)
    events = []
    weight = model[0].weight

    def pre(optimizer, args, kwargs):
        assert optimizer is shim
        events.append(("pre", weight.detach().clone()))

    def post(optimizer, args, kwargs):
        assert optimizer is shim
        events.append(("post", weight.detach().clone()))

    handles = [shim.register_step_pre_hook(pre), shim.register_step_post_hook(post)]
    train(model, shim, 3)
    assert [kind for kind, _ in events] == ["pre", "post"] * 3
    for (_, before), (_, after) in zip(events[::2], events[1::2]):
        assert not torch.equal(before, after)  # pre fires before the update, post after
    for handle in handles:
        handle.remove()
    train(model, shim, 1, start=3)
    assert len(events) == 6


@pytest.mark.parametrize("engine", ["torch", "eager"])
def test_global_step_hooks_fire_once_per_step_with_the_shim(engine):
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    model = make_model()
    shim = make_shim("adam", {"lr": 0.1}, model, engine)
    seen = []
    handles = [
        register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: seen.append(("pre", optimizer))),
        register_optimizer_step_post_hook(lambda optimizer, args, kwargs: seen.append(("post", optimizer))),
    ]
    try:
        train(model, shim, 2)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == [("pre", shim), ("post", shim)] * 2


@pytest.mark.parametrize("engine", ["torch", "eager"])
def test_state_dict_hooks(engine):
    model = make_model()
    shim = make_shim("adam", {"lr": 0.1}, model, engine)
    train(model, shim, 1)
    calls = []

    def pre(optimizer):
        calls.append(("pre", optimizer))

    def post(optimizer, state_dict):
        calls.append(("post", optimizer))
        state_dict["note"] = "from a hook"
        return state_dict

    shim.register_state_dict_pre_hook(pre)
    shim.register_state_dict_post_hook(post)
    state_dict = shim.state_dict()
    assert calls == [("pre", shim), ("post", shim)]
    assert state_dict["note"] == "from a hook"
    assert set(state_dict["state"]) == set(range(6))


@pytest.mark.parametrize("engine", ["torch", "eager"])
def test_load_state_dict_hooks(engine):
    model = make_model()
    shim = make_shim("adam", {"lr": 0.1}, model, engine)
    train(model, shim, 1)
    checkpoint = through_bytes(shim.state_dict())
    calls = []

    def pre(optimizer, state_dict):
        calls.append("pre")
        state_dict = dict(state_dict)
        state_dict["param_groups"] = [{**g, "lr": 0.0125} for g in state_dict["param_groups"]]
        return state_dict

    def post(optimizer):
        calls.append(("post", [g["lr"] for g in optimizer.param_groups], len(optimizer.state)))

    shim.register_load_state_dict_pre_hook(pre)
    shim.register_load_state_dict_post_hook(post)
    shim.load_state_dict(checkpoint)
    assert calls == ["pre", ("post", [0.0125, 0.0125], 6)]
    assert [g["lr"] for g in shim.param_groups] == [0.0125, 0.0125]
    assert checkpoint["param_groups"][0]["lr"] == 0.1  # the caller's dict is not modified


@pytest.mark.parametrize("engine", ["torch", "eager"])
def test_load_state_dict_post_hook_can_edit_the_loaded_state(engine):
    """A post-hook that resets the first moments after loading acts as it does on torch.optim."""

    def reset_first_moment(optimizer):
        for leaf in optimizer.state.values():
            leaf["exp_avg"].zero_()

    flags = CASES["adam"][0]
    model_a = make_model()
    source = make_shim("adam", flags, model_a, "eager")
    train(model_a, source, N)
    checkpoint = through_bytes(source.state_dict())
    runs = []
    for kind in ("shim", "torch"):
        model = copy.deepcopy(model_a)
        optimizer = (
            make_shim("adam", flags, model, engine) if kind == "shim" else make_torch("adam", flags, model, engine)
        )
        optimizer.register_load_state_dict_post_hook(reset_first_moment)
        optimizer.load_state_dict(copy.deepcopy(checkpoint))
        if kind == "torch":  # torch takes the checkpoint's execution flags; the shim keeps its kernel
            for group in optimizer.param_groups:
                group.update(torch_flags("adam", engine))
        assert all(torch.count_nonzero(leaf["exp_avg"]) == 0 for leaf in optimizer.state_dict()["state"].values())
        train(model, optimizer, M, start=N)
        runs.append(params_of(model))
    assert_tensors(runs[0], runs[1], exact=engine == "torch")


def _rename(state_dict: dict, names: dict) -> dict:
    state = {i: {names.get(k, k): v for k, v in leaf.items()} for i, leaf in state_dict["state"].items()}
    return {**state_dict, "state": state}


@pytest.mark.parametrize("engine", ["torch", "eager"])
def test_load_state_dict_pre_hook_can_migrate_a_checkpoint(engine):
    """torch runs load_state_dict pre-hooks first and validates what they return (e.g. renamed keys)."""
    legacy_names = {"exp_avg": "m", "exp_avg_sq": "v"}
    model_t = make_model()
    reference = torch.optim.Adam(param_groups("adam", {}, model_t), **torch_flags("adam", engine))
    train(model_t, reference, 2)
    legacy = _rename(through_bytes(reference.state_dict()), legacy_names)
    migrate = lambda optimizer, state_dict: _rename(state_dict, {v: k for k, v in legacy_names.items()})  # noqa: E731

    torch_loader = torch.optim.Adam(param_groups("adam", {}, copy.deepcopy(model_t)))
    torch_loader.register_load_state_dict_pre_hook(migrate)
    torch_loader.load_state_dict(copy.deepcopy(legacy))  # torch.optim accepts it

    model_s = copy.deepcopy(model_t)
    shim = make_shim("adam", {}, model_s, engine)
    shim.register_load_state_dict_pre_hook(migrate)
    shim.load_state_dict(legacy)
    train(model_t, reference, 2, start=2)
    train(model_s, shim, 2, start=2)
    assert_tensors(params_of(model_s), params_of(model_t), exact=engine == "torch")


# ------------------------------------------------------------------------------------------------
# sparse gradients, missing gradients


@pytest.mark.parametrize(
    "name, flags, engine, layout",
    cases(ALGORITHMS, ("torch", "eager"), first_only=True, extra=("one-group", "two-groups")),
)
def test_sparse_gradients_are_rejected_and_change_nothing(name, flags, engine, layout):
    torch.manual_seed(0)
    embedding = nn.Embedding(5, 3, sparse=True).double()
    head = nn.Linear(3, 1).double()
    dense, sparse = list(head.parameters()), list(embedding.parameters())
    groups = [{"params": dense}, {"params": sparse}] if layout == "two-groups" else [{"params": dense + sparse}]
    shim = optorch.build({"name": name, **flags}, groups, engine=engine)
    before_params = [p.detach().clone() for p in dense + sparse]
    before_state = snapshot(shim)

    head(embedding(torch.tensor([0, 3]))).sum().backward()
    assert embedding.weight.grad.is_sparse
    with pytest.raises(RuntimeError, match="sparse"):
        shim.step()

    for p, before in zip(dense + sparse, before_params):
        assert torch.equal(p.detach(), before)
    assert_same(shim.state_dict(), before_state)


@pytest.mark.parametrize("name, flags, engine", ADAM_COMPILED + cases(ALGORITHMS, ("torch", "eager"), first_only=True))
def test_param_without_grad_gets_no_state_and_is_untouched(name, flags, engine):
    model = make_model()
    frozen_value = model[4].bias.detach().clone()
    shim = make_shim(name, flags, model, engine)
    train(model, shim, 3, drop=lambda i: [model[4].bias])
    assert torch.equal(model[4].bias.detach(), frozen_value)
    state = shim.state_dict()["state"]
    index = 5  # model[4].bias
    if engine == "torch" and index in state:  # torch.optim.Adagrad creates state at construction
        assert float(state[index]["step"]) == 0
    else:
        assert index not in state and model[4].bias not in shim.state
    assert set(range(5)) <= set(state)


def _intermittent(model: nn.Sequential) -> Callable:
    """Step-dependent missing grads: first layer's weight misses steps 0-1, last bias every odd step."""
    return lambda i: ([model[0].weight] if i < 2 else []) + ([model[4].bias] if i % 2 else [])


@pytest.mark.parametrize("name, flags, engine", ADAM_COMPILED + cases(engines=("torch", "eager")))
def test_intermittent_missing_grads_match_torch(name, flags, engine):
    # torch's fused SGD cannot start a momentum buffer late (it raises), so there the shim steps
    # unfused and the reference is torch.optim.SGD as users build it.
    late_buffer = name == "sgd" and engine == "torch" and bool(flags.get("momentum"))
    model_s, model_t = make_model(), make_model()
    shim = make_shim(name, flags, model_s, engine)
    reference = make_torch(name, flags, model_t, "eager" if late_buffer else engine)
    train(model_s, shim, 7, drop=_intermittent(model_s))
    train(model_t, reference, 7, drop=_intermittent(model_t))
    exact = engine == "torch" and not late_buffer
    assert_tensors(params_of(model_s), params_of(model_t), exact)
    assert_state_like_torch(shim, reference, exact)
    if not isinstance(reference, torch.optim.SGD):  # per-parameter step counts, as torch keeps them
        steps = {i: float(s["step"]) for i, s in shim.state_dict()["state"].items()}
        assert (steps[0], steps[1], steps[5]) == (5, 7, 4)


@pytest.mark.parametrize("engine", ["torch", "eager"])
def test_sgd_momentum_param_with_late_first_grad(engine):
    """A param whose first grad comes after the others have momentum buffers (a layer unfrozen later)."""
    flags = {"lr": 0.05, "momentum": 0.9}
    model_s, model_t = make_model(), make_model()
    shim = make_shim("sgd", flags, model_s, engine)
    reference = make_torch("sgd", flags, model_t, "eager")  # torch.optim.SGD as users build it
    train(model_s, shim, 4, drop=lambda i: [model_s[4].weight] if i < 2 else [])
    train(model_t, reference, 4, drop=lambda i: [model_t[4].weight] if i < 2 else [])
    assert_tensors(params_of(model_s), params_of(model_t), exact=False)


# ------------------------------------------------------------------------------------------------
# GradScaler


@pytest.mark.parametrize("name, flags, engine", cases(ALGORITHMS, ("torch", "eager"), first_only=True))
def test_grad_scaler(name, flags, engine):
    inf_step = 2
    runs = []
    for kind in ("shim", "torch"):
        if kind == "torch" and registry.get(name).torch_optimizer is None:
            continue
        model = make_model()
        optimizer = make_shim(name, flags, model, engine) if kind == "shim" else make_torch(name, flags, model, engine)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        history = []
        for i in range(5):
            optimizer.zero_grad()
            scaler.scale(loss_at(model, i)).backward()
            if i == inf_step:
                model[2].weight.grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
            state_before = snapshot(optimizer)
            scaler.step(optimizer)
            scaler.update()
            # A step taken moves the params or, where a first step only fills state (ADOPT), the state.
            changed = any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters())) or differs(
                optimizer.state_dict(), state_before
            )
            history.append((changed, scaler.get_scale()))
            if i == inf_step:
                assert not changed, "a step with an inf grad must be skipped"
                assert_same(optimizer.state_dict(), state_before)
        runs.append((model, history))
    (model_s, history_s), *rest = runs
    assert [changed for changed, _ in history_s] == [i != inf_step for i in range(5)]
    if rest:
        ((model_t, history_t),) = rest
        assert history_s == history_t
        assert_tensors(params_of(model_s), params_of(model_t), exact=engine == "torch")


# ------------------------------------------------------------------------------------------------
# the shim never moves a parameter's memory or its gradient's


FLAT_ENGINES = ["eager", pytest.param("compiled", marks=pytest.mark.compile), "torch"]


@pytest.mark.parametrize("engine", FLAT_ENGINES)
def test_params_and_grads_stay_where_they_are(engine):
    model = make_model()
    params = list(model.parameters())
    pointers = [p.data_ptr() for p in params]
    shim = optorch.build({"name": "adam", "lr": 0.01}, param_groups("adam", {}, model), engine=engine)
    assert [p.data_ptr() for p in params] == pointers
    for i in range(3):
        shim.zero_grad(set_to_none=i % 2 == 0)
        loss_at(model, i).backward()
        grads = [p.grad for p in params]
        grad_pointers = [g.data_ptr() for g in grads]
        shim.step()
        assert all(p.grad is g for p, g in zip(params, grads)), "the step left .grad alone"
        assert [g.data_ptr() for g in grads] == grad_pointers
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert [p.data_ptr() for p in params] == pointers
    assert len({storage(p) for p in params}) == len(params), "no two params share a storage"
    # module.load_state_dict copies into the params, and the shim steps what the module holds
    values = {k: v + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(values)
    reference_model = copy.deepcopy(model)
    reference = torch.optim.Adam(param_groups("adam", {}, reference_model), lr=0.01)
    reference.load_state_dict(copy.deepcopy(shim.state_dict()))  # torch would share the tensors otherwise
    train(model, shim, 2, start=3)
    train(reference_model, reference, 2, start=3)
    assert_tensors(params_of(model), params_of(reference_model), exact=False)


def torch_refuses_complex(name: str) -> bool:
    """Whether torch.optim's counterpart refuses complex params (Adafactor does): then the shim must too."""
    param = nn.Parameter(torch.zeros(2, dtype=torch.complex128))
    param.grad = torch.ones_like(param)
    try:
        registry.get(name).torch_optimizer([param]).step()
    except RuntimeError as error:
        return "complex" in str(error)
    return False


@pytest.mark.parametrize("name, flags, engine", cases(first_only=True, engines=("torch", "eager")))
def test_complex_and_empty_params_match_torch(name, flags, engine):
    if torch_refuses_complex(name):
        param = nn.Parameter(torch.zeros(3, dtype=torch.complex128))
        with pytest.raises(RuntimeError, match="complex"):
            optimizer = optorch.build({"name": name, **flags}, [param], engine=engine)
            param.grad = torch.ones_like(param)
            optimizer.step()
        return
    runs = []
    for kind in ("shim", "torch"):
        generator = torch.Generator().manual_seed(0)
        params = [
            nn.Parameter(torch.randn(3, generator=generator, dtype=torch.complex128)),
            nn.Parameter(torch.zeros(0, dtype=torch.float64)),
            nn.Parameter(torch.randn(2, generator=generator, dtype=torch.float64)),
        ]
        if kind == "shim":
            optimizer = optorch.build({"name": name, **flags}, params, engine=engine)
        else:
            optimizer = registry.get(name).torch_optimizer(params, **flags)
        for i in range(4):
            optimizer.zero_grad()
            ((params[0] * (1 + i)).abs().square().sum() + params[1].sum() + (params[2] - i).square().sum()).backward()
            optimizer.step()
        runs.append([p.detach() for p in params])
    # engine "torch" cannot run the fused kernel on complex params: it runs torch's default, as torch would
    assert_tensors(runs[0], runs[1], exact=False)


class MixedModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.low = nn.Linear(4, 1).float()
        self.high = nn.Linear(4, 1).double()
        self.scale = nn.Parameter(torch.ones(1, dtype=torch.float32))

    def loss(self, i: int) -> torch.Tensor:
        # a separate loss per dtype: the float64 grads do not depend on float32 values, so the float64
        # params can be held to the float64 tolerance
        x, y = batch(i)
        return F.mse_loss(self.high(x), y) + F.mse_loss(self.low(x.float()) * self.scale, y.float()).double()


@pytest.mark.parametrize("engine", FLAT_ENGINES[:2])
def test_mixed_dtypes_match_torch(engine):
    model_s, model_t = MixedModel(), MixedModel()
    shim = optorch.build({"name": "adam", "lr": 0.01, "amsgrad": True}, model_s.parameters(), engine=engine)
    reference = torch.optim.Adam(model_t.parameters(), lr=0.01, amsgrad=True)
    params = list(model_s.parameters())
    dtypes = [p.dtype for p in params]
    for i in range(4):
        for model, optimizer in ((model_s, shim), (model_t, reference)):
            optimizer.zero_grad(set_to_none=False)
            model.loss(i).backward()
            optimizer.step()
    assert [p.dtype for p in model_s.parameters()] == dtypes
    for ours, theirs in zip(model_s.parameters(), model_t.parameters()):
        tolerance = 1e-12 if ours.dtype == torch.float64 else 1e-6
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=tolerance)
    state = shim.state_dict()["state"]
    for index, param in enumerate(params):
        assert state[index]["step"].dtype == torch.float32
        assert {state[index][k].dtype for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")} == {param.dtype}


def test_frozen_params_in_a_group_are_untouched():
    model = make_model()
    model[0].weight.requires_grad_(False)
    before = model[0].weight.detach().clone()
    shim = optorch.build({"name": "adam", "lr": 0.1}, model.parameters(), engine="eager")
    train(model, shim, 2)
    assert torch.equal(model[0].weight.detach(), before)
    assert 0 not in shim.state_dict()["state"]


# ------------------------------------------------------------------------------------------------
# engines


@pytest.mark.parametrize("name", TORCH_ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_auto_engine_picks_torch_only_where_its_kernel_is_verified(name, dtype):
    """auto runs torch's fused kernel exactly where optorch.shim.engines.TORCH_KERNELS lists it (checked
    against torch's default kernel in test_engines.py), else optorch's own compiled update."""
    expected = "torch" if dtype in TORCH_KERNELS.get((name, "cpu"), ()) else "compiled"
    model = make_model().to(dtype)
    assert optorch.build({"name": name}, model.parameters()).engine == expected
    assert optorch.build({"name": name}, model.parameters(), engine="auto").engine == expected


def test_auto_engine_runs_sgd_with_dampening_on_optorch_s_own_update():
    # torch marks an unstarted momentum buffer by its absence; with dampening that differs from zeros
    assert optorch.build({"name": "sgd", "momentum": 0.9}, make_model().parameters()).engine == "torch"
    assert (
        optorch.build({"name": "sgd", "momentum": 0.9, "dampening": 0.1}, make_model().parameters()).engine
        == "compiled"
    )


@pytest.mark.parametrize("name", TORCH_ALGORITHMS)
def test_auto_engine_with_complex_params(name):
    complex_params = [nn.Parameter(torch.zeros(3, dtype=torch.complex128))]  # no fused kernel for complex
    if torch_refuses_complex(name):  # nothing to pick: the first step refuses them (see test_complex_and_empty...)
        with pytest.raises(RuntimeError, match="complex"):
            optimizer = optorch.build({"name": name}, complex_params)
            complex_params[0].grad = torch.ones_like(complex_params[0])
            optimizer.step()
        return
    assert optorch.build({"name": name}, complex_params).engine == "compiled"


@pytest.mark.parametrize("engine", ["eager", "compiled", "torch"])
def test_explicit_engine_is_used(engine):
    shim = optorch.build({"name": "adam"}, make_model().parameters(), engine=engine)
    assert shim.engine == engine


def test_auto_engine_without_torch_counterpart_compiles():
    algorithm = optorch.Algorithm("sgd_copy", optorch.sgd.Config, optorch.sgd.init_leaf, optorch.sgd.update)
    params = make_model().parameters()
    assert optorch.Optimizer(params, algorithm, optorch.sgd.Config(lr=0.1)).engine == "compiled"
    with pytest.raises(ValueError, match="torch"):
        optorch.Optimizer(make_model().parameters(), algorithm, engine="torch")


def test_unknown_engine_lists_the_engines():
    with pytest.raises(ValueError) as info:
        optorch.build({"name": "adam"}, make_model().parameters(), engine="jit")
    for engine in ("auto", "torch", "compiled", "eager"):
        assert engine in str(info.value)
    assert "jit" in str(info.value)


def test_every_torch_algorithm_has_cases():
    assert set(TORCH_ALGORITHMS) <= set(CASES)
