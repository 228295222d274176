"""``optorch verify --distributed``: every algorithm under torch's distributed engines, compared with
the single-process run of the same model and global batch.

Each case trains a small float64 MLP (uneven shapes, so that shards are uneven) for a few steps on a
fixed global batch, split evenly over the ranks, in one of these *modes*:

==============  ===============================================================================
``fsdp2``       ``fully_shard`` on each layer and the model (parameters are DTensors sharded on dim 0)
``ddp``         ``DistributedDataParallel``
``zero``        ``ZeroRedundancyOptimizer`` over DDP, ``parameters_as_bucket_view=False``, the local
                optimizer ``functools.partial(optorch.build, config, partition_group=WORLD)``
``zero-bucket`` the same with ``parameters_as_bucket_view=True``
``zero-class``  ``zero`` with ``optimizer_class=functools.partial(optorch.optim.<Name>, partition_group=WORLD)``
                and the config's keys as ZeRO's keyword arguments, as with a torch.optim class (configs
                without builder entries)
``zero-resume`` ``zero``, saved halfway (``consolidate_state_dict``) and resumed in a new optimizer
``dcp``         FSDP2, saved halfway with ``torch.distributed.checkpoint`` and resumed in a new model
                and optimizer (``get/set_optimizer_state_dict``, ``dcp.save``/``dcp.load``)
``dcp-flat``    the same with ``flatten_optimizer_state_dict=True``
``dcp-full``    FSDP2, saved halfway as a full state dict (``full_state_dict=True``) and resumed both in
                a new FSDP2 run and in a single process
``dcp-ddp``     ``dcp`` under DDP
``tp``          tensor parallel (``ColwiseParallel``, ``RowwiseParallel``: placements on dims 0 and 1)
``fsdp2-tp``    a 2-D mesh, FSDP2 over tensor parallel (needs 4 ranks; skipped with fewer)
==============  ===============================================================================

and reports, per case, the largest difference of the final parameters from the single-process run
(and from torch.optim's own class in the same mode, where torch.optim has the algorithm), and for the
resuming modes from the same mode run without a break. Tolerances: :data:`TOLERANCE`, and
:data:`RESUME_TOLERANCE` for a resume against its own uninterrupted run.

Run it on this machine (it starts the processes)::

    optorch verify --distributed                 # 2 processes, gloo on CPU
    optorch verify --distributed --backend nccl --nproc 8

or across machines with ``torchrun`` (one process per GPU; rank 0 prints the table)::

    torchrun --nnodes 2 --nproc-per-node 8 ... -m optorch.verify_distributed --backend nccl
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .distributed_cases import CONFIGS, MODES, RESUME_TOLERANCE, TOLERANCE, Case, Result, cases, entries
from .distributed_runs import Context, run_case

__all__ = ["CONFIGS", "Case", "MODES", "RESUME_TOLERANCE", "TOLERANCE", "cases", "entries", "main", "run_case", "spawn"]


def _worker(
    rank: int,
    world: int,
    backend: str,
    init: str,
    workdir: str,
    todo: list[Case],
    out: str,
    extra: Callable[[], Any] | None,
) -> None:
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        results: dict[str, Any] = {case.label: vars(result) for case, result in _run_all(todo, workdir).items()}
        if extra is not None:
            results["extra"] = extra()
        if dist.get_rank() == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _run_all(todo: Sequence[Case], workdir: str) -> dict[Case, Result]:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    ctx = Context(rank, world, device, workdir)
    results = {}
    for case in todo:
        if case.mode == "fsdp2-tp" and (world < 4 or world % 2):
            continue
        try:
            results[case] = run_case(case, ctx)
        except Exception as error:  # noqa: BLE001 - reported per case; every rank raises alike
            results[case] = Result(error=f"{type(error).__name__}: {error}")
    return results


def spawn(
    todo: Sequence[Case], world: int = 2, backend: str = "gloo", extra: Callable[[], Any] | None = None
) -> dict[str, Any]:
    """Run ``todo`` in ``world`` local processes; rank 0's results by case label. ``extra`` (a
    module-level function) runs on every rank after the cases, its rank 0's value under ``"extra"``
    (more checks in the same processes: starting them is most of the time)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as workdir:
        out = os.path.join(workdir, "results.pt")
        init = "file://" + os.path.join(workdir, "init")
        mp.spawn(_worker, args=(world, backend, init, workdir, list(todo), out, extra), nprocs=world, join=True)
        return torch.load(out, weights_only=False)


def _table(results: dict[str, dict[str, Any]]) -> str:
    rows = [f"{'case':<34} {'vs single':>10} {'vs torch':>10} {'resume':>10}  result  collectives per step"]
    for label, r in results.items():
        result = Result(**r)
        cells = [
            ("-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1e}")
            for v in (r["diff"], r["torch_diff"], r["resume_diff"])
        ]
        comm = ", ".join(f"{k} {v}" for k, v in sorted(r["comm"].items())) or "none"
        status = "ok" if result.passed() else "FAIL"
        notes = "".join(
            f"  {prefix}{r[key]}"
            for key, prefix in (("error", ""), ("torch_error", "(torch.optim fails: "))
            if r.get(key)
        )
        rows.append(f"{label:<34} {cells[0]:>10} {cells[1]:>10} {cells[2]:>10}  {status:<6}  {comm}{notes}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optorch verify --distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--nproc", type=int, default=2, help="processes to start on this machine (default 2; ignored under torchrun)"
    )
    parser.add_argument(
        "--backend", default=None, help="gloo (CPU) or nccl (CUDA); default nccl where CUDA is available"
    )
    parser.add_argument(
        "--full", action="store_true", help="every config in every mode (default: the representative subset)"
    )
    parser.add_argument(
        "--engine",
        action="append",
        choices=("eager", "compiled", "auto", "torch"),
        help="engines (repeatable; default eager)",
    )
    parser.add_argument(
        "--config", action="append", choices=sorted(CONFIGS), help="configs to run (repeatable; default per --full)"
    )
    args = parser.parse_args(argv)
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    todo = cases(args.full or bool(args.config), tuple(args.engine or ("eager",)))
    if args.config:
        todo = [case for case in todo if case.config in args.config]
    started = time.perf_counter()
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # under torchrun
        import torch.distributed as dist

        dist.init_process_group(backend)
        with tempfile.TemporaryDirectory() as workdir:
            shared = [workdir]
            dist.broadcast_object_list(
                shared, src=0
            )  # rank 0's directory (ranks on other machines need a shared filesystem)
            results = {case.label: vars(result) for case, result in _run_all(todo, shared[0]).items()}
            rank = dist.get_rank()
            dist.destroy_process_group()
        if rank != 0:
            return 0
    else:
        results = spawn(todo, args.nproc, backend)
    print(_table(results))
    failed = [label for label, r in results.items() if not Result(**r).passed()]
    print(
        f"\n{len(results) - len(failed)} of {len(results)} cases within {TOLERANCE:g} (resume {RESUME_TOLERANCE:g}) "
        f"in {time.perf_counter() - started:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
