"""From a parsed config to what runs it: :func:`build` (a ``torch.optim.Optimizer``, the shim) and
:func:`build_stepper` (the pure stepper), both from :func:`optorch.builder.spec.parse`'s one value."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from ..core import distributed
from ..core.compat import pytree
from ..core.config import Config
from ..core.errors import ConfigError
from ..functional.combinators import Stepper, bind, param_names, partition
from ..functional.inject import inject_hyperparams
from ..functional.settings import Combinators, torch_param_groups
from ..shim.adaptive import AdaptiveOpt
from ..shim.optimizer import Optimizer
from .files import load_config
from .spec import ENTRY_KEYS, Parsed, _naming_the_file, parse

__all__ = ["assemble", "build", "build_stepper", "split_param_groups"]


def build(
    config: Mapping[str, Any] | Config | str | os.PathLike,
    params: Iterable[Any],
    *,
    engine: str = "auto",
    partition_group: Any = None,
    into: Any = None,
):
    """A :class:`optorch.Optimizer` (a ``torch.optim.Optimizer``) for ``params``.

    ``params`` is what torch.optim accepts: an iterable of tensors, or of param-group dicts whose keys
    override the config for that group; or an ``nn.Module`` or ``model.named_parameters()``, which a
    ``param_groups`` entry needs (it matches names). ``engine`` picks how the step executes (see
    :class:`optorch.Optimizer`); the math is the algorithm's either way. ``partition_group``: the
    process group whose ranks each step a share of the params (ZeroRedundancyOptimizer's; see
    ``docs/distributed.md``). ``into``: an uninitialised instance of a subclass of
    :class:`optorch.Optimizer` to build (what the classes of :mod:`optorch.optim` do).
    """
    parsed = parse(config)
    with _naming_the_file(config, values=False):  # a param_groups pattern that matches none of the params' names
        return assemble(params, parsed, engine=engine, partition_group=partition_group, into=into)


def build_stepper(config: Mapping[str, Any] | Config | str | os.PathLike, params: Any = None) -> Stepper:
    """The pure stepper a builder config describes: its algorithm (with ``inject_hyperparams`` when it
    has a ``schedule``), partitioned by ``param_groups`` (``params``, a dict pytree, gives the names),
    wrapped in its combinators as :meth:`Combinators.wrap` orders them (its ``adapt`` entry
    is the shim's: the pure path adapts with :mod:`optorch.functional.adaptive`'s ``update``). It steps as
    ``optorch.build(config, model)`` does."""
    algorithm, config_, schedules, settings, _ = parse(config)
    settings = settings or Combinators()

    def core(overrides: Mapping[str, Any]) -> Stepper:
        group_config = config_.replace(**overrides) if overrides else config_
        kept = {name: schedule for name, schedule in schedules.items() if name not in overrides}
        return inject_hyperparams(algorithm, group_config, **kept) if kept else bind(algorithm, group_config)

    stepper: Stepper = core({})
    if settings.param_groups:
        if params is None:
            raise ValueError(
                "param_groups: build_stepper needs the params (a dict pytree) to match the patterns to names"
            )
        labels = settings.labels(param_names(params))
        steppers = {f"param_groups.{i}": core(rule.overrides) for i, rule in enumerate(settings.param_groups)}
        if "default" in labels:
            steppers["default"] = stepper
        stepper = partition(steppers, pytree.tree_unflatten(labels, pytree.tree_flatten(params)[1]))
    return settings.wrap(stepper)


def assemble(
    params: Iterable[Any], parsed: Parsed, *, engine: str = "auto", partition_group: Any = None, into: Any = None
):
    """The optimizer for a parsed config (:func:`build` after parsing)."""
    algorithm, config, schedules, settings, rules = parsed
    if rules is not None and distributed.zero_owner() is not None:
        # ZeRO copies its own param groups into this optimizer's before each step: knobs written here would be undone
        raise ConfigError(
            "an 'adapt' entry inside ZeroRedundancyOptimizer would adapt this rank's optimizer, whose param groups "
            "ZeRO overwrites with its own before every step; build without 'adapt' and adapt ZeRO's: "
            "optorch.AdaptiveOpt(zero_optimizer, config=optorch.builder.parse_adaptive(config))"
        )
    try:
        params = torch_param_groups(params, settings)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    entries = sorted({key for group in params if isinstance(group, Mapping) for key in group if key in ENTRY_KEYS})
    if entries:  # a group key is an override: a scheduled lr set in every group would never be scheduled
        raise ConfigError(
            f"param groups set {', '.join(map(repr, entries))}: builder entries apply to the whole optimizer, not to a "
            "group. (ZeroRedundancyOptimizer copies its keyword arguments into every param group: give entries to "
            "functools.partial(optorch.optim.<Name>, ...) or functools.partial(optorch.build, config) instead.)"
        )
    optimizer = into if into is not None else Optimizer.__new__(Optimizer)
    Optimizer.__init__(
        optimizer,
        params,
        algorithm,
        config,
        engine=engine,
        schedules=schedules,
        combinators=settings,
        partition_group=partition_group,
    )
    if rules is not None:
        optimizer.adaptive = AdaptiveOpt(optimizer, config=rules)  # its state rides in optimizer.state_dict()
    return optimizer


def split_param_groups(config: Mapping[str, Any], model: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A config's ``param_groups`` entry (it matches parameter names) resolved for a wrapper that takes
    param groups instead of names, e.g. ZeroRedundancyOptimizer: ``(groups, rest)``, the torch param
    groups of ``model`` (a module or ``named_parameters()``) with each entry's overrides, and the
    config without the entry, to build each rank's optimizer from::

        groups, rest = optorch.distributed.split_param_groups(config, model)
        ZeroRedundancyOptimizer(groups, optimizer_class=functools.partial(optorch.build, rest))

    which steps as ``optorch.build(config, model)`` does."""
    values = load_config(config) if not isinstance(config, Mapping) else dict(config)
    rest = {key: value for key, value in values.items() if key != "param_groups"}
    return torch_param_groups(model, parse(values).settings), rest
