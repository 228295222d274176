"""The ``optorch`` command line: ``optorch verify`` and ``optorch compare`` (also ``python -m optorch ...``).

``verify`` checks every algorithm against its reference on this machine's devices, dtypes and engines
(:func:`optorch.verify.plan`: a representative subset by default, ``--full`` for everything) and
prints one row per check. It exits 1 if any check fails, so it can gate a deployment on a new device
or torch version.

``compare`` trains a small MLP on scikit-learn's digits once per optimizer config (same init, same
batches) and reports a table and plots (see :mod:`optorch.compare`).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence

import torch

from ..algorithms import registry
from ..core.errors import ConfigError
from ..shim.optimizer import ENGINES
from . import compare, compare_report, verify, verify_distributed

__all__ = ["main"]

_VERIFY_EPILOG = """\
paths: "pure" is the pure stepper optorch.<algo>.step, one call per param group; "torch", "eager" and
"compiled" are the torch.optim shim optorch.build(..., engine=E); "torch:fused" is torch's fused kernel
wherever the shim's "auto" engine may pick it. References: torch.optim's own class (default execution),
an independent implementation (torch-adopt, pytorch_optimizer), the torch.optim optimizer a config
reduces to, or the original's recorded trajectory (ADOPT, DAG, AutoSGM).

float64 must equal the reference (<= 1e-12). float32, bfloat16 and float16 are judged against the
float64 truth: optorch's error there must be within a small factor of the reference's own error, plus a
few ulps (docs/verification.md). N/A: the reference's own low-precision run is too far from the truth
for the check to tell a wrong optimizer (e.g. float16 Adam, whose second moment underflows).

By default a representative subset (every flag takes each of its values; the compiled engine on a few
representatives) answers in about a minute; --full checks every combination on every path.
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
    verify_parser.add_argument(
        "--full", action="store_true", help="every flag combination on every path, the compiled engine included (long)"
    )
    verify_parser.add_argument(
        "--algo",
        action="append",
        metavar="NAME",
        help="algorithm to check (repeatable; default: every registered algorithm)",
    )
    verify_parser.add_argument(
        "--dtype", action="append", choices=verify.DTYPES, help="dtype to check (repeatable; default: all four)"
    )
    verify_parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all", help="default: all available")
    verify_parser.add_argument(
        "--engine",
        action="append",
        choices=verify.PATHS,
        help="path to check (repeatable; default: pure, torch, eager and compiled)",
    )
    verify_parser.add_argument("--no-compile", action="store_true", help="leave out the compiled engine")
    verify_parser.add_argument(
        "--steps", type=_positive_int, default=100, metavar="N", help="optimizer steps per check (default 100)"
    )
    verify_parser.add_argument(
        "--jobs",
        type=_positive_int,
        default=verify.cores(),
        metavar="N",
        help="processes to run checks in (default: this machine's cores)",
    )
    verify_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    verify_parser.add_argument(
        "--distributed",
        action="store_true",
        help="instead: every algorithm under FSDP2, DDP, ZeRO and DCP against one process (its own options: "
        "optorch verify --distributed --help)",
    )
    compare_parser = commands.add_parser(
        "compare",
        help="train a small model once per optimizer config and compare the runs",
        description=(
            "Train an MLP (64-64-10, LayerNorm) on scikit-learn's digits once per config, from the same init on the "
            "same batches, and report the final train loss, the test accuracy, the step time and the steps to a "
            "target loss, with plots."
        ),
        epilog=_COMPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare_parser.add_argument(
        "configs",
        nargs="*",
        metavar="CONFIG",
        help=(
            "builder config files (.yaml, .yml, .json) or directories of them; default: the repo's configs/ plus the "
            "default Config of every registered algorithm they leave out"
        ),
    )
    compare_parser.add_argument(
        "--out",
        default="optorch-compare",
        metavar="DIR",
        help="directory for table.txt, loss.png and knob-*.png (default ./optorch-compare)",
    )
    compare_parser.add_argument(
        "--steps", type=_positive_int, default=1500, metavar="N", help="optimizer steps per run (default 1500)"
    )
    compare_parser.add_argument(
        "--batch-size", type=_positive_int, default=64, metavar="B", help="mini-batch size (default 64)"
    )
    compare_parser.add_argument(
        "--seed", type=int, default=0, help="seed of the init, the train/test split and the batch order (default 0)"
    )
    compare_parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    compare_parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="eager",
        help="the shim's engine (default eager: the same code path for every algorithm, no compile time)",
    )
    compare_parser.add_argument(
        "--target",
        type=_finite_float,
        default=0.3,
        metavar="LOSS",
        help="training-set loss whose first step is reported (default 0.3)",
    )
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["verify"] and "--distributed" in argv:  # a command of its own, with its own options
        return verify_distributed.main([arg for arg in argv[1:] if arg != "--distributed"])
    args = _parser().parse_args(argv)
    # One intra-op thread: the tensors of both commands are tiny, and torch's CPU kernels spend
    # milliseconds per call waking more threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return compare_report.run(args) if args.command == "compare" else _verify(args)
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


