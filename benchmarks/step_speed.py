#!/usr/bin/env python
"""Optimizer step time, side by side in one run: torch.optim vs the optorch shim and the pure stepper.

Measures ``optimizer.step()`` only (no forward/backward) and prints, for every algorithm and tensor
layout, absolute ms/step and the ratio to ``torch.optim.Adam(fused=True)`` on the same params (the
reference row, re-measured in every block), plus the goals of DESIGN.md ("Performance goals") with
PASS/MISS. ``--json PATH`` writes every number (and every raw sample).

Rows per algorithm and layout:

* ``ref Adam fused``: the reference, ``torch.optim.Adam(fused=True)``;
* ``torch fused`` / ``torch foreach`` / ``torch for-loop``: the algorithm's torch.optim class, where it
  supports each mode;
* ``shim auto``: ``optorch.build(config, params)`` as users get it (engine "auto");
* ``shim compiled``: engine "compiled" (grads persist between steps as with
  ``zero_grad(set_to_none=False)``). Its first step (compile) is timed separately, from a cold
  Inductor cache unless ``--no-cold-compile``;
* ``shim compiled gather``: engine "compiled", fresh ``.grad`` tensors before every step (outside the
  timed region), as ``zero_grad()`` and a new backward give: the shim must follow new tensors;
* ``shim compiled cosine``: engine "compiled" with ``CosineAnnealingLR`` stepped after every step (the
  learning rate changes every step; recompiles are counted over ``--schedule-steps`` steps);
* ``shim eager``: engine "eager" (the same per-tensor update, not compiled);
* ``pure step``: ``optorch.<algo>.step(params, grads, state, config)`` on lists of tensors, eager and
  out of place; only the call is timed.

Timing: wall clock (``torch.cuda.synchronize`` on CUDA), median over ``--steps`` timed steps after
``--warmup`` steps. The rows of one block are timed *interleaved* (one step of each row per round,
rotating the order), so a noisy, shared machine slows all rows of a round alike and the ratios stay
meaningful. Every row has its own freshly cloned params and grads (same values, seeded). The table
also shows the ratio of the minima (``x min``), which is the more robust number on a shared machine,
and the page faults per step (fresh memory the kernel had to map: the price of allocating big
tensors every step on CPU). On a small, shared CPU machine, kernels that open one OpenMP parallel
region per tensor (torch's fused CPU kernels, per-tensor eager ops) stall whenever another process
holds a core; ``--threads 1`` gives stable ratios there.

First compiled step: the ``shim compiled`` row's first step runs from an empty Inductor cache
(``--cold-compile``); for layouts of 200 tensors the goal is judged on a fresh process with an empty
cache (``--first-step-process``), which includes Inductor's one-time set-up as a user's first run does.
The whole run uses its own temporary Inductor cache, so it neither reads nor fills the user's.

Peak step memory: CUDA ``max_memory_allocated`` above the level before the step; on CPU the running
sum of the CPU allocator's allocation and free events recorded by ``torch.profiler`` (profile_memory)
during one step. Both count the bytes a step allocates beyond what existed before it (temporaries, and
for the pure stepper its new params and state).

Examples::

    PYTHONPATH=src python benchmarks/step_speed.py --scale 0.01 --steps 5    # smoke run, every row
    PYTHONPATH=src python benchmarks/step_speed.py --json bench.json         # the full run
    PYTHONPATH=src python benchmarks/step_speed.py --algos adam,sgd --shapes 200x80k --rows auto,compiled,pure
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import inspect
import json
import os
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

try:
    import optorch
    from optorch.algorithms import registry
except ImportError:  # running from a checkout without PYTHONPATH=src
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    import optorch
    from optorch.algorithms import registry

DEFAULT_SHAPES = ("1x16M", "200x80k", "2000x8k", "2000x1k")
ROW_KEYS = (
    "fused",
    "foreach",
    "forloop",
    "peers",
    "auto",
    "contig",
    "compiled",
    "gather",
    "cosine",
    "eager",
    "pure",
    "purecompiled",
)
ROW_LABELS = {
    "ref": "ref Adam fused",
    "fused": "torch fused",
    "foreach": "torch foreach",
    "forloop": "torch for-loop",
    "peers": "peer implementations",
    "auto": "shim auto",
    "contig": "shim auto, contiguous",
    "compiled": "shim compiled",
    "gather": "shim compiled gather",
    "cosine": "shim compiled cosine",
    "eager": "shim eager",
    "pure": "pure step (eager)",
    "purecompiled": "pure step (torch.compile)",
}
# Hyperparameters per algorithm (the rest are the algorithm's defaults). SGD runs with momentum, the
# 20-bytes-per-parameter case DESIGN.md compares to Adam's 28.
ALGO_CONFIG: dict[str, dict[str, Any]] = {"sgd": {"lr": 1e-3, "momentum": 0.9}}


def _adopt_kwargs(config: dict[str, Any], decouple_key: str) -> dict[str, Any]:
    exponent = config["clip_exponent"]
    clip = (lambda step: step**exponent) if exponent is not None else None
    return {
        "lr": config["lr"],
        "betas": config["betas"],
        "eps": config["eps"],
        "weight_decay": config["weight_decay"],
        decouple_key: config["decouple"],
        "maximize": config["maximize"],
        "clip_lambda": clip,
    }


# The implementations users would otherwise pick, per algorithm: (label, "module:Class", the
# optorch config's hyperparameters -> their keyword arguments). Rows whose package is missing say so.
PEERS: dict[str, list[tuple[str, str, Callable[[dict[str, Any]], dict[str, Any]]]]] = {
    "adopt": [
        ("torch-adopt", "adopt:ADOPT", lambda c: _adopt_kwargs(c, "decouple")),
        ("pytorch_optimizer", "pytorch_optimizer:ADOPT", lambda c: _adopt_kwargs(c, "weight_decouple")),
    ],
    "lars": [
        (
            "pytorch_optimizer",
            "pytorch_optimizer:LARS",
            lambda c: {
                "lr": c["lr"],
                "momentum": c["momentum"],
                "weight_decay": c["weight_decay"],
                "trust_coefficient": c["trust_coefficient"],
            },
        ),
    ],
}
# DESIGN.md: shim step <= this many times torch.optim Adam fused; for SGD, the ratio scaled by the bytes
# it moves (20 against Adam's 28 a param). The others' limits are plain ratios: DAG moves fewer bytes
# than Adam and is allowed 1.5x for its math.
SHIM_GOALS = {"sgd": 1.0, "adam": 1.0, "adamw": 1.0, "adopt": 1.0, "dag": 1.5, "autosgm": 1.3}
BYTES_SCALED_GOALS = {"sgd"}
PURE_VS_FOREACH_GOAL = 1.5
FIRST_STEP_GOAL_S = 10.0
FIRST_STEP_GOAL_TENSORS = 200
ADAM_BYTES_PER_PARAM = 7  # in units of the element size: read p, g, m, v; write p, m, v


# ------------------------------------------------------------------------------------------------
# helpers


def parse_count(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgG]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 200, 80k, 16M)")
    number, suffix = match.groups()
    return int(float(number) * {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}[suffix.lower()])


def parse_shape(text: str) -> tuple[int, int]:
    """'200x80k' -> (200 tensors, 80_000 elements each)."""
    try:
        count, size = text.lower().split("x")
        return parse_count(count), parse_count(size)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is COUNTxSIZE, e.g. 200x80k, got {text!r}") from None


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def graph_count() -> int:
    """Graphs Dynamo has captured so far in this process (a recompile captures one more)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def element_bytes_moved(algorithm, config) -> int:
    """Elements read + written per parameter per step, in units of the element size:
    param (r+w), grad (r), every state buffer (r+w). SGD with momentum: 5 (20 bytes fp32); Adam: 7 (28)."""
    # per-element buffers only: 0-dim per-tensor scalars (step, DAG's alpha) move no bytes per element
    buffers = [key for key, value in algorithm.init_leaf(torch.zeros(4), config).items() if value.dim() > 0]
    return 3 + 2 * len(buffers)


