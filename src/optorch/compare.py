"""``optorch compare``: train one small real model once per optimizer config and compare the runs.

The model is an MLP (64-64-10, LayerNorm and ReLU, layers named ``hidden``, ``norm``, ``out``) on scikit-learn's digits (8x8 images of handwritten digits,
1797 samples that ship with scikit-learn: nothing is downloaded). Every run starts from the same
initial weights and sees the same mini-batches in the same order, so the runs differ only by their
optimizer. Each run steps through the :class:`optorch.Optimizer` shim, the way a torch training loop
uses it.

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
import json
import math
import os
import re
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pydantic
import torch
from torch import Tensor, nn

from . import registry
from .algorithm import Algorithm
from .builder import ConfigError, Parsed, assemble, explain, parse
from .config import Config

__all__ = [
    "CompareError",
    "Data",
    "Result",
    "Spec",
    "compare",
    "default_config_dir",
    "default_specs",
    "digits",
    "format_table",
    "load_specs",
    "plot_knobs",
    "plot_losses",
    "results_json",
]

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
FALLBACK_LR = 1e-3
"""The lr of a default config whose algorithm has no default lr (torch.optim's usual default)."""


class CompareError(ValueError):
    """A config that cannot be compared (named with its file and field), or a missing dependency."""


# -- what to compare ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One run to make: a label, where its config came from, and the validated config."""

    label: str
    source: str
    """The config file, or ``"defaults"`` for an algorithm's default Config."""
    algorithm: Algorithm
    config: Config
    schedules: dict[str, Any] = field(default_factory=dict)
    """The config's ``schedule`` entry, parsed (see :func:`optorch.builder.parse_schedules`)."""
    scheduler: Callable[[Any], Any] | None = None
    """Optional ``optimizer -> torch.optim.lr_scheduler.LRScheduler``, stepped after each step (for
    :func:`compare` from Python; a config file names no scheduler)."""
    combinators: Any = None
    """The config's combinator entries (clip_grad_norm, param_groups, ...; see
    :func:`optorch.builder.parse_combinators`), or None."""
    adaptive: Any = None
    """The config's ``adaptive`` entry, parsed (an :class:`optorch.AdaptiveConfig`), or None."""


def load_specs(paths: Sequence[str | os.PathLike]) -> list[Spec]:
    """Parse every config file (a directory: its config files, by name); the first bad one raises
    :class:`CompareError` naming it and its field.

    Nothing trains before all of them have parsed, so a typo in the last file costs no time.
    """
    specs = []
    for path in map(Path, paths):
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in CONFIG_SUFFIXES) if path.is_dir() else [path]
        for file in files:
            parsed = _parse_file(file)
            specs.append(Spec(file.stem, str(file), parsed.algorithm, parsed.config, parsed.schedules, combinators=parsed.settings, adaptive=parsed.rules))
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
    package = Path(__file__).resolve().parent
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
            specs.append(Spec(f"{name} (defaults)", "defaults", algorithm, default_config(algorithm)))
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
        _require("sklearn", "scikit-learn")
    csv = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():
        table = np.loadtxt(csv, delimiter=",")
        if table.shape == (1797, 65):
            return table[:, :64], table[:, 64].astype(np.int64)
    return _require("sklearn.datasets", "scikit-learn").load_digits(return_X_y=True)


