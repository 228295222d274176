"""``optorch.Optimizer``: a ``torch.optim.Optimizer`` that runs an optorch algorithm in place.

The shim is what ``optorch.build`` returns. It behaves like the torch optimizer it stands for:
``param_groups`` carry every hyperparameter under its torch name (so every ``lr_scheduler`` works),
``state_dict()`` has torch's layout and torch's per-parameter keys (so checkpoints interchange with
torch.optim), and ``zero_grad``, ``step(closure)``, ``add_param_group`` and the optimizer hooks are
torch's own.

How a step executes is the *engine*; the math is always the algorithm's:

* ``"torch"``: torch.optim's own kernel (fused where torch has one for these params, else its
  default) for algorithms whose math and state are exactly torch's. Fastest where it exists.
* ``"compiled"``: the algorithm's pure per-tensor ``update`` applied to one flat buffer per
  (param group, device, dtype), compiled once with ``torch.compile`` and written back in place.
  Params become views of the flat buffer; gradients are gathered into a flat buffer, or used in
  place when they already are its views. Compile time does not grow with the number of tensors
  (for an algorithm that reduces over each tensor, it grows with the number of distinct shapes: each
  run of same-shaped params steps as one ``vmap`` of ``update``), and a changed hyperparameter is a
  new tensor value, never a recompile.
* ``"eager"``: the same flat path without compiling.
* ``"auto"`` (default): ``"torch"`` where torch.optim has a fused kernel for the algorithm and these
  params, else ``"compiled"`` (which falls back to ``"eager"``, with one warning, where compiling is
  impossible).
"""

from __future__ import annotations

import inspect
import types
import warnings
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

from . import ops, registry
from .algorithm import SHARED_KEY, Algorithm, apply_update, sum_contributions
from .config import Config

__all__ = ["Optimizer", "ENGINES"]

ENGINES = ("auto", "torch", "compiled", "eager")
NO_EMA = "this optimizer keeps no EMA: add an 'ema' entry to its config"
NO_SCALER = "this optimizer has no loss scaler: add an 'amp' entry to its config"
_TORCH_EXECUTION_KEYS = ("foreach", "fused", "capturable", "differentiable")


