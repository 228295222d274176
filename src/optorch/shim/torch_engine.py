"""Engine ``"torch"``: torch.optim's own kernel on the shim's param groups and state, where the math
and the state are exactly torch's (:data:`TORCH_KERNELS`: where its fused kernel is verified equal to
torch.optim's default one)."""

from __future__ import annotations

import functools
import inspect
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..core import distributed, ops
from ..core.algorithm import Algorithm
from ..core.compat import torch_adagrad, torch_adam, torch_sgd
from .protocol import Work

__all__ = ["EXECUTION_KEYS", "FUSED_CALLS", "TORCH_KERNELS", "TorchEngine"]

TORCH_KERNELS: dict[tuple[str, str], tuple[torch.dtype, ...]] = {
    ("sgd", "cpu"): (torch.float32, torch.float64),
    ("adam", "cpu"): (torch.float32, torch.float64),
    ("adamw", "cpu"): (torch.float32, torch.float64),
    ("adagrad", "cpu"): (torch.float32, torch.float64),
    ("sgd", "cuda"): (torch.float32, torch.float64),
    ("adam", "cuda"): (torch.float32, torch.float64),
    ("adamw", "cuda"): (torch.float32, torch.float64),
}
"""``(algorithm, device type) -> dtypes`` where torch's fused kernel equals torch.optim's default
kernel (checked by ``test_engines.py`` and ``optorch verify``); ``"auto"`` uses torch's kernel only
there. Not listed, for example: fused SGD in bfloat16/float16 on CPU, which torch 2.13 computes
wrongly (a difference of several units after 20 steps)."""


EXECUTION_KEYS = ("foreach", "fused", "capturable", "differentiable")


