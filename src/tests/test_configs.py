"""The example configs in ``configs/``: each loads, validates, builds an optimizer and trains.

Every registered algorithm must ship ``configs/<name>.yaml``, so a new algorithm cannot be added
without an example config (and without this test building and stepping it).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
import torch

import optorch
from optorch import builder, combinators
from optorch.algorithms import registry

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.yaml"))
BUILDER_KEYS = ("name", *builder.ENTRY_KEYS)
"""Top-level keys that configure what surrounds the algorithm, not the algorithm itself."""


class _Model(torch.nn.Module):
    """A linear layer and a norm, with names (``linear.bias``, ``norm.weight``) for param_groups."""

    in_features, out_features = 4, 3

    def __init__(self):
        super().__init__()
        self.linear, self.norm = torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)

    def forward(self, x):
        return self.norm(self.linear(x))


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    torch.manual_seed(1)
    inputs, targets = torch.randn(8, model.in_features), torch.randn(8, model.out_features)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        if optimizer.adaptive is not None:
            optimizer.adaptive.step_loss(loss)
        optimizer.step()
        optimizer.zero_grad()


def test_config_directory_has_configs():
    assert CONFIG_FILES, f"no *.yaml files in {CONFIG_DIR}"


def test_every_registered_algorithm_has_a_config_file():
    missing = [name for name in registry.names() if not (CONFIG_DIR / f"{name}.yaml").is_file()]
    assert not missing, (
        f"registered algorithms without an example config: {', '.join(f'configs/{n}.yaml' for n in missing)}"
    )
    for name in registry.names():
        named = builder.load_config(CONFIG_DIR / f"{name}.yaml")["name"]
        assert registry.get(named).name == name, f"configs/{name}.yaml configures {named!r}, not {name!r}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_validates(path: Path):
    raw = builder.load_config(path)
    assert isinstance(raw.get("name"), str), f"{path.name}: needs a 'name' key"
    algorithm, config = builder.parse_config(raw)
    assert isinstance(config, algorithm.config)
    # Every key written in the file is a config field and keeps the value written there; a nested
    # dict of settings (DAG's hyper) is merged over its defaults, so it keeps the keys written.
    values = config.hyperparameters()
    schedules = builder.parse_schedules(raw, config)
    assert set(schedules) == set(raw.get(builder.SCHEDULE_KEY, {})), f"{path.name}: schedule"
    settings = builder.parse_combinators(raw, (algorithm, config))
    entries = {key for key in raw if key in combinators.KEYS}
    assert (settings.model_fields_set if settings else set()) == entries, f"{path.name}: combinator entries"
    entry = raw.get(builder.ADAPTIVE_KEY)
    rules = builder.parse_adaptive(raw, config)
    assert (rules is None) == (entry is None), f"{path.name}: adaptive"
    for key, value in (entry or {}).items():
        assert getattr(rules, key) == (tuple(value) if isinstance(value, list) else value), (
            f"{path.name}: adaptive: {key}"
        )
    for key, value in raw.items():
        if key in BUILDER_KEYS:
            continue
        expected = tuple(value) if isinstance(value, list) else value
        if isinstance(value, dict):
            assert {k: values[key][k] for k in value} == value, f"{path.name}: {key}"
        else:
            assert getattr(config, key) == expected, f"{path.name}: {key}"
    # A path parses to the same thing as the dict loaded from it.
    assert builder.parse_config(path) == (algorithm, config)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_keys_are_the_torch_constructor_keywords(path: Path):
    """Migrating is a one-line change: the same keys construct the torch.optim counterpart."""
    algorithm, config = builder.parse_config(path)
    if algorithm.torch_optimizer is None:
        pytest.skip(f"{algorithm.name} has no torch.optim counterpart")
    values = builder.load_config(path)
    groups = values.get("param_groups", [])
    for key in BUILDER_KEYS:  # the builder's, not constructor keywords
        values.pop(key, None)
    # Each param_groups entry's overrides are torch param-group keys too.
    params = [{"params": [torch.zeros(2, requires_grad=True)]}]
    params += [
        {"params": [torch.zeros(2, requires_grad=True)], **{k: v for k, v in group.items() if k != "match"}}
        for group in groups
    ]
    algorithm.torch_optimizer(params, **values)


ENGINES = ["auto", "eager", pytest.param("compiled", marks=pytest.mark.compile)]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_builds_and_trains(path: Path, engine: str):
    _, config = builder.parse_config(path)
    lr_schedule = builder.parse_schedules(path).get("lr")
    settings = builder.parse_combinators(path) or combinators.Combinators()
    torch.manual_seed(0)
    model = _Model()
    initial = [p.detach().clone() for p in model.parameters()]

    # Named params, as param_groups needs (plain tensors work for configs without it: test_builder).
    optimizer = (
        optorch.build(path, model.named_parameters())
        if engine == "auto"
        else optorch.build(path, model.named_parameters(), engine=engine)
    )

    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.param_groups[0]["lr"] == (config.lr if lr_schedule is None else lr_schedule(0))
    for before, param in zip(initial, model.parameters()):
        torch.testing.assert_close(param.detach(), before, rtol=0, atol=0, msg="building must not change params")

    # Each param_groups entry's overrides reach the params it matches (the first match wins).
    names = {id(p): name for name, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            rule = next(
                (r for r in settings.param_groups if any(fnmatch.fnmatchcase(names[id(param)], g) for g in r.match)),
                None,
            )
            for key, value in (rule.overrides if rule else {}).items():
                assert group[key] == value, f"{path.name}: {names[id(param)]} has {key}={group[key]!r}"

    assert (optimizer.adaptive is not None) == (builder.ADAPTIVE_KEY in builder.load_config(path))
    _train(model, optimizer, steps=3 * settings.accumulate_steps)

    for (name, param), before in zip(model.named_parameters(), initial):
        assert torch.isfinite(param).all(), f"{path.name}: {name} is not finite after 3 steps"
        assert not torch.equal(param.detach(), before), f"{path.name}: {name} did not change in 3 steps"
