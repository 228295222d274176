r"""Adaptive knobs: hyperparameters that follow the loss online (AdaptiveOpt).

Rules turn the loss sequence into positive **factors** on a knob's **base** value (its value when
adaptation started). The rules and their state per (knob, rule term):

======================  ==============================  ============================================
rule                    state                           factor :math:`f_t`
======================  ==============================  ============================================
``trend``               :math:`T_0 = 1`                 :math:`T_t = \mathrm{clip}(T_{t-1} u)` if improving,
                                                        :math:`\mathrm{clip}(T_{t-1} d)` if worsening; :math:`f = T`
                                                        (:math:`1/T` for ``weight_decay``)
``variance``            none                            :math:`1 / (1 + \lambda_v \mathrm{CV}_t)`
``inverse``             none                            :math:`\ell_0 / \max(F_t, 10^{-12})` (1 if
                                                        :math:`\ell_0 \le 0` or :math:`F_t \le 0`)
``relative``            :math:`Q_0 = 1`                 :math:`Q_t = \mathrm{clip}(Q_{t-1}(1 +
                                                        \kappa\,\mathrm{clip}(r_t, -c, c)))`
``stable``              :math:`E_0 = 1`                 :math:`E_t = \mathrm{clip}(\beta_{st} E_{t-1} + (1-\beta_{st}) /
                                                        (1 + \lambda_v \mathrm{CV}_t))`
``cosine``              none (uses :math:`t`)           :math:`\varphi + (1-\varphi)\tfrac12(1 + \cos(\pi t / T_0))`
``cosine_restart``      :math:`t_{cur} = 0, T_i = T_0`  :math:`\varphi + (1-\varphi)\tfrac12(1 +
                                                        \cos(\pi t_{cur} / T_i))`, then :math:`t_{cur} \mathrel{+}= 1`;
                                                        at :math:`t_{cur} \ge T_i`:
                                                        :math:`t_{cur} = 0,\ T_i = \lfloor T_i m \rfloor`
======================  ==============================  ============================================

``clip`` clamps a state to ``factor_bounds``. The statistics, shared by all rules, at the t-th accepted
loss :math:`\ell_t` (t = 0 first): :math:`F_t = \beta_f F_{t-1} + (1-\beta_f)\ell_t` and
:math:`L_t = \beta_s L_{t-1} + (1-\beta_s)\ell_t` (both :math:`\ell_0` at t = 0), the reference
:math:`\ell_0`, the coefficient of variation :math:`\mathrm{CV}_t = s_w / (|\mu_w| + 10^{-12})` of the
last ``var_window`` losses (0 below two), and :math:`r_t = (L_t - F_t) / (|L_t| + 10^{-12})`; improving
means :math:`r_t > \mathrm{tol}`, worsening :math:`r_t < -\mathrm{tol}` (``trend_signal="ema_step"``:
:math:`F_{t-1} - F_t` beyond :math:`\pm` ``ema_step_tol`` instead). A composite rule ``"a+b"``
multiplies its terms' factors.

A knob's value from its base :math:`b` and factor :math:`f`: ``lr`` and ``weight_decay`` scale directly,
:math:`v = b f`; the decay-type knobs (``momentum``, ``beta1``, ``beta2``, ``alpha``) scale their
horizon :math:`H = 1/(1 - v)`, so :math:`v = 1 - (1 - b) / f`. Then the bounds: lr in
:math:`[l_0 b, l_1 b]` (``lr_bounds``), weight decay in :math:`[0, \rho b]` (``wd_max_ratio``), momentum
and beta1 in :math:`[\min(0.5, b), \max(0.99, b)]`, beta2 and alpha in
:math:`[\min(0.9, b), \max(0.9999, b)]`. A decay-type knob whose base is 0 (or not below 1) is never
changed: torch's RMSprop has no momentum buffer to use when it started with momentum 0.

Two forms share these functions:

* functional: :func:`init`, :func:`update` (pure, tensors only, no host read, a non-finite loss
  changes nothing), :func:`knob_value`, and :func:`bases` / :func:`write_hyperparams` for the
  :func:`optorch.inject_hyperparams` steppers;
* :class:`AdaptiveOpt`, which wraps a torch.optim optimizer, an optorch shim or a bitsandbytes 8-bit
  optimizer and writes the values into its param groups on ``step_loss(loss)``.

The design is the project's own (docs/rules.md): the original AdaptiveOpt is a README without code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from ..core.compat import pytree
from ..core.config import Count, Number
from ..core.errors import shown, suggest
from ..core.scalars import half_cosine

__all__ = [
    "AdaptiveConfig",
    "KNOBS",
    "TERMS",
    "init",
    "knob_value",
    "parse_entry",
    "update",
]

TERMS = ("trend", "variance", "inverse", "relative", "stable", "cosine", "cosine_restart")
KNOBS = ("lr", "momentum", "beta1", "beta2", "alpha", "weight_decay")
DECAY_KNOBS = ("momentum", "beta1", "beta2", "alpha")
_EPS = 1e-12  # keeps the relative statistics finite at a zero loss


# --- configuration ---------------------------------------------------------------------------


def _parse_rule(value: Any, where: str) -> str | None:
    """``"Trend + cosine"`` -> ``"trend+cosine"``; None, "" and "none" -> None."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(
            f"the rule for {where} must be a string such as 'trend+cosine' (or None), got {type(value).__name__} "
            f"{value!r}"
        )
    if value.strip().lower() in ("", "none"):
        return None
    terms = [term.strip() for term in value.lower().split("+")]
    seen = []
    for term in terms:
        if term not in TERMS:
            raise ValueError(
                f"unknown term {term!r} in the rule {value!r} for {where}{suggest(term, TERMS)}; terms: "
                f"{', '.join(TERMS)}"
            )
        if term in seen:
            raise ValueError(f"term {term!r} appears twice in the rule {value!r} for {where}")
        seen.append(term)
    return "+".join(seen)


