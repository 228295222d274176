"""Every algorithm with a torch.optim counterpart, every flag combination: optorch equals torch.optim.

The grids, the problem and the comparison live in :mod:`optorch.verify` (``optorch verify`` runs the
same checks on a user's device). A newly registered algorithm with a torch.optim counterpart is picked
up here by itself, and fails loudly until it has a grid in ``optorch.verify``.
"""

from __future__ import annotations

import pytest
import torch

import optorch
from optorch import registry, verify

ALGORITHMS = verify.grid_algorithms()


def _case_id(name: str, config: dict) -> str:
    return f"{name}[{verify.describe(config)}]"


def _cases(paths, configs_of, marks=(), algorithms=ALGORITHMS):
    """(name, config, path) params, path varying fastest so the cached torch reference is reused."""
    return [
        pytest.param(name, config, path, marks=marks, id=f"{_case_id(name, config)}-{path}")
        for name in algorithms
        for config in configs_of(name)
        for path in verify.paths_for(name, paths)
    ]


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, and one intra-op thread: the problem's tensors are tiny, and torch's fused CPU kernels
    spend milliseconds per call waking a second thread (30-60x slower under ``pytest -n 2``)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("intermittent", [False, True], ids=["all-grads", "none-grads"])
@pytest.mark.parametrize("name, config, path", _cases(("pure", "torch", "eager"), verify.flag_grid))
def test_float64_every_flag_combination(name, config, path, intermittent):
    result = verify.check(name, config, steps=100, dtype=torch.float64, engine=path, intermittent=intermittent)
    assert result.max_abs_diff <= verify.FLOAT64_TOLERANCE, result


@pytest.mark.parametrize("intermittent", [False, True], ids=["all-grads", "none-grads"])
@pytest.mark.parametrize("name, config, path", _cases(("compiled",), verify.representative, marks=[pytest.mark.compile]))
def test_float64_compiled(name, config, path, intermittent):
    result = verify.check(name, config, steps=100, dtype=torch.float64, engine=path, intermittent=intermittent)
    assert result.passed and result.tolerance <= verify.FLOAT64_COMPILED_REDUCTION_TOLERANCE, result


@pytest.mark.parametrize(
    "name, config, path",
    _cases(("pure", "torch", "eager"), verify.representative, algorithms=verify.float32_algorithms())
    + _cases(("compiled",), verify.representative, marks=[pytest.mark.compile], algorithms=verify.float32_algorithms()),
)
def test_float32(name, config, path):
    result = verify.check(name, config, steps=100, dtype=torch.float32, engine=path)
    assert result.max_abs_diff <= verify.FLOAT32_TOLERANCE, result


@pytest.mark.parametrize("name", verify.float32_algorithms())
def test_float32_tolerance_keeps_its_margin_over_torch_itself(name):
    """The float32 tolerance is torch's own fused/foreach-vs-for-loop drift times a safety factor; it must
    stay well above that drift, or the justification in optorch.verify no longer holds."""
    drift = max(verify.torch_kernel_drift(name, config, intermittent=True) for config in verify.representative(name))
    assert 8 * drift <= verify.FLOAT32_TOLERANCE


@pytest.mark.parametrize("name", ALGORITHMS)
def test_the_problem_can_tell_a_wrong_optimizer(name):
    """Non-vacuous: every trainable parameter moves, the frozen one does not, and a 1e-4 relative change
    of lr moves the trajectory by more than 1e7 times the float64 tolerance."""
    config = verify.most_flags(name)
    kwargs = dict(steps=100, dtype=torch.float64, device="cpu")
    trajectory = verify.run_torch(name, config, **kwargs)
    initial, _, _ = verify.problem(torch.float64, "cpu")
    for param in verify.TRAINABLE:
        assert (trajectory[-1][param] - initial[param]).abs().max() > 1e-2, param
    assert torch.equal(trajectory[-1]["frozen"], initial["frozen"])
    perturbed = verify.run_torch(name, {**config, "lr": config["lr"] * (1 + 1e-4)}, **kwargs)
    assert verify.max_abs_diff(trajectory, perturbed) > 1e7 * verify.FLOAT64_TOLERANCE


def test_grid_covers_every_flag_combination():
    sizes = {name: len(verify.flag_grid(name)) for name in ("sgd", "adam", "adamw", "rmsprop", "adagrad")}
    # sgd: 32 combinations, less the 12 with nesterov but no plain momentum, which the Config rejects.
    assert sizes == {"sgd": 20, "adam": 16, "adamw": 8, "rmsprop": 16, "adagrad": 16}


def test_an_algorithm_without_a_torch_counterpart_has_no_grid(monkeypatch):
    fake = optorch.Algorithm("fake", optorch.sgd.Config, optorch.sgd.init_leaf, optorch.sgd.update)
    monkeypatch.setitem(registry.ALGORITHMS, "fake", fake)
    assert "fake" not in verify.grid_algorithms()
    with pytest.raises(verify.NoGridError, match="fake has no reference implementation"):
        verify.flag_grid("fake")
