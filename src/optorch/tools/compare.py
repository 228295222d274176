"""``optorch compare``: train one small real model once per optimizer config and compare the runs.

The model is an MLP (64-64-10, LayerNorm and ReLU, layers named ``hidden``, ``norm``, ``out``) on scikit-learn's
digits (8x8 images of handwritten digits, 1797 samples that ship with scikit-learn: nothing is downloaded).
Every run starts from the same initial weights and sees the same mini-batches in the same order, so the runs
differ only by their optimizer. Each run steps through the :class:`optorch.Optimizer` shim, the way a torch
training loop uses it.

What a run records:

* the loss on the whole training set every few steps (the loss curve) and at the end;
* the test accuracy at the end (a fixed 20% of the data, never trained on);
* the time of each ``optimizer.step()`` (its 10th percentile is reported, as a ratio to the fastest
  run: forward and backward are the same for every run, so they are left out). The runs take turns,
  a few steps each, so load from other processes slows them alike;
* the first evaluated step at which the training loss reaches the target;
* every numeric hyperparameter of the param groups at each step, and each 0-dim entry of the
  optimizer's shared state: whatever changes over a run (an LR scheduler, an adaptive rule) is
  plotted against the step, one PNG per knob.

With no config files it compares a default set that covers every registered algorithm: the repo's
``configs/*`` files when optorch runs from a checkout (an editable install), plus, for each
registered algorithm that no file names, its default ``Config``.

Needs the ``compare`` extra: ``pip install 'optorch[compare]'`` (scikit-learn, tqdm, matplotlib).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import torch
from torch import Tensor, nn

from ..algorithms import registry
from ..builder.make import assemble
from ..builder.spec import Parsed, explain, parse
from ..core.algorithm import Algorithm
from ..core.config import Config
from ..core.errors import ConfigError
from ..core.scalars import as_float

__all__ = [
    "CompareError",
    "Data",
    "Result",
    "Spec",
    "compare",
    "default_config_dir",
    "default_specs",
    "digits",
    "load_specs",
]

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
FALLBACK_LR = 1e-3
"""The lr of a default config whose algorithm has no default lr (torch.optim's usual default)."""


class CompareError(ValueError):
    """A config that cannot be compared (named with its file and field), or a missing dependency."""


# -- what to compare ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One run to make: a label, where its config came from, and the config as the builder parsed it."""

    label: str
    source: str
    """The config file, or ``"defaults"`` for an algorithm's default Config."""
    parsed: Parsed
    """Every part of the config (:func:`optorch.builder.parse`): what the run's optimizer is built from."""
    scheduler: Callable[[Any], Any] | None = None
    """Optional ``optimizer -> torch.optim.lr_scheduler.LRScheduler``, stepped after each step (for
    :func:`compare` from Python; a config file names no scheduler)."""

    @property
    def algorithm(self) -> Algorithm:
        return self.parsed.algorithm

    @property
    def config(self) -> Config:
        return self.parsed.config

    @property
    def adaptive(self) -> Any:
        """The config's ``adapt`` entry, parsed (an :class:`optorch.AdaptiveConfig`), or None."""
        return self.parsed.rules


def load_specs(paths: Sequence[str | os.PathLike]) -> list[Spec]:
    """Parse every config file (a directory: its config files, by name); the first bad one raises
    :class:`CompareError` naming it and its field.

    Nothing trains before all of them have parsed, so a typo in the last file costs no time.
    """
    specs = []
    for path in map(Path, paths):
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in CONFIG_SUFFIXES) if path.is_dir() else [path]
        for file in files:
            specs.append(Spec(file.stem, str(file), _parse_file(file)))
    return _unique_labels(specs)


def _parse_file(path: Path) -> Parsed:
    try:
        return parse(path)
    except (pydantic.ValidationError, ConfigError, registry.UnknownOptimizerError, OSError) as error:
        message = explain(error)
        raise CompareError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def _unique_labels(specs: list[Spec]) -> list[Spec]:
    seen: dict[str, int] = {}
    for spec in specs:
        seen[spec.label] = seen.get(spec.label, 0) + 1
    return [spec if seen[spec.label] == 1 else dataclasses.replace(spec, label=spec.source) for spec in specs]


