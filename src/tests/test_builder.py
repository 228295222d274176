"""``optorch.build`` and the configs behind it: dicts, Config instances, YAML/JSON files, per-group
overrides, and the errors users see for unknown names, unknown keys, invalid values and bad files."""

from __future__ import annotations

import inspect
import json

import pydantic
import pytest
import torch

import optorch
from optorch.algorithms import registry

ALGORITHMS = sorted(registry.ALGORITHMS)
TORCH_ALGORITHMS = sorted(name for name, a in registry.ALGORITHMS.items() if a.torch_optimizer is not None)
# How torch.optim runs a step, not what it computes: never a config key.
EXECUTION_FLAGS = {"foreach", "fused", "capturable", "differentiable"}


def make_params(*shapes: tuple[int, ...]) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64)) for shape in shapes]


def torch_keywords(name: str) -> dict[str, inspect.Parameter]:
    """The hyperparameter keywords of the torch.optim constructor ``name`` stands for."""
    algorithm = registry.get(name)
    signature = inspect.signature(algorithm.torch_optimizer.__init__).parameters
    skip = {"self", "params", *EXECUTION_FLAGS}
    if name == "adamw":
        skip.add("decoupled_weight_decay")  # AdamW is Adam with it fixed to True
    return {key: value for key, value in signature.items() if key not in skip}


def group_values(optimizer: torch.optim.Optimizer) -> list[dict]:
    """param_groups as comparable values (params by identity)."""
    return [
        {k: ([id(p) for p in v] if k == "params" else v) for k, v in group.items()} for group in optimizer.param_groups
    ]


# ------------------------------------------------------------------------------------------------
# building


@pytest.mark.parametrize("name", ALGORITHMS)
def test_build_from_dict_uses_the_config_values(name):
    algorithm = registry.get(name)
    params = make_params((3, 2), (2,))
    optimizer = optorch.build({"name": name, "lr": 0.125}, params, engine="eager")
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert isinstance(optimizer, optorch.Optimizer)
    assert optimizer.algorithm is algorithm
    (group,) = optimizer.param_groups
    assert group["params"] == params
    assert group["lr"] == 0.125
    for field, value in algorithm.config(lr=0.125).hyperparameters().items():
        assert group[field] == value, field


def test_build_name_is_case_insensitive():
    optimizer = optorch.build({"name": "AdamW", "lr": 0.5}, make_params((2,)))
    assert optimizer.algorithm is registry.get("adamw")


@pytest.mark.parametrize("name", ALGORITHMS)
def test_build_from_config_instance(name):
    algorithm = registry.get(name)
    config = algorithm.config(lr=0.25)
    optimizer = optorch.build(config, make_params((4,)), engine="eager")
    assert optimizer.algorithm is algorithm
    assert optimizer.group_config(optimizer.param_groups[0]) == config


def test_build_from_adam_config_keeps_tuple_betas():
    config = optorch.adam.Config(lr=0.01, betas=[0.8, 0.9], amsgrad=True)
    assert config.betas == (0.8, 0.9)
    optimizer = optorch.build(config, make_params((2,)))
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.9)
    assert optimizer.param_groups[0]["amsgrad"] is True


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
@pytest.mark.parametrize("as_string", [False, True], ids=["Path", "str"])
def test_build_from_file(tmp_path, suffix, as_string):
    values = {"name": "adam", "lr": 0.02, "betas": [0.8, 0.95], "weight_decay": 0.1, "amsgrad": True}
    path = tmp_path / f"adam{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        path.write_text(
            "# an example config\nname: adam\nlr: 0.02\nbetas: [0.8, 0.95]\nweight_decay: 0.1\namsgrad: true\n"
        )
    assert optorch.load_config(path) == values
    optimizer = optorch.build(str(path) if as_string else path, make_params((3,)))
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["amsgrad"]) == (0.02, (0.8, 0.95), 0.1, True)
    algorithm, config = optorch.parse_config(path)
    assert algorithm is registry.get("adam") and config == optorch.adam.Config(
        lr=0.02, betas=(0.8, 0.95), weight_decay=0.1, amsgrad=True
    )