def torch_modes(torch_class, device: torch.device) -> dict[str, dict[str, Any]]:
    """The execution modes torch.optim supports for this class on this device: name -> flags."""
    parameters = inspect.signature(torch_class.__init__).parameters
    modes: dict[str, dict[str, Any]] = {}
    if "fused" in parameters:
        try:
            from torch.optim.optimizer import _get_fused_kernels_supported_devices

            if device.type in _get_fused_kernels_supported_devices():
                modes["fused"] = {"fused": True}
        except ImportError:
            pass
    if "foreach" in parameters:
        modes["foreach"] = {"foreach": True}
        modes["forloop"] = {"foreach": False}
    else:
        modes["forloop"] = {}
    return modes


def _minor_faults() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return 0


class Timer:
    """Wall clock around one call; also counts the page faults the call took (fresh memory the
    kernel had to map: on CPU, the price of allocating big tensors every step)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.last_faults = 0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        faults = _minor_faults()
        start = time.perf_counter()
        out = fn()
        self.sync()
        elapsed = time.perf_counter() - start
        self.last_faults = _minor_faults() - faults
        return elapsed, out


def step_memory(fn: Callable[[], Any], device: torch.device) -> tuple[int | None, int | None]:
    """``(peak, end)``: bytes allocated by one call of ``fn`` beyond what was allocated before it, at
    their highest and when it returns (what it returns, e.g. the pure stepper's new params and state)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak, end = torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base
        del out
        return peak, end
    if device.type != "cpu":
        return None, None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    try:
        events = [
            e
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        ]
    except Exception:  # profiler internals differ
        return None, None
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak, current


# ------------------------------------------------------------------------------------------------
# rows


@dataclass
class Row:
    key: str
    label: str
    step: Callable[[], Any]
    before: Callable[[], None] | None = None  # untimed, before every step (e.g. fresh grads)
    after: Callable[[], None] | None = None  # untimed, after every step (e.g. scheduler.step())
    compiled: bool = False
    cold_first: bool = False
    note: str = ""
    samples: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)
    first_step_s: float | None = None
    recompiles: int = 0
    extra_steps: int = 0
    peak_bytes: int | None = None
    end_bytes: int | None = None
    error: str | None = None
    first_compile_in_process: bool = False
    keep: list[Any] = field(default_factory=list)  # keeps buffers alive for the block

    def run_once(self, timer: Timer, record: bool) -> float:
        if self.before is not None:
            self.before()
        graphs = graph_count() if self.compiled else 0
        elapsed, _ = timer.time(self.step)
        if self.compiled:
            self.recompiles += graph_count() - graphs
        if self.after is not None:
            self.after()
        if record:
            self.samples.append(elapsed)
            self.faults.append(timer.last_faults)
        return elapsed

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.samples) * 1e3 if self.samples else None