def _verify(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise _UsageError("--device cuda, but CUDA is not available")
    paths = [p for p in dict.fromkeys(args.engine or verify.PATHS) if not (p == "compiled" and args.no_compile)]
    if not paths:
        raise _UsageError("nothing to check: --no-compile left no path")
    plan = verify.plan(
        full=args.full,
        algorithms=args.algo,
        dtypes=args.dtype or verify.DTYPES,
        paths=paths,
        steps=args.steps,
        devices=None if args.device == "all" else [args.device],
    )
    if not plan.checks:
        raise _UsageError("nothing to check here: " + "; ".join(plan.skipped))
    scope = "every flag combination" if args.full else "a representative subset, --full for every flag combination"
    print(f"optorch verify: torch {torch.__version__}, {len(plan.checks)} checks ({scope})")
    print(
        f"float64: equal to the reference within {verify.FLOAT64_TOLERANCE:g}; below: error against the float64 truth "
        f"within {verify.FACTOR:g} x the reference's own error + {verify.FLOOR_ULPS[torch.float32]:g} ulps\n"
    )
    flags_width = max(len(check.flags) for check in plan.checks)
    columns = (
        ("algorithm", 9),
        ("flags", flags_width),
        ("path", 12),
        ("device", 6),
        ("dtype", 8),
        ("steps", 5),
        ("error", 9),
        ("ref. error", 10),
        ("tolerance", 9),
        ("result", 6),
    )
    row = "  ".join(
        f"{{:{'>' if title in ('steps', 'error', 'ref. error', 'tolerance') else '<'}{width}}}"
        for title, width in columns
    )
    print(row.format(*(title for title, _ in columns)).rstrip())
    print(row.format(*("-" * width for _, width in columns)))

    progress = _Progress(len(plan.checks), enabled=not args.no_progress and sys.stderr.isatty())
    verdicts: dict[str, list] = {}
    start = time.perf_counter()
    progress.show()
    for check, result in verify.run(plan.checks, jobs=args.jobs):
        progress.clear()
        if isinstance(result, verify.Crash):
            print(
                row.format(
                    check.algorithm,
                    check.flags,
                    check.shown_path,
                    check.device,
                    check.dtype,
                    check.steps,
                    "-",
                    "-",
                    "-",
                    "ERROR",
                ).rstrip()
            )
            print(f"    {result.error}", flush=True)
            verdicts.setdefault("ERROR", []).append(check)
        else:
            reference_error = (
                "-"
                if result.reference_error is None
                else f"{'~' if result.basis == 'sensitivity' else ''}{result.reference_error:.2e}"
            )
            print(
                row.format(
                    result.algorithm,
                    result.flags,
                    result.path,
                    result.device,
                    result.dtype,
                    result.steps,
                    f"{result.error:.2e}",
                    reference_error,
                    f"{result.tolerance:.1e}",
                    result.verdict,
                ).rstrip(),
                flush=True,
            )
            verdicts.setdefault(result.verdict, []).append(result)
        progress.show(f"{check.algorithm} {check.dtype} {check.shown_path}")
    progress.clear()
    elapsed = time.perf_counter() - start
    failed = len(verdicts.get("FAIL", [])) + len(verdicts.get("ERROR", []))
    counts = ", ".join(f"{len(verdicts[v])} {_VERDICTS[v]}" for v in _VERDICTS if v in verdicts)
    print(f"\n{'FAILED' if failed else 'OK'}: {len(plan.checks)} checks in {elapsed:.0f} s: {counts}")
    for note in plan.subset:
        print(f"  subset: {note}")
    for note in plan.skipped:
        print(f"  skipped: {note}")
    for reason in sorted({r.expected_failure for v in ("XFAIL", "XPASS") for r in verdicts.get(v, [])}):
        print(f"  expected to fail: {reason}")
    not_judged = sorted({f"{r.algorithm} {r.dtype}" for r in verdicts.get("N/A", [])})
    if not_judged:
        print(f"  N/A (the reference's own run is too far from the float64 truth to judge by): {', '.join(not_judged)}")
    return 1 if failed else 0


_VERDICTS = {
    "PASS": "passed",
    "FAIL": "failed",
    "ERROR": "crashed",
    "XFAIL": "failed as expected",
    "XPASS": "passed though expected to fail",
    "N/A": "not judged",
}


class _Progress:
    """A one-line progress bar on stderr (a terminal only), cleared before each printed row."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done = total, enabled, -1

    def show(self, last: str = "") -> None:
        """Count one more check done (``last``) and draw the bar."""
        self.done += 1
        if self.enabled:
            filled = 30 * self.done // self.total
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {last}\033[K")
            sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
