"""Frozen, validated hyperparameter configs.

Every algorithm has one ``Config`` class derived from :class:`Config` here. Its field names are the
keyword names of the constructor users already know (``torch.optim.Adam(lr=..., betas=...)``), so a
config dict migrates unchanged.

Numeric hyperparameters are :data:`Scalar`: a Python number, or a 0-dim tensor. Tensors are what let a
compiled step see a new learning rate without recompiling, and what ``torch.func.grad`` differentiates
and ``torch.func.vmap`` batches. Range checks apply to numbers; a tensor may be traced or batched, so
its value cannot be inspected and is taken as given.
"""

from __future__ import annotations

import numbers
from typing import Annotated, Any, Callable, ClassVar

import torch
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, PlainSerializer, StrictBool

__all__ = ["Config", "Flag", "Scalar", "NonNegative", "Probability", "UnitInterval", "is_zero"]


def _coerce_scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a tensor hyperparameter must hold one value, got shape {tuple(value.shape)}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"expected a real number or a 0-dim tensor, got {type(value).__name__} {value!r}")
    return float(value)


def _bounded(check: Callable[[float], bool], text: str) -> AfterValidator:
    def validate(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) and not check(value):
            raise ValueError(f"must be {text}, got {value!r}")
        return value

    validate.constraint = text  # what the config reference (optorch.docgen) shows
    return AfterValidator(validate)


def _serialize(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


Scalar = Annotated[Any, BeforeValidator(_coerce_scalar), PlainSerializer(_serialize)]
"""A real number or a one-element tensor."""

NonNegative = Annotated[Scalar, _bounded(lambda v: v >= 0.0, ">= 0")]
Probability = Annotated[Scalar, _bounded(lambda v: 0.0 <= v < 1.0, "in [0, 1)")]
UnitInterval = Annotated[Scalar, _bounded(lambda v: 0.0 <= v <= 1.0, "in [0, 1]")]
Flag = StrictBool
"""A switch: ``True`` or ``False`` only (never ``"yes"`` or ``1``), since a flag decides the math's shape."""


def is_zero(value: Any) -> bool:
    """True only for a number that is exactly zero; a tensor's value is unknown, so never."""
    return not isinstance(value, torch.Tensor) and value == 0


class Config(BaseModel):
    """Base of every algorithm's config: frozen, unknown keys rejected, validated on construction."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    accepted_keys: ClassVar[tuple[str, ...]] = ()
    """Constructor keys besides the fields, e.g. an original's tuple arguments, which a
    ``model_validator(mode="before")`` folds into the fields. The builder accepts them too."""

    linked_defaults: ClassVar[dict[str, str]] = {}
    """``{key: source}``: in the shim, a param group that leaves ``key`` out takes it from its own
    ``source`` (e.g. ``initial_lr`` from the group's ``lr``) rather than from the optimizer defaults."""

    global_keys: ClassVar[tuple[str, ...]] = ()
    """Fields that hold one value for all params (an algorithm's shared state reads them once per
    step), so the shim refuses them in a param group."""

    def replace(self, **changes: Any) -> "Config":
        """A validated copy with some fields changed (``dataclasses.replace`` for configs)."""
        return type(self)(**{**self.hyperparameters(), **changes})

    def with_tensors(self, **values: Any) -> "Config":
        """A copy with some numeric fields replaced by tensors (or tuples of tensors), unvalidated.

        Tensors are never range-checked (they may be traced or batched), so there is nothing to
        validate; skipping pydantic keeps this traceable, so a compiled step can build the config it
        steps with from hyperparameters it receives as tensors (:mod:`optorch.inject`, the shim).
        """
        for name, value in values.items():
            parts = value if isinstance(value, tuple) else (value,)
            if not all(isinstance(part, torch.Tensor) for part in parts):
                raise TypeError(f"with_tensors: {name!r} must be a field of {type(self).__name__} given as a tensor or a tuple of tensors")
        return self.unchecked(**values)

    def unchecked(self, **values: Any) -> "Config":
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