class TorchEngine:
    """torch.optim's own step on the shim's param groups and state.

    An inner torch optimizer supplies the kernel; before each step it is pointed at the shim's
    ``param_groups`` and ``state`` as they are then, so both are always torch's own truth. State
    keys that are not torch's (a combinator's ``ema``, ``grad_acc``) are hidden from it while it steps.
    """

    name = "torch"

    def __init__(
        self,
        algorithm: Algorithm,
        param_groups: list[dict[str, Any]],
        defaults: dict[str, Any],
        extras: frozenset[str] = frozenset(),
    ):
        self.algorithm = algorithm
        self.extras = extras
        torch_class = algorithm.torch_optimizer
        signature = inspect.signature(torch_class.__init__).parameters
        # A checkpoint carries torch's default execution flags: how this shim runs is not part of the
        # optimizer's state, and a torch.optim optimizer loading it should run as it would anyway.
        self.exported_flags = {key: signature[key].default for key in EXECUTION_KEYS if key in signature}
        params = [p for group in param_groups for p in group["params"]]
        fused = "fused" in signature and self._verified(params)
        self.flags = {"fused": True} if fused else {}
        # The config's values as keyword arguments too: some torch optimizers (Adagrad) read them to
        # fill their state at construction.
        self.inner = _bare(torch_class, defaults, self.flags)
        self._fused_ok: bool | None = None  # the fused kernel verified for every param that stepped last
        self.unhooked_step = torch_class.step.__wrapped__  # the shim's own step already ran the hooks
        for group in param_groups:
            self._complete(group)

    def _complete(self, group: dict[str, Any]) -> None:
        # torch's step reads its execution keys (foreach, capturable, ...) from every group
        for key, value in self.inner.defaults.items():
            group.setdefault(key, value)
        group.update(self.flags)

    def _verified(self, params: Sequence[Tensor]) -> bool:
        # DTensors (FSDP2): torch's fused kernels have no sharding strategy; its default one runs them
        return not any(map(distributed.is_dtensor, params)) and all(
            p.dtype in TORCH_KERNELS.get((self.algorithm.name, p.device.type), ()) for p in params
        )

    def add_group(self, group: dict[str, Any]) -> None:
        if self.flags and not self._verified(group["params"]):
            raise ValueError(
                "these params cannot run torch's fused kernel like the rest; build with engine='eager' or 'compiled'"
            )
        self._complete(group)

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        work: Sequence[Work],
        shared: tuple = (),
        mask: None = None,
        fresh: Callable[..., dict[str, Tensor]] | None = None,
        changed: bool = True,
    ) -> list:
        """``changed``: whether a param or its state may have changed since the last step (the
        shim's checks saw new data, or a param steps for the first time): the fused kernel's
        dtype check is then run again."""
        call = FUSED_CALLS.get(self.algorithm.name) if self.flags.get("fused") else None
        if call is not None and (changed or self._fused_ok is None):
            self._fused_ok = all(self._verified(item.params) for item in work)
        rest = []
        for item, group in zip(work, optimizer.param_groups):
            # torch's functional kernel on lists built from what the shim checked (the step of
            # torch's own optimizer would walk every param again to build them)
            done = (
                call is not None
                and self._fused_ok
                and call(item.params, item.grads, item.states, group, functools.partial(fresh, config=item.config))
            )
            if item.params and not done:
                rest.append(group)
        if rest:
            self._torch_step(optimizer, rest)
        return []

    def _torch_step(self, optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
        """torch's own ``step`` over ``groups``: its default kernel where the fused one is not
        verified for a param's dtype now (the model was converted after building) or cannot run
        (fused SGD cannot start momentum buffers for some params while others have them)."""
        inner = self.inner
        inner.param_groups = groups
        view = optimizer.state
        if self.extras:  # torch decides "no state yet" by an empty dict: it must not see the combinators' keys
            view = defaultdict(dict)
            for param, state in optimizer.state.items():
                view[param] = {key: value for key, value in state.items() if key not in self.extras}
        inner.state = view
        unfused = [
            g
            for g in groups
            if g.get("fused") and (not self._verified(g["params"]) or self._starts_some_state(g, view))
        ]
        for group in unfused:
            group["fused"] = False
        try:
            self.unhooked_step(inner)
        finally:
            for group in unfused:
                group["fused"] = True
        if self.extras:
            for param, state in view.items():
                optimizer.state[param].update(state)

    @staticmethod
    def _starts_some_state(group: dict[str, Any], state: Any) -> bool:
        started = {bool(state.get(p)) for p in group["params"] if p.grad is not None}
        return len(started) == 2

    def export(self, group: dict[str, Any]) -> None:
        group.update(self.exported_flags)

    def step_dtype_device(self, param: Tensor) -> tuple[torch.dtype, torch.device]:
        """Where torch keeps a param's ``step`` under this engine's flags: float32 on the param's
        device for a fused kernel, else on the CPU in torch's scalar dtype (float64 when that is the
        default dtype)."""
        if self.flags.get("fused"):
            return torch.float32, param.device
        return ops.torch_scalar_dtype(), torch.device("cpu")


def _fused_adam(params: list[Tensor], grads: list[Tensor], states: list[dict], group: dict, fresh) -> bool:
    steps, exp_avgs, exp_avg_sqs, maxima = [], [], [], []
    for param, state in zip(params, states):
        if "step" not in state:
            state.update(fresh(param))
        steps.append(state["step"])
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        if group["amsgrad"]:
            maxima.append(state["max_exp_avg_sq"])
    beta1, beta2 = group["betas"]
    torch_adam(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        maxima,
        steps,
        fused=True,
        decoupled_weight_decay=group["decoupled_weight_decay"],
        amsgrad=group["amsgrad"],
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=group["maximize"],
    )
    return True


def _fused_sgd(params: list[Tensor], grads: list[Tensor], states: list[dict], group: dict, fresh) -> bool:
    buffers = [state.get("momentum_buffer") for state in states] if group["momentum"] != 0 else []
    if len({buffer is None for buffer in buffers}) == 2:
        return False  # some buffers start now, others run: only torch's default kernel can (a layer unfrozen later)
    torch_sgd(
        params,
        grads,
        buffers,
        fused=True,
        weight_decay=group["weight_decay"],
        momentum=group["momentum"],
        lr=group["lr"],
        dampening=group["dampening"],
        nesterov=group["nesterov"],
        maximize=group["maximize"],
    )
    for state, buffer in zip(states, buffers):
        state["momentum_buffer"] = buffer
    return True


def _fused_adagrad(params: list[Tensor], grads: list[Tensor], states: list[dict], group: dict, fresh) -> bool:
    sums, steps = [], []
    for param, state in zip(params, states):
        if "sum" not in state:
            state.update(fresh(param))
        sums.append(state["sum"])
        steps.append(state["step"])
    torch_adagrad(
        params,
        grads,
        sums,
        steps,
        fused=True,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        lr_decay=group["lr_decay"],
        eps=group["eps"],
        maximize=group["maximize"],
    )
    return True


FUSED_CALLS = {"adam": _fused_adam, "adamw": _fused_adam, "sgd": _fused_sgd, "adagrad": _fused_adagrad}
"""torch.optim's functional fused kernels for the algorithms on :data:`TORCH_KERNELS`, called as
torch's own ``step`` calls them; each returns False where it cannot run (then torch's ``step`` runs)."""


def _bare(
    torch_class: type[torch.optim.Optimizer], defaults: dict[str, Any], flags: dict[str, Any]
) -> torch.optim.Optimizer:
    """A torch optimizer used only for its ``step``: built on a placeholder param, then emptied."""
    placeholder = torch.nn.Parameter(torch.zeros(1))
    accepted = inspect.signature(
        torch_class.__init__
    ).parameters  # (an unpickled defaults has torch's "differentiable")
    inner = torch_class([placeholder], **{k: v for k, v in defaults.items() if k in accepted}, **flags)
    inner.state.clear()
    return inner
