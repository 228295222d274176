"""The config reference, ``docs/reference/config.md``, rendered from the pydantic schemas.

Every registered algorithm's ``Config``, every builder top-level entry in :data:`ENTRIES` (with each
model it accepts: every schedule for ``schedule:``) and every nested settings model becomes a table
of field, type, default, constraints and description. Types, defaults and bounds come from the
models' field info (``Field(ge=...)``, the validators of :mod:`optorch.config`), so the page cannot
drift from the code; a test compares the committed page with a fresh rendering. Regenerate with::

    python -m optorch.tools.docgen            # writes docs/reference/config.md
    python -m optorch.tools.docgen --check    # exit 1 if the committed page is stale

Descriptions come from a field's docstring (the string literal after it in the class body) or
``Field(description=...)``, which a name shared by many models takes from one table
(:data:`optorch.core.config.SHARED_DESCRIPTIONS`, :data:`optorch.schedules.base.FIELD_DESCRIPTIONS`).
The test requires one for every field.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .. import schedules
from ..algorithms import registry
from ..builder.spec import ADAPTIVE_KEY, SCHEDULE_KEY
from ..functional import adaptive, settings
from .docgen_fields import (
    description,
    field_docstrings,
    literal,
    model_anchor,
    nested_models,
    owner_of,
    rst,
    shown_type,
    union_members,
)

__all__ = ["ENTRIES", "Entry", "PAGE", "main", "render"]

PAGE = Path("docs/reference/config.md")
"""Where the page lives, relative to the repository root."""


@dataclass(frozen=True)
class Entry:
    """A top-level entry of a builder config besides the algorithm's own keys."""

    key: str
    shape: str
    """What the entry's value looks like, e.g. ``{hyperparameter: schedule config}``."""
    models: Any
    """A pydantic model, or a discriminated union of them (``Annotated[Union[...], ...]``): the
    config(s) the entry's values are validated with. Each gets a table."""
    text: str
    """What the entry does, in a sentence or two of Markdown."""


ENTRIES: tuple[Entry, ...] = (
    Entry(
        SCHEDULE_KEY,
        "{hyperparameter: schedule config}",
        schedules.AnySchedule,
        "Schedules a scalar hyperparameter of the algorithm (`lr`, `weight_decay`, ...): the shim sets it "
        "to `schedule(step)` before every step. A schedule config names its kind under `name`; the "
        "formulas are on the [schedules page](../schedules.md).",
    ),
    Entry(
        ADAPTIVE_KEY,
        "{AdaptiveOpt key: value}",
        adaptive.AdaptiveConfig,
        "Adapts lr, momentum, betas, alpha or weight decay online from the loss: the built optimizer "
        "carries an `optorch.AdaptiveOpt` as `optimizer.adaptive`; call `optimizer.adaptive.step_loss(loss)` "
        "before each step. The rules are on the [adaptive rules page](../rules.md).",
    ),
    Entry(
        ", ".join(settings.KEYS),
        "one top-level key each",
        settings.Combinators,
        "Run around the step: gradient clipping by global norm, skipping non-finite steps, gradient "
        "accumulation, a parameter EMA, param groups chosen by name pattern, and loss scaling. See the "
        "[combinators page](../combinators.md) and [mixed precision](../amp.md).",
    ),
)
"""The builder's top-level entries, one line each: add one here with the entry (the page lists them all)."""


def undescribed() -> list[str]:
    """``owner.field`` for every field of the page without a description."""
    missing = []
    for owner, model in _all_models():
        docstrings = field_docstrings(model)
        missing += [
            f"{owner}.{name}"
            for name, info in model.model_fields.items()
            if description(owner, name, info, docstrings) is None
        ]
    return missing


# ------------------------------------------------------------------------------------------------
# the page


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "", text.lower().replace(" ", "-"))


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _table(owner: str, model: type[BaseModel]) -> list[str]:
    docstrings = field_docstrings(model)
    fields = sorted(model.model_fields.items(), key=lambda item: item[0] != "name")  # the discriminator first
    lines = ["| key | type | default | constraints | description |", "|---|---|---|---|---|"]
    for name, info in fields:
        kind, constraints = shown_type(info.annotation, info.metadata)
        if info.default is not PydanticUndefined:
            default = f"`{literal(info.default)}`"
        elif info.default_factory is not None:
            default = f"`{literal(info.default_factory())}`"
        else:
            default = "required"
        text = description(owner, name, info, docstrings) or ""
        lines.append(
            f"| `{name}` | {_escape(kind)} | {_escape(default)} | {_escape(', '.join(constraints))} | {_escape(text)} |"
        )
    return lines


def _intro(model: type[BaseModel]) -> list[str]:
    doc = inspect.getdoc(model)
    if not doc or model.__doc__ is None or doc == inspect.getdoc(BaseModel) or "__doc__" not in model.__dict__:
        return []
    paragraphs = [" ".join(rst(paragraph).split()) for paragraph in doc.split("\n\n")]
    # a reST math block, inline or after a blank line, as a plain code block
    paragraphs = [
        re.sub(
            r"^(.*?):?\s*\.\. math::\s*(.+)$",
            lambda m: (m.group(1) + ":\n\n" if m.group(1) else "") + f"```\n{m.group(2)}\n```",
            p,
        )
        for p in paragraphs
    ]
    return [line for p in paragraphs for line in (p, "")]


