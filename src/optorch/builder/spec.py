"""A config, parsed once: a config dict, a Config, or a YAML/JSON file, read and validated into one
frozen :class:`Parsed` value that every consumer takes (``optorch.build``, ``optorch.build_stepper``,
``optorch compare``, the docs generator). A file is read once, each entry validated once.

A config dict names the algorithm and uses the keyword names of its constructor::

    optorch.build({"name": "adamw", "lr": 1e-3, "weight_decay": 0.01}, model.parameters())
    optorch.build("configs/adam.yaml", model.parameters())

Top-level entries besides the algorithm's keys configure what surrounds it (:data:`ENTRY_KEYS`):
``schedule`` (schedules of its hyperparameters), ``adapt`` (adaptive rules, an attached
:class:`optorch.AdaptiveOpt`) and the combinators ``clip_grad_norm``, ``skip_nonfinite``,
``accumulate_steps``, ``ema``, ``param_groups`` and ``amp``; each is validated by its own model.

Errors are specific: an unknown name lists the known ones with the closest match, an unknown key lists
the valid keys, and an invalid value raises ``pydantic.ValidationError`` naming the field.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import pydantic

from .. import schedules
from ..algorithms import registry
from ..core.algorithm import Algorithm
from ..core.config import Config
from ..core.errors import ConfigError, first_location, problems, shown, suggest
from ..functional import adaptive
from ..functional.knobs import locations
from ..functional.settings import KEYS as COMBINATOR_KEYS
from ..functional.settings import Combinators
from ..schedules import Schedule
from .files import load_config, where

__all__ = [
    "ENTRY_KEYS",
    "Parsed",
    "explain",
    "parse",
    "parse_adaptive",
    "parse_combinators",
    "parse_config",
    "parse_schedules",
]

SCHEDULE_KEY = "schedule"
ADAPTIVE_KEY = "adapt"
ENTRY_KEYS = (SCHEDULE_KEY, ADAPTIVE_KEY, *COMBINATOR_KEYS)
"""Top-level entries that configure what surrounds the algorithm (its schedules, adaptive rules and
combinators) rather than the algorithm itself."""


class Parsed(NamedTuple):
    """Every part of a config, validated (:func:`parse`): what everything downstream consumes."""

    algorithm: Algorithm
    config: Config
    schedules: dict[str, Schedule]
    """The ``schedule`` entry: hyperparameter name -> schedule."""
    settings: Combinators | None
    """The combinator entries (``param_groups`` among them); None when the config has none."""
    rules: adaptive.AdaptiveConfig | None
    """The ``adapt`` entry."""


def parse(config: Mapping[str, Any] | Config | str | os.PathLike) -> Parsed:
    """Every part of a config dict, Config or file, validated: the algorithm's keys, then ``schedule``,
    the combinator entries and ``adapt``, each once. A file is read once. What :func:`optorch.build`
    assembles an optimizer from; a checker for configs (in CI, ``optorch compare``)."""
    if isinstance(config, Config):
        return Parsed(registry.for_config(config), config, {}, None, None)
    with _naming_the_file(config):
        raw = _as_dict(config)
        algorithm, values = _algorithm(raw)
        return Parsed(
            algorithm, values, _schedules(raw, values), _combinators(raw, algorithm, values), _adaptive(raw, values)
        )


def parse_config(config: Mapping[str, Any] | Config | str | os.PathLike) -> tuple[Algorithm, Config]:
    """Resolve a config dict, Config instance or file path into ``(algorithm, validated config)``; the
    top-level entries are validated too (:func:`parse` has them all)."""
    parsed = parse(config)
    return parsed.algorithm, parsed.config


def parse_schedules(
    config: Mapping[str, Any] | Config | str | os.PathLike, parsed: Config | None = None
) -> dict[str, Schedule]:
    """The config's ``schedule`` entry, ``{hyperparameter: schedule config}``, as validated schedules::

    {"name": "adam", "lr": 3e-4, "schedule": {"lr": {"name": "cosine", "init_value": 3e-4,
                                                      "warmup_steps": 500, "decay_steps": 10000}}}
    """
    return _one_entry(config, parsed, _schedules, "schedules")


def parse_combinators(
    config: Mapping[str, Any] | Config | str | os.PathLike, parsed: tuple[Algorithm, Config] | None = None
) -> Combinators | None:
    """The config's ``clip_grad_norm``, ``skip_nonfinite``, ``accumulate_steps``, ``ema``, ``amp`` and
    ``param_groups`` entries, validated (:class:`optorch.functional.settings.Combinators`); None if it
    has none."""
    return _one_entry(config, parsed, lambda raw, given: _combinators(raw, *given), "settings")


def parse_adaptive(
    config: Mapping[str, Any] | Config | str | os.PathLike, parsed: Config | None = None
) -> adaptive.AdaptiveConfig | None:
    """The config's ``adapt`` entry (a mapping of :class:`optorch.AdaptiveConfig` keys) validated, or
    None::

        {"name": "sgd", "lr": 0.1, "momentum": 0.9,
         "adapt": {"lr_rule": "trend+cosine_restart", "momentum_rule": "relative", "cycle_length": 200}}

    A rule for a knob the optimizer lacks, or for a hyperparameter the ``schedule`` entry also sets,
    is an error.
    """
    return _one_entry(config, parsed, _adaptive, "rules")


def _one_entry(config: Any, parsed: Any, read: Any, field: str) -> Any:
    """One entry of a config: with the algorithm's config already parsed, that entry alone; else
    :func:`parse`'s (which validates the whole config once)."""
    if parsed is None or isinstance(config, Config):
        return getattr(parse(config), field)
    with _naming_the_file(config):
        return read(_as_dict(config), parsed)


