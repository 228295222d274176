"""What ``optorch compare`` shows and writes: the table, the loss and knob plots, the JSON of the
results, and the command itself (:func:`run`), which checks everything it can before the runs of
:mod:`optorch.tools.compare` train."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .compare import CONFIG_SUFFIXES, CompareError, Result, compare, default_specs, jsonable, load_specs, require

__all__ = ["format_table", "plot_knobs", "plot_losses", "results_json", "run"]


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
        lines.append(
            f"(step time: optimizer.step(), 10th percentile, as a multiple of the fastest: {1e3 * fastest:.3f} ms)"
        )
    return "\n".join(lines)


def _stopped(r: Result) -> str | None:
    """How a run stopped early, if it did: ``"diverged after 12"``, ``"failed after 3"``, ..."""
    for how, stopped in (("diverged", r.diverged), ("failed", r.error is not None), ("interrupted", r.interrupted)):
        if stopped:
            return f"{how} after {r.steps}"
    return None


def _pyplot():
    matplotlib = require("matplotlib", "matplotlib")
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
            ax.plot(
                *zip(*points),
                color=color,
                linestyle=style,
                label=r.label + (f" ({_stopped(r).split()[0]})" if _stopped(r) else ""),
            )
    if target is not None:
        ax.axhline(target, color="gray", linewidth=0.8, linestyle=":", label=f"target {target:g}")
    ax.set(
        xlabel="step", ylabel="training-set loss (cross-entropy)", yscale="log", title="optorch compare: MLP on digits"
    )
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
    return jsonable({"meta": meta, "runs": runs})


def run(args) -> int:
    """``optorch compare`` with parsed arguments (see :mod:`optorch.cli`): 0, or 130 when Ctrl-C
    stopped the runs (what they recorded is written all the same). Everything that can be checked
    before training is: the configs, the device, the packages, the output locations."""
    specs = load_specs(args.configs) if args.configs else default_specs()
    if not specs:
        raise CompareError(
            f"nothing to compare: no config files ({', '.join(CONFIG_SUFFIXES)}) in "
            f"{', '.join(args.configs) or 'the defaults'}"
        )
    _check_device(args.device)
    for module, package in (("sklearn", "scikit-learn"), ("tqdm", "tqdm"), ("matplotlib", "matplotlib")):
        require(module, package)
    out = Path(args.out)
    _check_outputs(out, Path(args.json) if args.json else None)
    print(
        f"optorch compare: {len(specs)} configs, MLP 64-64-10 (LayerNorm) on digits, {args.steps} steps of batch "
        f"{args.batch_size}, seed {args.seed}, {args.device}, engine {args.engine}",
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
        print(
            f"optorch compare: interrupted: {len(results) - stopped} of {len(results)} runs finished; the others are "
            "reported up to the step they reached",
            file=sys.stderr,
        )
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
