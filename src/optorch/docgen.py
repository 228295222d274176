"""The config reference, ``docs/reference/config.md``, rendered from the pydantic schemas.

Every registered algorithm's ``Config``, every builder top-level entry in :data:`ENTRIES` (with each
model it accepts: every schedule for ``schedule:``) and every nested settings model becomes a table
of field, type, default, constraints and description. Types, defaults and bounds come from the
models' field info (``Field(ge=...)``, the validators of :mod:`optorch.config`), so the page cannot
drift from the code; a test compares the committed page with a fresh rendering. Regenerate with::

    python -m optorch.docgen            # writes docs/reference/config.md
    python -m optorch.docgen --check    # exit 1 if the committed page is stale

Descriptions come from a field's docstring (the string literal after it in the class body) or
``Field(description=...)``, else from :data:`DESCRIPTIONS`. The test requires one for every field and
refuses entries of :data:`DESCRIPTIONS` that no field uses.
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import annotated_types
from pydantic import AfterValidator, BaseModel, BeforeValidator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from . import adaptive, builder, combinators, config, registry, schedules

__all__ = ["DESCRIPTIONS", "ENTRIES", "Entry", "PAGE", "main", "render"]

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
    Entry(builder.SCHEDULE_KEY, "{hyperparameter: schedule config}", schedules.AnySchedule,
          "Schedules a scalar hyperparameter of the algorithm (`lr`, `weight_decay`, ...): the shim sets it "
          "to `schedule(step)` before every step. A schedule config names its kind under `name`; the "
          "formulas are on the [schedules page](../schedules.md)."),
    Entry(builder.ADAPTIVE_KEY, "{AdaptiveOpt key: value}", adaptive.AdaptiveConfig,
          "Adapts lr, momentum, betas, alpha or weight decay online from the loss: the built optimizer "
          "carries an `optorch.AdaptiveOpt` as `optimizer.adaptive`; call `optimizer.adaptive.step_loss(loss)` "
          "before each step. The rules are on the [adaptive rules page](../rules.md)."),
    Entry(", ".join(combinators.KEYS), "one top-level key each", combinators.Combinators,
          "Run around the step: gradient clipping by global norm, skipping non-finite steps, gradient "
          "accumulation, a parameter EMA, param groups chosen by name pattern, and loss scaling. See the "
          "[combinators page](../combinators.md) and [mixed precision](../amp.md)."),
)
"""The builder's top-level entries, one line each: add one here with the entry (the page lists them all)."""