def default_config_dir() -> Path | None:
    """The directory of default config files, or None when there is none.

    ``optorch/configs`` inside the package if a distribution ships one; else the repo's ``configs/``
    when optorch runs from a checkout (``src/optorch`` next to ``pyproject.toml``), as in an editable
    install. A plain wheel install has neither, and the defaults come from the Configs alone.
    """
    package = Path(__file__).resolve().parent.parent  # the optorch package, above tools/
    shipped = package / "configs"
    if shipped.is_dir():
        return shipped
    root = package.parents[1]
    repo = root / "configs"
    if (root / "pyproject.toml").is_file() and repo.is_dir():
        return repo
    return None


def default_specs(config_dir: Path | None = None) -> list[Spec]:
    """Every config file in ``config_dir`` (default: :func:`default_config_dir`), then the default
    Config of each registered algorithm that none of those files names."""
    config_dir = default_config_dir() if config_dir is None else config_dir
    specs = load_specs([config_dir] if config_dir else [])
    covered = {spec.algorithm.name for spec in specs}
    for name in registry.names():
        if name not in covered:
            algorithm = registry.get(name)
            specs.append(
                Spec(f"{name} (defaults)", "defaults", Parsed(algorithm, default_config(algorithm), {}, None, None))
            )
    return specs


def default_config(algorithm: Algorithm) -> Config:
    """The algorithm's default Config; an lr of :data:`FALLBACK_LR` if it has no default lr."""
    try:
        return algorithm.config()
    except pydantic.ValidationError:
        return algorithm.config(lr=FALLBACK_LR)


# -- the task ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def digits(seed: int, device: str | torch.device = "cpu", test_fraction: float = 0.2) -> Data:
    """scikit-learn's digits, pixels scaled to [0, 1], split into train and test by ``seed``."""
    pixels, labels = _load_digits()
    x = torch.tensor(pixels, dtype=torch.float32) / 16.0
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Data(*(t.to(device) for t in (x[train], y[train], x[test], y[test])))


def _load_digits():
    """``(pixels, labels)`` as numpy arrays: sklearn.datasets.load_digits(return_X_y=True)."""
    import importlib.util

    import numpy as np

    # The digits ship inside scikit-learn as one small CSV (64 pixel columns, then the label).
    # Reading it directly skips importing sklearn.datasets, seconds on a busy machine; where the
    # file is not where this scikit-learn keeps it, load_digits reads it.
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        require("sklearn", "scikit-learn")
    csv = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():
        table = np.loadtxt(csv, delimiter=",")
        if table.shape == (1797, 65):
            return table[:, :64], table[:, 64].astype(np.int64)
    return require("sklearn.datasets", "scikit-learn").load_digits(return_X_y=True)


