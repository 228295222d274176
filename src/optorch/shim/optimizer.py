"""``optorch.Optimizer``: a ``torch.optim.Optimizer`` that runs an optorch algorithm in place.

The shim is what ``optorch.build`` returns. It behaves like the torch optimizer it stands for:
``param_groups`` carry every hyperparameter under its torch name (so every ``lr_scheduler`` works),
``state_dict()`` has torch's layout and torch's per-parameter keys (so checkpoints interchange with
torch.optim), and ``zero_grad``, ``step(closure)``, ``add_param_group`` and the optimizer hooks are
torch's own.

It lives by torch's rules for an optimizer (``docs/guide.md``, "The shim as a torch.optim citizen"):

* it never changes where a parameter's data or its ``.grad`` lives, and each step works on the
  tensors the param groups hold then (``p.data = ...``, ``model.to(...)``, DDP/ZeRO bucket views);
* ``optimizer.state`` is the truth between steps: writes to it (in place, by replacement,
  ``clear()``) take effect, and state written directly is checked before anything changes;
* everything needed to resume lives in ``state`` (per parameter: the algorithm's keys, and the
  combinators' ``ema`` and ``grad_acc``) and in ``param_groups`` (per group: ``schedule_step``; shared
  by all groups, kept identical in each under a prefix: ``shared.*`` for the algorithm's shared state
  such as DAG's shrink, ``accumulate.*``, ``skip.*``, ``amp.*``, ``ema.*`` and ``adapt.*``; and
  ``optorch_format``, the layout's version), which is all ``torch.distributed.checkpoint`` keeps;
* nothing that changes per step lives in a Python attribute, so ``torch.compile(opt.step)`` sees it
  change.

How a step executes is the *engine* (:mod:`optorch.engines`); the math is always the algorithm's:
``"torch"`` (torch.optim's own kernel), ``"compiled"`` and ``"eager"`` (the algorithm's pure
``update``, compiled or not), or ``"auto"`` (default: torch's fused kernel where it is verified for
these params' device and dtype, else ``"compiled"``, else ``"eager"``).
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..algorithms import registry
from ..core import distributed, ops
from ..core.algorithm import Algorithm, sum_contributions
from ..core.config import Config
from ..core.scalars import reads_zero
from ..functional.settings import ordered_params
from .engines import ENGINES, Engine, TorchEngine, Work, make_engine, resolve_engine
from .persistence import Persistent
from .runtime import attach
from .state import (
    FORMAT,
    FORMAT_KEY,
    NO_EMA,
    NO_SCALER,
    SCHEDULE_KEY,
    SHARED_PREFIX,
    StateCheck,
    StateDict,
    assign,
    check_unique,
    equal_values,
    same,
)

__all__ = ["ENGINES", "Optimizer"]


class Optimizer(Persistent, torch.optim.Optimizer):
    """A torch.optim-compatible optimizer for a registered optorch algorithm.

    Args:
        params: an iterable of tensors, or of param-group dicts (keys override ``config``).
        algorithm: a registered name (``"adam"``) or an :class:`~optorch.algorithm.Algorithm`.
        config: the algorithm's ``Config``; its defaults when omitted.
        engine: ``"auto"``, ``"torch"``, ``"compiled"`` or ``"eager"`` (see the module docs).
        schedules: ``{hyperparameter: step -> value}``, set in every group that did not set the key
            itself; the position is each group's ``schedule_step``.
        combinators: an :class:`optorch.combinators.Combinators` (a config's ``clip_grad_norm``,
            ``skip_nonfinite``, ``accumulate_steps``, ``ema`` and ``amp`` entries), run around each
            step; ``optimizer.combinators`` is then its runtime.
        partition_group: a ``torch.distributed`` process group whose ranks each hold a disjoint share
            of the params in an optimizer of their own (ZeroRedundancyOptimizer's group): what
            reduces across params (shared state, ``clip_grad_norm``, ``skip_nonfinite``, ``amp``)
            then reduces across those ranks too. Never for DDP or FSDP2, where every rank's optimizer
            holds every parameter (whole or sharded).
    """

    def __init__(
        self,
        params: Iterable[Any],
        algorithm: str | Algorithm,
        config: Config | None = None,
        *,
        engine: str = "auto",
        schedules: Mapping[str, Callable[[Any], Any]] | None = None,
        combinators: Any = None,
        partition_group: Any = None,
    ):
        self.algorithm = registry.get(algorithm) if isinstance(algorithm, str) else algorithm
        self._fields = tuple(
            self.algorithm.config.model_fields
        )  # read once: pydantic's class property breaks a compiled graph
        config = self.algorithm.as_config(config)
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        self.schedules = dict(schedules or {})
        self.adaptive = None  # an optorch.AdaptiveOpt adapting this optimizer (optorch.build attaches it)
        self.combinators = None
        self._settings = combinators
        self._overrides: list[set[str]] = []  # per group, the keys its dict set itself
        self._configs: list[tuple[tuple, Config]] = []  # per group: the values last validated, and their Config
        self._linked: dict[str, Tensor] = {}  # values kept identical in every group, by key
        self._initial: dict[str, Tensor] = {}  # their values when linked
        self._engine: Engine | None = None
        self.partition = distributed.Partition(partition_group) if partition_group is not None else None
        super().__init__(params, config.hyperparameters())
        self._setup(engine)
        distributed.check_partition(self.algorithm.name, self.cross_parameter_reductions(), self.partition)

    def _setup(self, engine: str) -> None:
        """Everything beyond torch's own fields; also rebuilds it for a copy or an unpickled shim."""
        self._fields = tuple(self.algorithm.config.model_fields)
        if self.state.default_factory is not StateDict:
            self.state = defaultdict(StateDict, self.state)
        self._lock = threading.Lock()
        self._skipped = torch.zeros((), dtype=torch.bool)
        configs = [self._config(i, group) for i, group in enumerate(self.param_groups)]
        self.engine = resolve_engine(engine, self.algorithm, self._all_params(), configs)
        extras = self._settings.state_keys() if self._settings is not None else frozenset()
        self._engine = make_engine(self.engine, self.algorithm, self.param_groups, self.defaults, extras)
        self._extras = extras
        self._states = StateCheck(self.algorithm, self._engine, extras)
        self._checks_seen = -1  # the state checks' count when the torch engine last verified its kernel
        if self.algorithm.shared is not None and not self._linked_prefix(SHARED_PREFIX):
            fresh = self._fresh_shared(configs[0])
            self._link({SHARED_PREFIX + key: value for key, value in fresh.items()})
        if self._settings is not None and self.combinators is None:
            self.combinators = attach(self._settings, self)
        self._apply_schedules()

    # -- configuration -----------------------------------------------------------------------

    def group_config(self, group: Mapping[str, Any]) -> Config:
        """The validated algorithm config for a param group's current hyperparameters."""
        return self.algorithm.config(**{name: group[name] for name in self._fields})

    def _config(self, index: int, group: dict[str, Any]) -> Config:
        """Group ``index``'s config, validated when its values changed since the last step (so a
        step costs no validation, and a compiled step no graph break). Inside ``torch.compile`` the
        values are traced, as tensor hyperparameters are: the last validated config carries them
        unchecked."""
        fields = self._fields
        values = tuple(group[name] for name in fields)
        cached = self._configs[index] if index < len(self._configs) else None
        if torch.compiler.is_compiling() and cached is not None:
            return cached[1].unchecked(**dict(zip(fields, values)))
        if cached is not None and same(cached[0], values):
            return cached[1]
        config = self.group_config(group)
        if index < len(self._configs):
            self._configs[index] = (values, config)
        else:
            self._configs.append((values, config))
        return config

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, checked first: on any error nothing is added or changed."""
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        candidate = dict(param_group)
        params = candidate.get("params")
        candidate["params"] = ordered_params(params) if params is not None else params
        for key, source in self.algorithm.config.linked_defaults.items():
            if key not in candidate and source in candidate:
                candidate[key] = candidate[source]
        config = self.group_config({**self.defaults, **candidate})  # validate before anything changes
        defaults = self.group_config(self.defaults)
        differing = [key for key in self.algorithm.config.global_keys if getattr(config, key) != getattr(defaults, key)]
        if differing:
            raise ValueError(
                f"{self.algorithm.name}: {', '.join(map(repr, differing))} hold one value for all param groups; "
                "set them on the optimizer, not in a param group"
            )
        check_unique(candidate["params"], self.param_groups)
        if self._engine is not None:
            self._engine.add_group(candidate)
        super().add_param_group(candidate)
        group = self.param_groups[-1]
        self._overrides.append(set(param_group) - {"params"})
        self._configs.append((tuple(group[name] for name in self._fields), config))
        group[FORMAT_KEY] = FORMAT
        if self.schedules:
            first = self.param_groups[0].get(SCHEDULE_KEY)
            group[SCHEDULE_KEY] = (
                first.clone()
                if isinstance(first, Tensor) and len(self.param_groups) > 1
                else torch.zeros((), dtype=torch.int64)
            )
        group.update(self._linked)
        if self._engine is not None and self.algorithm.shared is not None:
            fresh = self._fresh_shared(self._configs[0][1])
            for key in self.algorithm.shared.derived:  # e.g. DAG's total parameter count
                self._linked[SHARED_PREFIX + key].copy_(fresh[key])
            self._apply_schedules()
        elif self._engine is not None:
            self._apply_schedules()

    def _fresh_shared(self, config: Config) -> dict[str, Tensor]:
        """The algorithm's shared state for these params; with a partition, its keys derived from the
        params (sums over them, such as DAG's total size) summed over every rank's share."""
        fresh = self.algorithm.shared.init(self._trainable(), config)
        if self.partition is not None:
            for key in self.algorithm.shared.derived:
                fresh[key] = self.partition.reduce(fresh[key])
        return fresh

    def cross_parameter_reductions(self) -> list[str]:
        """What this optimizer reduces across all its params each step (empty for a per-tensor
        algorithm without such entries): under a partition of the params over ranks (ZeRO) each
        needs the ``partition_group``, and none of it can be stepped one param at a time."""
        reductions = [f"{self.algorithm.name}'s shared state"] if self.algorithm.shared is not None else []
        settings = self._settings
        if settings is not None:
            reductions += [
                f"'{key}'"
                for key, on in (
                    ("clip_grad_norm", settings.clip_grad_norm is not None),
                    ("skip_nonfinite", settings.skip_nonfinite),
                    ("amp", settings.amp is not None and settings.amp.enabled),
                )
                if on
            ]
        return reductions

    def _link(self, values: Mapping[str, Tensor]) -> None:
        """Keep ``values`` in every param group (the same tensors: updated in place, seen by all).
        Keys this optimizer links already (a copy, an unpickled shim) keep their values."""
        values = {key: value for key, value in values.items() if key not in self._linked}
        self._initial.update({key: value.detach().clone() for key, value in values.items()})
        self._linked.update(values)
        for group in self.param_groups:
            group.update(values)

    def _fresh_linked(self) -> dict[str, Tensor]:
        """Each linked value as it was when this optimizer was built (for ``complete_state_dict``)."""
        return {key: value.clone() for key, value in self._initial.items()}

    def _linked_prefix(self, prefix: str) -> dict[str, Tensor]:
        return {key[len(prefix) :]: value for key, value in self._linked.items() if key.startswith(prefix)}

    def linked(self, key: str) -> Tensor:
        """The value every group keeps under ``key`` (``"amp.scale"``, ``"shared.s_t"``, ...)."""
        return self._linked[key]

    def _relink(self) -> None:
        """Every group must hold the linked tensors themselves; a group that holds other values (set
        by hand) must agree with the rest, and is relinked after its value is taken over."""
        for key, canonical in self._linked.items():
            held = [group.get(key) for group in self.param_groups]
            if all(value is canonical for value in held):
                continue
            values = [value for value in held if value is not canonical]
            first = values[0]
            if any(not equal_values(first, value) for value in values) or (
                len(values) < len(held) and not equal_values(first, canonical)
            ):
                raise ValueError(
                    f"{self.algorithm.name}: param groups disagree on {key!r}, which holds one value for all of them"
                )
            assign(canonical, first, key)
            for group in self.param_groups:
                group[key] = canonical

    @property
    def shared(self) -> dict[str, Tensor] | None:
        """The algorithm's state shared by all params (DAG's ``s_t``, ``k_val``, ...), as live 0-dim
        tensors (the ``shared.*`` values of every param group); None for algorithms without any."""
        if self.algorithm.shared is None:
            return None
        return self._linked_prefix(SHARED_PREFIX)

    @property
    def step_was_skipped(self) -> bool:
        """Whether the last ``step()`` left the params unchanged: an accumulating call
        (``accumulate_steps``), an inf/NaN gradient (``skip_nonfinite``, ``amp``). A torch LR
        scheduler that counts updates is stepped only when this is False (accelerate's name)."""
        return bool(self._skipped)

    # -- stepping ----------------------------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            self._step()
        else:
            with self._lock:  # one optimizer stepped from two threads: one step after the other
                self._step()
        return loss

    @torch.no_grad()
    def _step(self) -> None:
        if not torch.compiler.is_compiling():
            if distributed.in_backward() and (reductions := self.cross_parameter_reductions()):
                raise RuntimeError(
                    f"{self.algorithm.name}: step() runs inside backward (an optimizer stepped per parameter from a "
                    f"gradient hook?), but {', '.join(reductions)} reduce(s) over all parameters, which have no "
                    "gradients yet; step the whole optimizer after backward() instead"
                )
            if not isinstance(self.state, defaultdict) or self.state.default_factory is not StateDict:
                self.state = defaultdict(StateDict, self.state)  # replaced from outside: new entries get noted
            if self._is_state_init_step():
                self._create_states()
                return
            self._check_schedules()
        self._apply_schedules()
        configs = [self._config(i, group) for i, group in enumerate(self.param_groups)]
        work = self._collect(configs)
        self._relink()
        applied = self.combinators.before_step(work) if self.combinators is not None else True
        if isinstance(applied, Tensor) and isinstance(self._engine, TorchEngine):
            applied = bool(applied)  # torch's kernels cannot be masked: one host read (a graph break)
        if applied is not False:
            # Inside torch.compile a skip decision is a tensor: every write below is masked by it.
            mask = applied if isinstance(applied, Tensor) else None
            checks = self._states.full_checks
            missing = self._create_missing(work)
            shared = (self.shared,) if self.algorithm.shared is not None else ()
            if isinstance(self._engine, TorchEngine):
                self._engine.step(self, work, fresh=self._states.fresh, changed=missing or checks != self._checks_seen)
                self._checks_seen = self._states.full_checks
                contributions = []
            else:
                contributions = self._engine.step(self, work, shared, mask)
            if shared:
                self._finish_shared(contributions, configs[0], mask)
            if self.combinators is not None:
                self.combinators.after_step(applied)
            if self.schedules:
                for group in self.param_groups:
                    position = group[SCHEDULE_KEY]
                    ops.assign(position, position + (1 if mask is None else mask.to(position.dtype)))
        ops.assign(self._skipped, ~applied if isinstance(applied, Tensor) else not applied)
        self._apply_schedules()  # param_groups show the values the next step will use

    def _collect(self, configs: list[Config]) -> list[Work]:
        """Each group's params with a gradient, their gradients and their checked state (None where a
        param has none yet). Raises before anything changes. This is the step's one pass over every
        param (the engines take the lists from here)."""
        work = []
        check = self._states.traced if torch.compiler.is_compiling() else self._states.check
        states = self.state
        for group, config in zip(self.param_groups, configs):
            params, grads, leaves = [], [], []
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"{self.algorithm.name} does not support sparse gradients")
                if grad.shape != param.shape:  # only `.grad.data = ...` gets one past autograd's own check
                    raise RuntimeError(
                        f"{self.algorithm.name}: a parameter of shape {tuple(param.shape)} has a gradient of shape "
                        f"{tuple(grad.shape)}"
                    )
                params.append(param)
                grads.append(grad)
                leaves.append(check(param, states, config))
            work.append(Work(config, params, grads, leaves))
        return work

    def _create_missing(self, work: list[Work]) -> bool:
        """Create the state of params that step for the first time; whether there were any.
        torch's kernels create their own (SGD marks an unstarted momentum buffer by its absence,
        which a zero buffer would not): the torch engine gets the combinators' keys only."""
        own = not isinstance(self._engine, TorchEngine)
        missing = False
        for item in work:
            if None not in item.states:
                continue
            missing = True
            for i, (param, state) in enumerate(zip(item.params, item.states)):
                if state is None:
                    item.states[i] = self._create_state(param, item.config, own)
        return missing

    def _create_state(self, param: Tensor, config: Config, own: bool = True) -> dict[str, Tensor] | None:
        state = self.state[param]
        if own:
            state.update(self._states.fresh(param, config))
        if self.combinators is not None:
            self.combinators.new_param(param, state)
        return self._states.check(param, self.state, config) if own else state  # torch's kernel fills the rest

    def _finish_shared(self, contributions: list[dict[str, Tensor]], config: Config, mask: Tensor | None) -> None:
        shared = self.shared
        device = next(iter(shared.values())).device
        totals = sum_contributions(contributions, device)
        if self.partition is not None:
            totals = self.partition.totals(totals, self.algorithm.shared.contributions, device)
        for key, value in self.algorithm.shared.finish(shared, totals, config).items():
            ops.assign(shared[key], value if mask is None else torch.where(mask.to(device), value, shared[key]))

    def _is_state_init_step(self) -> bool:
        """A step with every lr 0 and every gradient zero on an optimizer that has no state yet:
        what ``torch.distributed.checkpoint`` runs to create the state it then saves or loads. It
        creates the state and changes nothing else (no param, position, counter or statistic). Every
        rank decides alike: a sharded gradient is checked whole, and under a partition the ranks vote."""
        if not all(reads_zero(group.get("lr", 0.0)) for group in self.param_groups):
            return False
        grads = [p.grad for p in self._all_params() if p.grad is not None]
        local = not any(self.state.values()) and all(not bool(distributed.full(g.any())) for g in grads)
        if self.partition is None:
            return local and bool(grads)
        votes = self.partition.reduce(torch.tensor([float(not local), float(len(grads))]))
        return not bool(votes[0]) and bool(votes[1])

    def _create_states(self) -> None:
        configs = [self._config(i, group) for i, group in enumerate(self.param_groups)]
        for group, config in zip(self.param_groups, configs):
            for param in group["params"]:
                if param.grad is not None and not self.state.get(param):
                    self._create_state(param, config)

    def _check_schedules(self) -> None:
        """A builder schedule owns its key: a different value there means someone else (a torch
        lr_scheduler, a hand edit) is driving it too, and one of the two would be silently ignored."""
        for name, schedule in self.schedules.items():
            for group, overrides in zip(self.param_groups, self._overrides):
                if name in overrides or SCHEDULE_KEY not in group:
                    continue
                expected = float(schedule(int(group[SCHEDULE_KEY])))
                held = group[name]
                # a compiled step leaves its value as a tensor, computed in float64 tensor ops
                same = (
                    math.isclose(float(held), expected, rel_tol=1e-12, abs_tol=0.0)
                    if isinstance(held, Tensor)
                    else held == expected
                )
                if not same:
                    raise RuntimeError(
                        f"{self.algorithm.name}: {name!r} is set by this optimizer's 'schedule' entry ({expected!r} at "
                        f"step {int(group[SCHEDULE_KEY])}), but the param group holds {group[name]!r}: something else "
                        "(a torch lr_scheduler?) writes it too. Use one of them: drop the 'schedule' entry, or the "
                        "other writer."
                    )

    def _apply_schedules(self) -> None:
        """Set each scheduled hyperparameter to its value at the group's ``schedule_step`` in every
        group that did not set that key itself (a no-decay group keeps its weight decay of 0). Inside
        ``torch.compile`` the value is a 0-dim tensor, so a new position is new data, not a recompile."""
        compiling = torch.compiler.is_compiling()
        for name, schedule in self.schedules.items():
            for group, overrides in zip(self.param_groups, self._overrides):
                if name in overrides or SCHEDULE_KEY not in group:
                    continue
                position = group[SCHEDULE_KEY]
                group[name] = schedule(position) if compiling else float(schedule(int(position)))

    # -- around the step ---------------------------------------------------------------------

    def ema_params(self) -> list[Tensor]:
        """The EMA of each param (config entry ``ema``), in ``param_groups`` order."""
        return self._combinators(NO_EMA).ema_params()

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``loss`` times the loss scale (config entry ``amp``): call ``backward()`` on the result."""
        return self._combinators(NO_SCALER).scale_loss(loss)

    def swap_ema(self):
        """A context manager: within it the params hold their EMA (``with opt.swap_ema(): evaluate()``)."""
        return self._combinators(NO_EMA).swap_ema()

    def _combinators(self, missing: str):
        """The runtime of the config's combinator entries; ``missing`` is the error when there is none."""
        if self.combinators is None:
            raise RuntimeError(missing)
        return self.combinators

    # -- copies -------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return (
            super()
            .__repr__()
            .replace(type(self).__name__, f"optorch.Optimizer[{self.algorithm.name}, engine={self.engine}]", 1)
        )

    # -- helpers -----------------------------------------------------------------------------

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _trainable(self) -> list[Tensor]:
        return [p for p in self._all_params() if p.requires_grad]
