"""From a config to an optimizer: ``files`` reads a YAML/JSON file, ``spec`` parses a config once into
one frozen :class:`Parsed`, ``make`` builds the shim (``build``) or the pure stepper
(``build_stepper``) from it."""

from ..core.errors import ConfigError
from .files import load_config
from .make import assemble, build, build_stepper, split_param_groups
from .spec import (
    ADAPTIVE_KEY,
    ENTRY_KEYS,
    SCHEDULE_KEY,
    Parsed,
    explain,
    parse,
    parse_adaptive,
    parse_combinators,
    parse_config,
    parse_schedules,
)

__all__ = [
    "ADAPTIVE_KEY",
    "ENTRY_KEYS",
    "SCHEDULE_KEY",
    "ConfigError",
    "Parsed",
    "assemble",
    "build",
    "build_stepper",
    "explain",
    "load_config",
    "parse",
    "parse_adaptive",
    "parse_combinators",
    "parse_config",
    "parse_schedules",
    "split_param_groups",
]