DESCRIPTIONS: dict[str, str] = {
    # names torch.optim uses the same way in every algorithm
    "lr": "learning rate",
    "betas": "decay rates of the first and second moment averages",
    "eps": "added to the denominator for numerical stability",
    "weight_decay": "weight decay (an L2 penalty added to the gradient unless the algorithm decouples it)",
    "maximize": "maximize the objective instead of minimizing it",
    "amsgrad": "use the running maximum of the second moment (AMSGrad)",
    "decoupled_weight_decay": "decoupled (AdamW-style) weight decay instead of an L2 penalty",
    "momentum": "momentum factor",
    "dampening": "dampening of the momentum buffer update",
    "nesterov": "Nesterov momentum (needs a non-zero momentum and zero dampening)",
    # one algorithm's own names
    "adadelta.lr": "scales the update (torch's default 1.0)",
    "adadelta.rho": "decay rate of the running averages of squared gradients and updates",
    "adafactor.lr": "cap on the relative step size; also scales the decoupled weight decay",
    "adafactor.beta2_decay": "the second-moment weight at step t is t ** beta2_decay",
    "adafactor.eps": "(eps1, eps2): eps1 regularizes the second moment (None: the dtype's eps), eps2 floors the parameter RMS",
    "adafactor.d": "clipping threshold on the RMS of the update",
    "adafactor.weight_decay": "decoupled weight decay, times the learning rate",
    "adagrad.lr_decay": "the learning rate at step t is lr / (1 + (t - 1) lr_decay)",
    "adagrad.initial_accumulator_value": "starting value of the sum of squared gradients",
    "adopt.eps": "floor on the square root of the second moment",
    "adopt.decouple": "decoupled weight decay (skipped on the first call) instead of an L2 penalty",
    "asgd.lambd": "decay term",
    "asgd.alpha": "power of the step-size decay",
    "asgd.t0": "step at which averaging starts",
    "autosgm.adaptive": "normalize by the second moment (lr_cfg[0])",
    "autosgm.numerator": "numerator of the learning-rate estimate, 0-4 (lr_cfg[2])",
    "autosgm.beta_n": "pole of the numerator's smoothing filter (beta_cfg[0])",
    "autosgm.beta_a": "pole of the second-moment average (beta_cfg[1])",
    "autosgm.beta_i": "pole of the gradient's smoothing filter, the momentum (beta_cfg[2])",
    "autosgm.gamma_i": "zero of the gradient's smoothing filter, below beta_i or 0 (beta_cfg[3])",
    "autosgm.eta_i": "input gain of the smoothing filter; 0 means 1 - beta_i (beta_cfg[4])",
    "autosgm.debias": "bias-correct both filters (beta_cfg[5])",
    "autosgm.window": "learning-rate window: 0 flat, 1 raised cosine, 2 polynomial, 3 exponential, 4 simple polynomial, 5-6 logistic (rc_cfg[0])",
    "autosgm.window_sequence": "0, or 1, which warns and is ignored as in the original (rc_cfg[1])",
    "autosgm.window_floor": "the window's floor (rc_cfg[2])",
    "autosgm.window_order": "the window's order, > 0 (rc_cfg[3])",
    "autosgm.window_full": "a full window instead of a half one (rc_cfg[4] == 0)",
    "autosgm.window_epochs": "the window's period in epochs (rc_cfg[5])",
    "autosgm.window_steps_per_epoch": "steps per epoch (rc_cfg[6])",
    "autosgm.window_unit": "the window's time unit (rc_cfg[7])",
    "autosgm.window_flat_top": "fraction of the window held flat at its top (rc_cfg[8])",
    "autosgm.weight_decay": "weight decay (wd_cfg[0])",
    "autosgm.decoupled_weight_decay": "decoupled weight decay (wd_cfg[1] != 0)",
    "autosgm.eps": "added to the denominator (eps_cfg[0])",
    "dag.k_val": "gain of the alpha controller; global",
    "dag.k_sched": "a cosine schedule for k_val; global",
    "dag.foreach": "accepted for compatibility; changes nothing",
    "dag.differentiable": "accepted for compatibility; changes nothing",
    "dag.fused": "accepted for compatibility; changes nothing",
    "dag.hyper": "the alpha controller's settings, merged over their defaults; global",
    "dag.shrink": "the global RMS shrink's settings, merged over their defaults; global",
    "dag.use_exact_sigma": "exact per-tensor standard deviation instead of the estimate; global",
    "dag.sigma_every": "recompute sigma every this many steps; global",
    "dag.sat_every": "recompute the saturation statistics every this many steps; global",
    "decoupled_adam.weight_decay": "fraction of the parameter removed per step at the schedule's peak",
    "lars.trust_coefficient": "trust coefficient of the layer-wise ratio",
    "lars.eps": "added to the trust ratio's denominator",
    "nadam.momentum_decay": "momentum decay of the mu schedule",
    "rmsprop.alpha": "smoothing constant of the squared-gradient average",
    "rmsprop.centered": "normalize by the estimated variance instead of the second moment",
    "rprop.lr": "initial step size",
    "rprop.etas": "(decrease, increase) factors of the step size",
    "rprop.step_sizes": "(minimum, maximum) step size",
    "Hyper.tau": "target of the controller",
    "Hyper.p_star": "target saturation probability",
    "Hyper.kappa": "gain; None: tau / Phi^-1(1 - p_star / 2)",
    "Hyper.beta": "exponent of the controller",
    "Hyper.eta": "step of the controller",
    "Hyper.rho": "smoothing of the controller",
    "Hyper.eps": "added to the controller's denominators",
    "Hyper.alpha_min": "lower clamp of alpha",
    "Hyper.alpha_max": "upper clamp of alpha",
    "ShrinkSettings.lambda_rms": "strength of the global RMS shrink",
    "ShrinkSettings.s_min": "floor of the shrink factor",
    "ShrinkSettings.gamma": "exponent of the shrink",
    "ShrinkSettings.ema_beta": "decay of the RMS averages",
    "ShrinkSettings.warmup_steps": "steps before the shrink starts",
    "CosineSchedule.name": "the schedule kind",
    "CosineSchedule.k0": "k_val at step 0",
    "CosineSchedule.total_steps": "optimizer steps until k_val reaches 0",
    # schedules
    "name": "the schedule kind",
    "value": "the constant value",
    "init_value": "the value at the start (after any warmup: the peak)",
    # the autosgm_window schedule: AutoSGM's window keys (their rc_cfg places are in the autosgm table)
    "window": "the window's kind: 0 flat, 1 raised cosine, 2 polynomial, 3 exponential, 4 simple polynomial, 5-6 logistic",
    "window_floor": "the window's floor",
    "window_order": "the window's order, > 0",
    "window_full": "a full window instead of a half one",
    "window_epochs": "the window's period in epochs",
    "window_steps_per_epoch": "steps per epoch",
    "window_unit": "the window's time unit",
    "window_flat_top": "fraction of the window held flat at its top",
    "end_value": "the value at the end",
    "warmup_steps": "steps of the linear warmup from warmup_start_value to init_value",
    "warmup_start_value": "the value at step 0 when there is a warmup",
    "decay_steps": "the total length, warmup included, after which the value is end_value",
    "transition_steps": "length of the transition",
    "transition_begin": "steps before the transition starts",
    "stable_steps": "steps held at init_value after the warmup",
    "decay_type": "shape of the decay",
    "decay_rate": "factor per transition_steps",
    "staircase": "decay in whole transitions (a staircase) instead of continuously",
    "power": "exponent of the polynomial",
    "step_size": "steps between decays",
    "gamma": "factor of each decay",
    "milestones": "steps at which the value is multiplied by gamma",
    "T_0": "length of the first cycle",
    "T_mult": "factor by which each cycle is longer than the last",
    "max_lr": "the peak value",
    "total_steps": "the length of the whole schedule",
    "pct_start": "fraction of total_steps spent rising",
    "anneal_strategy": "shape of the annealing",
    "div_factor": "the start value is max_lr / div_factor",
    "final_div_factor": "the end value is the start value / final_div_factor",
    "three_phase": "a third phase that anneals below the start value (torch's three_phase)",
    "schedules": "the schedules to join, each a schedule config",
    "boundaries": "steps at which the next schedule starts (one fewer than schedules)",
    "timescale": "the value is init_value / sqrt(1 + step / timescale)",
}
"""Descriptions of fields without a docstring: ``"owner.field"`` (owner: an algorithm's name, or a
nested model's class name), else the bare field name for a meaning shared by every owner."""


