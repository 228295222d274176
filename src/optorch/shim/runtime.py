"""The combinators around an ``optorch.Optimizer``'s step, run in place on ``.grad``.

The math is :mod:`optorch.functional.combinators`' functions, in the order
:meth:`optorch.functional.settings.Combinators.wrap` nests the pure wrappers, so a built optimizer
steps as its pure stepper does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..core import distributed, ops
from ..functional import amp
from ..functional.combinators import clip_coefficient, ema_decay, ema_update, finite_counters, global_norm
from ..functional.settings import AROUND_STEP, Combinators

__all__ = ["InPlace", "attach"]


def attach(settings: Combinators | None, optimizer: Any) -> InPlace | None:
    """The in-place runtime for an ``optorch.Optimizer`` (None when nothing runs around its step)."""
    if settings is None:
        return None
    if not any(settings.is_set(entry) for entry in AROUND_STEP if entry != "step"):
        return None
    return InPlace(settings, optimizer)


class _Pass:
    """One call of :meth:`InPlace.before_step`: the params that step, and whether they do so far."""

    def __init__(self, work: Sequence[Any], params: list[Tensor]):
        self.work, self.params = work, params
        self.apply: bool | Tensor = True

    @property
    def grads(self) -> list[Tensor]:
        return [p.grad for p in self.params]


class InPlace:
    """The combinators around an ``optorch.Optimizer``'s step, on ``.grad`` in place.

    ``Optimizer.step`` calls :meth:`before_step` (accumulate, unscale, check, clip: it returns False
    to skip the engine step, and the shim then also leaves its schedules where they are) and, after
    a step, :meth:`after_step` (EMA). The math is this module's functions, so a built optimizer steps
    as :func:`from_config`'s pure stepper does.

    Its state lives where torch's tools look: per parameter in ``optimizer.state`` (``grad_acc``,
    the accumulated gradient; ``ema``, the average), and the counters in every param group, linked
    (``accumulate.micro_step``; ``skip.notfinite_count``, ``skip.total_notfinite``,
    ``skip.last_finite``; ``amp.scale``, ``amp.growth_tracker``, ``amp.overflows``; ``ema.count``).
    """

    def __init__(self, settings: Combinators, optimizer: Any):
        self.settings = settings
        self.optimizer = optimizer
        params = self._params()
        device = params[0].device if params else None
        count = lambda: torch.zeros((), dtype=torch.int64)  # noqa: E731 - host counters: read without a device sync
        values: dict[str, Tensor] = {}
        if settings.accumulate_steps > 1:
            values["accumulate.micro_step"] = count()
        if settings.skip_nonfinite:
            values.update(
                {
                    "skip.notfinite_count": count(),
                    "skip.total_notfinite": count(),
                    "skip.last_finite": torch.ones((), dtype=torch.bool),
                }
            )
        if settings.amp is not None:
            scaler = amp.init(settings.amp, device)
            values.update(
                {"amp.scale": scaler.scale, "amp.growth_tracker": scaler.growth_tracker, "amp.overflows": count()}
            )
        if settings.ema is not None:
            values["ema.count"] = torch.zeros((), dtype=torch.int64, device=device)
        optimizer._link(values)  # kept where they are when the optimizer already has them (a copy)
        self.last_grad_norm: Tensor | None = None
        """The global gradient norm the last step clipped with (``clip_grad_norm`` only)."""

    def _value(self, key: str) -> Tensor:
        return self.optimizer.linked(key)

    @property
    def stepped(self) -> bool:
        """Whether the last ``optimizer.step()`` updated the params (``not optimizer.step_was_skipped``)."""
        return not self.optimizer.step_was_skipped

    @property
    def overflows(self) -> int:
        """Steps skipped for an inf/NaN in the scaled gradients (``amp``)."""
        return int(self._value("amp.overflows"))

    @property
    def skipped(self) -> int:
        """Steps skipped for a non-finite gradient so far (``skip_nonfinite``)."""
        return int(self._value("skip.total_notfinite"))

    @property
    def scaler(self) -> amp.ScalerState | None:
        """The loss scaler's state (``amp``): live tensors."""
        if self.settings.amp is None:
            return None
        return amp.ScalerState(self._value("amp.scale"), self._value("amp.growth_tracker"))

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``loss * scale``: call ``backward()`` on this (``amp`` entry)."""
        if self.settings.amp is None:
            raise RuntimeError("this optimizer has no loss scaler: add an 'amp' entry to its config")
        return amp.scale_loss(loss, self.scaler)

    def state_keys(self) -> frozenset[str]:
        return self.settings.state_keys()

    def _params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def new_param(self, param: Tensor, state: dict[str, Tensor]) -> None:
        """A param's first step: its average starts at its value before the update; its accumulated
        gradient at zero, if it has none yet (so a new state has every key a checkpoint has: DCP's
        flattened loading reads the keys of the state it loads into)."""
        if self.settings.ema is not None and "ema" not in state:
            state["ema"] = param.detach().clone()
        if self.settings.accumulate_steps > 1 and "grad_acc" not in state:
            state["grad_acc"] = torch.zeros_like(param)

    @torch.no_grad()
    def before_step(self, work: Sequence[Any]) -> bool | Tensor:
        """Accumulate, unscale, check and clip the gradients of ``work``; whether to step.

        The stages run in :data:`~optorch.functional.settings.AROUND_STEP`'s order, each only where
        its entry is set. An accumulating call returns False (one host read of a CPU counter).
        Otherwise the loss scale and the skip counters are updated with tensor ops, and the answer is a
        0-dim bool tensor (no NaN/inf, no overflow) that the shim reads once eagerly, as
        ``GradScaler.step`` does, and that a compiled step applies with ``torch.where`` instead, so
        neither amp nor skip_nonfinite costs a graph break there."""
        step = _Pass(work, [p for item in work for p in item.params])
        for entry in AROUND_STEP[: AROUND_STEP.index("step")]:
            if self.settings.is_set(entry) and getattr(self, f"_{entry}")(step) is False:
                return False
        if torch.compiler.is_compiling() or step.apply is True:
            return step.apply
        return bool(step.apply)  # one host read, as GradScaler.step

    def _accumulate_steps(self, step: _Pass) -> bool:
        """Add the gradients to the accumulated ones; on the k-th call, step on their mean."""
        params, state, k = step.params, self.optimizer.state, self.settings.accumulate_steps
        for param in params:  # zeros + g, as multi_steps sums (a first -0.0 becomes 0.0 in both)
            entry = state[param]
            if "grad_acc" not in entry:
                entry["grad_acc"] = torch.zeros_like(param.grad)
            entry["grad_acc"].add_(param.grad)
        micro_step = self._value("accumulate.micro_step")
        ops.assign(micro_step, micro_step + 1)
        if int(micro_step) < k:
            return False
        with_grad = {id(p) for p in params}
        for param in self._params():
            acc = state[param].get("grad_acc") if param in state else None
            # a param without a gradient now steps if it had one earlier in this window
            if acc is None or (id(param) not in with_grad and not bool(distributed.full(acc.any()))):
                continue
            if param.grad is None:
                param.grad = acc / k
            else:
                param.grad.copy_(acc / k)
            acc.zero_()
            if id(param) not in with_grad:
                self._adopt(step.work, param)
        ops.assign(micro_step, 0)
        step.params = [p for item in step.work for p in item.params]
        return True

    def _amp(self, step: _Pass) -> None:
        """Unscale the gradients and update the loss scale; an overflowing step leaves them scaled."""
        grads = step.grads
        partition = self.optimizer.partition  # this rank's share of the params (ZeRO): decide over all shares
        unscaled, found_inf = amp.unscale(grads, self.scaler)
        if partition is not None:
            found_inf = partition.reduce(found_inf, "max")
        new = amp.update(self.scaler, found_inf, self.settings.amp)
        ops.assign(self._value("amp.scale"), new.scale)
        ops.assign(self._value("amp.growth_tracker"), new.growth_tracker)
        overflow = (found_inf != 0).cpu()
        ops.assign(self._value("amp.overflows"), self._value("amp.overflows") + overflow.to(torch.int64))
        step.apply = ~overflow
        for grad, value in zip(grads, unscaled):  # as GradScaler: an overflowing step leaves them scaled
            grad.copy_(torch.where(step.apply.to(grad.device), value, grad))

    def _skip_nonfinite(self, step: _Pass) -> None:
        """Count a step whose gradients hold a NaN or an inf, and skip it."""
        partition, apply = self.optimizer.partition, step.apply
        names = ("notfinite_count", "total_notfinite", "last_finite")
        counters = {name: self._value(f"skip.{name}") for name in names}
        finite = ops.all_finite(step.grads).cpu()
        if partition is not None:
            finite = partition.reduce(finite, "min").bool()
        finite, new_counters = finite_counters(finite, counters, None)
        for name in names:  # counted only on steps amp let through, as apply_if_finite inside amp.scaled
            ops.assign(
                counters[name],
                new_counters[name] if apply is True else torch.where(apply, new_counters[name], counters[name]),
            )
        step.apply = finite if apply is True else apply & finite

    def _clip_grad_norm(self, step: _Pass) -> None:
        """Scale the gradients to a global norm of at most ``clip_grad_norm``."""
        grads, partition = step.grads, self.optimizer.partition
        if not grads and partition is None:
            return
        self.last_grad_norm = global_norm(grads) if partition is None else partition.norm(global_norm(grads))
        coefficient = clip_coefficient(self.last_grad_norm, self.settings.clip_grad_norm)
        for grad in grads:
            grad.mul_(coefficient.to(grad.device))

    def _adopt(self, work: Sequence[Any], param: Tensor) -> None:
        """A param with no gradient this call but some in the accumulated ones steps too."""
        for item, group in zip(work, self.optimizer.param_groups):
            if any(param is p for p in group["params"]):
                item.params.append(param)
                item.grads.append(param.grad)
                item.states.append(
                    self.optimizer._states.check(param, self.optimizer.state, item.config)
                )  # eager only: a host read got us here
                return

    @torch.no_grad()
    def after_step(self, apply: bool | Tensor = True) -> None:
        """The stages after the step (:data:`~optorch.functional.settings.AROUND_STEP`: the EMA);
        ``apply`` is :meth:`before_step`'s answer (a tensor inside torch.compile)."""
        for entry in AROUND_STEP[AROUND_STEP.index("step") + 1 :]:
            if self.settings.is_set(entry):
                getattr(self, f"_{entry}")(apply)

    def _ema(self, apply: bool | Tensor) -> None:
        """Move the EMA of the params toward them (where the step applied)."""
        count = self._value("ema.count")
        counted = count + (apply.to(count.device, count.dtype) if isinstance(apply, Tensor) else 1)
        decay = ema_decay(self.settings.ema.decay, counted, self.settings.ema.warmup)
        ops.assign(count, counted)
        pairs = [(state["ema"], p) for p in self._params() if (state := self.optimizer.state.get(p)) and "ema" in state]
        for average, new in zip([a for a, _ in pairs], ema_update([a for a, _ in pairs], [p for _, p in pairs], decay)):
            average.copy_(new if apply is True else torch.where(apply.to(new.device), new, average))

    def ema_params(self) -> list[Tensor]:
        """The EMA of each param, in ``param_groups`` order (live tensors: read, don't write). A param
        that has not stepped yet is its own average."""
        if self.settings.ema is None:
            raise RuntimeError("this optimizer keeps no EMA: add an 'ema' entry to its config")
        state = self.optimizer.state
        return [state[p]["ema"] if p in state and "ema" in state[p] else p.detach() for p in self._params()]

    @contextlib.contextmanager
    def swap_ema(self) -> Iterator[None]:
        """Within the block the params hold their EMA (e.g. to evaluate); restored on exit."""
        averages, params = self.ema_params(), self._params()
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            for p, average in zip(params, averages):
                p.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(params, saved):
                    p.copy_(value)
