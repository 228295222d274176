#!/usr/bin/env bash
# The step-speed table on one CUDA GPU, in one command (about 5-8 minutes on an H100):
#   bash benchmarks/cuda.sh [OUTDIR]
# Writes OUTDIR/step_speed_cuda.{txt,json} and OUTDIR/pure_compile_cuda.txt (OUTDIR defaults to .).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
mkdir -p "$out"
export PYTHONPATH=src
python benchmarks/step_speed.py --device cuda --algos adam,adopt,dag,autosgm \
    --shapes 1x4M,200x20k,2000x1k --rows fused,foreach,peers,auto,contig,compiled,pure,purecompiled \
    --steps 20 --warmup 3 --block-budget 20 --json "$out/step_speed_cuda.json" | tee "$out/step_speed_cuda.txt"
python benchmarks/pure_compile.py --device cuda --design floor,regions --tensors 200,2000 --size 20000 | tee "$out/pure_compile_cuda.txt"
