"""Frozen, validated hyperparameter configs.

Every algorithm has one ``Config`` class derived from :class:`Config` here. Its field names are the
keyword names of the constructor users already know (``torch.optim.Adam(lr=..., betas=...)``), so a
config dict migrates unchanged.

Numeric hyperparameters are :data:`Scalar`: a finite Python number, or a 0-dim floating-point tensor.
Tensors are what let a compiled step see a new learning rate without recompiling, and what
``torch.func.grad`` differentiates and ``torch.func.vmap`` batches. Range checks apply to numbers; a
tensor may be traced or batched, so its value cannot be inspected and only its shape and dtype are
checked (a one-element tensor of shape ``(1,)`` would broadcast every parameter it touches to 1-D).

The settings around the algorithms (schedules, combinators, the loss scaler, adaptive rules) use
:data:`Number` and :data:`Count`: a bool or a string is never read as a number there either.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, ClassVar

import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    ValidationInfo,
    field_validator,
)

from .errors import shown
from .scalars import is_real, scales

__all__ = [
    "SHARED_DESCRIPTIONS",
    "Config",
    "Count",
    "Flag",
    "Number",
    "Scalar",
    "NonNegative",
    "Probability",
    "UnitInterval",
    "check_count",
    "check_tensor_hyperparameter",
    "describe",
    "representable",
]


def check_tensor_hyperparameter(value: torch.Tensor) -> torch.Tensor:
    """A tensor hyperparameter must be 0-dim and floating point: its value is never read (it may be
    traced or batched), but a shape would broadcast the params it touches and an integer lr would
    truncate."""
    if value.dim() != 0:
        raise ValueError(
            f"a tensor hyperparameter must be 0-dim, got shape {tuple(value.shape)} (use tensor.reshape(()) for one "
            "value)"
        )
    if not value.is_floating_point():
        raise ValueError(f"a tensor hyperparameter must be a floating-point tensor, got {value.dtype}")
    return value


def _coerce_scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return check_tensor_hyperparameter(value)
    if not is_real(value):
        raise ValueError(f"expected a real number or a 0-dim tensor, got {type(value).__name__} {shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range (YAML or JSON with 400 digits)
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number, got {shown(value)}")
    return number


def _bounded(check: Callable[[float], bool], text: str) -> AfterValidator:
    def validate(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) and not check(value):
            raise ValueError(f"must be {text}, got {shown(value)}")
        return value

    validate.constraint = text  # what the config reference (optorch.docgen) shows
    return AfterValidator(validate)


def _serialize(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


Scalar = Annotated[Any, BeforeValidator(_coerce_scalar), PlainSerializer(_serialize)]
"""A finite real number or a 0-dim floating-point tensor."""

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
"""A finite real number (an int or a float; never a bool or a string): the settings' numbers."""


class _NonZero:
    def __repr__(self) -> str:
        return "<non-zero>"


_NONZERO = _NonZero()


