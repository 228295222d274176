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

import contextlib
import os
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import pydantic

from . import adaptive, combinators, distributed, registry, schedules
from .algorithm import Algorithm
from .config import Config, did_you_mean, first_location, problems, shown
from .configfile import ConfigError, load_config, where
from .schedules import Schedule

__all__ = ["ENTRY_KEYS", "ConfigError", "Parsed", "assemble", "build", "explain", "load_config", "parse", "parse_adaptive", "parse_combinators", "parse_config", "parse_schedules"]


def parse_config(config: Mapping[str, Any] | Config | str | os.PathLike) -> tuple[Algorithm, Config]:
    """Resolve a config dict, Config instance or file path into ``(algorithm, validated config)``
    (the top-level entries are checked and left out: :func:`parse_schedules`, :func:`parse_adaptive`
    and :func:`parse_combinators` read them)."""
    if isinstance(config, Config):
        return registry.for_config(config), config
    with _naming_the_file(config):
        raw = _as_dict(config)
        values = {key: value for key, value in raw.items() if key not in ENTRY_KEYS}  # parse_schedules, ... read those
        if "name" not in values:
            raise ConfigError(f"config needs a 'name' key naming the optimizer, one of: {', '.join(registry.names())}")
        name = values.pop("name")
        if not isinstance(name, str):
            raise ConfigError(f"'name' must be a string naming the optimizer, got {shown(name)}", key=("name",))
        algorithm = registry.get(name)
        valid = [*algorithm.config.model_fields, *algorithm.config.accepted_keys]
        unknown = [key for key in values if key not in valid]
        if unknown:
            hints = [f"{shown(key)}{did_you_mean(key, [*valid, *ENTRY_KEYS])}" for key in unknown]
            raise ConfigError(f"unknown key(s) for {algorithm.name}: {', '.join(hints)}. Valid keys: name, {', '.join(valid)}; "
                              f"top-level entries: {', '.join(ENTRY_KEYS)}", key=(unknown[0],))
        parsed = algorithm, algorithm.config(**values)
        parse_schedules(raw, parsed[1])
        parse_combinators(raw, parsed)
        parse_adaptive(raw, parsed[1])
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
    with _naming_the_file(config):
        raw = _as_dict(config)
        entry = raw.get(SCHEDULE_KEY) or {}
        if not isinstance(entry, Mapping):
            raise ConfigError(f"'{SCHEDULE_KEY}' must map hyperparameter names to schedule configs, got {type(entry).__name__}", key=(SCHEDULE_KEY,))
        if parsed is None:
            parsed = parse_config(raw)[1]
        values = parsed.hyperparameters()
        for name in entry:
            if name not in values or isinstance(values[name], bool) or not isinstance(values[name], (int, float)):
                scalars = [k for k, v in values.items() if isinstance(v, float)]
                raise ConfigError(f"'{SCHEDULE_KEY}': {shown(name)} is not a scalar hyperparameter of this optimizer; schedulable: {', '.join(scalars)}",
                                  key=(SCHEDULE_KEY, name))
        result = {}
        for name, schedule in entry.items():
            try:
                result[name] = schedules.from_config(schedule)
            except pydantic.ValidationError as error:
                raise ConfigError(f"'{SCHEDULE_KEY}.{name}': {problems(error)}", key=(SCHEDULE_KEY, name, *first_location(error))) from None
            except (ValueError, TypeError) as error:
                raise ConfigError(f"'{SCHEDULE_KEY}.{name}': {error}", key=(SCHEDULE_KEY, name)) from None
            try:  # its first value, now; a later one out of range fails the step that would use it
                parsed.replace(**{name: result[name](0)})
            except pydantic.ValidationError as error:
                raise ConfigError(f"'{SCHEDULE_KEY}.{name}': its value at step 0 is refused: {problems(error)}", key=(SCHEDULE_KEY, name)) from None
        return result


