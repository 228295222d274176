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
from collections import OrderedDict, defaultdict
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

from . import distributed, ops, registry
from .algorithm import Algorithm, sum_contributions
from .combinators import ordered_params
from .config import Config
from .engines import ENGINES, Engine, TorchEngine, Work, make_engine, resolve_engine

__all__ = ["ENGINES", "FORMAT", "FORMAT_KEY", "SCHEDULE_KEY", "SHARED_PREFIX", "Optimizer"]

FORMAT_KEY = "optorch_format"
FORMAT = 2
"""The layout of the shim's checkpoints: 2 keeps every piece of state in ``state`` and
``param_groups``; 1 (no ``optorch_format`` key) kept some under top-level keys, migrated on load."""
SCHEDULE_KEY = "schedule_step"
SHARED_PREFIX = "shared."
STATE_PREFIXES = (SHARED_PREFIX, "adapt.", "accumulate.", "skip.", "amp.", "ema.")
"""Param-group keys that hold state (of the algorithm, the adaptive rules, the combinators)."""
NO_EMA = "this optimizer keeps no EMA: add an 'ema' entry to its config"
NO_SCALER = "this optimizer has no loss scaler: add an 'amp' entry to its config"


class Optimizer(torch.optim.Optimizer):
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

    def __init__(self, params: Iterable[Any], algorithm: str | Algorithm, config: Config | None = None, *, engine: str = "auto",
                 schedules: Mapping[str, Callable[[Any], Any]] | None = None, combinators: Any = None, partition_group: Any = None):
        self.algorithm = registry.get(algorithm) if isinstance(algorithm, str) else algorithm
        self._fields = tuple(self.algorithm.config.model_fields)  # read once: pydantic's class property breaks a compiled graph
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
        self._states = _StateCheck(self.algorithm, self._engine, extras)
        self._checks_seen = -1  # the state checks' count when the torch engine last verified its kernel
        if self.algorithm.shared is not None and not self._linked_prefix(SHARED_PREFIX):
            fresh = self._fresh_shared(configs[0])
            self._link({SHARED_PREFIX + key: value for key, value in fresh.items()})
        if self._settings is not None and self.combinators is None:
            self.combinators = self._settings.attach(self)
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
        if cached is not None and _same(cached[0], values):
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
            raise ValueError(f"{self.algorithm.name}: {', '.join(map(repr, differing))} hold one value for all param groups; "
                             "set them on the optimizer, not in a param group")
        _check_unique(candidate["params"], self.param_groups)
        if self._engine is not None:
            self._engine.add_group(candidate)
        super().add_param_group(candidate)
        group = self.param_groups[-1]
        self._overrides.append(set(param_group) - {"params"})
        self._configs.append((tuple(group[name] for name in self._fields), config))
        group[FORMAT_KEY] = FORMAT
        if self.schedules:
            first = self.param_groups[0].get(SCHEDULE_KEY)
            group[SCHEDULE_KEY] = first.clone() if isinstance(first, Tensor) and len(self.param_groups) > 1 else torch.zeros((), dtype=torch.int64)
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
            reductions += [f"'{key}'" for key, on in (("clip_grad_norm", settings.clip_grad_norm is not None), ("skip_nonfinite", settings.skip_nonfinite),
                                                        ("amp", settings.amp is not None and settings.amp.enabled)) if on]
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
        return {key[len(prefix):]: value for key, value in self._linked.items() if key.startswith(prefix)}

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
            if any(not _equal_values(first, value) for value in values) or (len(values) < len(held) and not _equal_values(first, canonical)):
                raise ValueError(f"{self.algorithm.name}: param groups disagree on {key!r}, which holds one value for all of them")
            _assign(canonical, first, key)
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
                    f"{self.algorithm.name}: step() runs inside backward (an optimizer stepped per parameter from a gradient hook?), "
                    f"but {', '.join(reductions)} reduce(s) over all parameters, which have no gradients yet; step the whole "
                    "optimizer after backward() instead"
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
                    raise RuntimeError(f"{self.algorithm.name}: a parameter of shape {tuple(param.shape)} has a gradient of shape {tuple(grad.shape)}")
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
        if not all(_is_zero(group.get("lr", 0.0)) for group in self.param_groups):
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
                same = math.isclose(float(held), expected, rel_tol=1e-12, abs_tol=0.0) if isinstance(held, Tensor) else held == expected
                if not same:
                    raise RuntimeError(
                        f"{self.algorithm.name}: {name!r} is set by this optimizer's 'schedule' entry ({expected!r} at step "
                        f"{int(group[SCHEDULE_KEY])}), but the param group holds {group[name]!r}: something else (a torch "
                        f"lr_scheduler?) writes it too. Use one of them: drop the 'schedule' entry, or the other writer."
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

    # -- checkpoints, copies -----------------------------------------------------------------

    def __repr__(self) -> str:
        return super().__repr__().replace(type(self).__name__, f"optorch.Optimizer[{self.algorithm.name}, engine={self.engine}]", 1)

    def __getstate__(self) -> dict[str, Any]:
        # torch's fields plus what rebuilds the rest; runtime objects (locks, compiled code) are remade.
        keep = ("schedules", "adaptive", "_settings", "_overrides", "_configs", "_linked", "_initial", "engine", "partition")
        state = {**super().__getstate__(), **{key: self.__dict__[key] for key in keep}}
        registered = registry.ALGORITHMS.get(self.algorithm.name)
        state["algorithm"] = self.algorithm.name if registered is self.algorithm else self.algorithm
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_settings" not in state:  # a shim pickled before format 2: rebuild from its torch fields
            raise RuntimeError("this optorch optimizer was pickled by an older optorch; save its state_dict() instead")
        super().__setstate__(state)
        self.__dict__.setdefault("partition", None)
        if isinstance(self.algorithm, str):
            self.algorithm = registry.get(self.algorithm)
        self.combinators = None
        self._engine = None
        self._setup(self.engine)
        if self.adaptive is not None:
            self.adaptive.optimizer = self

    def state_dict(self) -> dict[str, Any]:
        hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = OrderedDict()
        try:
            state_dict = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = hooks
        state_dict["state"] = {index: self._states.export(leaf) for index, leaf in state_dict["state"].items() if leaf}
        state_dict["state"] = {index: leaf for index, leaf in state_dict["state"].items() if leaf}
        if isinstance(self._engine, TorchEngine):
            for group in state_dict["param_groups"]:
                self._engine.export(group)
        for hook in hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this shim or of the torch.optim optimizer it stands for.

        The whole dict is checked first (structure, shapes, dtypes, values); on any mismatch it
        raises ``ValueError`` and the optimizer is left unchanged. Checkpoints of format 1 (an older
        optorch) are migrated.
        """
        if not isinstance(state_dict, dict):
            raise ValueError(f"{self.algorithm.name}: a state_dict is a dict, got {type(state_dict).__name__}")
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        from .checkpoint import check_and_load

        check_and_load(self, state_dict)
        self._configs = []
        for i, group in enumerate(self.param_groups):
            self._config(i, group)
        self._apply_schedules()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # -- helpers -----------------------------------------------------------------------------

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _trainable(self) -> list[Tensor]:
        return [p for p in self._all_params() if p.requires_grad]


# ------------------------------------------------------------------------------------------------
# per-parameter state, checked


def _noted(name: str) -> Callable[..., Any]:
    """``dict.<name>``, noting a write (for :class:`StateDict`)."""
    method = getattr(dict, name)

    def write(self: "StateDict", *args: Any, **kwargs: Any) -> Any:
        self.written = True
        return method(self, *args, **kwargs)

    write.__name__ = name
    return write


class StateDict(dict):
    """A parameter's state in ``optimizer.state``: a plain dict that notes being written to, so a step
    can tell in O(1) that the tensors it checked are still the ones there. In-place changes to those
    tensors need no note (they cannot change a shape, dtype or device). Checkpoints hold plain dicts."""

    __slots__ = ("written",)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.written = True

    def __setitem__(self, key: Any, value: Any) -> None:
        if dict.get(self, key, _ABSENT) is not value:  # torch's SGD stores its buffer again every step
            self.written = True
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self.written = True
        super().__delitem__(key)

    clear = _noted("clear")
    pop = _noted("pop")
    popitem = _noted("popitem")
    setdefault = _noted("setdefault")
    update = _noted("update")
    __ior__ = _noted("__ior__")

    def __reduce__(self):
        return StateDict, (dict(self),)


_ABSENT = object()


class _StateCheck:
    """A param's state checked against what its config needs, cheaply between steps.

    The full check (keys, shapes, dtypes, devices; a torch-layout state written directly, e.g. by
    ZeroRedundancyOptimizer, is converted) runs when the state dict, one of its tensors, the param's
    shape, dtype or device, or the config changed since the last check; otherwise the same tensors
    are known good. In-place writes need no check: they cannot change shape, dtype or device.
    """

    def __init__(self, algorithm: Algorithm, engine: Engine, extras: frozenset[str]):
        self.algorithm = algorithm
        self.torch_layout = isinstance(engine, TorchEngine)
        self.engine = engine
        self.extras = extras
        self._known: dict[int, tuple] = {}  # id(param) -> what its last full check saw
        self.full_checks = 0

    def fresh(self, param: Tensor, config: Config) -> dict[str, Tensor]:
        """A param's initial state in this engine's layout."""
        leaf = self.algorithm.init_leaf(param, config)
        if not self.torch_layout:
            return leaf
        leaf = self.algorithm.state_to_torch(leaf)
        if "step" in leaf:
            dtype, device = self.engine.step_dtype_device(param)
            leaf["step"] = leaf["step"].to(dtype=dtype, device=device if param.device.type != "meta" else "meta")
        return leaf

    def check(self, param: Tensor, states: dict[Tensor, Any], config: Config) -> dict[str, Tensor] | None:
        """The state the engine steps ``param`` with (None when it has none yet), after checking it:
        the algorithm's keys for optorch's engines, the whole dict (torch's layout) for torch's."""
        state = states.get(param)
        if not state:
            return None
        known = self._known.get(id(param))
        # A new data pointer means new data (p.data = ..., a dtype or device conversion): check again.
        if known is not None and known[0] is state and not state.written and known[1] is config and known[2] == param.data_ptr():
            return known[3]
        self.full_checks += 1
        leaf = self._full_check(param, state, config)
        if leaf is None:
            return None
        if type(state) is not StateDict:  # assigned from outside (ZeroRedundancyOptimizer): noted from now on
            state = states[param] = StateDict(state)
            leaf = {key: state[key] for key in leaf}
        state.written = False
        stepped = state if self.torch_layout else leaf
        self._known[id(param)] = (state, config, param.data_ptr(), stepped, param)  # the param kept: its id stays its own
        return stepped

    def traced(self, param: Tensor, states: dict[Tensor, Any], config: Config) -> dict[str, Tensor] | None:
        """:meth:`check` inside ``torch.compile``: the state as it is (the eager steps around check it)."""
        state = states.get(param)
        return {key: value for key, value in state.items() if key not in self.extras} or None if state else None

    def _full_check(self, param: Tensor, state: dict[str, Any], config: Config) -> dict[str, Tensor] | None:
        name = self.algorithm.name
        extras = {key: state[key] for key in state if key in self.extras}
        own = {key: value for key, value in state.items() if key not in self.extras}
        for key, value in extras.items():
            _check_tensor(name, param, key, value, param.shape, {param.dtype}, {param.device})
        if not own:
            return None
        expected = self.fresh(distributed.meta_like(param), config)
        if set(own) != set(expected):
            converted = self.algorithm.state_from_torch(own)
            if self.torch_layout:
                converted = self.algorithm.state_to_torch(converted)
            if set(converted) != set(expected):
                raise ValueError(
                    f"{name}: the state of a parameter of shape {tuple(param.shape)} has keys {sorted(own)}, expected "
                    f"{sorted(expected)}{' (plus ' + ', '.join(sorted(self.extras)) + ')' if self.extras else ''}; "
                    "was it written for another optimizer or other flags?"
                )
            own = converted
        for key, reference in expected.items():
            value = own[key]
            if reference.dim() == 0 and not isinstance(value, Tensor):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{name}: state {key!r} of a parameter must be a number or a 0-dim tensor, got {type(value).__name__}")
                value = own[key] = torch.tensor(float(value), dtype=reference.dtype, device=param.device if reference.device.type == "meta" else reference.device)
            dtypes = {reference.dtype}
            if param.is_floating_point() or param.is_complex():
                dtypes.add(param.dtype)
            if reference.dim() == 0:
                dtypes |= {torch.float32, torch.float64}
            devices = {param.device} | ({torch.device("cpu")} if reference.dim() == 0 else set())
            _check_tensor(name, param, key, value, reference.shape, dtypes, devices)
            distributed.check_layout(name, key, value, reference)
        if own.keys() != {key for key in state if key not in self.extras}:
            for key in [key for key in state if key not in self.extras]:
                del state[key]
            state.update(own)
        return {key: state[key] for key in expected}

    def export(self, state: dict[str, Any]) -> dict[str, Any]:
        """A param's state as its checkpoint holds it: torch's keys, plus the extras."""
        if self.torch_layout:
            return dict(state)
        own = {key: value for key, value in state.items() if key not in self.extras}
        exported = self.algorithm.state_to_torch(own) if own else {}
        return {**exported, **{key: value for key, value in state.items() if key in self.extras}}


def _check_tensor(name: str, param: Tensor, key: str, value: Any, shape: torch.Size, dtypes: set, devices: set) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name}: state {key!r} of a parameter of shape {tuple(param.shape)} must be a tensor, got {type(value).__name__}")
    if value.shape != shape:
        raise ValueError(f"{name}: state {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)} (its parameter has {tuple(param.shape)})")
    if value.dtype not in dtypes:
        raise ValueError(
            f"{name}: state {key!r} is {value.dtype}, its parameter {param.dtype}: was the model converted (.to(dtype), "
            ".double()) after the optimizer stepped? Save and load the optimizer's state_dict to convert its state too."
        )
    if value.device not in devices:
        raise ValueError(f"{name}: state {key!r} is on {value.device}, its parameter on {param.device}")


def _check_unique(params: list[Any] | None, groups: list[dict[str, Any]]) -> None:
    """The same param twice would be stepped twice per step (torch only warns): refused."""
    if not params:
        return
    seen: set[int] = set()
    for param in params:
        if not isinstance(param, Tensor):
            continue
        if id(param) in seen:
            raise ValueError("a param group lists the same parameter twice: it would be stepped twice per step "
                             "(torch.optim only warns); list each parameter once")
        seen.add(id(param))
    existing = {id(p) for group in groups for p in group["params"]}
    if seen & existing:
        raise ValueError("some parameters appear in more than one parameter group")


def _is_zero(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.numel() == 1 and not bool(value)
    return isinstance(value, (int, float)) and value == 0


def _same(a: tuple, b: tuple) -> bool:
    """Whether two tuples of hyperparameter values are the same: tensors by identity, the rest by
    type and value (a tensor replaced by an equal one is new: its later in-place changes count)."""
    return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))


def _same_value(x: Any, y: Any) -> bool:
    if x is y:
        return True
    if isinstance(x, Tensor) or isinstance(y, Tensor) or type(x) is not type(y):
        return False
    if isinstance(x, tuple):
        return _same(x, y)
    return x == y


def _equal_values(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        a_, b_ = torch.as_tensor(a), torch.as_tensor(b)
        return a_.shape == b_.shape and bool((a_.to(torch.float64) == b_.to(a_.device, torch.float64)).all()) if a_.numel() else a_.shape == b_.shape
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _assign(target: Tensor, value: Any, key: str) -> None:
    if isinstance(value, Tensor):
        if value.shape != target.shape and value.numel() != 1:
            raise ValueError(f"{key!r} must have shape {tuple(target.shape)}, got {tuple(value.shape)}")
        target.copy_(value.reshape(target.shape))
    else:
        target.fill_(value)