class Block:
    """All rows of one (algorithm, layout): params cloned from one seeded master set per row."""

    def __init__(self, args, algorithm, count: int, size: int, device: torch.device, dtype: torch.dtype):
        self.args = args
        self.algorithm = algorithm
        self.count, self.size = count, size
        self.device, self.dtype = device, dtype
        generator = torch.Generator().manual_seed(args.seed)
        self.master_params = [torch.randn(size, generator=generator, dtype=dtype).to(device) for _ in range(count)]
        self.master_grads = [torch.randn(size, generator=generator, dtype=dtype).to(device) for _ in range(count)]
        self.config_dict = {"name": algorithm.name, **ALGO_CONFIG.get(algorithm.name, {})}
        _, self.config = optorch.parse_config(self.config_dict)

    def fresh(self, with_grads: bool = True) -> list[torch.Tensor]:
        params = [p.detach().clone().requires_grad_(True) for p in self.master_params]
        if with_grads:
            for param, grad in zip(params, self.master_grads):
                param.grad = grad.clone()
        return params

    def fresh_grads(self) -> list[torch.Tensor]:
        return [g.clone() for g in self.master_grads]

    # -- row builders ----------------------------------------------------------------------------

    def reference(self) -> Row:
        params = self.fresh()
        opt = torch.optim.Adam(params, lr=1e-3, fused=True)
        return Row("ref", ROW_LABELS["ref"], opt.step, keep=[params, opt])

    def torch_row(self, key: str, flags: dict[str, Any]) -> Row:
        params = self.fresh()
        opt = self.algorithm.torch_optimizer(params, **self.config.hyperparameters(), **flags)
        return Row(key, ROW_LABELS[key], opt.step, note=_flags_note(flags), keep=[params, opt])

    def peers(self) -> list[Row]:
        rows = []
        for label, target, kwargs_of in PEERS.get(self.algorithm.name, []):
            module_name, class_name = target.split(":")
            try:
                peer_class = getattr(__import__(module_name), class_name)
            except ImportError as error:
                rows.append(Row("peer:" + label, label, lambda: None, error=f"not installed ({error})"))
                continue
            params = self.fresh()
            opt = peer_class(params, **kwargs_of(self.config.hyperparameters()))
            rows.append(Row("peer:" + label, label, opt.step, note=target, keep=[params, opt]))
        return rows

    def shim(self, key: str, engine: str) -> Row:
        params = self.fresh()
        if key == "contig":  # the user's explicit layout: params and grads back to back
            optorch.contiguous(params)
        opt = optorch.build(self.config_dict, params, engine=engine)
        note = f"engine={opt.engine}"
        group = opt.param_groups[0]
        if opt.engine == "torch":
            note += ", " + (_flags_note({k: group[k] for k in ("fused", "foreach") if group.get(k)}) or "torch default")
        compiled = opt.engine == "compiled"
        row = Row(key, ROW_LABELS[key], opt.step, compiled=compiled, note=note, keep=[params, opt])
        if key == "compiled":
            row.cold_first = self.args.cold_compile
        if key == "gather":
            grads = self.fresh_grads()
            row.keep.append(grads)

            def before(params=params, grads=grads):
                for param, grad in zip(params, grads):
                    param.grad = grad  # new tensors every step, as after zero_grad() and backward()

            row.before = before
        if key == "cosine":
            total = self.args.warmup + max(self.args.steps, self.args.schedule_steps)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
            row.after = scheduler.step
            row.keep.append(scheduler)
        return row

    def pure(self) -> Row:
        algorithm, config = self.algorithm, self.config
        holder = {"params": [p.clone() for p in self.master_params], "grads": self.fresh_grads()}
        holder["state"] = algorithm.init(holder["params"], config)

        def step():
            new = algorithm.step(holder["params"], holder["grads"], holder["state"], config)
            holder["last"] = new  # rebinding (and freeing the old step's tensors) happens untimed
            return new

        def after():
            holder["params"], holder["state"] = holder.pop("last")

        return Row("pure", ROW_LABELS["pure"], step, after=after, note="out of place, lists", keep=[holder])

    def pure_compiled(self) -> Row:
        """``torch.compile(algorithm.step)``: the pure step compiled whole by the user (first step: the
        compile, from an empty Inductor cache with ``--cold-compile``)."""
        algorithm, config = self.algorithm, self.config
        holder = {"params": [p.clone() for p in self.master_params], "grads": self.fresh_grads()}
        holder["state"] = algorithm.init(holder["params"], config)
        compiled = torch.compile(algorithm.step)

        def step():
            with torch.no_grad():
                new = compiled(holder["params"], holder["grads"], holder["state"], config)
            holder["last"] = new
            return new

        def after():
            holder["params"], holder["state"] = holder.pop("last")

        row = Row(
            "purecompiled",
            ROW_LABELS["purecompiled"],
            step,
            after=after,
            compiled=True,
            note="out of place, lists",
            keep=[holder],
        )
        row.cold_first = self.args.cold_compile
        return row

    def rows(self, wanted: list[str]) -> list[Row]:
        rows = [self.reference()]
        torch_class = self.algorithm.torch_optimizer
        modes = torch_modes(torch_class, self.device) if torch_class is not None else {}
        for key in wanted:
            try:
                if key in ("fused", "foreach", "forloop"):
                    if key in modes:
                        rows.append(self.torch_row(key, modes[key]))
                elif key == "peers":
                    rows.extend(self.peers())
                elif key in ("auto", "contig"):
                    rows.append(self.shim(key, "auto"))
                elif key in ("compiled", "gather", "cosine"):
                    rows.append(self.shim(key, "compiled"))
                elif key == "eager":
                    rows.append(self.shim(key, "eager"))
                elif key == "pure":
                    rows.append(self.pure())
                elif key == "purecompiled":
                    rows.append(self.pure_compiled())
            except Exception as error:  # a row that cannot be built is reported, not fatal
                rows.append(Row(key, ROW_LABELS[key], lambda: None, error=f"{type(error).__name__}: {error}"))
        return rows


