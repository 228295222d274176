"""``AdaptiveOpt``: the adaptive rules of :mod:`optorch.functional.adaptive` run on a live optimizer,
writing the knobs into its param groups before each step (and, for an ``optorch.Optimizer``, keeping
the rule state in its ``state_dict``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.compat import pytree
from ..core.scalars import is_real
from ..functional.adaptive import AdaptiveConfig, adaptable, init, knob_value, update
from ..functional.knobs import BASE_PREFIX, flatten_state, locations, read_knob

__all__ = ["AdaptiveOpt", "plot_history"]


class AdaptiveOpt:
    """Adapts the hyperparameters of ``optimizer`` from the loss, outside autograd.

    ::

        adaptive = optorch.AdaptiveOpt(optimizer, lr_rule="trend+cosine_restart", momentum_rule="relative")
        loss.backward()
        adaptive.step_loss(loss)      # writes the knobs the next optimizer.step() uses
        optimizer.step()
        optimizer.zero_grad()

    ``optimizer`` is a torch.optim optimizer, an :class:`optorch.Optimizer`, or a bitsandbytes 8-bit
    optimizer (recognised by its ``optimizer_name``). The keys are :class:`AdaptiveConfig`'s (or pass
    ``config=``). Only knobs the optimizer has are adapted; the values are global across param groups
    (each group scales its own base). ``history`` records the loss and every knob of group 0 per call.
    """

    def __init__(self, optimizer: Any, config: AdaptiveConfig | None = None, **keys: Any):
        if config is not None and keys:
            raise TypeError(f"give AdaptiveOpt either config= or keys, not both (got {', '.join(keys)})")
        self.config = config if config is not None else AdaptiveConfig(**keys)
        self.optimizer = optimizer
        self.optimizer_name = getattr(optimizer, "optimizer_name", None)
        self.state = init(self.config)
        link = getattr(optimizer, "_link", None)
        self._bases_in_groups = link is not None
        self._bases_beside: list[dict[str, Any]] = []
        if link is not None:  # an optorch shim: the rule state rides in its param groups (adapt.*)
            flat = flatten_state(self.state)
            link(flat)
            self.state = pytree.tree_unflatten(
                [optimizer.linked(key) for key in flat], pytree.tree_flatten(self.state)[1]
            )
        self._capture_groups()
        self.last_factors: dict[str, float] = {}
        self.history: dict[str, list[float]] = {"loss": []}

    @property
    def rules(self) -> dict[str, tuple[str, ...]]:
        return self.config.rules()

    def _locations(self, group: Mapping[str, Any]) -> dict[str, tuple[str, int | None]]:
        return locations(group, self.optimizer_name)

    def _capture_groups(self) -> None:
        """Record the base of each adapted knob in every group that has none yet (``adapt.base.<knob>``):
        in the group itself for an optorch shim, so it is saved with its param groups; beside it for
        any other optimizer, whose param groups are left as they are."""
        rules = self.config.rules()
        for index, group in enumerate(self.optimizer.param_groups):
            places, store = self._locations(group), self._base_store(index)
            for knob in rules:
                if knob in places and BASE_PREFIX + knob not in store:
                    store[BASE_PREFIX + knob] = float(read_knob(group, places[knob]))

    def _base_store(self, index: int) -> dict[str, Any]:
        if self._bases_in_groups:
            return self.optimizer.param_groups[index]
        while len(self._bases_beside) <= index:
            self._bases_beside.append({})
        return self._bases_beside[index]

    @property
    def bases(self) -> list[dict[str, float]]:
        """Each param group's base value of every adapted knob it has."""
        return [
            {
                key[len(BASE_PREFIX) :]: value
                for key, value in self._base_store(i).items()
                if isinstance(key, str) and key.startswith(BASE_PREFIX)
            }
            for i in range(len(self.optimizer.param_groups))
        ]

    @torch.no_grad()
    def step_loss(self, loss: Any) -> None:
        """Adapt the knobs to this loss (a tensor or a number); one host read. A non-finite loss
        changes nothing. Under DDP, pass the loss tensor: its mean over the ranks is used."""
        value = _loss_value(loss)
        self._capture_groups()
        if math.isfinite(value):
            new, factors = update(self.state, torch.tensor(value, dtype=torch.float64), self.config)
            pytree.tree_map(
                lambda old, fresh: old.copy_(fresh), self.state, new
            )  # in place: the shim's groups hold these
            self.last_factors = {knob: float(f) for knob, f in factors.items()}
            self._write(factors)
        self._record(value)

    def _write(self, factors: Mapping[str, Tensor]) -> None:
        for knob, factor in factors.items():
            targets = [
                (group, base[knob])
                for group, base in zip(self.optimizer.param_groups, self.bases)
                if knob in base and adaptable(knob, base[knob])
            ]
            if not targets:
                continue
            values = knob_value(
                knob, torch.tensor([b for _, b in targets], dtype=torch.float64), factor, self.config
            ).tolist()
            for (group, _), value in zip(targets, values):
                _write(group, self._locations(group)[knob], value)

    def _record(self, loss: float) -> None:
        knobs = self.knobs()
        for name in set(self.history) - {"loss"} - set(knobs):
            self.history[name].append(math.nan)
        for name, value in knobs.items():
            self.history.setdefault(name, [math.nan] * len(self.history["loss"])).append(value)
        self.history["loss"].append(loss)

    # -- reading the knobs (group 0) ------------------------------------------------------------

    def knobs(self, group: int = 0) -> dict[str, float]:
        """Every knob the param group has, by knob name, as floats."""
        group_ = self.optimizer.param_groups[group]
        return {knob: float(read_knob(group_, place)) for knob, place in self._locations(group_).items()}

    def _knob(self, name: str) -> float | None:
        return self.knobs().get(name)

    @property
    def lr(self) -> float:
        return self.knobs()["lr"]

    @property
    def momentum(self) -> float | None:
        return self._knob("momentum")

    @property
    def betas(self) -> tuple[float, float] | None:
        knobs = self.knobs()
        return (knobs["beta1"], knobs["beta2"]) if "beta1" in knobs and "beta2" in knobs else None

    @property
    def alpha(self) -> float | None:
        return self._knob("alpha")

    @property
    def wd(self) -> float | None:
        return self._knob("weight_decay")

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The rule state (statistics, window, each rule's state, t) and the per-group bases. The
        history is not saved (it grows with the run)."""
        return {
            "state": pytree.tree_map(lambda x: x.clone(), self.state),
            "bases": [dict(b) for b in self.bases],
            "rules": self._rule_strings(),
        }

    def _rule_strings(self) -> dict[str, str]:
        return {knob: "+".join(terms) for knob, terms in self.rules.items()}

    def check_state_dict(self, state_dict: Any) -> None:
        """Raise ``ValueError`` naming the mismatch if ``state_dict`` does not fit these rules."""
        if not isinstance(state_dict, Mapping) or set(state_dict) != {"state", "bases", "rules"}:
            raise ValueError("an AdaptiveOpt state_dict is a dict with 'state', 'bases' and 'rules'")
        if state_dict["rules"] != self._rule_strings():
            raise ValueError(
                f"AdaptiveOpt: the checkpoint's rules {state_dict['rules']} are not these rules {self._rule_strings()}"
            )
        expected_leaves, expected_spec = pytree.tree_flatten(self.state)
        try:
            leaves, spec = pytree.tree_flatten(state_dict["state"])
        except Exception as error:  # noqa: BLE001 - any malformed container
            raise ValueError(f"AdaptiveOpt: unreadable state: {error}") from error
        if spec != expected_spec:
            raise ValueError(
                f"AdaptiveOpt: the saved rule state has another layout (other rules or var_window?): "
                f"saved {pytree.tree_unflatten([0] * len(leaves), spec)}, expected "
                f"{pytree.tree_unflatten([0] * len(expected_leaves), expected_spec)}"
            )
        for saved, expected in zip(leaves, expected_leaves):
            if not isinstance(saved, Tensor) or saved.shape != expected.shape:
                shape = tuple(saved.shape) if isinstance(saved, Tensor) else type(saved).__name__
                raise ValueError(
                    "AdaptiveOpt: the saved rule state has another layout (another var_window?): an entry of shape "
                    f"{shape}, expected {tuple(expected.shape)}"
                )
        bases_ = state_dict["bases"]
        if not isinstance(bases_, list) or len(bases_) > len(self.optimizer.param_groups):
            raise ValueError(f"AdaptiveOpt: 'bases' must list at most {len(self.optimizer.param_groups)} param groups")

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.check_state_dict(state_dict)
        pytree.tree_map(
            lambda own, saved: own.copy_(saved.detach().to(device=own.device, dtype=own.dtype)),
            self.state,
            dict(state_dict["state"]),
        )
        for index, bases_ in enumerate(state_dict["bases"]):
            store = self._base_store(index)
            for key in [key for key in store if isinstance(key, str) and key.startswith(BASE_PREFIX)]:
                del store[key]
            store.update({BASE_PREFIX + knob: float(v) for knob, v in bases_.items()})
        self._capture_groups()
        self.last_factors = (
            {knob: float(f) for knob, f in self.state["factors"].items()} if int(self.state["t"]) else {}
        )

    # -- plotting -----------------------------------------------------------------------------

    def plot(self, path: str | Path) -> Path:
        """Draw the loss and every knob over the steps into a PNG (matplotlib, imported here)."""
        return plot_history(self.history, path, title=repr(self))

    def __repr__(self) -> str:
        rules = ", ".join(knob + "=" + "+".join(terms) for knob, terms in self.rules.items())
        return f"AdaptiveOpt({type(self.optimizer).__name__}, {rules or 'no rules'})"


def plot_history(history: Mapping[str, list[float]], path: str | Path, title: str = "loss and knobs") -> Path:
    """One PNG: the loss (log scale when positive) on top, then one panel per knob, against the step."""
    from matplotlib.figure import Figure  # no pyplot: no backend or global state is touched

    names = ["loss", *(k for k in history if k != "loss")]
    fig = Figure(figsize=(8, 2.2 * len(names)), layout="constrained")
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, names):
        values = history[name]
        ax.plot(range(1, len(values) + 1), values, color="C0" if name == "loss" else "C1")
        finite = [v for v in values if math.isfinite(v)]
        if name == "loss" and finite and min(finite) > 0:
            ax.set_yscale("log")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    axes[0].set_title(title)
    axes[-1].set_xlabel("step")
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def _loss_value(loss: Any) -> float:
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(f"step_loss needs one loss value, got a tensor of shape {tuple(loss.shape)}")
        loss = loss.detach()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank must see the same loss, or their lrs (and then their params) drift apart.
            loss = loss.to(torch.float64).clone()
            dist.all_reduce(loss)
            loss = loss / dist.get_world_size()
        return float(loss)
    if not is_real(loss):
        raise TypeError(f"step_loss needs a loss tensor or a number, got {type(loss).__name__}")
    return float(loss)


def _write(group: dict[str, Any], location: tuple[str, int | None], value: float) -> None:
    """Write a knob; a tensor-valued one (capturable/fused lr or betas) in place, keeping the object."""
    key, index = location
    current = read_knob(group, location)
    if isinstance(current, Tensor):
        current.fill_(value)
    elif index is None:
        group[key] = value
    else:
        group[key] = (*group[key][:index], value, *group[key][index + 1 :])
