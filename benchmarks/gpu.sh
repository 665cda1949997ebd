#!/usr/bin/env bash
# One command for the GPU numbers of docs/benchmarks.md:
#   bash benchmarks/gpu.sh OUTDIR
# Runs (1) the hypergradient bench (cifar_very_tiny, batch 128, η = 1, 4, 16, 64, every engine,
# median of 3; metakd's closed-form BatchNorm double backward switched on for CUDA too, so
# metakd/reverse vs metakd/reverse-stockbn measures it there), (2) the one-epoch bench (baseline / hypergrad /
# forecast) and (3) the step bench (metakd.bench.e2e: Trainer vs minimal loop, online vs plain), on CUDA, and writes
# OUTDIR/{env.txt, bench.json, bench.md, bench_gpu.png, epoch.json, epoch.md, step.json, step.md, log.txt}.
# Needs torch with CUDA, higher and torchopt; metakd is taken from this checkout (no install).
# About 3-6 minutes on an H100/H200 (the step bench compiles its synthetic row once); each part is
# capped by `timeout`.
set -euo pipefail

OUT="${1:?usage: bash benchmarks/gpu.sh OUTDIR}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS="ignore::FutureWarning"
PY="${PYTHON:-python}"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi -L || echo "nvidia-smi not available"
  "$PY" - <<'PY'
import importlib.metadata as md, platform, torch, higher, torchopt
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| higher", md.version("higher"), "| torchopt", torchopt.__version__)
print("cuda available:", torch.cuda.is_available(),
      "| device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
PY
} 2>&1 | tee "$OUT/env.txt"

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'CUDA is not available')"

cd "$ROOT"
timeout 170 "$PY" -m metakd.bench.engines --device cuda --model cifar_very_tiny --batch-size 128 \
  --etas 1,4,16,64 --repeats 3 --fast-bn-devices cpu,cuda --out "$OUT" --plot "$OUT/bench_gpu.png" \
  2>&1 | tee "$OUT/log.txt"
timeout 60 "$PY" -m metakd.bench.engines --device cuda --model cifar_very_tiny --batch-size 128 \
  --e2e-only --out "$OUT" 2>&1 | tee -a "$OUT/log.txt"
# (3) the step bench on CUDA (issue 21 item 6): the Trainer's step against the minimal eager loop (synthetic
# default, eager and torch.compile'd; CIFAR student), and the online step against a plain one -> step.json/.md
timeout 240 "$PY" -m metakd.bench.e2e --device cuda --repeats 5 --out "$OUT" 2>&1 | tee -a "$OUT/log.txt"
echo "results in $OUT"