def mlp(seed: int) -> nn.Module:
    """The model every run starts from: 64 pixels, 64 hidden units (LayerNorm, ReLU), 10 classes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # named layers, and a norm, so that recipes with param_groups (no decay on "*norm*") apply
        return nn.Sequential(
            OrderedDict(hidden=nn.Linear(64, 64), norm=nn.LayerNorm(64), act=nn.ReLU(), out=nn.Linear(64, 10))
        )


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> Tensor:
    """``(steps, batch_size)`` sample indices: shuffled epochs, the same for every run."""
    if not 1 <= batch_size <= n:
        raise CompareError(f"the batch size must be between 1 and the {n} training samples, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps / (n // batch_size))  # each epoch drops its last, incomplete batch
    order = torch.cat([torch.randperm(n, generator=generator)[: n - n % batch_size] for _ in range(epochs)])
    return order[: steps * batch_size].view(steps, batch_size)


# -- running -----------------------------------------------------------------------------------


@dataclass
class Result:
    label: str
    source: str
    algorithm: str
    config: dict[str, Any]
    steps: int
    """Steps taken (fewer than asked if the run diverged)."""
    eval_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    """Loss on the whole training set after each step in ``eval_steps`` (step 0: the initial model)."""
    batch_loss: list[float] = field(default_factory=list)
    """Loss on each step's mini-batch, before the step."""
    knobs: dict[str, list[float]] = field(default_factory=dict)
    """Each numeric hyperparameter or shared-state scalar, per step (the value the step used)."""
    step_times: list[float] = field(default_factory=list)
    final_train_loss: float = math.nan
    test_accuracy: float = math.nan
    steps_to_target: int | None = None
    diverged: bool = False
    interrupted: bool = False
    """Stopped by Ctrl-C before its last step: its numbers are those of the steps it took."""
    error: str | None = None
    """Why the run stopped at a step that raised (its config failed mid-run: a schedule that leaves
    the hyperparameter's range); the other runs go on."""

    @property
    def step_time(self) -> float:
        """Seconds per ``optimizer.step()``: the 10th percentile of its times, the first few steps
        (which warm caches up) left out. The work of a step is the same every step, so its spread is
        other processes' doing; the fast end measures the step, where the median on a busy machine
        moved by tens of percent from one invocation to the next."""
        times = sorted(self.step_times[min(5, len(self.step_times) // 2) :])
        return times[len(times) // 10] if times else math.nan

    def changing_knobs(self) -> dict[str, list[float]]:
        """The knobs that change during the run, step counters (DAG's ``global_step``) and another
        group's copy of group 0's values (``g1.lr`` under a schedule for every group) left out."""

        def copy_of_group_0(name: str, values: list[float]) -> bool:
            return name.startswith("g") and "." in name and self.knobs.get(name.split(".", 1)[1]) == values

        return {
            name: values
            for name, values in self.knobs.items()
            if len(set(values)) > 1 and not _is_counter(values) and not copy_of_group_0(name, values)
        }


def _is_counter(values: list[float]) -> bool:
    return all(b - a == 1 for a, b in zip(values, values[1:]))


def compare(
    specs: Sequence[Spec],
    *,
    steps: int = 1500,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 64,
    engine: str = "eager",
    target: float = 0.3,
    eval_every: int | None = None,
    progress: bool = True,
) -> list[Result]:
    """Train the MLP on digits once per spec, all from the same init and on the same batches.

    On the CPU it runs on one intra-op thread (restored after): the tensors are tiny, and waking more
    threads costs more than they give, noisily so on a busy machine. Ctrl-C stops every run where it
    is: the results come back as recorded so far, each unfinished run marked ``interrupted``.
    """
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        return _compare(specs, steps, seed, device, batch_size, engine, target, eval_every, progress)
    finally:
        torch.set_num_threads(threads)


def _compare(specs, steps, seed, device, batch_size, engine, target, eval_every, progress) -> list[Result]:
    data = digits(seed, device)
    model = mlp(seed).to(device)
    batches = batch_order(len(data.y_train), steps, batch_size, seed).to(device)
    eval_every = eval_every or max(1, steps // 100)
    # Build every optimizer first: a config the shim rejects fails before any run has started.
    runs = []
    for spec in specs:
        run_model = copy.deepcopy(model)
        try:
            optimizer = _optimizer(spec, run_model, engine)
        except (ValueError, TypeError) as error:
            raise CompareError(f"{spec.source}: {error}") from None
        scheduler = spec.scheduler(optimizer) if spec.scheduler is not None else None
        runs.append((spec, run_model, optimizer, scheduler))
    tqdm = require("tqdm", "tqdm").tqdm
    results = [
        Result(spec.label, spec.source, spec.algorithm.name, jsonable(spec.config.hyperparameters()), 0)
        for spec in specs
    ]
    bars = [
        tqdm(
            total=steps,
            desc=spec.label,
            unit="step",
            position=i,
            leave=True,
            disable=not progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        for i, spec in enumerate(specs)
    ]
    try:
        # The runs take turns, eval_every steps at a time, so that a burst of load from other
        # processes slows all of them alike rather than the one that happens to be running.
        active = [
            (result, _train(result, *run[1:], data, batches, eval_every, target, bar))
            for result, run, bar in zip(results, runs, bars)
        ]
        while active:
            active = [(result, run) for result, run in active if _turn(result, run)]
    except KeyboardInterrupt:
        for result in results:
            result.interrupted = result.error is None and math.isnan(
                result.test_accuracy
            )  # a run sets it as it finishes
    finally:
        for bar in bars:
            bar.close()
    return results


def _turn(result: Result, run) -> bool:
    """One turn of a run; whether it goes on. A config that fails mid-run stops its run, not the others."""
    try:
        return next(run, None) is not None
    except ValueError as error:  # pydantic's too: a scheduled value the algorithm's Config refuses
        result.error = explain(error)
        return False


def _optimizer(spec: Spec, model: nn.Module, engine: str):
    # named params: a param_groups entry matches names
    return assemble(model.named_parameters(), spec.parsed, engine=engine)


def _train(
    result: Result,
    model: nn.Module,
    optimizer,
    scheduler,
    data: Data,
    batches: Tensor,
    eval_every: int,
    target: float,
    bar,
):
    """One run, filling in ``result``: a generator that pauses (yields True) after each evaluation."""
    loss_fn = nn.functional.cross_entropy
    cuda = data.x_train.device.type == "cuda"

    def evaluate(step: int) -> float:
        with torch.no_grad():
            loss = loss_fn(model(data.x_train), data.y_train).item()
        result.eval_steps.append(step)
        result.train_loss.append(loss)
        if result.steps_to_target is None and loss <= target:
            result.steps_to_target = step
        return loss

    evaluate(0)
    for step, index in enumerate(batches, start=1):
        loss = loss_fn(model(data.x_train[index]), data.y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        batch_loss = loss.item()
        result.batch_loss.append(batch_loss)
        if not math.isfinite(batch_loss):
            result.diverged = True
            break
        if getattr(optimizer, "adaptive", None) is not None:
            optimizer.adaptive.step_loss(batch_loss)  # the knobs recorded next are the ones this step uses
        for name, value in _knobs(optimizer).items():
            result.knobs.setdefault(name, []).append(value)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        result.step_times.append(time.perf_counter() - start)
        if scheduler is not None:
            scheduler.step()
        result.steps = step
        bar.update(1)
        if step % eval_every == 0 or step == len(batches):
            train_loss = evaluate(step)
            bar.set_postfix(loss=f"{train_loss:.3g}", refresh=False)
            if not math.isfinite(train_loss):
                result.diverged = True
                break
            yield True
    result.final_train_loss = result.train_loss[-1] if not result.diverged else math.nan
    with torch.no_grad():
        result.test_accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()


def _knobs(optimizer) -> dict[str, float]:
    """The numeric hyperparameters of each param group (``lr``, ``betas[0]``, ...; ``g1.lr`` for the
    second group) and the 0-dim entries of the shared state (``shared.alpha``), as floats."""
    knobs = {}
    fields = optimizer.algorithm.config.model_fields
    for i, group in enumerate(optimizer.param_groups):
        prefix = f"g{i}." if i else ""
        for key, value in group.items():
            if key not in fields:  # the shim's other keys (positions, counters, adapt.*) are state
                continue
            if isinstance(value, (tuple, list)):
                items = {f"{prefix}{key}[{j}]": item for j, item in enumerate(value)}
            else:
                items = {f"{prefix}{key}": value}
            for name, item in items.items():
                number = as_float(item)
                if number is not None:
                    knobs[name] = number
    for key, value in (optimizer.shared or {}).items():
        number = as_float(value)
        if number is not None:
            knobs[f"shared.{key}"] = number
    return knobs


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise CompareError(f"optorch compare needs {package}: pip install 'optorch[compare]'") from None
