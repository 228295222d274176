"""How the config reference shows one field: its type and constraints read from the pydantic field
info and validators, its default as a Python literal, its description (the field's docstring, else
its ``description``)."""

from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import annotated_types
from pydantic import AfterValidator, BaseModel, BeforeValidator
from pydantic.fields import FieldInfo

from ..core import config

__all__ = [
    "description",
    "field_docstrings",
    "literal",
    "model_anchor",
    "nested_models",
    "owner_of",
    "rst",
    "shown_type",
    "union_members",
]


# ------------------------------------------------------------------------------------------------
# types and constraints


def _number(value: Any) -> str:
    if isinstance(value, float):
        text = repr(value)
        if len(text) > 8 and float(f"{value:g}") == value:
            text = f"{value:g}"
        return re.sub(r"e([+-])0*(\d)", lambda m: f"e{'' if m.group(1) == '+' else '-'}{m.group(2)}", text)
    return repr(value)


def literal(value: Any) -> str:
    """A default as a Python literal, floats short (1e-8, not 1e-08)."""
    if isinstance(value, (tuple, list)):
        inner = ", ".join(literal(v) for v in value)
        return (
            f"({inner},)"
            if isinstance(value, tuple) and len(value) == 1
            else (f"({inner})" if isinstance(value, tuple) else f"[{inner}]")
        )
    if isinstance(value, BaseModel):
        return f"{type(value).__name__}()"
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (int, float)):
        return _number(value)
    return repr(value)


@dataclass
class _Bounds:
    low: Any = None
    low_open: bool = False
    high: Any = None
    high_open: bool = False

    def text(self) -> str | None:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return None


def _constraints(metadata: list[Any]) -> tuple[bool, list[str]]:
    """(whether the metadata make the value a Scalar, the constraints they state)."""
    scalar, texts, bounds, finite = False, [], _Bounds(), False
    for item in metadata:
        if isinstance(item, FieldInfo):
            inner_scalar, inner = _constraints(list(item.metadata))
            scalar, texts = scalar or inner_scalar, texts + inner
        elif isinstance(item, BeforeValidator) and item.func is config._coerce_scalar:
            scalar = True
        elif isinstance(item, AfterValidator) and hasattr(item.func, "constraint"):
            texts.append(item.func.constraint)
        elif isinstance(item, annotated_types.Ge):
            bounds.low, bounds.low_open = item.ge, False
        elif isinstance(item, annotated_types.Gt):
            bounds.low, bounds.low_open = item.gt, True
        elif isinstance(item, annotated_types.Le):
            bounds.high, bounds.high_open = item.le, False
        elif isinstance(item, annotated_types.Lt):
            bounds.high, bounds.high_open = item.lt, True
        elif getattr(item, "allow_inf_nan", None) is False:
            finite = True
    if finite and (bounds.low is None or bounds.high is None):  # an interval says finite already
        texts.insert(0, "finite")
    if bounds.text():
        texts.insert(0, bounds.text())
    return scalar, texts


def shown_type(annotation: Any, metadata: list[Any] = ()) -> tuple[str, list[str]]:
    """(the type as the page shows it, its constraints) of a field's annotation and metadata."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return shown_type(args[0], [*args[1:], *metadata])
    scalar, constraints = _constraints(list(metadata))
    if scalar:
        return "scalar", constraints
    if annotation is type(None):
        return "None", constraints
    if origin in (typing.Union, types.UnionType):
        models = [arg for arg in args if isinstance(arg, type) and issubclass(arg, BaseModel)]
        if len(models) > 2 and len(models) == len(args):  # a discriminated union: one of several configs
            return "config (`name`: " + ", ".join(
                f"[{owner_of(m)}](#{model_anchor(m)})" for m in models
            ) + ")", constraints
        parts = [shown_type(arg) for arg in args]
        inner = [c for _, cs in parts for c in cs]
        return " or ".join(t for t, _ in parts), constraints + list(dict.fromkeys(inner))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item, item_constraints = shown_type(args[0])
            return f"tuple of {item}", constraints + [f"each {c}" for c in item_constraints]
        parts = [shown_type(arg) for arg in args]
        kinds = [t for t, _ in parts]
        per_item = [cs for _, cs in parts]
        if all(cs == per_item[0] for cs in per_item) and per_item[0]:
            constraints = constraints + [f"each {c}" for c in per_item[0]]
        else:
            constraints = constraints + [f"item {i}: {', '.join(cs)}" for i, cs in enumerate(per_item) if cs]
        return f"({', '.join(kinds)})", constraints
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a!r}`" if not isinstance(a, str) else f'`"{a}"`' for a in args), constraints
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{model_anchor(annotation)})", constraints
    names = {bool: "bool", int: "int", float: "float", str: "str", Any: "any"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation))), constraints


def nested_models(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from nested_models(arg)


def union_members(models: Any) -> list[type[BaseModel]]:
    if isinstance(models, type) and issubclass(models, BaseModel):
        return [models]
    return list(dict.fromkeys(nested_models(models)))


# ------------------------------------------------------------------------------------------------
# descriptions


@functools.cache
def field_docstrings(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from string literals right after annotated assignments, over the MRO."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass in (object, BaseModel) or not issubclass(klass, BaseModel):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                found[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return found


def rst(text: str) -> str:
    """reST inline markup of docstrings as Markdown: :math:`x` and ``x`` become `x`."""
    text = re.sub(r":(?:math|func|class|mod|data|meth):`~?([^`]*)`", r"`\1`", text)
    return text.replace("``", "`")


def description(owner: str, name: str, info: FieldInfo, docstrings: dict[str, str]) -> str | None:
    """A field's description: its docstring, else its ``description`` (``Field(description=)``, or the
    shared one of its name: :data:`optorch.core.config.SHARED_DESCRIPTIONS`,
    :data:`optorch.schedules.base.FIELD_DESCRIPTIONS`)."""
    text = docstrings.get(name) or info.description
    return rst(text) if text else None


def model_anchor(model: type[BaseModel]) -> str:
    """The id of a model's table heading (set explicitly, with attr_list, so links never guess)."""
    return f"{public_module(model)}-{model.__name__}".lower()


def public_module(model: type[BaseModel]) -> str:
    """The public module a model is known by (``optorch.<this>``), which anchors stay named after
    wherever in the layers its code lives: a schedule's is ``schedules``, the combinator entries'
    ``combinators``, an algorithm's its own name."""
    parts = model.__module__.split(".")
    if parts[1] == "schedules":
        return "schedules"
    return {"settings": "combinators"}.get(parts[-1], parts[-1])


def owner_of(model: type[BaseModel]) -> str:
    name = model.model_fields.get("name")
    return name.default if name is not None and isinstance(name.default, str) else model.__name__
