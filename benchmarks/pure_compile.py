"""Compile time and speed of the pure step under ``torch.compile``, against torch's foreach Adam.

Each layout runs in a fresh process with an empty Inductor cache (a new ``TORCHINDUCTOR_CACHE_DIR``),
so the first call pays what a user's very first run pays: Dynamo's trace, Inductor's lowering and the
C++ builds. Then the compiled step and ``torch.optim.Adam(foreach=True)`` are timed interleaved.
``--design`` picks how the step compiles (``optorch.set_compiled_design``), or ``floor``: a compiled
function that takes and returns as many tensors as the step and computes nothing, the part of the
compile time no design can remove.

    PYTHONPATH=src python benchmarks/pure_compile.py --algo adam --design floor,blocks,regions \
        --tensors 200,1000,2000 --size 20000 --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _floor(params, grads, state, config):
    """What any compiled pure step costs before computing anything: a graph that takes and returns as
    many tensors as the step does, each new one a view (for Adam: 5 in and 4 out a param)."""
    return [p.view(p.shape) for p in params], {k: [v.view(v.shape) for v in vs] for k, vs in state.items()}


def child(args) -> None:
    import torch

    import optorch
    from optorch import registry

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.design != "floor":
        optorch.set_compiled_design(args.design)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    algorithm = registry.get(args.algo)
    _, config = optorch.parse_config({"name": args.algo})
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(args.size, generator=generator).to(device) for _ in range(args.count)]
    grads = [torch.randn(args.size, generator=generator).to(device) for _ in range(args.count)]
    state = algorithm.init(params, config)
    step = torch.compile(_floor if args.design == "floor" else algorithm.step)
    holder = {"params": params, "state": state}

    def pure():
        with torch.no_grad():
            holder["params"], holder["state"] = step(holder["params"], grads, holder["state"], config)

    started = time.perf_counter()
    pure()
    sync()
    first = time.perf_counter() - started
    torch_params = [p.clone().requires_grad_(True) for p in params]
    for p, g in zip(torch_params, grads):
        p.grad = g.clone()
    foreach = torch.optim.Adam(torch_params, lr=1e-3, foreach=True)
    rows = {"pure compiled": pure, "torch foreach Adam": foreach.step}
    for fn in rows.values():
        for _ in range(args.warmup):
            fn()
    samples = {key: [] for key in rows}
    for round_index in range(args.steps):
        keys = list(rows)[round_index % 2 :] + list(rows)[: round_index % 2]
        for key in keys:
            sync()
            started = time.perf_counter()
            rows[key]()
            sync()
            samples[key].append(time.perf_counter() - started)
    medians = {key: statistics.median(v) * 1e3 for key, v in samples.items()}
    print(
        json.dumps(
            {
                "algo": args.algo,
                "design": args.design,
                "tensors": args.count,
                "size": args.size,
                "first_call_s": first,
                "pure_ms": medians["pure compiled"],
                "foreach_ms": medians["torch foreach Adam"],
                "ratio": medians["pure compiled"] / medians["torch foreach Adam"],
                "graphs": __import__("torch")._dynamo.utils.counters["stats"]["unique_graphs"],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", default="adam")
    parser.add_argument("--tensors", default="200,1000,2000")
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--design",
        default="regions",
        help="comma-separated: regions, blocks (optorch.set_compiled_design), floor (a graph of views only)",
    )
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.count is not None:
        child(args)
        return
    for design, count in itertools.product(args.design.split(","), map(int, args.tensors.split(","))):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            command = [
                sys.executable,
                __file__,
                "--algo",
                args.algo,
                "--design",
                design,
                "--size",
                str(args.size),
                "--device",
                args.device,
                "--threads",
                str(args.threads),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--count",
                str(count),
            ]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            print(
                lines[-1] if lines else f"{count} tensors: failed: {done.stderr.strip().splitlines()[-1:]}", flush=True
            )


if __name__ == "__main__":
    main()
