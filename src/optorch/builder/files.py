"""Reading config files: one strict loader for YAML and JSON.

A config file is a mapping of names to values, a few hundred bytes. :func:`load_config` reads one so
that nothing in it is silently reinterpreted or allowed to blow up:

* **YAML 1.2, core schema.** Booleans are ``true``/``True``/``TRUE`` and the false forms only, so
  ``yes``, ``on`` and ``off`` stay strings (which a flag then refuses); numbers are decimal, ``0o``
  octal or ``0x`` hex integers and decimal floats with or without a dot (``1e-3``), ``.inf`` and
  ``.nan``, so ``1:30`` (YAML 1.1's sexagesimal 90), ``010`` (1.1's octal 8), ``1_000`` and dates are not
  numbers. No merge keys (``<<``).
* **JSON, strict.** No ``NaN``/``Infinity`` literals (not JSON).
* **Duplicate keys are errors**, in both (the last one silently won), and keys must be strings.
* **Bounded.** At most :data:`MAX_BYTES` bytes, nested at most :data:`MAX_DEPTH` deep, and a YAML
  file may expand to at most :data:`MAX_VALUES` values, its aliases counted at every use (300 bytes of
  nested aliases otherwise expand to tens of millions of numbers). Reading the largest allowed file
  takes well under a second and a few MB.

Every error is a :class:`ConfigError` that names the file and, for YAML, the line. :func:`key_lines`
finds the line of a key, so that errors found later (a value out of range) can name it too.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ..core.errors import ConfigError, shown

__all__ = ["MAX_BYTES", "MAX_VALUES", "key_lines", "load_config", "where"]

MAX_BYTES = 64 * 1024
"""The largest config file read (64 KiB; the repository's largest config is under 2 KiB)."""
MAX_VALUES = 10_000
"""The most values (mappings, lists and scalars) a YAML file may expand to, aliases counted per use."""
MAX_DEPTH = 64
"""The deepest nesting of mappings and lists in a YAML file (a config nests three or four deep)."""


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a config dict from a ``.yaml``/``.yml`` or ``.json`` file (see the module docs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"{path}: config files must end in .yaml, .yml or .json")
    text = _read(path)
    try:
        data = _json(text) if suffix == ".json" else yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        problem = " ".join(part for part in (error.context, error.problem) if part)
        raise ConfigError(f"{path}{_line(mark)}: {problem}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}, line {error.lineno}: {error.msg} (column {error.colno})") from None
    except (yaml.YAMLError, ValueError) as error:  # ConfigError from JSON's hooks; ValueError: an int of 4300+ digits
        raise ConfigError(f"{path}: {error}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def where(path: str | os.PathLike, key: Sequence[Any] = ()) -> str:
    """``"file"``, or ``"file, line N"`` with the line of ``key`` (a path of keys and list indices,
    as pydantic's error locations; its longest prefix found in the file gives the line)."""
    lines = key_lines(path) if key else {}
    key = tuple(key)
    for end in range(len(key), 0, -1):
        if key[:end] in lines:
            return f"{path}, line {lines[key[:end]]}"
    return str(path)


def key_lines(path: str | os.PathLike) -> dict[tuple, int]:
    """``{key path: line}`` (1-based) of every mapping key and list item in a config file; empty when
    the file cannot be read. JSON is read as YAML here, which it nearly always is."""
    try:
        root = yaml.compose(_read(Path(path)), Loader=_Loader)
    except (yaml.YAMLError, ConfigError, OSError, RecursionError):
        return {}
    lines: dict[tuple, int] = {}
    pending = [((), root)] if root is not None else []
    while pending and len(lines) < MAX_VALUES:
        prefix, node = pending.pop()
        if isinstance(node, MappingNode):
            items = [(key.value, key, value) for key, value in node.value if isinstance(key, ScalarNode)]
        elif isinstance(node, SequenceNode):
            items = [(i, value, value) for i, value in enumerate(node.value)]
        else:
            continue
        for name, marked, value in items:
            path_ = (*prefix, name)
            if path_ not in lines:
                lines[path_] = marked.start_mark.line + 1
                pending.append((path_, value))
    return lines


# -- reading ---------------------------------------------------------------------------------------


def _read(path: Path) -> str:
    with open(path, "rb") as file:
        data = file.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_BYTES // 1024} KiB; a config file is a few hundred bytes")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {data[error.start]:#04x} at offset {error.start})") from None


def _line(mark: Any) -> str:
    return f", line {mark.line + 1}" if mark is not None else ""


def _json(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ConfigError(f"duplicate key {shown(key)}")
        seen.add(key)
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ConfigError(f"{name} is not JSON; numbers must be finite")


# -- YAML 1.2's core schema ------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's core-schema scalars, no duplicate or non-string keys, and
    a bound on what aliases expand to."""

    yaml_implicit_resolvers: dict = {}  # filled below with the core schema's only
    _depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        # PyYAML recurses per level, slowly: 5000 levels take seconds to reach Python's limit
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} deep", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: Node) -> Any:
        _count_values(node, {})
        return super().construct_document(node)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        first: dict[str, int] = {}
        for key, _ in node.value:
            if not (isinstance(key, ScalarNode) and key.tag == "tag:yaml.org,2002:str"):
                raise yaml.constructor.ConstructorError(
                    None, None, f"keys must be names (strings), got {shown(key.value)}", key.start_mark
                )
            line = key.start_mark.line + 1
            if key.value in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {shown(key.value)} (first on line {first[key.value]})", key.start_mark
                )
            first[key.value] = line
        return super().construct_mapping(node, deep)

    def construct_yaml_bool(self, node: ScalarNode) -> bool:
        value = self.construct_scalar(node)
        if value not in _BOOLS:
            raise yaml.constructor.ConstructorError(
                None, None, f"{shown(value)} is not a YAML 1.2 boolean (true or false)", node.start_mark
            )
        return _BOOLS[value]

    def construct_yaml_int(self, node: ScalarNode) -> int:
        value = self.construct_scalar(node)
        if not _INT.fullmatch(value):
            raise yaml.constructor.ConstructorError(
                None, None, f"{shown(value)} is not a YAML 1.2 integer", node.start_mark
            )
        for prefix, base in (("0o", 8), ("0x", 16)):
            if value.startswith(prefix):
                return int(value[2:], base)
        return int(value)

    def construct_yaml_float(self, node: ScalarNode) -> float:
        value = self.construct_scalar(node)
        if not _FLOAT.fullmatch(value):
            raise yaml.constructor.ConstructorError(
                None, None, f"{shown(value)} is not a YAML 1.2 number", node.start_mark
            )
        special = value.lstrip("+-").lower()
        if special in (".inf", ".nan"):
            return float(value.replace(".", "", 1))
        return float(value)


_BOOLS = {form: value for value in (True, False) for form in (str(value).lower(), str(value), str(value).upper())}
_INT = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.nan|\.NaN|\.NAN")
_CORE = (  # tag, pattern, the characters a value may start with ("" for the empty value, null)
    ("tag:yaml.org,2002:null", r"~|null|Null|NULL|", [*"~nN", ""]),
    ("tag:yaml.org,2002:bool", r"true|True|TRUE|false|False|FALSE", [*"tTfF"]),
    ("tag:yaml.org,2002:int", _INT.pattern, [*"-+0123456789"]),
    ("tag:yaml.org,2002:float", _FLOAT.pattern, [*"-+0123456789."]),
)
for _tag, _pattern, _first in _CORE:
    _Loader.add_implicit_resolver(_tag, re.compile(f"^(?:{_pattern})$"), _first)
_Loader.add_constructor("tag:yaml.org,2002:bool", _Loader.construct_yaml_bool)
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)


def _count_values(node: Node, sizes: dict[int, int | None]) -> int:
    """The number of values ``node`` stands for, each alias counted at each use (memoised, so
    linear in the file); raises past :data:`MAX_VALUES` or on an alias inside itself."""
    known = sizes.get(id(node), 0)
    if known is None:
        raise yaml.composer.ComposerError(
            None, None, "an alias refers to a value that contains it (a recursive alias)", node.start_mark
        )
    if known:
        return known
    sizes[id(node)] = None
    children = (
        [n for pair in node.value for n in pair]
        if isinstance(node, MappingNode)
        else node.value
        if isinstance(node, SequenceNode)
        else []
    )
    total = 1
    for child in children:
        total += _count_values(child, sizes)
        if total > MAX_VALUES:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"expands to more than {MAX_VALUES} values (aliases of aliases?); a config is a few dozen",
                node.start_mark,
            )
    sizes[id(node)] = total
    return total