# ------------------------------------------------------------------------------------------------
# types and constraints


def _number(value: Any) -> str:
    if isinstance(value, float):
        text = repr(value)
        if len(text) > 8 and float(f"{value:g}") == value:
            text = f"{value:g}"
        return re.sub(r"e([+-])0*(\d)", lambda m: f"e{'' if m.group(1) == '+' else '-'}{m.group(2)}", text)
    return repr(value)


def _literal(value: Any) -> str:
    """A default as a Python literal, floats short (1e-8, not 1e-08)."""
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_literal(v) for v in value)
        return f"({inner},)" if isinstance(value, tuple) and len(value) == 1 else (f"({inner})" if isinstance(value, tuple) else f"[{inner}]")
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


def _describe(annotation: Any, metadata: list[Any] = ()) -> tuple[str, list[str]]:
    """(the type as the page shows it, its constraints) of a field's annotation and metadata."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _describe(args[0], [*args[1:], *metadata])
    scalar, constraints = _constraints(list(metadata))
    if scalar:
        return "scalar", constraints
    if annotation is type(None):
        return "None", constraints
    if origin in (typing.Union, types.UnionType):
        models = [arg for arg in args if isinstance(arg, type) and issubclass(arg, BaseModel)]
        if len(models) > 2 and len(models) == len(args):  # a discriminated union: one of several configs
            return "config (`name`: " + ", ".join(f"[{_owner(m)}](#{_model_anchor(m)})" for m in models) + ")", constraints
        parts = [_describe(arg) for arg in args]
        inner = [c for _, cs in parts for c in cs]
        return " or ".join(t for t, _ in parts), constraints + list(dict.fromkeys(inner))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item, item_constraints = _describe(args[0])
            return f"tuple of {item}", constraints + [f"each {c}" for c in item_constraints]
        parts = [_describe(arg) for arg in args]
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
        return f"[{annotation.__name__}](#{_model_anchor(annotation)})", constraints
    names = {bool: "bool", int: "int", float: "float", str: "str", Any: "any"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation))), constraints


def _nested_models(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _nested_models(arg)


def _union_members(models: Any) -> list[type[BaseModel]]:
    if isinstance(models, type) and issubclass(models, BaseModel):
        return [models]
    return list(dict.fromkeys(_nested_models(models)))


# ------------------------------------------------------------------------------------------------
# descriptions


@functools.lru_cache(maxsize=None)
def _field_docstrings(cls: type) -> dict[str, str]:
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
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                found[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return found


def _rst(text: str) -> str:
    """reST inline markup of docstrings as Markdown: :math:`x` and ``x`` become `x`."""
    text = re.sub(r":(?:math|func|class|mod|data|meth):`~?([^`]*)`", r"`\1`", text)
    return text.replace("``", "`")


def description(owner: str, name: str, info: FieldInfo, docstrings: dict[str, str]) -> str | None:
    """A field's description: its docstring, its ``Field(description=)``, else :data:`DESCRIPTIONS`."""
    text = docstrings.get(name) or info.description or DESCRIPTIONS.get(f"{owner}.{name}") or DESCRIPTIONS.get(name)
    return _rst(text) if text else None