def _nested_sections(owner: str, model: type[BaseModel], seen: set, level: int = 4) -> list[str]:
    """A section for each model nested in ``model``'s fields (once each), under ``level`` headings."""
    lines = []
    for info in model.model_fields.values():
        for nested in nested_models(info.annotation):
            if nested in seen:
                continue
            seen.add(nested)
            lines += [
                f"{'#' * level} {nested.__name__} {{#{model_anchor(nested)}}}",
                "",
                *_intro(nested),
                *_table(nested.__name__, nested),
                "",
            ]
            lines += _nested_sections(nested.__name__, nested, seen, level)
    return lines


def _all_models() -> Iterator[tuple[str, type[BaseModel]]]:
    """Every (owner, model) the page tabulates, nested settings included."""

    def with_nested(owner: str, model: type[BaseModel], seen: set) -> Iterator[tuple[str, type[BaseModel]]]:
        yield owner, model
        for info in model.model_fields.values():
            for nested in nested_models(info.annotation):
                if nested not in seen:
                    seen.add(nested)
                    yield from with_nested(nested.__name__, nested, seen)

    seen: set = set()
    for name in registry.names():
        yield from with_nested(name, registry.get(name).config, seen)
    for entry in ENTRIES:
        for model in union_members(entry.models):
            yield from with_nested(owner_of(model), model, seen)


_HEADER = """\
# Config reference

<!-- Generated by `python -m optorch.tools.docgen` from the pydantic schemas: do not edit by hand. -->

This page is generated from the configs' pydantic schemas (`python -m optorch.tools.docgen`), and a test
fails when it differs from the code, so it lists exactly what the code accepts.

## The builder config

`optorch.build(config, params)` and `optorch.parse_config(config)` take a config as a dict, a
`Config` instance, or a `.yaml`/`.yml`/`.json` file holding the same mapping:

```yaml
name: adamw              # the algorithm (case-insensitive): a section below
lr: 1.0e-3               # its fields, under the names of the tables below;
betas: [0.9, 0.95]       #   keys left out take the defaults
weight_decay: 0.01
schedule:                # optional top-level entries (listed below)
  lr: {name: cosine, init_value: 1.0e-3, warmup_steps: 100, decay_steps: 10000}
```

- **`name`** picks the algorithm; every other key is one of its fields (or a key its `Config` also
  accepts, listed under its table). An unknown key is an error that names the closest valid one.
- **Values** are validated by the algorithm's `Config` when the config is parsed: a bad value raises
  `pydantic.ValidationError` naming the field. Flags must be real booleans (`true`/`false`), numbers
  real numbers (never a string or a bool), and every number is finite (no `.inf`, no `.nan`). Files are
  read as YAML 1.2 or strict JSON (see the guide's "Config files"): `1e-3` and `1.0e-3` both read as
  floats, `yes`, `on` and `1:30` as strings.
- **Per-group values.** `params` may be torch.optim param groups (`[{"params": [...], "weight_decay":
  0.0}, ...]`); a hyperparameter key in a group overrides the config for that group's parameters and is
  validated with the same `Config` (some algorithms mark keys as global, refused per group: see its
  page).
- **Types.** *scalar* is a finite real number or a 0-dim floating-point tensor: a tensor is never
  range-checked (it may be traced or batched), which is what lets a compiled step or `torch.func` take
  hyperparameters as tensors; a tensor of shape `(1,)` is refused (it would broadcast the params to
  1-D). A tuple may be given as a list. Rules that tie several fields together (e.g. `nesterov` needs
  momentum) are checked too and are stated on each algorithm's page.

"""


def render() -> str:
    """The whole page, as Markdown."""
    lines = [
        _HEADER.rstrip("\n"),
        "",
        "## Top-level entries",
        "",
        "Besides `name` and the algorithm's fields, a builder config may hold these entries:",
        "",
        "| entry | value | what it does |",
        "|---|---|---|",
    ]
    lines += [
        f"| [`{entry.key}:`](#{_anchor(entry.key)}) | `{_escape(entry.shape)}` | {_escape(entry.text)} |"
        for entry in ENTRIES
    ]
    lines.append("")
    seen = {model for entry in ENTRIES for model in union_members(entry.models)}  # each has its own section
    for entry in ENTRIES:
        lines += [f"### {entry.key} {{#{_anchor(entry.key)}}}", "", f"`{entry.key}: {entry.shape}`. {entry.text}", ""]
        for model in union_members(entry.models):
            owner = owner_of(model)
            lines += [
                f"#### {entry.key}: {owner} {{#{model_anchor(model)}}}",
                "",
                *_intro(model),
                *_table(owner, model),
                "",
            ]
            lines += _nested_sections(owner, model, seen, level=5)
    lines += [
        "## Algorithms",
        "",
        "One section per registered algorithm (`optorch.registry.names()`), with a link to its page.",
        "",
    ]
    for name in registry.names():
        model = registry.get(name).config
        lines += [
            f"### {name}",
            "",
            f"`name: {name}`. Page: [{name}](../algorithms/{name}.md). Python: "
            f"`optorch.{registry.get(name).config.__module__.rpartition('.')[2]}.Config`.",
            "",
        ]
        lines += _intro(model)
        if model.accepted_keys:
            lines += [
                "Also accepted: "
                + ", ".join(f"`{key}`" for key in model.accepted_keys)
                + " (folded into the fields below; see the page).",
                "",
            ]
        lines += [*_table(name, model), ""]
        lines += _nested_sections(name, model, seen)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m optorch.tools.docgen", description="Render the config reference from the pydantic schemas."
    )
    parser.add_argument(
        "--out", type=Path, default=PAGE, help=f"the page to write (default {PAGE}, relative to the current directory)"
    )
    parser.add_argument(
        "--check", action="store_true", help="do not write; exit 1 if the page differs from a fresh rendering"
    )
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else None
        if current != text:
            print(f"{args.out} is stale: run python -m optorch.tools.docgen", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