class AdaptiveConfig(BaseModel):
    """Every key of AdaptiveOpt: the rule per knob and the tuning constants (all tunable defaults).

    A rule is a string of ``+``-joined terms (``"trend+cosine_restart"``), stored lower-cased; None,
    ``""`` and ``"none"`` leave the knob alone. ``betas_rule`` is a pair (beta1's rule, beta2's rule);
    one string applies to both.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    lr_rule: str | None = None
    """The learning rate's rule (terms: trend, variance, inverse, relative, stable, cosine, cosine_restart)."""
    momentum_rule: str | None = None
    """Momentum's rule (SGD, RMSprop; a base of 0 is left alone)."""
    betas_rule: tuple[str | None, str | None] = (None, None)
    """(beta1's rule, beta2's rule) of Adam-style optimizers; one string applies to both."""
    alpha_rule: str | None = None
    """RMSprop's alpha's rule."""
    wd_rule: str | None = None
    """Weight decay's rule (``trend`` runs inverted: less decay while improving)."""
    cycle_length: Annotated[Count, Field(ge=1)] = 500
    """T_0 of ``cosine`` and ``cosine_restart``, in steps."""
    cycle_mult: Annotated[Number, Field(ge=1.0)] = 2.0
    """``cosine_restart``: each cycle is ``floor(previous * cycle_mult)`` steps long."""
    trend_signal: Literal["fast_slow", "ema_step"] = "fast_slow"
    """How ``trend`` tells improving from worsening: the fast/slow EMA gap, or the fast EMA's last move."""
    fast_beta: Annotated[Number, Field(ge=0.0, lt=1.0)] = 0.9
    """Decay of the fast loss EMA F."""
    slow_beta: Annotated[Number, Field(ge=0.0, lt=1.0)] = 0.99
    """Decay of the slow loss EMA L."""
    improve_tol: Annotated[Number, Field(ge=0.0)] = 1e-3
    """Improving when (L - F) / |L| exceeds this, worsening below its negative."""
    ema_step_tol: Annotated[Number, Field(ge=0.0)] = 1e-4
    """``trend_signal="ema_step"``: the fast EMA must move by more than this (absolute) to count."""
    var_window: Annotated[Count, Field(ge=2)] = 20
    """Losses in the window whose coefficient of variation ``variance`` and ``stable`` use."""
    trend_up: Annotated[Number, Field(ge=1.0)] = 1.01
    """``trend``'s multiplier on an improving step."""
    trend_down: Annotated[Number, Field(gt=0.0, le=1.0)] = 0.98
    """``trend``'s multiplier on a worsening step."""
    relative_gain: Annotated[Number, Field(ge=0.0)] = 1.0
    """``relative``: the factor grows by 1 + gain * clip(r, -c, c) per step."""
    relative_clip: Annotated[Number, Field(ge=0.0)] = 0.05
    """``relative``: c, the clip on the relative improvement r."""
    var_gain: Annotated[Number, Field(ge=0.0)] = 1.0
    """``variance`` and ``stable``: the factor is 1 / (1 + var_gain * CV)."""
    stable_beta: Annotated[Number, Field(ge=0.0, lt=1.0)] = 0.99
    """``stable``: decay of its EMA of the variance factor."""
    cos_floor: Annotated[Number, Field(ge=0.0, le=1.0)] = 0.1
    """The cosine rules' lowest factor."""
    factor_bounds: tuple[Number, Number] = (0.1, 10.0)
    """Bounds of the compounding rule states (``trend``, ``relative``)."""
    lr_bounds: tuple[Number, Number] = (1e-3, 2.0)
    """The lr's bounds relative to its base."""
    lr_limits: tuple[Number | None, Number | None] = (None, None)
    """Optional absolute (min, max) of the lr, applied after ``lr_bounds``."""
    wd_max_ratio: Annotated[Number, Field(ge=1.0)] = 10.0
    """Weight decay stays in [0, wd_max_ratio * base]."""
    momentum_bounds: tuple[Number, Number] = (0.5, 0.99)
    """Momentum and beta1 stay in [min(lo, base), max(hi, base)]."""
    beta2_bounds: tuple[Number, Number] = (0.9, 0.9999)
    """Beta2 and alpha stay in [min(lo, base), max(hi, base)]."""

    @field_validator("lr_rule", "momentum_rule", "alpha_rule", "wd_rule", mode="before")
    @classmethod
    def _rule(cls, value: Any, info) -> str | None:
        return _parse_rule(
            value,
            {"lr_rule": "lr", "momentum_rule": "momentum", "alpha_rule": "alpha", "wd_rule": "weight_decay"}[
                info.field_name
            ],
        )

    @field_validator("betas_rule", mode="before")
    @classmethod
    def _betas_rule(cls, value: Any) -> tuple[str | None, str | None]:
        if value is None or isinstance(value, str):
            value = (value, value)
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ValueError(f"betas_rule is a pair (beta1's rule, beta2's rule) or one rule for both, got {value!r}")
        return (_parse_rule(value[0], "beta1"), _parse_rule(value[1], "beta2"))

    @field_validator("factor_bounds", "lr_bounds")
    @classmethod
    def _around_one(cls, value: tuple[float, float], info) -> tuple[float, float]:
        low, high = value
        if not (0.0 <= low <= 1.0 <= high < math.inf) or (info.field_name == "factor_bounds" and low == 0.0):
            raise ValueError(
                f"must be (low, high) with {'0 <' if info.field_name == 'factor_bounds' else '0 <='} low <= 1 <= high, "
                f"finite; got {value!r}"
            )
        return value

    @field_validator("momentum_bounds", "beta2_bounds")
    @classmethod
    def _decay_bounds(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= value[0] <= value[1] < 1.0:
            raise ValueError(f"must be (low, high) with 0 <= low <= high < 1, got {value!r}")
        return value

    @field_validator("lr_limits")
    @classmethod
    def _limits(cls, value: tuple[float | None, float | None]) -> tuple[float | None, float | None]:
        low, high = value
        if (low is not None and low < 0) or (low is not None and high is not None and low > high):
            raise ValueError(f"must be (min, max), either None, with 0 <= min <= max; got {value!r}")
        return value

    @model_validator(mode="after")
    def _positive_relative(self) -> AdaptiveConfig:
        if self.relative_gain * self.relative_clip >= 1.0:
            raise ValueError(
                "relative_gain * relative_clip must be below 1 (so a worsening step keeps the factor positive), got "
                f"{self.relative_gain} * {self.relative_clip}"
            )
        return self

    def rules(self) -> dict[str, tuple[str, ...]]:
        """``{knob: (term, ...)}`` for every knob that has a rule."""
        rules = {
            "lr": self.lr_rule,
            "momentum": self.momentum_rule,
            "beta1": self.betas_rule[0],
            "beta2": self.betas_rule[1],
            "alpha": self.alpha_rule,
            "weight_decay": self.wd_rule,
        }
        return {knob: tuple(rule.split("+")) for knob, rule in rules.items() if rule}

    def replace(self, **changes: Any) -> AdaptiveConfig:
        """A validated copy with some keys changed."""
        return type(self)(**{**self.model_dump(), **changes})


def parse_entry(entry: Any) -> AdaptiveConfig:
    """The builder's ``adapt:`` entry (a mapping of :class:`AdaptiveConfig` keys), validated."""
    if isinstance(entry, AdaptiveConfig):
        return entry
    if not isinstance(entry, Mapping):
        raise ValueError(
            f"must map AdaptiveOpt keys (lr_rule, momentum_rule, ...) to values, got {type(entry).__name__}"
        )
    unknown = [key for key in entry if key not in AdaptiveConfig.model_fields]
    if unknown:
        valid = list(AdaptiveConfig.model_fields)
        hints = [f"{shown(k)}{suggest(k, valid)}" for k in unknown]
        raise ValueError(f"unknown key(s) {', '.join(hints)}; valid keys: {', '.join(valid)}")
    return AdaptiveConfig(**entry)


# --- the rules as pure functions ---------------------------------------------------------------


def init(
    config: AdaptiveConfig, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
) -> dict[str, Any]:
    """The rule state before any loss: statistics, each (knob, term)'s state, and the last factors.

    ``{"t", "fast", "slow", "ref", "window", "terms": {knob: {term: {...}}}, "factors": {knob: f}}``,
    all tensors (``t`` and the cosine_restart counters int64, the rest ``dtype``)."""
    real = lambda value: torch.tensor(value, dtype=dtype, device=device)  # noqa: E731
    count = lambda value: torch.tensor(value, dtype=torch.int64, device=device)  # noqa: E731
    terms: dict[str, dict[str, dict[str, Tensor]]] = {}
    for knob, rule in config.rules().items():
        terms[knob] = {}
        for term in rule:
            if term in ("trend", "relative", "stable"):
                terms[knob][term] = {"value": real(1.0)}
            elif term == "cosine_restart":
                terms[knob][term] = {"t_cur": count(0), "t_i": count(config.cycle_length)}
    return {
        "t": count(0),
        "fast": real(0.0),
        "slow": real(0.0),
        "ref": real(0.0),
        "window": torch.zeros(config.var_window, dtype=dtype, device=device),
        "terms": terms,
        "factors": {knob: real(1.0) for knob in config.rules()},
    }


def _statistics(state: Mapping[str, Any], loss: Tensor, config: AdaptiveConfig) -> dict[str, Tensor]:
    t = state["t"]
    first = t == 0
    fast = torch.where(first, loss, config.fast_beta * state["fast"] + (1 - config.fast_beta) * loss)
    slow = torch.where(first, loss, config.slow_beta * state["slow"] + (1 - config.slow_beta) * loss)
    ref = torch.where(first, loss, state["ref"])
    # The window is a ring buffer: the t-th loss goes to slot t mod W; the first n slots are held.
    slots = torch.arange(config.var_window, device=t.device)
    window = torch.where(slots == t % config.var_window, loss, state["window"])
    held_count = torch.clamp(t + 1, max=config.var_window)
    held = slots < held_count
    n = held_count.to(loss.dtype)
    mean = torch.where(held, window, 0.0).sum() / n
    variance = torch.where(held, (window - mean) ** 2, 0.0).sum() / torch.clamp(n - 1, min=1.0)
    cv = torch.where(held_count >= 2, variance.sqrt() / (mean.abs() + _EPS), 0.0)
    r = (slow - fast) / (slow.abs() + _EPS)
    if config.trend_signal == "fast_slow":
        improving, worsening = r > config.improve_tol, r < -config.improve_tol
    else:  # the sibling scheduler's literal rule: the fast EMA against its previous value
        drop = state["fast"] - fast
        improving = (drop > config.ema_step_tol) & ~first
        worsening = (drop < -config.ema_step_tol) & ~first
    return {
        "t": t,
        "fast": fast,
        "slow": slow,
        "ref": ref,
        "window": window,
        "cv": cv,
        "r": r,
        "improving": improving,
        "worsening": worsening,
    }


def _term(
    term: str, knob: str, state: Mapping[str, Tensor] | None, s: Mapping[str, Tensor], config: AdaptiveConfig
) -> tuple[dict[str, Tensor], Tensor]:
    """One (knob, term): ``(its new state, its factor)``."""
    low, high = config.factor_bounds
    if term == "trend":
        full = lambda number: torch.full_like(state["value"], number)  # noqa: E731
        change = torch.where(
            s["improving"], full(config.trend_up), torch.where(s["worsening"], full(config.trend_down), full(1.0))
        )
        value = torch.clamp(state["value"] * change, low, high)
        return {"value": value}, (1.0 / value if knob == "weight_decay" else value)
    if term == "variance":
        return {}, 1.0 / (1.0 + config.var_gain * s["cv"])
    if term == "inverse":
        usable = (s["ref"] > 0) & (s["fast"] > 0)
        return {}, torch.where(usable, s["ref"] / torch.clamp(s["fast"], min=_EPS), 1.0)
    if term == "relative":
        step = 1.0 + config.relative_gain * torch.clamp(s["r"], -config.relative_clip, config.relative_clip)
        value = torch.clamp(state["value"] * step, low, high)
        return {"value": value}, value
    if term == "stable":
        target = 1.0 / (1.0 + config.var_gain * s["cv"])
        value = torch.clamp(config.stable_beta * state["value"] + (1 - config.stable_beta) * target, low, high)
        return {"value": value}, value
    if term == "cosine":
        return {}, _cosine(s["t"], torch.tensor(config.cycle_length, device=s["t"].device), s["fast"].dtype, config)
    if term == "cosine_restart":
        t_cur, t_i = state["t_cur"], state["t_i"]
        factor = _cosine(t_cur, t_i, s["fast"].dtype, config)
        t_cur = t_cur + 1
        restart = t_cur >= t_i
        grown = torch.floor(t_i.to(torch.float64) * config.cycle_mult).to(t_i.dtype)
        return {"t_cur": torch.where(restart, 0, t_cur), "t_i": torch.where(restart, grown, t_i)}, factor
    raise ValueError(f"unknown term {term!r}")


def _cosine(t: Tensor, period: Tensor, dtype: torch.dtype, config: AdaptiveConfig) -> Tensor:
    phase = t.to(dtype) / period.to(dtype)
    return half_cosine(1, config.cos_floor, math.pi * phase)


def update(state: Mapping[str, Any], loss: Any, config: AdaptiveConfig) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """One loss: ``(new state, {knob: factor})``, the factor being the product of the knob's terms.

    Pure and free of host reads (``torch.where`` instead of branches), so it may run on the loss's
    device or inside ``torch.compile``. A non-finite loss returns the state unchanged and the last
    factors again, so the knobs keep their values.
    """
    like = state["fast"]
    if isinstance(loss, Tensor):
        loss = loss.detach().to(device=like.device, dtype=like.dtype).reshape(())
    else:
        loss = torch.tensor(loss, device=like.device, dtype=like.dtype)
    accepted = torch.isfinite(loss)
    # The rejected branch is computed too (torch.where): feed it a finite stand-in.
    s = _statistics(state, torch.where(accepted, loss, like), config)
    terms, factors = {}, {}
    for knob, rule in config.rules().items():
        terms[knob], factor = {}, torch.ones((), dtype=like.dtype, device=like.device)
        for term in rule:
            term_state, term_factor = _term(term, knob, state["terms"][knob].get(term), s, config)
            if term_state:
                terms[knob][term] = term_state
            factor = factor * term_factor
        factors[knob] = factor
    new = {
        "t": state["t"] + 1,
        "fast": s["fast"],
        "slow": s["slow"],
        "ref": s["ref"],
        "window": s["window"],
        "terms": terms,
        "factors": factors,
    }
    new = pytree.tree_map(lambda fresh, old: torch.where(accepted, fresh, old), new, dict(state))
    return new, dict(new["factors"])


def knob_value(knob: str, base: Any, factor: Any, config: AdaptiveConfig) -> Tensor:
    """The bounded value of ``knob`` from its base and its factor (tensors or numbers, broadcast).

    A decay-type knob whose base is not in (0, 1), and a weight decay of 0, come back as the base.
    """
    factor = factor if isinstance(factor, Tensor) else torch.tensor(factor, dtype=torch.float64)
    factor = factor if factor.is_floating_point() else factor.to(torch.float64)
    base = (base if isinstance(base, Tensor) else torch.tensor(base, dtype=torch.float64)).to(
        device=factor.device, dtype=factor.dtype
    )
    if knob == "lr":
        low, high = config.lr_bounds
        value = torch.minimum(torch.maximum(base * factor, low * base), high * base)
        min_lr, max_lr = config.lr_limits
        if min_lr is not None:
            value = torch.clamp(value, min=min_lr)
        if max_lr is not None:
            value = torch.clamp(value, max=max_lr)
        return value
    if knob == "weight_decay":
        return torch.minimum(torch.clamp(base * factor, min=0.0), config.wd_max_ratio * base)
    if knob not in DECAY_KNOBS:
        raise ValueError(f"unknown knob {knob!r}; knobs: {', '.join(KNOBS)}")
    # Horizon space: H = 1/(1 - v) scales by the factor, so v = 1 - (1 - b)/f never reaches 1.
    low, high = config.momentum_bounds if knob in ("momentum", "beta1") else config.beta2_bounds
    adaptable = (base > 0) & (base < 1)
    value = 1.0 - (1.0 - base) / factor
    value = torch.minimum(torch.maximum(value, torch.clamp(base, max=low)), torch.clamp(base, min=high))
    return torch.where(adaptable, value, base)


def adaptable(knob: str, base: float) -> bool:
    """Whether a knob with this base value is ever changed (see :func:`knob_value`)."""
    if knob in DECAY_KNOBS:
        return 0.0 < base < 1.0
    return base != 0.0


# --- where each knob lives -------------------------------------------------------------------

# (key, index): group[key], or group[key][index] for a tuple such as betas.