def mlp(seed: int) -> nn.Module:
    """The model every run starts from: 64 pixels, 64 hidden units (LayerNorm, ReLU), 10 classes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # named layers, and a norm, so that recipes with param_groups (no decay on "*norm*") apply
        return nn.Sequential(OrderedDict(hidden=nn.Linear(64, 64), norm=nn.LayerNorm(64), act=nn.ReLU(), out=nn.Linear(64, 10)))


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

        return {name: values for name, values in self.knobs.items()
                if len(set(values)) > 1 and not _is_counter(values) and not copy_of_group_0(name, values)}


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
    tqdm = _require("tqdm", "tqdm").tqdm
    results = [Result(spec.label, spec.source, spec.algorithm.name, _jsonable(spec.config.hyperparameters()), 0) for spec in specs]
    bars = [
        tqdm(total=steps, desc=spec.label, unit="step", position=i, leave=True, disable=not progress, file=sys.stderr, dynamic_ncols=True)
        for i, spec in enumerate(specs)
    ]
    try:
        # The runs take turns, eval_every steps at a time, so that a burst of load from other
        # processes slows all of them alike rather than the one that happens to be running.
        active = [(result, _train(result, *run[1:], data, batches, eval_every, target, bar)) for result, run, bar in zip(results, runs, bars)]
        while active:
            active = [(result, run) for result, run in active if _turn(result, run)]
    except KeyboardInterrupt:
        for result in results:
            result.interrupted = result.error is None and math.isnan(result.test_accuracy)  # a run sets it as it finishes
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
    return assemble(model.named_parameters(), spec.algorithm, spec.config, engine=engine, schedules=spec.schedules,
                    settings=spec.combinators, rules=spec.adaptive)


def _train(result: Result, model: nn.Module, optimizer, scheduler, data: Data, batches: Tensor, eval_every: int, target: float, bar):
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
                number = _number(item)
                if number is not None:
                    knobs[name] = number
    for key, value in (optimizer.shared or {}).items():
        number = _number(value)
        if number is not None:
            knobs[f"shared.{key}"] = number
    return knobs


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value.item())
    return None


# -- reporting ---------------------------------------------------------------------------------


def format_table(results: Sequence[Result], target: float) -> str:
    """One row per run: final train loss, test accuracy, step time / fastest, steps to the target."""
    fastest = min((r.step_time for r in results if math.isfinite(r.step_time)), default=math.nan)
    header = ("config", "algorithm", "train loss", "test acc", "step time", f"steps to loss<={target:g}")
    rows = []
    for r in results:
        rows.append(
            (
                r.label,
                r.algorithm,
                _stopped(r) or f"{r.final_train_loss:.4f}",
                f"{100 * r.test_accuracy:.1f}%" if math.isfinite(r.test_accuracy) else "-",
                f"{r.step_time / fastest:.2f}x" if math.isfinite(r.step_time) else "-",
                str(r.steps_to_target) if r.steps_to_target is not None else "-",
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    align = ["<", "<", ">", ">", ">", ">"]

    def line(row):
        return "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(row, align, widths)).rstrip()

    lines = [line(header), line(["-" * w for w in widths]), *map(line, rows)]
    if math.isfinite(fastest):
        lines.append(f"(step time: optimizer.step(), 10th percentile, as a multiple of the fastest: {1e3 * fastest:.3f} ms)")
    return "\n".join(lines)


def _stopped(r: Result) -> str | None:
    """How a run stopped early, if it did: ``"diverged after 12"``, ``"failed after 3"``, ..."""
    for how, stopped in (("diverged", r.diverged), ("failed", r.error is not None), ("interrupted", r.interrupted)):
        if stopped:
            return f"{how} after {r.steps}"
    return None


def _pyplot():
    matplotlib = _require("matplotlib", "matplotlib")
    matplotlib.use("Agg", force=True)  # files only: no display, whatever backend the user has
    import matplotlib.pyplot as plt

    return plt


def _styles(n: int):
    """Distinct (color, linestyle) pairs for n lines: 10 colors, then the same colors dashed, ..."""
    colors = [f"C{i}" for i in range(10)]
    lines = ["-", "--", ":", "-."]
    return [(colors[i % 10], lines[(i // 10) % 4]) for i in range(n)]


def plot_losses(results: Sequence[Result], path: str | os.PathLike, target: float | None = None) -> Path:
    """The training-set loss against the step, one line per run (log scale)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 6), layout="constrained")
    for r, (color, style) in zip(results, _styles(len(results))):
        points = [(s, v) for s, v in zip(r.eval_steps, r.train_loss) if math.isfinite(v) and v > 0]
        if points:
            ax.plot(*zip(*points), color=color, linestyle=style, label=r.label + (f" ({_stopped(r).split()[0]})" if _stopped(r) else ""))
    if target is not None:
        ax.axhline(target, color="gray", linewidth=0.8, linestyle=":", label=f"target {target:g}")
    ax.set(xlabel="step", ylabel="training-set loss (cross-entropy)", yscale="log", title="optorch compare: MLP on digits")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_knobs(results: Sequence[Result], out: str | os.PathLike) -> list[Path]:
    """One PNG per knob that changes during some run (``knob-lr.png``, ...), one line per such run."""
    plt = _pyplot()
    by_knob: dict[str, list[tuple[str, list[float]]]] = {}
    for r in results:
        for name, values in r.changing_knobs().items():
            by_knob.setdefault(name, []).append((r.label, values))
    paths = []
    for name, runs in sorted(by_knob.items()):
        fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
        for (label, values), (color, style) in zip(runs, _styles(len(runs))):
            ax.plot(range(1, len(values) + 1), values, color=color, linestyle=style, label=label)
        ax.set(xlabel="step", ylabel=name, title=f"{name} over the steps")
        positive = [v for _, vs in runs for v in vs if v > 0]
        if positive and max(positive) > 10 * min(positive):  # e.g. lrs of different runs, decades apart
            ax.set_yscale("log")  # a warmup's 0 is left off the log axis
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        path = Path(out) / f"knob-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def results_json(results: Sequence[Result], meta: dict[str, Any]) -> dict[str, Any]:
    """Everything a run recorded, as plain JSON (non-finite numbers as null)."""
    fastest = min((r.step_time for r in results if math.isfinite(r.step_time)), default=math.nan)
    runs = []
    for r in results:
        runs.append(
            {
                "label": r.label,
                "source": r.source,
                "algorithm": r.algorithm,
                "config": r.config,
                "steps": r.steps,
                "diverged": r.diverged,
                "interrupted": r.interrupted,
                "error": r.error,
                "final_train_loss": r.final_train_loss,
                "test_accuracy": r.test_accuracy,
                "step_time_s": r.step_time,
                "step_time_ratio": r.step_time / fastest,
                "steps_to_target": r.steps_to_target,
                "curve": {"step": r.eval_steps, "train_loss": r.train_loss},
                "batch_loss": r.batch_loss,
                "changing_knobs": r.changing_knobs(),
            }
        )
    return _jsonable({"meta": meta, "runs": runs})


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise CompareError(f"optorch compare needs {package}: pip install 'optorch[compare]'") from None


