"""The ``optorch`` command line: ``optorch verify`` and ``optorch compare`` (also ``python -m optorch ...``).

``verify`` runs every algorithm that has a torch.optim counterpart over its whole flag grid against
torch.optim on this machine's devices, and prints one row per check. It exits 1 if any check fails,
so it can gate a deployment on a new device or torch version.

``compare`` trains a small MLP on scikit-learn's digits once per optimizer config (same init, same
batches) and reports a table and plots (see :mod:`optorch.compare`).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Sequence

import torch

from . import compare, registry, verify
from .configfile import ConfigError
from .shim import ENGINES

__all__ = ["main"]

_VERIFY_EPILOG = """\
paths: "pure" is the pure stepper optorch.<algo>.step, one call per param group; "torch", "eager" and
"compiled" are the torch.optim shim optorch.build(..., engine=E). Each runs against torch.optim's own
class (default execution flags) on a small deterministic problem: several tensors, a frozen parameter,
two param groups with different learning rates, gradients recomputed from the current parameters.

The compiled engine compiles once per flag combination (seconds each), so by default it runs on a
representative subset of each grid (every flag takes each of its values at least once); --compile-all
runs it on every combination, --no-compile skips it.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optorch", description="Purely functional optimizers for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    verify_parser = commands.add_parser(
        "verify",
        help="check every algorithm against torch.optim on this machine",
        description="Check optorch's algorithms against torch.optim, flag combination by flag combination.",
        epilog=_VERIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify_parser.add_argument("--algo", action="append", metavar="NAME", help="algorithm to check (repeatable; default: every registered algorithm with a torch.optim counterpart)")
    verify_parser.add_argument("--steps", type=_positive_int, default=100, metavar="N", help="optimizer steps per check (default 100)")
    verify_parser.add_argument("--dtype", choices=("float64", "float32", "both"), default="both", help="default both")
    verify_parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all", help="default: all available")
    verify_parser.add_argument("--engine", action="append", choices=verify.PATHS, help="path to check (repeatable; default: pure, torch, eager and compiled)")
    verify_parser.add_argument("--no-compile", action="store_true", help="leave out the compiled engine")
    verify_parser.add_argument("--compile-all", action="store_true", help="run the compiled engine on every flag combination, not a representative subset")
    verify_parser.add_argument(
        "--none-grads",
        choices=("off", "on", "both"),
        default="both",
        help="drop one parameter's gradient every third step (torch skips it and its step count falls behind): off, on, or both (default)",
    )
    compare_parser = commands.add_parser(
        "compare",
        help="train a small model once per optimizer config and compare the runs",
        description="Train an MLP (64-64-10, LayerNorm) on scikit-learn's digits once per config, from the same init on the same batches, "
        "and report the final train loss, the test accuracy, the step time and the steps to a target loss, with plots.",
        epilog=_COMPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare_parser.add_argument("configs", nargs="*", metavar="CONFIG", help="builder config files (.yaml, .yml, .json) or directories of them; default: the repo's configs/ plus the default Config of every registered algorithm they leave out")
    compare_parser.add_argument("--out", default="optorch-compare", metavar="DIR", help="directory for table.txt, loss.png and knob-*.png (default ./optorch-compare)")
    compare_parser.add_argument("--steps", type=_positive_int, default=1500, metavar="N", help="optimizer steps per run (default 1500)")
    compare_parser.add_argument("--batch-size", type=_positive_int, default=64, metavar="B", help="mini-batch size (default 64)")
    compare_parser.add_argument("--seed", type=int, default=0, help="seed of the init, the train/test split and the batch order (default 0)")
    compare_parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    compare_parser.add_argument("--engine", choices=ENGINES, default="eager", help="the shim's engine (default eager: the same code path for every algorithm, no compile time)")
    compare_parser.add_argument("--target", type=_finite_float, default=0.3, metavar="LOSS", help="training-set loss whose first step is reported (default 0.3)")
    compare_parser.add_argument("--json", metavar="PATH", help="also write every run's results and curves as JSON")
    compare_parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


_COMPARE_EPILOG = """\
Every run uses the torch.optim shim (optorch.build) in an ordinary training loop. Step time is the
10th percentile of the times of optimizer.step() alone (forward and backward are the same for every
run), as a multiple of the fastest run. Any hyperparameter that changes during a run (an LR scheduler, an
adaptive rule) and any scalar of an algorithm's shared state is plotted against the step.

A bad config file stops the command before any training, naming the file, the line and the field;
so does an output location that cannot be written. Ctrl-C stops the runs and still writes the table,
the plots and the JSON of what they recorded (exit code 130).
Needs the compare extra: pip install 'optorch[compare]'.
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


USER_ERRORS = (registry.UnknownOptimizerError, ConfigError, verify.NoGridError, compare.CompareError, OSError)
"""What a user's input can cause (a config, a path, an option): one line and exit code 2, never a traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # One intra-op thread: the tensors of both commands are tiny, and torch's CPU kernels spend
    # milliseconds per call waking more threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return compare.run(args) if args.command == "compare" else _verify(args)
    except (*USER_ERRORS, _UsageError) as error:
        print(f"optorch {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"optorch {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)


class _UsageError(Exception):
    pass


def _case_label(name: str, config: dict | str, intermittent: bool) -> str:
    if isinstance(config, str):  # a reduction, by label
        reduction = next(r for r in registry.get(name).reductions if r.label == config)
        return f"= {reduction.optimizer}: {reduction.label}"
    return verify.label(config, intermittent)


def _verify(args: argparse.Namespace) -> int:
    names = [registry.get(name).name for name in args.algo] if args.algo else verify.grid_algorithms() + verify.reduction_algorithms()
    # An algorithm is checked over its flag grid against its reference and/or through its reductions
    # to torch.optim configs (AutoSGM); one with neither makes flag_grid say why it cannot be verified.
    grids = {name: verify.flag_grid(name) if (name in verify.grid_algorithms() or not registry.get(name).reductions) else []
             for name in dict.fromkeys(names)}
    paths = [p for p in dict.fromkeys(args.engine or verify.PATHS) if not (p == "compiled" and args.no_compile)]
    if not paths:
        raise _UsageError("nothing to check: --no-compile left no path")
    dtypes = ["float64", "float32"] if args.dtype == "both" else [args.dtype]
    devices = verify.available_devices() if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        raise _UsageError("--device cuda, but CUDA is not available")
    none_grads = {"off": [False], "on": [True], "both": [False, True]}[args.none_grads]
    subset = "compiled" in paths and not args.compile_all

    cases = []
    for name, grid in grids.items():
        compiled_configs = verify.representative(name) if subset and grid else grid
        for device in devices:
            for dtype in dtypes:
                if dtype == "float32" and name not in verify.float32_algorithms():
                    continue  # torch's own float32 kernels disagree on this problem (Grid.float32)
                for config in grid:
                    for intermittent in none_grads:
                        for path in verify.paths_for(name, paths):
                            if path != "compiled" or config in compiled_configs:
                                cases.append((name, config, device, dtype, intermittent, path))

        for reduction in registry.get(name).reductions:
            for device in devices:
                for dtype in dtypes:
                    for path in verify.paths_for(name, paths):
                        if path != "compiled" or not subset or reduction is registry.get(name).reductions[0]:
                            cases.append((name, reduction.label, device, dtype, False, path))

    print(f"optorch verify: torch {torch.__version__}, {len(cases)} checks against torch.optim, {args.steps} steps each")
    if subset:
        print("(the compiled engine runs on a representative subset of each flag grid; --compile-all for all of it)")
    flags_width = max([5] + [len(_case_label(n, c, i)) for n, c, _, _, i, _ in cases])
    columns = (("algorithm", 9), ("flags", flags_width), ("path", 14), ("device", 6), ("dtype", 7), ("steps", 5), ("max abs diff", 12), ("tolerance", 9), ("result", 6))
    row = "  ".join(f"{{:{'>' if title in ('steps', 'max abs diff', 'tolerance') else '<'}{width}}}" for title, width in columns)
    print(row.format(*(title for title, _ in columns)).rstrip())
    print(row.format(*("-" * width for _, width in columns)))

    failed, start = 0, time.perf_counter()
    for name, config, device, dtype, intermittent, path in cases:
        try:
            if isinstance(config, str):  # a reduction, by label
                result = verify.check_reduction(name, config, steps=args.steps, dtype=dtype, device=device, engine=path)
            else:
                result = verify.check(name, config, steps=args.steps, dtype=dtype, device=device, engine=path, intermittent=intermittent)
        except Exception as error:  # a check that crashes is a failed check; report it and go on
            failed += 1
            shown = "pure" if path == "pure" else f"shim:{path}"
            tolerance = f"{verify.default_tolerance(getattr(torch, dtype)):.0e}"
            print(row.format(name, _case_label(name, config, intermittent), shown, device, dtype, args.steps, "-", tolerance, "ERROR").rstrip())
            print(f"    {type(error).__name__}: {error}", flush=True)
            continue
        failed += not result.passed
        fields = (result.algorithm, result.flags, result.path, result.device, result.dtype, result.steps, f"{result.max_abs_diff:.2e}", f"{result.tolerance:.0e}", "PASS" if result.passed else "FAIL")
        print(row.format(*fields).rstrip(), flush=True)
    elapsed = time.perf_counter() - start
    print(f"\n{'FAILED' if failed else 'OK'}: {len(cases)} checks, {len(cases) - failed} passed, {failed} failed, in {elapsed:.0f} s")
    return 1 if failed else 0
