"""Build a torch.optim-compatible optimizer from a config dict, a Config, or a YAML/JSON file.

A config dict names the algorithm and uses the keyword names of its constructor::

    optorch.build({"name": "adamw", "lr": 1e-3, "weight_decay": 0.01}, model.parameters())
    optorch.build("configs/adam.yaml", model.parameters())

Top-level entries besides the algorithm's keys configure what surrounds it (:data:`ENTRY_KEYS`):
``schedule`` (schedules of its hyperparameters), ``adapt`` (adaptive rules, an attached
:class:`optorch.AdaptiveOpt`) and the combinators ``clip_grad_norm``, ``skip_nonfinite``,
``accumulate_steps``, ``ema``, ``param_groups`` and ``amp``; each is validated by its own parser.

Errors are specific: an unknown name lists the known ones with the closest match, an unknown key lists
the valid keys, and an invalid value raises ``pydantic.ValidationError`` naming the field.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import pydantic
import yaml

from . import adaptive, combinators, distributed, registry, schedules
from .algorithm import Algorithm
from .config import Config
from .schedules import Schedule

__all__ = ["ENTRY_KEYS", "ConfigError", "assemble", "build", "load_config", "parse_adaptive", "parse_combinators", "parse_config", "parse_schedules"]


class ConfigError(ValueError):
    """A config dict or file that cannot be turned into an optimizer config."""


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float, as YAML 1.2 does (YAML 1.1 wants ``1.0e-3``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a config dict from a ``.yaml``/``.yml`` or ``.json`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        data = yaml.load(text, Loader=_YamlLoader)
    elif path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        raise ConfigError(f"{path}: config files must end in .yaml, .yml or .json")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_config(config: Mapping[str, Any] | Config | str | os.PathLike) -> tuple[Algorithm, Config]:
    """Resolve a config dict, Config instance or file path into ``(algorithm, validated config)``
    (the top-level entries are checked and left out: :func:`parse_schedules`, :func:`parse_adaptive`
    and :func:`parse_combinators` read them)."""
    if isinstance(config, Config):
        return registry.for_config(config), config
    values = _as_dict(config)
    for key in ENTRY_KEYS:  # the surroundings' entries: parse_schedules, ... read them
        values.pop(key, None)
    if "name" not in values:
        raise ConfigError(f"config needs a 'name' key naming the optimizer, one of: {', '.join(registry.names())}")
    algorithm = registry.get(values.pop("name"))
    valid = [*algorithm.config.model_fields, *algorithm.config.accepted_keys]
    unknown = [key for key in values if key not in valid]
    if unknown:
        known = [*valid, *ENTRY_KEYS]
        hints = [f"{key!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(key, known, n=1)) else repr(key) for key in unknown]
        raise ConfigError(f"unknown key(s) for {algorithm.name}: {', '.join(hints)}. Valid keys: name, {', '.join(valid)}; "
                          f"top-level entries: {', '.join(ENTRY_KEYS)}")
    parsed = algorithm, algorithm.config(**values)
    parse_schedules(config, parsed[1])
    parse_combinators(config, parsed)
    parse_adaptive(config, parsed[1])
    return parsed


SCHEDULE_KEY = "schedule"
ADAPTIVE_KEY = "adapt"
ENTRY_KEYS = (SCHEDULE_KEY, ADAPTIVE_KEY, *combinators.KEYS)
"""Top-level entries that configure what surrounds the algorithm (its schedules, adaptive rules and
combinators) rather than the algorithm itself."""


def parse_schedules(config: Mapping[str, Any] | Config | str | os.PathLike, parsed: Config | None = None) -> dict[str, Schedule]:
    """The config's ``schedule`` entry, ``{hyperparameter: schedule config}``, as validated schedules::

        {"name": "adam", "lr": 3e-4, "schedule": {"lr": {"name": "cosine", "init_value": 3e-4,
                                                          "warmup_steps": 500, "decay_steps": 10000}}}
    """
    if isinstance(config, Config):
        return {}
    entry = _as_dict(config).get(SCHEDULE_KEY) or {}
    if not isinstance(entry, Mapping):
        raise ConfigError(f"'{SCHEDULE_KEY}' must map hyperparameter names to schedule configs, got {type(entry).__name__}")
    if parsed is None:
        parsed = parse_config(config)[1]
    values = parsed.hyperparameters()
    for name in entry:
        if name not in values or isinstance(values[name], bool) or not isinstance(values[name], (int, float)):
            scalars = [k for k, v in values.items() if isinstance(v, float)]
            raise ConfigError(f"'{SCHEDULE_KEY}': {name!r} is not a scalar hyperparameter of this optimizer; schedulable: {', '.join(scalars)}")
    try:
        return {name: schedules.from_config(schedule) for name, schedule in entry.items()}
    except (ValueError, TypeError) as error:
        raise ConfigError(f"'{SCHEDULE_KEY}': {error}") from error


def parse_combinators(config: Mapping[str, Any] | Config | str | os.PathLike, parsed: tuple[Algorithm, Config] | None = None) -> combinators.Combinators | None:
    """The config's ``clip_grad_norm``, ``skip_nonfinite``, ``accumulate_steps``, ``ema`` and
    ``param_groups`` entries, validated (:class:`optorch.combinators.Combinators`); None if it has none."""
    if isinstance(config, Config):
        return None
    values = _as_dict(config)
    try:
        return combinators.Combinators.from_config(values, *(parsed or parse_config(values)))
    except ValueError as error:
        raise ConfigError(f"{_where(config)}{error}") from error


def _where(config: Any) -> str:
    return f"{config}: " if isinstance(config, (str, os.PathLike)) else ""




def parse_adaptive(config: Mapping[str, Any] | Config | str | os.PathLike, parsed: Config | None = None) -> adaptive.AdaptiveConfig | None:
    """The config's ``adapt`` entry (a mapping of :class:`optorch.AdaptiveConfig` keys) validated, or
    None::

        {"name": "sgd", "lr": 0.1, "momentum": 0.9,
         "adapt": {"lr_rule": "trend+cosine_restart", "momentum_rule": "relative", "cycle_length": 200}}

    A rule for a knob the optimizer lacks, or for a hyperparameter the ``schedule`` entry also sets,
    is an error.
    """
    if isinstance(config, Config):
        return None
    values = _as_dict(config)
    entry = values.get(ADAPTIVE_KEY)
    if entry is None:
        return None
    if not isinstance(entry, (Mapping, adaptive.AdaptiveConfig)):
        raise ConfigError(f"'{ADAPTIVE_KEY}' must map AdaptiveOpt keys (lr_rule, momentum_rule, ...) to values, got {entry!r}")
    try:
        rules = adaptive.parse_entry(entry)
    except pydantic.ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<entry>'}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"'{ADAPTIVE_KEY}': {problems}") from None
    except ValueError as error:
        raise ConfigError(f"'{ADAPTIVE_KEY}': {error}") from None
    if parsed is None:
        parsed = parse_config(config)[1]
    places = adaptive.locations(parsed.hyperparameters())
    scheduled = values.get(SCHEDULE_KEY) or {}
    for knob in rules.rules():
        if knob not in places:
            raise ConfigError(f"'{ADAPTIVE_KEY}': a rule for {knob}, which this optimizer does not have (it has {', '.join(places) or 'none'})")
        if places[knob][0] in scheduled:
            raise ConfigError(f"'{ADAPTIVE_KEY}': a rule for {knob}, which '{SCHEDULE_KEY}' also sets; use one of them")
    return rules


def _as_dict(config: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, an optorch Config or a file path, got {type(config).__name__}")
    return dict(config)


def build(config: Mapping[str, Any] | Config | str | os.PathLike, params: Iterable[Any], *, engine: str = "auto", partition_group: Any = None,
          into: Any = None):
    """A :class:`optorch.Optimizer` (a ``torch.optim.Optimizer``) for ``params``.

    ``params`` is what torch.optim accepts: an iterable of tensors, or of param-group dicts whose keys
    override the config for that group; or an ``nn.Module`` or ``model.named_parameters()``, which a
    ``param_groups`` entry needs (it matches names). ``engine`` picks how the step executes (see
    :class:`optorch.Optimizer`); the math is the algorithm's either way. ``partition_group``: the
    process group whose ranks each step a share of the params (ZeroRedundancyOptimizer's; see
    ``docs/distributed.md``). ``into``: an uninitialised instance of a subclass of
    :class:`optorch.Optimizer` to build (what the classes of :mod:`optorch.optim` do).
    """
    algorithm, parsed = parse_config(config)
    try:
        return assemble(params, algorithm, parsed, engine=engine, schedules=parse_schedules(config, parsed),
                        settings=parse_combinators(config, (algorithm, parsed)), rules=parse_adaptive(config, parsed),
                        partition_group=partition_group, into=into)
    except ConfigError as error:  # a param_groups pattern that matches none of the params' names
        raise ConfigError(f"{_where(config)}{error}") from error


def assemble(params: Iterable[Any], algorithm: Algorithm, config: Config, *, engine: str = "auto", schedules: Mapping[str, Schedule] | None = None,
             settings: combinators.Combinators | None = None, rules: adaptive.AdaptiveConfig | None = None, partition_group: Any = None,
             into: Any = None):
    """The optimizer for the parsed parts of a config (:func:`build` after parsing): ``settings`` are
    its combinator entries, ``rules`` its ``adapt`` entry."""
    from .shim import Optimizer

    if rules is not None and distributed.zero_owner() is not None:
        # ZeRO copies its own param groups into this optimizer's before each step: knobs written here would be undone
        raise ConfigError("an 'adapt' entry inside ZeroRedundancyOptimizer would adapt this rank's optimizer, whose param groups "
                          "ZeRO overwrites with its own before every step; build without 'adapt' and adapt ZeRO's: "
                          "optorch.AdaptiveOpt(zero_optimizer, config=optorch.builder.parse_adaptive(config))")
    try:
        params = combinators.torch_param_groups(params, settings)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    entries = sorted({key for group in params if isinstance(group, Mapping) for key in group if key in ENTRY_KEYS})
    if entries:  # a group key is an override: a scheduled lr set in every group would never be scheduled
        raise ConfigError(f"param groups set {', '.join(map(repr, entries))}: builder entries apply to the whole optimizer, not to a "
                          "group. (ZeroRedundancyOptimizer copies its keyword arguments into every param group: give entries to "
                          "functools.partial(optorch.optim.<Name>, ...) or functools.partial(optorch.build, config) instead.)")
    optimizer = into if into is not None else Optimizer.__new__(Optimizer)
    Optimizer.__init__(optimizer, params, algorithm, config, engine=engine, schedules=schedules, combinators=settings, partition_group=partition_group)
    if rules is not None:
        optimizer.adaptive = adaptive.AdaptiveOpt(optimizer, config=rules)  # its state rides in optimizer.state_dict()
    return optimizer