def _algorithm(raw: Mapping[str, Any]) -> tuple[Algorithm, Config]:
    values = {key: value for key, value in raw.items() if key not in ENTRY_KEYS}  # the entries have their own parsers
    if "name" not in values:
        raise ConfigError(f"config needs a 'name' key naming the optimizer, one of: {', '.join(registry.names())}")
    name = values.pop("name")
    if not isinstance(name, str):
        raise ConfigError(f"'name' must be a string naming the optimizer, got {shown(name)}", key=("name",))
    algorithm = registry.get(name)
    valid = [*algorithm.config.model_fields, *algorithm.config.accepted_keys]
    unknown = [key for key in values if key not in valid]
    if unknown:
        hints = [f"{shown(key)}{suggest(key, [*valid, *ENTRY_KEYS])}" for key in unknown]
        raise ConfigError(
            f"unknown key(s) for {algorithm.name}: {', '.join(hints)}. Valid keys: name, {', '.join(valid)}; "
            f"top-level entries: {', '.join(ENTRY_KEYS)}",
            key=(unknown[0],),
        )
    return algorithm, algorithm.config(**values)


def _schedules(raw: Mapping[str, Any], parsed: Config) -> dict[str, Schedule]:
    entry = raw.get(SCHEDULE_KEY) or {}
    if not isinstance(entry, Mapping):
        raise ConfigError(
            f"'{SCHEDULE_KEY}' must map hyperparameter names to schedule configs, got {type(entry).__name__}",
            key=(SCHEDULE_KEY,),
        )
    values = parsed.hyperparameters()
    for name in entry:
        if name not in values or isinstance(values[name], bool) or not isinstance(values[name], (int, float)):
            scalars = [k for k, v in values.items() if isinstance(v, float)]
            raise ConfigError(
                f"'{SCHEDULE_KEY}': {shown(name)} is not a scalar hyperparameter of this optimizer; schedulable: "
                f"{', '.join(scalars)}",
                key=(SCHEDULE_KEY, name),
            )
    result = {}
    for name, schedule in entry.items():
        try:
            result[name] = schedules.from_config(schedule)
        except pydantic.ValidationError as error:
            raise ConfigError(
                f"'{SCHEDULE_KEY}.{name}': {problems(error)}", key=(SCHEDULE_KEY, name, *first_location(error))
            ) from None
        except (ValueError, TypeError) as error:
            raise ConfigError(f"'{SCHEDULE_KEY}.{name}': {error}", key=(SCHEDULE_KEY, name)) from None
        try:  # its first value, now; a later one out of range fails the step that would use it
            parsed.replace(**{name: result[name](0)})
        except pydantic.ValidationError as error:
            raise ConfigError(
                f"'{SCHEDULE_KEY}.{name}': its value at step 0 is refused: {problems(error)}", key=(SCHEDULE_KEY, name)
            ) from None
    return result


def _combinators(raw: Mapping[str, Any], algorithm: Algorithm, parsed: Config) -> Combinators | None:
    try:
        return Combinators.from_config(raw, algorithm, parsed)
    except pydantic.ValidationError as error:
        raise ConfigError(problems(error), key=first_location(error)) from None
    except ValueError as error:
        raise ConfigError(str(error), key=getattr(error, "key", ())) from None


def _adaptive(raw: Mapping[str, Any], parsed: Config) -> adaptive.AdaptiveConfig | None:
    entry = raw.get(ADAPTIVE_KEY)
    if entry is None:
        return None
    if not isinstance(entry, (Mapping, adaptive.AdaptiveConfig)):
        raise ConfigError(
            f"'{ADAPTIVE_KEY}' must map AdaptiveOpt keys (lr_rule, momentum_rule, ...) to values, got {shown(entry)}",
            key=(ADAPTIVE_KEY,),
        )
    try:
        rules = adaptive.parse_entry(entry)
    except pydantic.ValidationError as error:
        raise ConfigError(f"'{ADAPTIVE_KEY}': {problems(error)}", key=(ADAPTIVE_KEY, *first_location(error))) from None
    except ValueError as error:
        raise ConfigError(f"'{ADAPTIVE_KEY}': {error}", key=(ADAPTIVE_KEY,)) from None
    places = locations(parsed.hyperparameters())
    scheduled = raw.get(SCHEDULE_KEY) or {}
    for knob in rules.rules():
        if knob not in places:
            raise ConfigError(
                f"'{ADAPTIVE_KEY}': a rule for {knob}, which this optimizer does not have (it has "
                f"{', '.join(places) or 'none'})",
                key=(ADAPTIVE_KEY,),
            )
        if places[knob][0] in scheduled:
            raise ConfigError(
                f"'{ADAPTIVE_KEY}': a rule for {knob}, which '{SCHEDULE_KEY}' also sets; use one of them",
                key=(ADAPTIVE_KEY,),
            )
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
        raise type(error)(
            f"{where(config, key)}: {error}", **({"key": key} if isinstance(error, ConfigError) else {})
        ) from None
