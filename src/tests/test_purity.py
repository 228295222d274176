"""``init`` and ``step`` are pure: inputs untouched, outputs fresh, configs frozen, state a plain pytree.

Run for every registered algorithm (a new one is picked up by itself) with its default config and, where
it has a verification grid, the combination with every flag on.
"""

from __future__ import annotations

import pydantic
import pytest
import torch
import tree
from torch.utils import _pytree as pytree

from optorch.algorithms import registry
from optorch.tools import verify


def _configs(name: str) -> list[pytest.param]:
    algorithm = registry.get(name)
    configs = [pytest.param(name, algorithm.config(), id=f"{name}[defaults]")]
    if name in verify.grid_algorithms():
        flags = {k: v for k, v in verify.most_flags(name).items() if k != "name"}
        configs.append(
            pytest.param(name, algorithm.config(**flags), id=f"{name}[{verify.describe({'name': name, **flags})}]")
        )
    return configs


CONFIGS = [case for name in registry.names() for case in _configs(name)]


def _params(kind: str) -> object:
    w, b, s = (
        torch.randn(4, 3, dtype=torch.float64),
        torch.randn(3, dtype=torch.float64),
        torch.randn((), dtype=torch.float64),
    )
    return {
        "dict": {"w": w, "b": b, "scale": s},
        "list": [w, b, s],
        "nested": {"layer": {"w": w, "b": b}, "head": {"scale": s, "extra": [torch.randn(2, dtype=torch.float64)]}},
    }[kind]


def _tensors(*trees) -> list[torch.Tensor]:
    return [leaf for t in trees for leaf in pytree.tree_leaves(t) if isinstance(leaf, torch.Tensor)]


def _snapshot(*trees):
    return [(t, t._version, t.clone()) for t in _tensors(*trees)]


def _assert_untouched(snapshot) -> None:
    for tensor, version, copy in snapshot:
        assert tensor._version == version, "an input tensor was modified in place"
        assert torch.equal(tensor, copy), "an input tensor's value changed"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _warm_state(algorithm, params, config, steps: int = 3):
    """A state some steps in, so the buffers hold real values, not zeros."""
    state = algorithm.init(params, config)
    for _ in range(steps):
        grads = pytree.tree_map(torch.randn_like, params)
        params, state = algorithm.step(params, grads, state, config)
    return params, state


@pytest.mark.parametrize("kind", ["dict", "list", "nested"])
@pytest.mark.parametrize("name, config", CONFIGS)
def test_init_and_step_leave_inputs_untouched(name, config, kind):
    algorithm = registry.get(name)
    params = _params(kind)
    snapshot = _snapshot(params)
    algorithm.init(params, config)
    _assert_untouched(snapshot)

    params, state = _warm_state(algorithm, params, config)
    grads = pytree.tree_map(torch.randn_like, params)
    snapshot = _snapshot(params, grads, state)
    new_params, new_state = algorithm.step(params, grads, state, config)
    _assert_untouched(snapshot)

    assert pytree.tree_structure(new_params) == pytree.tree_structure(params)
    assert pytree.tree_structure(new_state) == pytree.tree_structure(state)
    # An empty storage (Adafactor's placeholder state) holds no memory, so it cannot alias: all of
    # them report the same null data_ptr.
    inputs = {t.untyped_storage().data_ptr() for t in _tensors(params, grads, state) if t.untyped_storage().nbytes()}
    for output in _tensors(new_params, new_state):
        if not output.untyped_storage().nbytes():
            continue
        assert output.untyped_storage().data_ptr() not in inputs, "step returned a tensor aliasing its input"


@pytest.mark.parametrize("name, config", CONFIGS)
def test_none_grad_skips_the_param_and_its_state(name, config):
    algorithm = registry.get(name)
    params, state = _warm_state(algorithm, _params("dict"), config)
    grads = {"w": torch.randn(4, 3, dtype=torch.float64), "b": None, "scale": torch.randn((), dtype=torch.float64)}
    snapshot = _snapshot(params, state)
    new_params, new_state = algorithm.step(params, grads, state, config)
    _assert_untouched(snapshot)
    assert torch.equal(new_params["b"], params["b"])
    for key in algorithm.state_keys(config):  # per-parameter state (not an algorithm's shared state)
        assert torch.equal(new_state[key]["b"], state[key]["b"])
    assert not torch.equal(new_params["w"], params["w"])
    if "step" in state:  # a per-parameter counter, where the algorithm keeps one (DAG counts globally)
        assert torch.equal(new_state["step"]["w"], state["step"]["w"] + 1)


@pytest.mark.parametrize("name, config", CONFIGS)
def test_config_is_frozen(name, config):
    before = config.lr
    with pytest.raises(pydantic.ValidationError):
        config.lr = before * 2 + 1  # a value the grid cannot already hold
    assert config.lr is before


@pytest.mark.parametrize("name, config", CONFIGS)
def test_state_round_trips_through_dm_tree_and_torch_pytree(name, config):
    algorithm = registry.get(name)
    _, state = _warm_state(algorithm, _params("nested"), config)

    leaves, spec = pytree.tree_flatten(state)
    assert all(isinstance(leaf, torch.Tensor) for leaf in leaves)
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert pytree.tree_structure(rebuilt) == spec
    assert all(a is b for a, b in zip(pytree.tree_leaves(rebuilt), leaves))

    dm_leaves = tree.flatten(state)
    assert len(dm_leaves) == len(leaves)
    rebuilt = tree.unflatten_as(state, dm_leaves)
    tree.assert_same_structure(rebuilt, state)
    assert all(a is b for a, b in zip(tree.flatten(rebuilt), dm_leaves))

    doubled = tree.map_structure(lambda t: t * 2, state)
    tree.assert_same_structure(doubled, state)
    for a, b in zip(tree.flatten(doubled), dm_leaves):
        assert torch.equal(a, b * 2)