def used_descriptions() -> set[str]:
    """The keys of :data:`DESCRIPTIONS` that some field of the page takes its description from."""
    used = set()
    for owner, model in _all_models():
        docstrings = _field_docstrings(model)
        for name, info in model.model_fields.items():
            if docstrings.get(name) or info.description:
                continue
            used.add(f"{owner}.{name}" if f"{owner}.{name}" in DESCRIPTIONS else name)
    return used


def undescribed() -> list[str]:
    """``owner.field`` for every field of the page without a description."""
    missing = []
    for owner, model in _all_models():
        docstrings = _field_docstrings(model)
        missing += [f"{owner}.{name}" for name, info in model.model_fields.items() if description(owner, name, info, docstrings) is None]
    return missing


# ------------------------------------------------------------------------------------------------
# the page


def _model_anchor(model: type[BaseModel]) -> str:
    """The id of a model's table heading (set explicitly, with attr_list, so links never guess)."""
    return f"{model.__module__.removeprefix('optorch.')}-{model.__name__}".lower().replace(".", "-")


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "", text.lower().replace(" ", "-"))


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _table(owner: str, model: type[BaseModel]) -> list[str]:
    docstrings = _field_docstrings(model)
    fields = sorted(model.model_fields.items(), key=lambda item: item[0] != "name")  # the discriminator first
    lines = ["| key | type | default | constraints | description |", "|---|---|---|---|---|"]
    for name, info in fields:
        kind, constraints = _describe(info.annotation, info.metadata)
        if info.default is not PydanticUndefined:
            default = f"`{_literal(info.default)}`"
        elif info.default_factory is not None:
            default = f"`{_literal(info.default_factory())}`"
        else:
            default = "required"
        text = description(owner, name, info, docstrings) or ""
        lines.append(f"| `{name}` | {_escape(kind)} | {_escape(default)} | {_escape(', '.join(constraints))} | {_escape(text)} |")
    return lines