def _flags_note(flags: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in flags.items())


# ------------------------------------------------------------------------------------------------
# measuring one block


_PROCESS_HAS_COMPILED = False


def first_step(row: Row, timer: Timer) -> None:
    """The first step of a row, timed on its own (for compiled rows this is the compile)."""
    global _PROCESS_HAS_COMPILED
    cold = contextlib.nullcontext()
    if row.compiled and row.cold_first:
        from torch._inductor.utils import fresh_cache

        cold = fresh_cache()
    with cold, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if row.before is not None:
            row.before()
        elapsed, _ = timer.time(row.step)
        if row.after is not None:
            row.after()
    row.first_step_s = elapsed
    if row.compiled:
        if not _PROCESS_HAS_COMPILED:
            row.note += ", 1st step incl. Inductor's one-time set-up"
            row.first_compile_in_process = True
        _PROCESS_HAS_COMPILED = True
    for warning in caught:
        if "torch.compile failed" in str(warning.message):
            row.compiled = False
            row.note += "; COMPILE FAILED, ran eagerly"
            row.error = str(warning.message)


def measure_block(block: Block, rows: list[Row], args, timer: Timer, log) -> None:
    live = [row for row in rows if row.error is None]
    for row in live:
        try:
            first_step(row, timer)
        except Exception as error:
            row.error = f"{type(error).__name__}: {error}"
            log(f"  ! {row.label}: {row.error}")
    live = [row for row in live if row.error is None]
    for _ in range(max(args.warmup - 1, 0)):
        for row in live:
            row.run_once(timer, record=False)
    rounds_started = time.perf_counter()
    for round_index in range(args.steps):
        if (
            args.block_budget is not None
            and round_index >= 5
            and time.perf_counter() - rounds_started > args.block_budget
        ):
            log(f"  (block budget: stopped after {round_index} timed rounds)")
            break
        shift = round_index % len(live)
        for row in live[shift:] + live[:shift]:
            row.run_once(timer, record=True)
    for row in live:
        if row.key == "cosine":
            while args.warmup + len(row.samples) + row.extra_steps < args.warmup + max(args.steps, args.schedule_steps):
                row.run_once(timer, record=False)
                row.extra_steps += 1
    if args.memory:
        for row in live:
            try:
                if row.before is not None:
                    row.before()
                row.peak_bytes, row.end_bytes = step_memory(row.step, block.device)
                if row.after is not None:
                    row.after()
            except Exception as error:
                log(f"  ! peak memory of {row.label}: {type(error).__name__}: {error}")