def _structure(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(map(_structure, value))
    return _NONZERO if scales(value) else value


def check_count(value: int) -> int:
    """A count of steps, at most 2**53: beyond, it is no longer exact in float64, where step counters
    are compared with it (and soon overflows int64)."""
    if value > 2**53:
        raise ValueError(f"must be at most 2**53, got {shown(value)}")
    return value


check_count.constraint = "<= 2**53"  # what the config reference (optorch.docgen) shows
Count = Annotated[int, Field(strict=True), AfterValidator(check_count)]
"""A whole number up to 2**53 given as an int (never a bool, a float or a string): the settings'
step counts (compared with float64 and int64 counters)."""

NonNegative = Annotated[Scalar, _bounded(lambda v: v >= 0.0, ">= 0")]
Probability = Annotated[Scalar, _bounded(lambda v: 0.0 <= v < 1.0, "in [0, 1)")]
UnitInterval = Annotated[Scalar, _bounded(lambda v: 0.0 <= v <= 1.0, "in [0, 1]")]
Flag = StrictBool
"""A switch: ``True`` or ``False`` only (never ``"yes"`` or ``1``), since a flag decides the math's shape."""


def representable(value: float, dtype: torch.dtype) -> bool:
    """Whether ``value`` survives being stored in ``dtype``: finite there, and not rounded to 0
    unless it is 0 (a loss scale of 1e-50 is 0 in float32; one of 1e39 is inf)."""
    rounded = torch.tensor(value, dtype=torch.float64).to(dtype).item()
    return math.isfinite(rounded) and (rounded != 0 or value == 0)


SHARED_DESCRIPTIONS: dict[str, str] = {
    "eps": "added to the denominator for numerical stability",
    "weight_decay": "weight decay (an L2 penalty added to the gradient unless the algorithm decouples it)",
    "maximize": "maximize the objective instead of minimizing it",
    "lr": "learning rate",
    "betas": "decay rates of the first and second moment averages",
    "amsgrad": "use the running maximum of the second moment (AMSGrad)",
    "decoupled_weight_decay": "decoupled (AdamW-style) weight decay instead of an L2 penalty",
    "momentum": "momentum factor",
    "dampening": "dampening of the momentum buffer update",
    "nesterov": "Nesterov momentum (needs a non-zero momentum and zero dampening)",
}
"""What a field means when torch.optim uses its name the same way in every algorithm: the description
of every field of that name that has no docstring of its own (the config reference shows it)."""


def describe(model: type[BaseModel], descriptions: dict[str, str]) -> None:
    """Give each field of ``model`` that has no description the one ``descriptions`` has for its name,
    so that a meaning shared by many models is written once (a field's docstring still comes first)."""
    for name, info in model.model_fields.items():
        if info.description is None and name in descriptions:
            info.description = descriptions[name]


class Config(BaseModel):
    """Base of every algorithm's config: frozen, unknown keys rejected, validated on construction."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    accepted_keys: ClassVar[tuple[str, ...]] = ()
    """Constructor keys besides the fields, e.g. an original's tuple arguments, which a
    ``model_validator(mode="before")`` folds into the fields. The builder accepts them too."""

    field_descriptions: ClassVar[dict[str, str]] = {}
    """Descriptions of inherited fields whose meaning this config changes (its own fields take a
    docstring instead)."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        describe(cls, SHARED_DESCRIPTIONS)
        for name, text in cls.__dict__.get("field_descriptions", {}).items():
            cls.model_fields[name].description = text  # each subclass holds its own copy of the field

    linked_defaults: ClassVar[dict[str, str]] = {}
    """``{key: source}``: in the shim, a param group that leaves ``key`` out takes it from its own
    ``source`` (e.g. ``initial_lr`` from the group's ``lr``) rather than from the optimizer defaults."""

    global_keys: ClassVar[tuple[str, ...]] = ()
    """Fields that hold one value for all params (an algorithm's shared state reads them once per
    step), so the shim refuses them in a param group."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_tensor_for_a_tuple(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic would unpack a tensor of shape (2,) into the tuple, each part a view of it
        if isinstance(value, torch.Tensor) and isinstance(cls.model_fields[info.field_name].default, tuple):
            raise ValueError(
                f"expected a tuple (of numbers or 0-dim tensors), got a tensor of shape {tuple(value.shape)}"
            )
        return value

    def replace(self, **changes: Any) -> Config:
        """A validated copy with some fields changed (``dataclasses.replace`` for configs)."""
        return type(self)(**{**self.hyperparameters(), **changes})

    def with_tensors(self, **values: Any) -> Config:
        """A copy with some numeric fields replaced by tensors (or tuples of tensors), unvalidated.

        Tensors are never range-checked (they may be traced or batched), so only their shape and dtype
        are checked (0-dim, floating point); skipping pydantic keeps this traceable, so a compiled step can build
        the config it steps with from hyperparameters it receives as tensors (:mod:`optorch.inject`, the shim).
        """
        for name, value in values.items():
            parts = value if isinstance(value, tuple) else (value,)
            if not all(isinstance(part, torch.Tensor) for part in parts):
                raise TypeError(
                    f"with_tensors: {name!r} must be a field of {type(self).__name__} given as a tensor or a tuple of "
                    "tensors"
                )
            try:
                for part in parts:
                    check_tensor_hyperparameter(part)
            except ValueError as error:
                raise ValueError(f"with_tensors: {name!r}: {error}") from None
        return self.unchecked(**values)

    def unchecked(self, **values: Any) -> Config:
        """A copy with some fields replaced, unvalidated: for values that are traced (the shim inside
        ``torch.compile(optimizer.step)``, where its group's numbers are symbolic) or are tensors."""
        unknown = [name for name in values if name not in self.__dict__]
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {', '.join(map(repr, unknown))}")
        copy = object.__new__(type(self))
        object.__setattr__(copy, "__dict__", {**self.__dict__, **values})
        for attribute in ("__pydantic_fields_set__", "__pydantic_extra__", "__pydantic_private__"):
            object.__setattr__(copy, attribute, getattr(self, attribute))
        return copy

    def hyperparameters(self) -> dict[str, Any]:
        """Field name to value, values as they are (tensors stay tensors)."""
        return {name: getattr(self, name) for name in type(self).model_fields}

    def structure(self) -> tuple:
        """What of this config can select a param's state (its keys, shapes and dtypes): every value
        but those that only scale what is computed (:func:`~optorch.core.scalars.scales`: what a
        schedule changes at every step), of which only that they are not zero (``test_shim.py``
        holds every algorithm to it)."""
        return tuple(map(_structure, vars(self).values()))
