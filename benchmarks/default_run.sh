#!/usr/bin/env bash
# The embedded default `metakd train` timed three ways (docs/benchmarks.md, issue 21 item 1):
#   bash benchmarks/default_run.sh
# (1) compiled, first run on a machine: an empty inductor cache (TORCHINDUCTOR_CACHE_DIR), so the
#     compilation is timed in full (the CPU probe and every kernel); (2) compiled again, cache warm;
#     (3) eager (train.compile=off). Prints each run's training wall and CPU seconds and its summary
#     (test accuracy, λ) from summary.json. W&B offline as in the README; the teacher logits and the
#     ledger's reference run are cached before the timed runs. About 3-4 minutes on 2 CPU cores.
set -euo pipefail
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
unset OMP_NUM_THREADS MKL_NUM_THREADS
metakd train -q --out "$OUT/warmup" train.epochs=10 wandb.mode=disabled >/dev/null
run() {
  local name="$1"; shift
  metakd train -q --json --out "$OUT/$name" "$@" | tail -1 | python -c "
import json, sys
s = json.load(sys.stdin)
m = s['meta']
print(f\"$name: {s['wall_seconds']:.1f} s wall, {s['cpu_seconds']:.1f} s CPU of training; \"
      f\"test {s['test_accuracy']:.4f}, beta1 {m['beta1']:.4g} beta2 {m['beta2']:.4g} T {m['temperature']:.4g}\")"
}
uptime
TORCHINDUCTOR_CACHE_DIR="$OUT/inductor" run compiled-cold
TORCHINDUCTOR_CACHE_DIR="$OUT/inductor" run compiled-warm
run eager train.compile=off
uptime
