#!/usr/bin/env bash
# The CPU numbers of docs/benchmarks.md (about 10 minutes on 2 cores):
#   bash benchmarks/cpu.sh [OUTDIR]     (default docs/bench; the plot goes to docs/img/bench_cpu.png)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/docs/bench}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS="ignore::FutureWarning"
lscpu | grep -E "Model name|^CPU\(s\)" || true
cd "$ROOT"
python -m metakd.bench.engines --device cpu --threads 1 --out "$OUT" --plot "$ROOT/docs/img/bench_cpu.png" --e2e
# the Trainer's step against the minimal eager loop, and online vs plain (docs/benchmarks.md "End to end")
python -m metakd.bench.e2e --threads 1 --out "$OUT"