def parse_combinators(config: Mapping[str, Any] | Config | str | os.PathLike, parsed: tuple[Algorithm, Config] | None = None) -> combinators.Combinators | None:
    """The config's ``clip_grad_norm``, ``skip_nonfinite``, ``accumulate_steps``, ``ema`` and
    ``param_groups`` entries, validated (:class:`optorch.combinators.Combinators`); None if it has none."""
    if isinstance(config, Config):
        return None
    with _naming_the_file(config):
        values = _as_dict(config)
        try:
            return combinators.Combinators.from_config(values, *(parsed or parse_config(values)))
        except pydantic.ValidationError as error:
            raise ConfigError(problems(error), key=first_location(error)) from None
        except ValueError as error:
            raise ConfigError(str(error), key=getattr(error, "key", ())) from None


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
    with _naming_the_file(config):
        values = _as_dict(config)
        entry = values.get(ADAPTIVE_KEY)
        if entry is None:
            return None
        if not isinstance(entry, (Mapping, adaptive.AdaptiveConfig)):
            raise ConfigError(f"'{ADAPTIVE_KEY}' must map AdaptiveOpt keys (lr_rule, momentum_rule, ...) to values, got {shown(entry)}", key=(ADAPTIVE_KEY,))
        try:
            rules = adaptive.parse_entry(entry)
        except pydantic.ValidationError as error:
            raise ConfigError(f"'{ADAPTIVE_KEY}': {problems(error)}", key=(ADAPTIVE_KEY, *first_location(error))) from None
        except ValueError as error:
            raise ConfigError(f"'{ADAPTIVE_KEY}': {error}", key=(ADAPTIVE_KEY,)) from None
        if parsed is None:
            parsed = parse_config(values)[1]
        places = adaptive.locations(parsed.hyperparameters())
        scheduled = values.get(SCHEDULE_KEY) or {}
        for knob in rules.rules():
            if knob not in places:
                raise ConfigError(f"'{ADAPTIVE_KEY}': a rule for {knob}, which this optimizer does not have (it has {', '.join(places) or 'none'})",
                                  key=(ADAPTIVE_KEY,))
            if places[knob][0] in scheduled:
                raise ConfigError(f"'{ADAPTIVE_KEY}': a rule for {knob}, which '{SCHEDULE_KEY}' also sets; use one of them", key=(ADAPTIVE_KEY,))
        return rules


def explain(error: BaseException) -> str:
    """A config error in one line: what is wrong, where (for a file: the file and the line of the
    key, which a ``pydantic.ValidationError`` of a file's config carries as a note)."""
    if isinstance(error, pydantic.ValidationError):
        notes = getattr(error, "__notes__", [])
        return f"{notes[0]}: {problems(error)}" if notes else problems(error)
    return " ".join(str(error).split())


def _as_dict(config: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, an optorch Config or a file path, got {type(config).__name__}")
    return dict(config)


@contextlib.contextmanager
def _naming_the_file(config: Any, values: bool = True) -> Iterator[None]:
    """For a config read from a file, errors name it, and the line of the key at fault: a
    ``ConfigError`` (or an unknown name) in its message, a ``pydantic.ValidationError`` in a note
    (its type, which names the field, stays the contract; ``explain`` puts both in one line).
    ``values=False``: a ValidationError is not the file's (a param group's value, in ``build``)."""
    if not isinstance(config, (str, os.PathLike)):
        yield
        return
    try:
        yield
    except pydantic.ValidationError as error:
        if values and not getattr(error, "__notes__", None):
            error.add_note(where(config, first_location(error)))
        raise
    except (ConfigError, registry.UnknownOptimizerError) as error:
        if str(error).startswith(str(config)):
            raise
        key = getattr(error, "key", ("name",))
        raise type(error)(f"{where(config, key)}: {error}", **({"key": key} if isinstance(error, ConfigError) else {})) from None


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
    parsed = parse(config)
    with _naming_the_file(config, values=False):  # a param_groups pattern that matches none of the params' names
        return assemble(params, parsed.algorithm, parsed.config, engine=engine, schedules=parsed.schedules, settings=parsed.settings, rules=parsed.rules,
                        partition_group=partition_group, into=into)


class Parsed(NamedTuple):
    """Every part of a config, validated (:func:`parse`)."""

    algorithm: Algorithm
    config: Config
    schedules: dict[str, Schedule]
    settings: combinators.Combinators | None
    """The combinator entries."""
    rules: adaptive.AdaptiveConfig | None
    """The ``adapt`` entry."""


def parse(config: Mapping[str, Any] | Config | str | os.PathLike) -> Parsed:
    """Every part of a config dict, Config or file, validated; a file is read once. What :func:`build`
    assembles an optimizer from; a checker for configs (in CI, ``optorch compare``)."""
    with _naming_the_file(config):
        values = config if isinstance(config, Config) else _as_dict(config)
        algorithm, parsed = parse_config(values)
        return Parsed(algorithm, parsed, parse_schedules(values, parsed), parse_combinators(values, (algorithm, parsed)), parse_adaptive(values, parsed))


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