# -- the command -------------------------------------------------------------------------------


def run(args) -> int:
    """``optorch compare`` with parsed arguments (see :mod:`optorch.cli`): 0, or 130 when Ctrl-C
    stopped the runs (what they recorded is written all the same). Everything that can be checked
    before training is: the configs, the device, the packages, the output locations."""
    specs = load_specs(args.configs) if args.configs else default_specs()
    if not specs:
        raise CompareError(f"nothing to compare: no config files ({', '.join(CONFIG_SUFFIXES)}) in {', '.join(args.configs) or 'the defaults'}")
    _check_device(args.device)
    for module, package in (("sklearn", "scikit-learn"), ("tqdm", "tqdm"), ("matplotlib", "matplotlib")):
        _require(module, package)
    out = Path(args.out)
    _check_outputs(out, Path(args.json) if args.json else None)
    print(
        f"optorch compare: {len(specs)} configs, MLP 64-64-10 (LayerNorm) on digits, {args.steps} steps of batch {args.batch_size}, "
        f"seed {args.seed}, {args.device}, engine {args.engine}",
        flush=True,
    )
    start = time.perf_counter()
    results = compare(
        specs,
        steps=args.steps,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
        engine=args.engine,
        target=args.target,
        progress=not args.no_progress,
    )
    elapsed = time.perf_counter() - start
    table = format_table(results, args.target)
    print("\n" + table)
    (out / "table.txt").write_text(table + "\n")
    written = [plot_losses(results, out / "loss.png", args.target), *plot_knobs(results, out)]
    if args.json:
        meta = {
            "torch": torch.__version__,
            "task": "MLP 64-64-10 (LayerNorm, ReLU) on sklearn digits, cross-entropy",
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "device": args.device,
            "engine": args.engine,
            "target": args.target,
            "threads": torch.get_num_threads(),
            "wall_s": elapsed,
        }
        Path(args.json).write_text(json.dumps(results_json(results, meta), indent=1, allow_nan=False) + "\n")
        written.append(Path(args.json))
    stopped = sum(r.interrupted for r in results)
    print(f"\n{len(results)} runs in {elapsed:.0f} s; wrote {', '.join(str(p) for p in [out / 'table.txt', *written])}")
    for r in results:
        if r.error is not None:
            print(f"optorch compare: error: {r.label} stopped at step {r.steps + 1}: {r.error}", file=sys.stderr)
    if stopped:
        print(f"optorch compare: interrupted: {len(results) - stopped} of {len(results)} runs finished; the others are reported "
              "up to the step they reached", file=sys.stderr)
        return 130
    return 2 if any(r.error is not None for r in results) else 0


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CompareError(f"--device {device}, but CUDA is not available")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, ValueError) as error:
        raise CompareError(f"--device {device}: {str(error).splitlines()[0]}") from None


def _check_outputs(out: Path, json_path: Path | None) -> None:
    """Every place the command writes to is usable, checked before any training (a bad --out or
    --json would otherwise fail after all of it)."""
    for directory in dict.fromkeys([out, *([json_path.parent] if json_path else [])]):
        if directory.exists() and not directory.is_dir():
            raise CompareError(f"cannot write to {directory}: it is not a directory")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as error:
            raise CompareError(f"cannot write to {directory}: {error.strerror or error}") from None
    for path in [out / "table.txt", out / "loss.png", *([json_path] if json_path else [])]:
        if path.exists() and not path.is_file():
            raise CompareError(f"cannot write {path}: it exists and is not a file")