@pytest.mark.parametrize("engine", ["torch", "eager"])
def test_per_group_overrides_reach_param_groups_and_the_step(engine):
    first, second = make_params((3, 2)), make_params((4,))
    optimizer = optorch.build(
        {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        [{"params": first}, {"params": second, "lr": 0.01, "momentum": 0.5, "nesterov": True}],
        engine=engine,
    )
    groups = optimizer.param_groups
    assert (groups[0]["lr"], groups[0]["momentum"], groups[0]["nesterov"]) == (0.1, 0.9, False)
    assert (groups[1]["lr"], groups[1]["momentum"], groups[1]["nesterov"]) == (0.01, 0.5, True)
    assert optimizer.group_config(groups[1]) == optorch.sgd.Config(lr=0.01, momentum=0.5, nesterov=True)

    twins = [[p.detach().clone().requires_grad_() for p in ps] for ps in (first, second)]
    reference = torch.optim.SGD(
        [{"params": twins[0]}, {"params": twins[1], "lr": 0.01, "momentum": 0.5, "nesterov": True}],
        lr=0.1,
        momentum=0.9,
    )
    for _ in range(3):
        for p, t in zip(first + second, twins[0] + twins[1]):
            p.grad = torch.ones_like(p)
            t.grad = torch.ones_like(t)
        optimizer.step()
        reference.step()
    for p, t in zip(first + second, twins[0] + twins[1]):
        torch.testing.assert_close(p.detach(), t.detach(), rtol=0, atol=1e-12)


def test_build_engine_argument():
    assert optorch.build({"name": "adam"}, make_params((2,)), engine="eager").engine == "eager"
    assert optorch.build({"name": "adam"}, make_params((2,))).engine == "torch"


# ------------------------------------------------------------------------------------------------
# errors


def test_unknown_name_lists_known_names_and_suggests():
    with pytest.raises(optorch.UnknownOptimizerError) as info:
        optorch.build({"name": "adamm", "lr": 0.1}, make_params((2,)))
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "adamm" in message
    assert "did you mean 'adam'" in message.lower()
    for name in ALGORITHMS:
        assert name in message


def test_unknown_name_without_close_match_still_lists_names():
    with pytest.raises(optorch.UnknownOptimizerError) as info:
        optorch.build({"name": "zzzzzz"}, make_params((2,)))
    for name in ALGORITHMS:
        assert name in str(info.value)


def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(optorch.ConfigError) as info:
        optorch.build({"name": "adam", "lr": 0.1, "beta": (0.9, 0.99)}, make_params((2,)))
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "'beta'" in message
    assert "did you mean 'betas'" in message.lower()
    for key in optorch.adam.Config.model_fields:
        assert key in message


def test_unknown_execution_flag_is_a_config_error():
    """torch.optim's execution flags say how torch runs, not what the optimizer is: not config keys."""
    with pytest.raises(optorch.ConfigError, match="fused"):
        optorch.build({"name": "adam", "fused": True}, make_params((2,)))


def test_missing_name():
    with pytest.raises(optorch.ConfigError, match="'name'") as info:
        optorch.build({"lr": 0.1}, make_params((2,)))
    for name in ALGORITHMS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "values, field",
    [
        ({"name": "sgd", "lr": -0.1}, "lr"),
        ({"name": "adam", "lr": -1e-3}, "lr"),
        ({"name": "adam", "betas": (0.9, 1.0)}, "betas"),
        ({"name": "adamw", "betas": (1.5, 0.999)}, "betas"),
        ({"name": "sgd", "lr": 0.1, "nesterov": True}, "nesterov"),
        ({"name": "sgd", "lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}, "nesterov"),
        ({"name": "adam", "lr": [0.1]}, "lr"),
        ({"name": "rmsprop", "momentum": [0.9, 0.8]}, "momentum"),
        ({"name": "adagrad", "eps": "small"}, "eps"),
        ({"name": "adam", "amsgrad": "maybe"}, "amsgrad"),
        ({"name": "sgd", "weight_decay": -0.5}, "weight_decay"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={v[k]}" for k in v),
)
def test_invalid_value_raises_validation_error_naming_the_field(values, field):
    with pytest.raises(pydantic.ValidationError) as info:
        optorch.build(values, make_params((2,)))
    assert field in str(info.value)


@pytest.mark.parametrize("engine", ["torch", "eager"])
def test_invalid_group_override_at_build(engine):
    params = make_params((3,), (2,))
    storages = [p.untyped_storage().data_ptr() for p in params]
    values = [p.detach().clone() for p in params]
    with pytest.raises(pydantic.ValidationError, match="lr"):
        optorch.build({"name": "adam"}, [{"params": params[:1]}, {"params": params[1:], "lr": -1.0}], engine=engine)
    with pytest.raises(pydantic.ValidationError, match="betas"):
        optorch.build(
            {"name": "adam"}, [{"params": params[:1], "betas": (0.9, 1.0)}, {"params": params[1:]}], engine=engine
        )
    # nothing was done to the params (no flat buffers half set up)
    assert [p.untyped_storage().data_ptr() for p in params] == storages
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)


@pytest.mark.parametrize("engine", ["torch", "eager"])
@pytest.mark.parametrize(
    "override, field",
    [
        ({"lr": -1.0}, "lr"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"eps": [1e-8]}, "eps"),
        ({"amsgrad": "sometimes"}, "amsgrad"),
    ],
    ids=["lr", "betas", "eps", "amsgrad"],
)
def test_invalid_add_param_group_leaves_the_optimizer_unchanged(engine, override, field):
    params = make_params((3, 2), (2,))
    extra = make_params((5,))[0]
    optimizer = optorch.build({"name": "adam", "lr": 0.1}, params, engine=engine)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    before = group_values(optimizer)
    state_before = optimizer.state_dict()
    extra_value, extra_storage = extra.detach().clone(), extra.untyped_storage().data_ptr()

    with pytest.raises(pydantic.ValidationError) as info:
        optimizer.add_param_group({"params": [extra], **override})
    assert field in str(info.value)

    assert group_values(optimizer) == before
    assert optimizer.state_dict()["param_groups"] == state_before["param_groups"]
    assert torch.equal(extra.detach(), extra_value) and extra.untyped_storage().data_ptr() == extra_storage
    # still steps as before, and the rejected param is not stepped
    extra.grad = torch.ones_like(extra)
    optimizer.step()
    assert torch.equal(extra.detach(), extra_value)
    assert extra not in optimizer.state


def test_valid_add_param_group_is_validated_and_applied():
    params = make_params((3,))
    extra = make_params((2,))[0]
    optimizer = optorch.build({"name": "adam", "lr": 0.1}, params, engine="eager")
    optimizer.add_param_group({"params": [extra], "betas": [0.5, 0.6]})
    assert optimizer.param_groups[1]["lr"] == 0.1
    assert optimizer.group_config(optimizer.param_groups[1]).betas == (0.5, 0.6)


def test_file_with_bad_suffix(tmp_path):
    path = tmp_path / "adam.toml"
    path.write_text('name = "adam"\n')
    with pytest.raises(optorch.ConfigError, match=r"\.yaml|\.json"):
        optorch.build(path, make_params((2,)))


@pytest.mark.parametrize(
    "suffix, text",
    [(".yaml", "- name: adam\n- lr: 0.1\n"), (".json", '["adam", 0.1]'), (".yaml", "adam\n"), (".yaml", "")],
)
def test_file_with_non_mapping_top_level(tmp_path, suffix, text):
    path = tmp_path / f"config{suffix}"
    path.write_text(text)
    with pytest.raises(optorch.ConfigError, match="mapping"):
        optorch.build(path, make_params((2,)))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        optorch.build(tmp_path / "nope.yaml", make_params((2,)))


def test_file_with_unknown_key(tmp_path):
    path = tmp_path / "sgd.yaml"
    path.write_text("name: sgd\nlr: 0.1\nmomentun: 0.9\n")
    with pytest.raises(optorch.ConfigError, match="momentum"):
        optorch.build(path, make_params((2,)))


def test_config_of_wrong_type_is_rejected():
    with pytest.raises(TypeError):
        optorch.build(["adam"], make_params((2,)))


# ------------------------------------------------------------------------------------------------
# Config classes


@pytest.mark.parametrize("name", ALGORITHMS)
def test_config_is_frozen(name):
    config = registry.get(name).config()
    field = next(iter(type(config).model_fields))
    with pytest.raises(pydantic.ValidationError):
        setattr(config, field, getattr(config, field))
    assert hash(config) == hash(registry.get(name).config())


@pytest.mark.parametrize("name", ALGORITHMS)
def test_config_rejects_unknown_fields(name):
    with pytest.raises(pydantic.ValidationError):
        registry.get(name).config(not_a_hyperparameter=1.0)


@pytest.mark.parametrize("name", TORCH_ALGORITHMS)
def test_config_fields_are_torch_keyword_names(name):
    fields = set(registry.get(name).config.model_fields)
    assert fields == set(torch_keywords(name))


@pytest.mark.parametrize("name", TORCH_ALGORITHMS)
def test_config_defaults_are_torch_defaults(name):
    keywords = torch_keywords(name)
    config = registry.get(name).config(**{key: p.default for key, p in keywords.items()})
    assert config == registry.get(name).config()
    for key, parameter in keywords.items():
        assert getattr(config, key) == parameter.default, key


def test_yaml_exponent_floats_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "adam.yaml"
    path.write_text("name: adam\nlr: 3e-4\neps: 1E-10\nweight_decay: -0e0\n")
    config = optorch.load_config(path)
    assert config == {"name": "adam", "lr": 3e-4, "eps": 1e-10, "weight_decay": 0.0}
    assert optorch.parse_config(path)[1].lr == 3e-4


@pytest.mark.parametrize("value", ["yes", 1, "true", None])
def test_flags_accept_only_booleans(value):
    with pytest.raises(pydantic.ValidationError, match="amsgrad"):
        optorch.adam.Config(amsgrad=value)


def test_a_misspelt_top_level_entry_is_suggested():
    with pytest.raises(optorch.ConfigError) as info:
        optorch.build({"name": "adamw", "clip_grad_nrom": 1.0}, make_params((2,)))
    message = str(info.value)
    assert (
        "did you mean 'clip_grad_norm'" in message and "top-level entries: schedule, adapt, clip_grad_norm" in message
    )