def probe_first_step(spec: str, device: str, dtype: str, seed: int) -> dict[str, Any]:
    """In this (fresh) process: build the compiled shim for ``ALGO:COUNT:SIZE`` and time its first
    step from an empty Inductor cache. What a user's first training step pays, one-time process
    costs (Inductor's imports and set-up) included."""
    from torch._inductor.utils import fresh_cache

    name, count, size = spec.split(":")
    algorithm = registry.get(name)
    generator = torch.Generator().manual_seed(seed)
    params = [
        torch.randn(int(size), generator=generator, dtype=getattr(torch, dtype)).to(device).requires_grad_(True)
        for _ in range(int(count))
    ]
    for param in params:
        param.grad = torch.randn_like(param)
    opt = optorch.build({"name": algorithm.name, **ALGO_CONFIG.get(algorithm.name, {})}, params, engine="compiled")
    timer = Timer(torch.device(device))
    with fresh_cache(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        elapsed, _ = timer.time(opt.step)
        second, _ = timer.time(opt.step)
    failed = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    return {"first_step_s": elapsed, "second_step_s": second, "compile_failed": failed[0] if failed else None}


def run_probe(algorithm, count: int, size: int, args) -> dict[str, Any] | None:
    import subprocess

    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--probe-first-step",
        f"{algorithm.name}:{count}:{size}",
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--seed",
        str(args.seed),
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.abspath(src), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {
            "error": (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"],
            "process_wall_s": wall,
        }
    result = json.loads(lines[-1])
    result["process_wall_s"] = wall
    return result


# ------------------------------------------------------------------------------------------------
# report


def row_result(row: Row, ref: Row, block: Block) -> dict[str, Any]:
    ms, ref_ms = row.median_ms, ref.median_ms
    ratio = ms / ref_ms if (ms is not None and ref_ms) else None
    ratio_min = min(row.samples) / min(ref.samples) if (row.samples and ref.samples) else None
    moved = element_bytes_moved(block.algorithm, block.config) if row.key != "ref" else ADAM_BYTES_PER_PARAM
    scaled = ratio * ADAM_BYTES_PER_PARAM / moved if ratio is not None else None
    samples = sorted(row.samples)
    return {
        "row": row.key,
        "label": row.label,
        "note": row.note.strip(", "),
        "ms": ms,
        "ms_min": samples[0] * 1e3 if samples else None,
        "ms_p25": samples[len(samples) // 4] * 1e3 if samples else None,
        "ms_p75": samples[(3 * len(samples)) // 4] * 1e3 if samples else None,
        "steps": len(samples),
        "page_faults_per_step": statistics.median(row.faults) if row.faults else None,
        "ratio": ratio,
        "ratio_of_minima": ratio_min,
        "ratio_bytes_scaled": scaled,
        "bytes_per_param": moved * block.master_params[0].element_size(),
        "first_step_s": row.first_step_s,
        "first_step_cold_cache": bool(row.compiled and row.cold_first),
        "first_step_first_compile_in_process": row.first_compile_in_process,
        "recompiles": row.recompiles if row.compiled else None,
        "recompile_window_steps": (len(row.samples) + row.extra_steps + max(block.args.warmup - 1, 0))
        if row.compiled
        else None,
        "peak_step_bytes": row.peak_bytes,
        "end_step_bytes": row.end_bytes,
        "peak_temporary_bytes": None
        if row.peak_bytes is None or row.end_bytes is None
        else row.peak_bytes - row.end_bytes,
        "error": row.error,
        "samples_ms": [s * 1e3 for s in row.samples],
    }


def goals_for_block(
    algo: str, shape: str, count: int, results: dict[str, dict[str, Any]], probe: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    goals = []

    def add(name, value, limit, unit, row, passed=None):
        if value is None:
            return
        ok = (value <= limit) if passed is None else passed
        goals.append(
            {
                "algo": algo,
                "shape": shape,
                "goal": name,
                "row": row,
                "value": value,
                "limit": limit,
                "unit": unit,
                "pass": bool(ok),
            }
        )

    auto = results.get("auto")
    if auto and algo in SHIM_GOALS and auto["ms"] is not None:
        if algo in BYTES_SCALED_GOALS:
            add("shim default <= Adam fused (bytes-scaled)", auto["ratio_bytes_scaled"], SHIM_GOALS[algo], "x", "auto")
        else:
            add(f"shim default <= {SHIM_GOALS[algo]:g}x Adam fused", auto["ratio"], SHIM_GOALS[algo], "x", "auto")
    pure, foreach = results.get("pure"), results.get("foreach")
    if pure and foreach and pure["ms"] is not None and foreach["ms"] is not None:
        add("pure eager <= 1.5x torch foreach", pure["ms"] / foreach["ms"], PURE_VS_FOREACH_GOAL, "x", "pure")
        if pure["peak_step_bytes"] is not None and foreach["peak_step_bytes"] is not None:
            add(
                "pure peak step memory <= torch foreach",
                pure["peak_step_bytes"] / 2**20,
                foreach["peak_step_bytes"] / 2**20,
                "MiB",
                "pure",
            )
    compiled = results.get("compiled")
    if probe is not None and probe.get("first_step_s") is not None:
        add(
            f"first compiled step <= 10 s with {count} tensors (fresh process, cold cache)",
            probe["first_step_s"],
            FIRST_STEP_GOAL_S,
            "s",
            "compiled",
        )
    elif compiled and compiled["first_step_s"] is not None and count == FIRST_STEP_GOAL_TENSORS:
        cold = "cold cache" if compiled["first_step_cold_cache"] else "warm cache"
        where = "first compile in this process" if compiled["first_step_first_compile_in_process"] else "in-process"
        add(
            f"first compiled step <= 10 s with {count} tensors ({where}, {cold})",
            compiled["first_step_s"],
            FIRST_STEP_GOAL_S,
            "s",
            "compiled",
        )
    for key in ("compiled", "gather", "cosine"):
        result = results.get(key)
        if result and result["recompiles"] is not None:
            add(f"zero recompiles ({result['recompile_window_steps']} steps)", result["recompiles"], 0, "", key)
        if result and result["error"]:
            add("compiles", 1, 0, "", key, passed=False)
    return goals


def fmt(value, spec, empty="-"):
    if value is None:
        width = re.match(r"\d*", spec).group()
        return empty.rjust(int(width)) if width else empty
    return format(value, spec)


def print_block(
    algo: str,
    shape: str,
    n_params: int,
    results: list[dict[str, Any]],
    goals: list[dict[str, Any]],
    device: str,
    out,
    probe=None,
) -> None:
    ref = next(r for r in results if r["row"] == "ref")
    print(
        f"\n== {algo}  {shape}  ({n_params / 1e6:.2f}M params, {device})  reference Adam fused: "
        f"{fmt(ref['ms'], '.2f')} ms/step ==",
        file=out,
    )
    header = (
        f"{'row':<22}{'ms/step':>9}{'min ms':>9}{'x ref':>7}{'x min':>7}{'x bytes':>8}{'1st s':>7}{'recomp':>7}"
        f"{'peak MiB':>9}{'tmp MiB':>8}{'faults':>8}  {'goal':<10} note"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    by_row = {}
    for goal in goals:
        by_row.setdefault(goal["row"], []).append("PASS" if goal["pass"] else "MISS")
    for r in results:
        if r["error"] and r["ms"] is None:
            print(f"{r['label']:<22}  ERROR {r['error']}", file=out)
            continue
        goal = "/".join(by_row.get(r["row"], [])) if r["row"] != "ref" else ""
        mib = lambda b: None if b is None else b / 2**20  # noqa: E731
        print(
            f"{r['label']:<22}{fmt(r['ms'], '9.2f')}{fmt(r['ms_min'], '9.2f')}{fmt(r['ratio'], '7.2f')}"
            f"{fmt(r['ratio_of_minima'], '7.2f')}{fmt(r['ratio_bytes_scaled'], '8.2f')}"
            f"{fmt(r['first_step_s'], '7.2f')}{fmt(r['recompiles'], '7d')}{fmt(mib(r['peak_step_bytes']), '9.1f')}"
            f"{fmt(mib(r['peak_temporary_bytes']), '8.1f')}{fmt(r['page_faults_per_step'], '8.0f')}"
            f"  {goal:<10} {r['note']}",
            file=out,
        )
    if probe is not None:
        if probe.get("first_step_s") is not None:
            print(
                f"shim compiled, fresh process, cold cache: first step {probe['first_step_s']:.2f} s, second "
                f"{probe['second_step_s'] * 1e3:.1f} ms"
                + (f"; COMPILE FAILED: {probe['compile_failed']}" if probe.get("compile_failed") else ""),
                file=out,
            )
        else:
            print(f"shim compiled, fresh process: probe failed: {probe.get('error')}", file=out)
    out.flush()


def print_summary(blocks: list[dict[str, Any]], shapes: list[str], out) -> None:
    print("\n== summary: ms/step (x Adam fused of the same block; bytes-scaled in [] where it differs) ==", file=out)
    algos = list(dict.fromkeys(b["algo"] for b in blocks))
    width = 24
    print(f"{'algo':<8}{'row':<22}" + "".join(f"{s:>{width}}" for s in shapes), file=out)
    for algo in algos:
        rows = list(dict.fromkeys(r["row"] for b in blocks if b["algo"] == algo for r in b["results"]))
        for key in rows:
            cells = []
            for shape in shapes:
                block = next((b for b in blocks if b["algo"] == algo and b["shape"] == shape), None)
                r = next((r for r in block["results"] if r["row"] == key), None) if block else None
                if r is None or r["ms"] is None:
                    cells.append("-")
                    continue
                cell = f"{r['ms']:.1f} ({r['ratio']:.2f}x"
                if abs(r["ratio_bytes_scaled"] - r["ratio"]) > 1e-9:
                    cell += f" [{r['ratio_bytes_scaled']:.2f}]"
                cells.append(cell + ")")
            label = next(r["label"] for b in blocks if b["algo"] == algo for r in b["results"] if r["row"] == key)
            print(f"{algo:<8}{label:<22}" + "".join(f"{c:>{width}}" for c in cells), file=out)
    out.flush()


def print_goals(goals: list[dict[str, Any]], out) -> None:
    print("\n== goals (DESIGN.md, Performance goals) ==", file=out)
    for g in goals:
        value = f"{g['value']:.2f}{g['unit']}" if isinstance(g["value"], float) else f"{g['value']}{g['unit']}"
        limit = f"{g['limit']:.2f}{g['unit']}" if isinstance(g["limit"], float) else f"{g['limit']}{g['unit']}"
        print(
            f"[{'PASS' if g['pass'] else 'MISS'}] {g['algo']:<8}{g['shape']:<10}{g['goal']}: {value} (limit {limit})",
            file=out,
        )
    passed = sum(g["pass"] for g in goals)
    print(f"{passed}/{len(goals)} goals pass", file=out)
    out.flush()


# ------------------------------------------------------------------------------------------------
# main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Rows: " + ", ".join(ROW_KEYS),
    )
    parser.add_argument(
        "--shapes", default=",".join(DEFAULT_SHAPES), help="comma-separated COUNTxSIZE layouts (default: %(default)s)"
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every tensor's size (not the tensor count) by this, e.g. 0.01 for a smoke run",
    )
    parser.add_argument(
        "--algos", default=None, help="comma-separated algorithm names (default: every registered algorithm)"
    )
    parser.add_argument(
        "--rows",
        default=",".join(ROW_KEYS),
        help="comma-separated rows to run; the Adam fused reference always runs (default: all)",
    )
    parser.add_argument(
        "--steps", type=int, default=20, help="timed steps per row; the median is reported (default: %(default)s)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed steps per row before timing, the first (compile) step included (default: %(default)s)",
    )
    parser.add_argument(
        "--schedule-steps",
        type=int,
        default=100,
        help="steps of the cosine-schedule row over which recompiles are counted (default: %(default)s)",
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: %(default)s)"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument(
        "--cold-compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the 'shim compiled' first step from an empty Inductor cache (default: on)",
    )
    parser.add_argument(
        "--first-step-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=(
            f"for layouts of {FIRST_STEP_GOAL_TENSORS} tensors, also time the compiled first step in a fresh process "
            "(the goal's measure; default: on)"
        ),
    )
    parser.add_argument(
        "--block-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop a block's timed rounds after this many seconds (at least 5 rounds); default: no limit",
    )
    parser.add_argument("--probe-first-step", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure peak step memory of every row (default: on)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every result and raw sample as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe_first_step:
        print(json.dumps(probe_first_step(args.probe_first_step, args.device, args.dtype, args.seed)))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    dtype = getattr(torch, args.dtype)
    shape_names = split_list(args.shapes)
    shapes = [(name, *parse_shape(name)) for name in shape_names]
    algos = split_list(args.algos) if args.algos else list(registry.ALGORITHMS)
    algorithms = [registry.get(name) for name in algos]
    wanted = split_list(args.rows)
    unknown = [key for key in wanted if key not in ROW_KEYS]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; choose from {', '.join(ROW_KEYS)}")
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("--steps and --warmup must be >= 1 (the first warmup step is the timed first step)")

    out = sys.stdout
    timer = Timer(device)
    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "optorch": getattr(optorch, "__version__", None),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device) if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})",
        "dtype": args.dtype,
        "args": vars(args),
        "timing": "median wall clock of interleaved rounds (one step of every row per round, rotating order)",
        "peak_memory": "torch.cuda.max_memory_allocated above the pre-step level"
        if device.type == "cuda"
        else "CPU allocator events from torch.profiler(profile_memory=True): peak of the running sum during one step",
    }
    print(
        f"optorch step_speed: torch {meta['torch']}, {meta['device']}, {meta['cpu_count']} CPU cores, "
        f"{meta['torch_threads']} torch threads, {args.dtype}, scale {args.scale}",
        file=out,
    )
    print(
        f"steps {args.steps} (median), warmup {args.warmup}, cosine-schedule recompile window "
        f"{max(args.steps, args.schedule_steps)} steps; rows interleaved per round",
        file=out,
    )

    blocks, all_goals = [], []

    def log(message):
        print(message, file=out, flush=True)

    # One inductor cache for this process (not the user's), so runs do not depend on earlier runs.
    from torch._inductor.utils import fresh_cache

    started = time.perf_counter()
    with fresh_cache(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*profiler.*")
        for shape_name, count, size in shapes:
            size = max(1, int(round(size * args.scale)))
            for algorithm in algorithms:
                block_started = time.perf_counter()
                probe = None
                if args.first_step_process and count == FIRST_STEP_GOAL_TENSORS and "compiled" in wanted:
                    probe = run_probe(algorithm, count, size, args)
                block = Block(args, algorithm, count, size, device, dtype)
                rows = block.rows(wanted)
                measure_block(block, rows, args, timer, log)
                results = [row_result(row, rows[0], block) for row in rows]
                by_key = {r["row"]: r for r in results}
                goals = goals_for_block(algorithm.name, shape_name, count, by_key, probe)
                all_goals.extend(goals)
                print_block(algorithm.name, shape_name, count * size, results, goals, meta["device"], out, probe)
                log(f"(block took {time.perf_counter() - block_started:.1f} s)")
                blocks.append(
                    {
                        "algo": algorithm.name,
                        "shape": shape_name,
                        "tensors": count,
                        "size": size,
                        "params": count * size,
                        "config": block.config_dict,
                        "results": results,
                        "first_step_fresh_process": probe,
                    }
                )
                del block, rows
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print_summary(blocks, shape_names, out)
    print_goals(all_goals, out)
    meta["wall_s"] = time.perf_counter() - started
    print(f"\ntotal {meta['wall_s']:.0f} s", file=out)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "blocks": blocks, "goals": all_goals}, handle, indent=1)
        print(f"wrote {args.json}", file=out)
    return 0


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


if __name__ == "__main__":
    sys.exit(main())