def _intro(model: type[BaseModel]) -> list[str]:
    doc = inspect.getdoc(model)
    if not doc or model.__doc__ is None or doc == inspect.getdoc(BaseModel) or "__doc__" not in model.__dict__:
        return []
    paragraphs = [" ".join(_rst(paragraph).split()) for paragraph in doc.split("\n\n")]
    # a reST math block, inline or after a blank line, as a plain code block
    paragraphs = [re.sub(r"^(.*?):?\s*\.\. math::\s*(.+)$", lambda m: (m.group(1) + ":\n\n" if m.group(1) else "") + f"```\n{m.group(2)}\n```", p) for p in paragraphs]
    return [line for p in paragraphs for line in (p, "")]


def _nested_sections(owner: str, model: type[BaseModel], seen: set, level: int = 4) -> list[str]:
    """A section for each model nested in ``model``'s fields (once each), under ``level`` headings."""
    lines = []
    for info in model.model_fields.values():
        for nested in _nested_models(info.annotation):
            if nested in seen:
                continue
            seen.add(nested)
            lines += [f"{'#' * level} {nested.__name__} {{#{_model_anchor(nested)}}}", "", *_intro(nested), *_table(nested.__name__, nested), ""]
            lines += _nested_sections(nested.__name__, nested, seen, level)
    return lines


def _all_models() -> Iterator[tuple[str, type[BaseModel]]]:
    """Every (owner, model) the page tabulates, nested settings included."""
    def with_nested(owner: str, model: type[BaseModel], seen: set) -> Iterator[tuple[str, type[BaseModel]]]:
        yield owner, model
        for info in model.model_fields.values():
            for nested in _nested_models(info.annotation):
                if nested not in seen:
                    seen.add(nested)
                    yield from with_nested(nested.__name__, nested, seen)

    seen: set = set()
    for name in registry.names():
        yield from with_nested(name, registry.get(name).config, seen)
    for entry in ENTRIES:
        for model in _union_members(entry.models):
            yield from with_nested(_owner(model), model, seen)


def _owner(model: type[BaseModel]) -> str:
    name = model.model_fields.get("name")
    return name.default if name is not None and isinstance(name.default, str) else model.__name__


_HEADER = """\
# Config reference

<!-- Generated by `python -m optorch.docgen` from the pydantic schemas: do not edit by hand. -->

This page is generated from the configs' pydantic schemas (`python -m optorch.docgen`), and a test
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
    lines = [_HEADER.rstrip("\n"), "", "## Top-level entries", "",
             "Besides `name` and the algorithm's fields, a builder config may hold these entries:", "",
             "| entry | value | what it does |", "|---|---|---|"]
    lines += [f"| [`{entry.key}:`](#{_anchor(entry.key)}) | `{_escape(entry.shape)}` | {_escape(entry.text)} |" for entry in ENTRIES]
    lines.append("")
    seen = {model for entry in ENTRIES for model in _union_members(entry.models)}  # each has its own section
    for entry in ENTRIES:
        lines += [f"### {entry.key} {{#{_anchor(entry.key)}}}", "", f"`{entry.key}: {entry.shape}`. {entry.text}", ""]
        for model in _union_members(entry.models):
            owner = _owner(model)
            lines += [f"#### {entry.key}: {owner} {{#{_model_anchor(model)}}}", "", *_intro(model), *_table(owner, model), ""]
            lines += _nested_sections(owner, model, seen, level=5)
    lines += ["## Algorithms", "", "One section per registered algorithm (`optorch.registry.names()`), with a link to its page.", ""]
    for name in registry.names():
        model = registry.get(name).config
        lines += [f"### {name}", "", f"`name: {name}`. Page: [{name}](../algorithms/{name}.md). Python: `optorch.{registry.get(name).config.__module__.removeprefix('optorch.')}.Config`.", ""]
        lines += _intro(model)
        if model.accepted_keys:
            lines += ["Also accepted: " + ", ".join(f"`{key}`" for key in model.accepted_keys) + " (folded into the fields below; see the page).", ""]
        lines += [*_table(name, model), ""]
        lines += _nested_sections(name, model, seen)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optorch.docgen", description="Render the config reference from the pydantic schemas.")
    parser.add_argument("--out", type=Path, default=PAGE, help=f"the page to write (default {PAGE}, relative to the current directory)")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the page differs from a fresh rendering")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else None
        if current != text:
            print(f"{args.out} is stale: run python -m optorch.docgen", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