class Optimizer(torch.optim.Optimizer):
    """A torch.optim-compatible optimizer for a registered optorch algorithm.

    Args:
        params: an iterable of tensors, or of param-group dicts (keys override ``config``).
        algorithm: a registered name (``"adam"``) or an :class:`~optorch.algorithm.Algorithm`.
        config: the algorithm's ``Config``; its defaults when omitted.
        engine: ``"auto"``, ``"torch"``, ``"compiled"`` or ``"eager"`` (see the module docs).
        combinators: an :class:`optorch.combinators.Combinators` (a config's ``clip_grad_norm``,
            ``skip_nonfinite``, ``accumulate_steps`` and ``ema`` entries), run around each step;
            ``optimizer.combinators`` is then its runtime (``skipped``, ``stepped``, ``last_grad_norm``).
    """

    def __init__(self, params: Iterable[Any], algorithm: str | Algorithm, config: Config | None = None, *, engine: str = "auto",
                 schedules: Mapping[str, Callable[[int], float]] | None = None, combinators: Any = None):
        self.algorithm = registry.get(algorithm) if isinstance(algorithm, str) else algorithm
        self.schedules = dict(schedules or {})
        self.schedule_step = 0
        self.adaptive = None  # an optorch.AdaptiveOpt adapting this optimizer (optorch.build attaches it)
        self._overrides: list[set[str]] = []  # per group, the keys its dict set itself
        config = self.algorithm.as_config(config)
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        self._runner: _TorchRunner | _FlatRunner | None = None
        super().__init__(params, config.hyperparameters())
        self._apply_schedules()
        self.engine = _resolve_engine(engine, self.algorithm, self.param_groups)
        self._runner = _TorchRunner(self) if self.engine == "torch" else _FlatRunner(self, compiled=self.engine == "compiled")
        # Clipping, non-finite skipping, accumulation, EMA (optorch.combinators.Combinators): run around the step.
        self.combinators = combinators.attach(self) if combinators is not None else None

    # -- configuration -----------------------------------------------------------------------

    def group_config(self, group: dict[str, Any]) -> Config:
        """The validated algorithm config for a param group's current hyperparameters."""
        return self.algorithm.config(**{name: group[name] for name in self.algorithm.config.model_fields})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        for key, source in self.algorithm.config.linked_defaults.items():
            if key not in param_group and source in param_group:
                param_group = {**param_group, key: param_group[source]}
        config = self.group_config({**self.defaults, **param_group})  # validate before anything changes
        defaults = self.group_config(self.defaults)
        differing = [key for key in self.algorithm.config.global_keys if getattr(config, key) != getattr(defaults, key)]
        if differing:
            raise ValueError(f"{self.algorithm.name}: {', '.join(map(repr, differing))} hold one value for all param groups; "
                             "set them on the optimizer, not in a param group")
        self._overrides.append(set(param_group) - {"params"})
        super().add_param_group(param_group)
        if self._runner is not None:
            self._runner.add_group(self.param_groups[-1])

    @property
    def shared(self) -> dict[str, Tensor] | None:
        """The algorithm's state shared by all params (DAG's ``s_t``, ``k_val``, ...), as live 0-dim
        tensors; None for algorithms without any."""
        return getattr(self._runner, "shared", None)

    # -- stepping ----------------------------------------------------------------------------

    def _apply_schedules(self) -> None:
        """Set each scheduled hyperparameter to its value at ``schedule_step`` in every param group
        that did not set that key itself (a no-decay group keeps its weight decay of 0)."""
        for name, schedule in self.schedules.items():
            value = float(schedule(self.schedule_step))
            for group, overrides in zip(self.param_groups, self._overrides):
                if name not in overrides:
                    group[name] = value

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.schedules:
            self._apply_schedules()
        # Every group's hyperparameters and every grad are checked before any parameter changes.
        configs = [self.group_config(group) for group in self.param_groups]
        for group in self.param_groups:
            if any(p.grad is not None and p.grad.is_sparse for p in group["params"]):
                raise RuntimeError(f"{self.algorithm.name} does not support sparse gradients")
        if self.combinators is not None and not self.combinators.before_step():
            return loss  # an accumulating call or a non-finite gradient: nothing changes
        with torch.no_grad():
            self._runner.step(configs)
        if self.schedules:
            self.schedule_step += 1
            self._apply_schedules()  # param_groups show the values the next step will use
        if self.combinators is not None:
            self.combinators.after_step()
        return loss

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

    # -- checkpoints -------------------------------------------------------------------------

    def __repr__(self) -> str:
        return super().__repr__().replace(type(self).__name__, f"optorch.Optimizer[{self.algorithm.name}, engine={self.engine}]", 1)

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        if self._runner is not None:
            self._runner.export(state_dict)
        if self.schedules:
            state_dict["schedule_step"] = self.schedule_step
        if self.combinators is not None:
            state_dict["combinators"] = self.combinators.state_dict()
        if self.adaptive is not None:
            state_dict["adaptive"] = self.adaptive.state_dict()
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this shim or of the torch.optim optimizer it stands for.

        The whole dict is checked first; on any mismatch (group count or sizes, state keys, shapes,
        invalid hyperparameters) it raises ``ValueError`` and the optimizer is left unchanged.
        """
        # torch's order: pre-hooks (which may migrate the dict), load, post-hooks; the check comes
        # after the pre-hooks and the post-hooks after the engine has taken the new state in.
        if not isinstance(state_dict, dict):
            raise ValueError(f"{self.algorithm.name}: a state_dict is a dict, got {type(state_dict).__name__}")
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        self._check_state_dict(state_dict)
        self._runner.check(state_dict)
        if self.combinators is not None:
            self.combinators.check(state_dict.get("combinators"))
        if self.adaptive is not None and "adaptive" in state_dict:
            self.adaptive.check_state_dict(state_dict["adaptive"])
        # A hyperparameter the checkpoint lacks keeps this optimizer's value (torch-adopt saves no clip:
        # its clip_lambda is passed to the constructor again), as _check_state_dict validated it.
        current = [{name: group[name] for name in self.algorithm.config.model_fields} for group in self.param_groups]
        pre_hooks, post_hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = OrderedDict(), OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = pre_hooks, post_hooks
        for group, values in zip(self.param_groups, current):
            for name, value in values.items():
                group.setdefault(name, value)
        self._runner.reload(state_dict)
        if self.schedules:
            self.schedule_step = int(state_dict.get("schedule_step", 0))
            self._apply_schedules()
        if self.combinators is not None:
            self.combinators.load(state_dict.get("combinators"))
        if self.adaptive is not None and "adaptive" in state_dict:
            self.adaptive.load_state_dict(state_dict["adaptive"])
        for hook in post_hooks.values():
            hook(self)

    def _check_state_dict(self, state_dict: Any) -> None:
        name = self.algorithm.name
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"{name}: a state_dict is a dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}: the state_dict has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}")
        params_by_index = {}
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{name}: param group {i} has {len(saved['params'])} params in the state_dict, {len(group['params'])} here")
            try:
                config = self.group_config({**group, **saved})
            except ValueError as error:
                raise ValueError(f"{name}: param group {i} of the state_dict has invalid hyperparameters: {error}") from error
            params_by_index.update({index: (param, config) for index, param in zip(saved["params"], group["params"])})
            if i == 0:
                first = config
            differing = [key for key in self.algorithm.config.global_keys if getattr(config, key) != getattr(first, key)]
            if differing:
                raise ValueError(f"{name}: param group {i} of the state_dict sets {', '.join(map(repr, differing))}, which hold one value for all param groups, unlike group 0")
        for index, leaf in state_dict["state"].items():
            if index not in params_by_index:
                raise ValueError(f"{name}: the state_dict has state for parameter {index!r}, which no param group lists")
            param, config = params_by_index[index]
            # The state this param would start with, shapes only: what the checkpoint must match.
            expected = self.algorithm.init_leaf(torch.empty(param.shape, dtype=param.dtype, device="meta"), config)
            keys = set(self.algorithm.state_from_torch(dict(leaf)))
            if keys != set(expected):
                raise ValueError(
                    f"{name}: state of parameter {index} has keys {sorted(keys)}, expected {sorted(expected)}; "
                    "is this a checkpoint of another optimizer or with other flags?"
                )
            for key, value in leaf.items():
                if key not in expected:  # a key torch saves under another name (from_torch maps it)
                    continue
                if expected[key].dim() == 0:
                    if not (isinstance(value, (int, float)) or (isinstance(value, Tensor) and value.numel() == 1)):
                        raise ValueError(f"{name}: {key!r} of parameter {index} must be a number or a one-element tensor")
                elif not isinstance(value, Tensor) or value.shape != expected[key].shape:
                    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"{name}: state {key!r} of parameter {index} has shape {shape}, expected {tuple(expected[key].shape)} (the parameter has {tuple(param.shape)})")


def _resolve_engine(engine: str, algorithm: Algorithm, groups: list[dict[str, Any]]) -> str:
    torch_class = algorithm.torch_optimizer
    if engine == "torch" and torch_class is None:
        raise ValueError(f"engine 'torch' needs a torch.optim counterpart, and {algorithm.name} has none")
    if engine == "auto":
        # torch's fused kernel where it has one for these params; elsewhere the compiled flat step
        # beats torch's foreach and for-loop kernels. A non-element-wise algorithm compiles one
        # batched segment per distinct shape (per bucket), unrolled: compile time grows with the
        # number of shapes, so beyond a few shapes it runs eagerly.
        fused = torch_class is not None and "fused" in inspect.signature(torch_class.__init__).parameters
        if fused and _fused_supported(groups):
            return "torch"
        return "compiled" if algorithm.elementwise or _shape_runs(groups) <= MAX_COMPILED_SEGMENTS else "eager"
    return engine


MAX_COMPILED_SEGMENTS = 8
"""The most segments "auto" compiles for a non-element-wise algorithm (see ``_resolve_engine``): a
segment is a run of same-shaped params of one bucket, stepped as one batched call."""


def _shape_runs(groups: list[dict[str, Any]]) -> int:
    """The segments a compiled non-element-wise step unrolls: distinct param shapes per bucket."""
    return sum(len({(p.device, p.dtype, p.requires_grad, p.shape) for p in group["params"]}) for group in groups)


# ------------------------------------------------------------------------------------------------
# engine "torch": torch.optim's own kernels on the shim's param_groups and state


class _TorchRunner:
    def __init__(self, optimizer: Optimizer):
        self.optimizer = optimizer
        torch_class = optimizer.algorithm.torch_optimizer
        signature = inspect.signature(torch_class.__init__).parameters
        # Checkpoints carry torch's default execution flags: how this shim runs is not part of the
        # optimizer's state, and a torch.optim optimizer loading the checkpoint should run as it would.
        self.exported_flags = {k: signature[k].default for k in _TORCH_EXECUTION_KEYS if k in signature}
        self.flags = {"fused": True} if "fused" in signature and _fused_supported(optimizer.param_groups) else {}
        # The config's values as keyword arguments too: some torch optimizers (Adagrad) read them to
        # fill their state at construction.
        self.inner = torch_class(optimizer.param_groups, **optimizer.defaults, **self.flags)
        optimizer.state = self.inner.state
        # torch's step without its hook wrapper: the shim's own step already ran the hooks.
        self.unhooked_step = type(self.inner).step.__wrapped__

    def add_group(self, group: dict[str, Any]) -> None:
        if self.flags and not _fused_supported([group]):
            raise ValueError("these params cannot run torch's fused kernel like the rest; build with engine='eager' or 'compiled'")
        self.inner.add_param_group(group)
        group.update(self.flags)

    def step(self, configs: list[Config]) -> None:
        groups = self.optimizer.param_groups
        all_started = len(self.optimizer.state) >= sum(len(g["params"]) for g in groups)
        fused_off = [] if all_started else [g for g in groups if g.get("fused") and self._starts_some_state(g)]
        for group in fused_off:
            group["fused"] = False
        try:
            self.unhooked_step(self.inner)
        finally:
            for group in fused_off:
                group["fused"] = True

    def _starts_some_state(self, group: dict[str, Any]) -> bool:
        # torch's fused SGD cannot start momentum buffers for some params while others have them
        # (a layer unfrozen later); its default kernel can, so such a step runs unfused.
        started = {p in self.optimizer.state for p in group["params"] if p.grad is not None}
        return len(started) == 2

    def export(self, state_dict: dict[str, Any]) -> None:
        for group in state_dict["param_groups"]:
            group.update(self.exported_flags)

    def check(self, state_dict: dict[str, Any]) -> None:
        pass  # torch's algorithms keep no shared state

    def reload(self, state_dict: dict[str, Any]) -> None:
        optimizer = self.optimizer
        self.inner.__setstate__({"state": optimizer.state, "param_groups": optimizer.param_groups})
        for group in optimizer.param_groups:
            group.update(self.flags)
            for param in group["params"]:
                state = optimizer.state.get(param)
                if state is not None and self.flags.get("fused") and isinstance(state.get("step"), Tensor):
                    state["step"] = state["step"].to(device=param.device, dtype=torch.float32)


def _fused_supported(groups: list[dict[str, Any]]) -> bool:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # older torch: keep torch's own default choice
        return False
    params = [p for group in groups for p in group["params"]]
    return all(p.is_floating_point() and p.device.type in devices for p in params)


# ------------------------------------------------------------------------------------------------
# engines "compiled" and "eager": the pure update on flat buffers


class _Bucket:
    """The params of one group sharing (device, dtype, requires_grad), stored as one flat buffer.

    Each param becomes a view of ``flat``; its state lives in flat buffers too, and
    ``optimizer.state[param]`` holds views, so ``state_dict`` sees torch's per-parameter layout.
    Per-tensor scalars (``step``, DAG's ``alpha``) live in one vector per key, an entry per param,
    as torch keeps one per parameter. An element-wise algorithm runs as one flat step while those
    scalars agree across the params; otherwise each param steps on its own segment. With ``by_shape``
    (the compiled engine, non-element-wise algorithms) the params are reordered so same-shaped ones
    are adjacent; only this bucket's order changes: ``optimizer.state`` is keyed by param and
    ``state_dict`` indexes params in ``param_groups`` order, as torch does.
    """

    def __init__(self, params: list[Tensor], algorithm: Algorithm, *, by_shape: bool = False):
        if by_shape:  # same-shaped params adjacent (shapes in first-seen order), for _batched_step
            first_seen: dict[torch.Size, int] = {}
            for param in params:
                first_seen.setdefault(param.shape, len(first_seen))
            params = sorted(params, key=lambda p: first_seen[p.shape])  # stable: keeps order within a shape
        self.params = params  # every structure below (flat buffers, vectors, views) follows this order
        self.sizes = [p.numel() for p in params]
        self.shapes = tuple(p.shape for p in params)
        self.flat = torch.cat([p.detach().reshape(-1) for p in params])
        self.grad = torch.zeros_like(self.flat)
        self.param_views = self._split(self.flat)
        self.grad_views = self._split(self.grad)
        for param, view in zip(params, self.param_views):
            param.data = view
        self.algorithm = algorithm
        self.buffers: dict[str, Tensor] = {}  # per-element state, flat
        self.views: dict[str, list[Tensor]] = {}
        self.scalars: dict[str, Tensor] = {}  # per-tensor state, one entry per param
        self.packed: dict[str, tuple[Tensor, tuple[torch.Size, ...]]] = {}  # state of other shapes, flat
        self.uniform = True  # all per-tensor scalars equal, so one flat step serves all params
        self.hyper: dict[str, Tensor] = {}  # hyperparameters as 0-dim tensors, refilled each step
        self.exposed: list[bool] = [False] * len(params)  # which params have an optimizer.state entry
        self.exposed_keys: tuple[str, ...] = ()
        self.step_fn: Callable[..., Any] = _flat_step

    def _split(self, flat: Tensor) -> list[Tensor]:
        return [chunk.view(shape) for chunk, shape in zip(flat.split(self.sizes), self.shapes)]

    def ensure(self, keys: tuple[str, ...], config: Config) -> None:
        """Create the state buffers ``keys`` needs that do not exist yet, at their initial values.

        Per-element state (shaped like each param) goes into one flat buffer per key, per-tensor
        scalars into one vector per key. A non-element-wise algorithm may also keep state of other
        shapes (Adafactor's row and column factors): one flat buffer per key too, each param's entry a
        view of its own shape (a compiled step writes its inputs back reliably only when they are not
        0-dim, so entries are never passed one by one).
        """
        missing = [k for k in keys if k not in self.views and k not in self.scalars]
        if not missing:
            return
        if self.algorithm.elementwise:  # one fresh state for the whole buffer
            fresh = self.algorithm.init_leaf(self.flat, config)
            for key in missing:
                if fresh[key].dim() == 0:
                    self.scalars[key] = fresh[key].expand(len(self.params)).clone()
                else:
                    self._flat_buffer(key, fresh[key])
            return
        per_param = [self.algorithm.init_leaf(view, config) for view in self.param_views]
        for key in missing:
            values = [leaf[key] for leaf in per_param]
            if all(v.dim() == 0 for v in values):
                self.scalars[key] = torch.stack(values)
            elif all(v.shape == shape for v, shape in zip(values, self.shapes)):
                self._flat_buffer(key, torch.cat([v.reshape(-1) for v in values]))
            else:
                shapes = tuple(v.shape for v in values)
                self.packed[key] = (torch.cat([v.reshape(-1) for v in values]), shapes)
                self.views[key] = _split_as(self.packed[key][0], shapes)

    def _flat_buffer(self, key: str, buffer: Tensor) -> None:
        self.buffers[key] = buffer
        self.views[key] = self._split(buffer)

    def reset(self, index: int, config: Config) -> None:
        fresh = self.algorithm.init_leaf(self.param_views[index], config)
        for key, value in self.leaf_state(index, tuple(fresh)).items():
            value.copy_(fresh[key])

    def leaf_state(self, index: int, keys: tuple[str, ...]) -> dict[str, Tensor]:
        return {key: self.scalars[key][index] if key in self.scalars else self.views[key][index] for key in keys}

    def adopt_dtypes(self, loaded: dict[str, Any]) -> None:
        """Per-tensor scalars take the dtype a loaded checkpoint gives them. torch.optim's loader casts
        every state value but ``step`` to the param's dtype (NAdam's float32 ``mu_product`` becomes
        float64 for float64 params), so a resumed torch optimizer computes in that dtype: so does this."""
        for key, values in self.scalars.items():
            value = loaded.get(key)
            if key != "step" and isinstance(value, Tensor) and value.dtype != values.dtype:
                self.scalars[key] = values.to(value.dtype)  # before any param's state view is made

    def check_uniform(self) -> None:
        self.uniform = all(bool((values == values[0]).all()) for values in self.scalars.values())


def _split_as(flat: Tensor, shapes: tuple[torch.Size, ...]) -> list[Tensor]:
    return [chunk.view(shape) for chunk, shape in zip(flat.split([shape.numel() for shape in shapes]), shapes)]


def _flat_step(update, param: Tensor, grad: Tensor, scalars: dict[str, Tensor], buffers: dict[str, Tensor], config: Config, *shared):
    """One element-wise step of every param of a bucket at once; per-tensor scalars are all equal."""
    leaf_state = {**{key: values[0] for key, values in scalars.items()}, **buffers}
    new_param, new_state, *contributions = apply_update(update, param, grad, leaf_state, config, *shared)
    param.copy_(new_param)
    for key, values in scalars.items():
        values.copy_(new_state[key].expand_as(values))
    for key, buffer in buffers.items():
        buffer.copy_(new_state[key])
    return contributions[0] if contributions else None


def _segment_step(update, param: Tensor, grad: Tensor, scalars: dict[str, Tensor], buffers: dict[str, Tensor], config: Config, sizes, shapes, packed, *shared):
    """One step of every param of a bucket, each on its own segment of the flat buffers (for
    algorithms that reduce over a tensor); ``packed`` holds state of other shapes, each key as a flat
    buffer and its entries' shapes. Returns the summed contributions to the shared state."""
    def split(flat: Tensor) -> list[Tensor]:
        return [chunk.view(shape) for chunk, shape in zip(flat.split(sizes), shapes)]

    params, grads = split(param), split(grad)
    views = {**{key: split(buffer) for key, buffer in buffers.items()}, **{key: _split_as(*entry) for key, entry in packed.items()}}
    contributions = []
    for i in range(len(sizes)):
        leaf_state = {**{key: values[i] for key, values in scalars.items()}, **{key: v[i] for key, v in views.items()}}
        new_param, new_state, *contribution = apply_update(update, params[i], grads[i], leaf_state, config, *shared)
        params[i].copy_(new_param)
        for key, value in leaf_state.items():
            value.copy_(new_state[key])
        contributions += contribution
    return _sum_in_place(contributions)


def _batched_step(update, param: Tensor, grad: Tensor, scalars: dict[str, Tensor], buffers: dict[str, Tensor], config: Config, sizes, shapes, packed, *shared):
    """``_segment_step`` for a bucket whose same-shaped params are adjacent: each run of ``n`` params
    of one shape (and one shape of each packed entry) steps as one ``vmap`` of ``update`` over
    zero-copy ``(n, *shape)`` views of the flat buffers, the per-tensor scalar vectors and the packed
    buffers. The compiled graph then has one segment per shape, not per tensor. vmap reduces in
    batches, so results may differ from the per-tensor loop by reduction rounding."""
    entry_shapes = {key: entry[1] for key, entry in packed.items()}
    keys = [(shape, *(s[i] for s in entry_shapes.values())) for i, shape in enumerate(shapes)]
    offsets = {None: 0, **{key: 0 for key in packed}}
    contributions = []
    start = 0
    while start < len(shapes):
        end = start + 1
        while end < len(shapes) and keys[end] == keys[start]:
            end += 1
        n, shape = end - start, shapes[start]

        def run(flat: Tensor, offset: int, entry: torch.Size) -> Tensor:
            return flat[offset:offset + n * entry.numel()].view(n, *entry)

        params, grads = run(param, offsets[None], shape), run(grad, offsets[None], shape)
        leaf = {key: values[start:end] for key, values in scalars.items()}
        leaf.update({key: run(buffer, offsets[None], shape) for key, buffer in buffers.items()})
        leaf.update({key: run(packed[key][0], offsets[key], entry_shapes[key][start]) for key in packed})

        def one(p: Tensor, g: Tensor, state: dict[str, Tensor]):
            return apply_update(update, p, g, state, config, *shared)

        new_params, new_state, *contribution = torch.func.vmap(one)(params, grads, leaf)
        params.copy_(new_params)
        for key, value in leaf.items():
            value.copy_(new_state[key])
        contributions += contribution
        offsets[None] += n * shape.numel()
        for key in packed:
            offsets[key] += n * entry_shapes[key][start].numel()
        start = end
    if not contributions:
        return None
    # Each run contributes one value per param (an unbatched one is expanded by vmap): sum them all.
    return {key: torch.cat([c[key] for c in contributions]).sum() for key in contributions[0]}


def _sum_in_place(contributions: list[dict[str, Tensor]]) -> dict[str, Tensor] | None:
    if not contributions:
        return None
    return {key: torch.stack([c[key] for c in contributions]).sum() for key in contributions[0]}


def _compiled(function: Callable[..., Any]) -> Callable[..., Any]:
    # Dynamo keeps its compile cache (and its recompile limit) per code object: a private copy of the
    # code gives each bucket one graph of its own, however many buckets and optimizers a process has.
    code = function.__code__.replace()
    copy = types.FunctionType(code, function.__globals__, function.__name__)
    return torch.compile(copy, fullgraph=True, dynamic=False)


class _FlatRunner:
    def __init__(self, optimizer: Optimizer, *, compiled: bool):
        self.optimizer = optimizer
        self.algorithm = optimizer.algorithm
        self.buckets: list[list[_Bucket]] = []
        self.compiled = compiled
        self.shared: dict[str, Tensor] | None = None
        if self.algorithm.shared is not None:
            self.shared = self.algorithm.shared.init(self._trainable(), optimizer.group_config(optimizer.param_groups[0]))
        for group in optimizer.param_groups:
            self.add_group(group)

    def _trainable(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]

    def add_group(self, group: dict[str, Any]) -> None:
        config = self.optimizer.group_config(group)
        by_kind: dict[tuple, list[Tensor]] = {}
        for param in group["params"]:
            by_kind.setdefault((param.device, param.dtype, param.requires_grad), []).append(param)
        # Compiled, a non-element-wise step batches each run of same-shaped params (_batched_step);
        # eagerly it steps tensor by tensor in the group's order, as the references do.
        batched = self.compiled and not self.algorithm.elementwise
        buckets = [_Bucket(params, self.algorithm, by_shape=batched) for params in by_kind.values()]
        function = _flat_step if self.algorithm.elementwise else _batched_step if batched else _segment_step
        for bucket in buckets:
            bucket.ensure(self.algorithm.state_keys(config), config)
            bucket.step_fn = _compiled(function) if self.compiled else function
        self.buckets.append(buckets)
        if self.shared is not None and self.buckets[1:]:  # a group added later: sizes change
            fresh = self.algorithm.shared.init(self._trainable(), config)
            for key in self.algorithm.shared.derived:
                self.shared[key].copy_(fresh[key])

    def step(self, configs: list[Config]) -> None:
        work = []
        for config, buckets in zip(configs, self.buckets):
            for bucket in buckets:
                grads = [p.grad for p in bucket.params]
                for param, grad, view in zip(bucket.params, grads, bucket.grad_views):
                    if grad is not None and grad is not view:  # views of our own buffer are known good
                        _check_grad_matches(self.algorithm.name, param, grad)
                work.append((config, bucket, grads))
        contributions = []
        for config, bucket, grads in work:
            keys = self.algorithm.state_keys(config)
            present = [g is not None for g in grads]
            if not any(present):
                continue
            bucket.ensure(keys, config)
            shared = self._shared_on(bucket)
            if all(present) and (bucket.uniform or not self.algorithm.elementwise):
                contribution = self._all_at_once(config, keys, bucket, grads, shared)
            else:
                contribution = self._per_param(config, keys, bucket, grads, shared)
            if contribution is not None:
                contributions.append(contribution)
            self._expose(bucket, keys, present)
        if self.shared is not None:
            device = next(iter(self.shared.values())).device
            totals = sum_contributions(contributions, device)
            for key, value in self.algorithm.shared.finish(self.shared, totals, configs[0]).items():
                self.shared[key].copy_(value)

    def _shared_on(self, bucket: _Bucket) -> tuple[dict[str, Tensor], ...]:
        if self.shared is None:
            return ()
        return ({key: value.to(bucket.flat.device) for key, value in self.shared.items()},)

    def _expose(self, bucket: _Bucket, keys: tuple[str, ...], present: list[bool]) -> None:
        """Give each stepped param its torch-style state entry (views into the flat buffers), once."""
        if keys != bucket.exposed_keys:
            bucket.exposed, bucket.exposed_keys = [False] * len(bucket.params), keys
        if all(bucket.exposed):
            return
        for index, param in enumerate(bucket.params):
            if present[index] and not bucket.exposed[index]:
                self.optimizer.state[param] = bucket.leaf_state(index, keys)
                bucket.exposed[index] = True

    def _all_at_once(self, config, keys, bucket: _Bucket, grads: list[Tensor], shared: tuple) -> dict[str, Tensor] | None:
        if not all(g is view for g, view in zip(grads, bucket.grad_views)):
            torch.cat([g.reshape(-1) for g in grads], out=bucket.grad)
            for param, view in zip(bucket.params, bucket.grad_views):
                param.grad = view  # the next backward accumulates straight into the flat buffer
        scalars = {key: bucket.scalars[key] for key in keys if key in bucket.scalars}
        buffers = {key: bucket.buffers[key] for key in keys if key in bucket.buffers}
        packed = {key: bucket.packed[key] for key in keys if key in bucket.packed}
        layout = () if self.algorithm.elementwise else (bucket.sizes, bucket.shapes, packed)
        # Compiled, numbers travel as tensors so a new value never recompiles; eagerly, numbers keep
        # torch's fused kernels and skip zero terms.
        step_config = self._tensor_config(bucket, config) if self.compiled else config
        try:
            return bucket.step_fn(self.algorithm.update, bucket.flat, bucket.grad, scalars, buffers, step_config, *layout, *shared)
        except Exception as error:
            if not self.compiled:
                raise
            warnings.warn(f"optorch: torch.compile failed ({type(error).__name__}: {error}); {self.algorithm.name} runs eagerly from now on", RuntimeWarning, stacklevel=4)
            self.compiled = False
            function = _flat_step if self.algorithm.elementwise else _segment_step
            for bucket_ in (b for buckets in self.buckets for b in buckets):
                bucket_.step_fn = function
            return function(self.algorithm.update, bucket.flat, bucket.grad, scalars, buffers, config, *layout, *shared)

    def _tensor_config(self, bucket: _Bucket, config: Config) -> Config:
        """``config`` with every real-valued number as a 0-dim tensor on the bucket's device, updated in
        place, so a compiled step sees new values without recompiling."""
        values = {name: _as_tensors(value, bucket.hyper, name, bucket.flat) for name, value in config.hyperparameters().items()}
        return config.with_tensors(**{name: value for name, value in values.items() if _is_tensors(value)})

    def _per_param(self, config, keys, bucket: _Bucket, grads: list[Tensor | None], shared: tuple) -> dict[str, Tensor] | None:
        contributions = []
        for index, (param, grad) in enumerate(zip(bucket.params, grads)):
            if grad is None:
                continue
            leaf = bucket.leaf_state(index, keys)
            new_param, new_state, *contribution = apply_update(self.algorithm.update, param, grad, leaf, config, *shared)
            param.copy_(new_param)
            for key, value in new_state.items():
                leaf[key].copy_(value)
            contributions += contribution
        if not all(g is not None for g in grads):
            bucket.uniform = False
        return _sum_in_place(contributions)

    def export(self, state_dict: dict[str, Any]) -> None:
        # torch's keys; a parameter torch would keep no state for (SGD without momentum) gets none.
        exported = {index: self.algorithm.state_to_torch(leaf) for index, leaf in state_dict["state"].items()}
        state_dict["state"] = {index: leaf for index, leaf in exported.items() if leaf}
        if self.shared is not None:
            state_dict[SHARED_KEY] = {key: value.clone() for key, value in self.shared.items()}

    def check(self, state_dict: dict[str, Any]) -> None:
        if self.shared is None:
            return
        saved = state_dict.get(SHARED_KEY)
        if not isinstance(saved, dict) or set(saved) != set(self.shared):
            found = sorted(saved) if isinstance(saved, dict) else "none"
            raise ValueError(f"{self.algorithm.name}: the state_dict's {SHARED_KEY!r} entry has keys {found}, expected {sorted(self.shared)}")
        for key, value in saved.items():
            if not isinstance(value, (int, float, Tensor)) or (isinstance(value, Tensor) and value.numel() != 1):
                raise ValueError(f"{self.algorithm.name}: shared state {key!r} must be a number or a one-element tensor")

    def reload(self, state_dict: dict[str, Any]) -> None:
        optimizer = self.optimizer
        if self.shared is not None:
            for key, value in state_dict[SHARED_KEY].items():
                self.shared[key].copy_(torch.as_tensor(value).reshape(()))
        for group, buckets in zip(optimizer.param_groups, self.buckets):
            config = optimizer.group_config(group)
            keys = self.algorithm.state_keys(config)
            for bucket in buckets:
                bucket.ensure(keys, config)
                bucket.exposed, bucket.exposed_keys = [False] * len(bucket.params), keys
                for index, param in enumerate(bucket.params):
                    loaded = optimizer.state.pop(param, None)
                    if loaded is None:
                        bucket.reset(index, config)
                        continue
                    loaded = self.algorithm.state_from_torch(loaded)
                    if self.algorithm.torch_optimizer is not None:
                        bucket.adopt_dtypes(loaded)
                    leaf = bucket.leaf_state(index, keys)
                    for key in keys:
                        leaf[key].copy_(torch.as_tensor(loaded[key]).reshape(leaf[key].shape))
                    optimizer.state[param] = leaf
                    bucket.exposed[index] = True
                bucket.check_uniform()


def _as_tensors(value: Any, cache: dict[str, Any], name: str, like: Tensor) -> Any:
    # Integers select code paths and cadences (DAG's sat_every, AutoSGM's window kind): they stay
    # Python values, as do flags and nested settings.
    if isinstance(value, (bool, int)):
        return value
    if isinstance(value, tuple):
        return tuple(_as_tensors(v, cache, f"{name}.{i}", like) for i, v in enumerate(value))
    if isinstance(value, (float, Tensor)):
        tensor = cache.get(name)
        if tensor is None:
            tensor = cache[name] = torch.zeros((), dtype=_hyper_dtype(like), device=like.device)
        tensor.fill_(value)
        return tensor
    return value


def _is_tensors(value: Any) -> bool:
    return isinstance(value, Tensor) or (isinstance(value, tuple) and bool(value) and all(isinstance(v, Tensor) for v in value))


def _hyper_dtype(like: Tensor) -> torch.dtype:
    # The param's own precision, as torch.optim's kernels round a Python-number hyperparameter; but
    # never below float32 (a bfloat16 lr keeps three digits). 0-dim float64 tensors next to float32
    # buffers would also make Dynamo trace the step twice before compiling it.
    dtype = like.real.dtype if like.is_complex() else like.dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _check_grad_matches(name: str, param: Tensor, grad: Tensor) -> None:
    # Sparse grads were refused by Optimizer.step already; a gather into the flat buffer also needs
    # the grad to have its param's shape, dtype and device.
    if grad.shape != param.shape or grad.dtype != param.dtype or grad.device != param.device:
        raise RuntimeError(
            f"{name}: a gradient of shape {tuple(grad.shape)}, {grad.dtype} on {grad.device} does not match its "
            f"parameter ({tuple(param.shape)}, {param.dtype} on {param.device})"
        )
