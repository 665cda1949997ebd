#!/usr/bin/env bash
# Issue 33 in one GPU call (<= 9 minutes on an H100/H200):
#   bash benchmarks/gpu_issue33.sh [--device cpu|cuda] DATA OUT [EPOCHS_TEACHER] [EPOCHS_STUDENT] [SEEDS]
# DATA: the CIFAR JPEG ImageFolder (class folders), or a .tar.gz holding it (`tar czf X.tar.gz -C
# ../shared/datasets cifar10-jpg`: the folder named `train` inside is used). Wheels of the packages the device
# image lacks (pydantic, optuna, higher, torchopt, ...) are installed from $WHEELS (default: `wheels/` beside a
# .tar.gz DATA) into /tmp when metakd's imports fail. Steps, each capped by `timeout` against one deadline:
#   1. unpack, decode the images once (.cache/metakd), so parallel processes only read the cache;
#   2. the teachers side by side: ResNet-18 (configs/teacher_resnet18.yaml: SGD 0.9, wd 5e-4, one-cycle,
#      crop + flip, bf16 + channels-last, EPOCHS_TEACHER epochs, default the config's; a quick failure is
#      retried once in fp32) and the paper's CNN (configs/teacher_tiny.yaml, 20 epochs as
#      benchmarks/gpu_cifar.sh), both on the 40,000-image teacher split; each one's logits cached once;
#   3. for both teachers at once, the student rows of configs/cifar10.yaml (EPOCHS_STUDENT epochs, default 100,
#      seeds 0..SEEDS-1, default 3; train.normalize_weights and evaluation every 10 epochs as in
#      docs/reproduction.md's searcher study): `baseline` and `fixed` at the grid's best λ (β1 0.01, β2 0.99,
#      T 8; FIXED overrides) by one `metakd experiment` with 2*SEEDS workers, and the `metakd-t4` pipeline
#      (docs/search.md: reverse finder η = 20, meta Adam lr 0.15, T held in [3.99, 4.01], EPOCHS_STUDENT/5
#      finder epochs, then a fixed-λ retrain) as one `metakd search --sampler hypergrad` per seed: 6*SEEDS
#      processes on the one GPU; then `metakd report` of each (in parallel, CPU only);
#   4. `bash benchmarks/gpu.sh` (engines vs higher/torchopt, epoch bench, step bench) alone on the GPU with the
#      time left (BENCH=first runs it before everything instead; BENCH=skip leaves it out);
#   5. benchmarks/cifar_table.py's side-by-side table and OUT/reports.tar.gz with reports only (summary.json,
#      results.md/csv/json, report.md, runs.csv, figures, search.json, teacher metrics, bench outputs, logs;
#      never checkpoints or metrics), OUT/summary.md and OUT/timings.txt.
# Time caps (seconds since the start): DEADLINE (520) ends everything before the archive; rows are cut at
# ROWS_END (400) so that the bench gets >= 2 minutes; the ResNet-18 teacher at TEACHER_END (280).
# A CPU dry run on tiny data (docs/benchmarks.md, "Prepared for a GPU (issue 33)"):
#   OMP_NUM_THREADS=1 DEVICE=cpu EXTRA="data.n_train=64 data.n_val=64 data.n_test=64" \
#     bash benchmarks/gpu_issue33.sh /tmp/tiny.tar.gz /tmp/issue33 1 1 1
set -uo pipefail
DEVICE=${DEVICE:-cuda}
if [[ ${1:-} == --device ]]; then DEVICE=${2:?--device needs cpu or cuda}; shift 2; fi
SRC=${1:?usage: gpu_issue33.sh [--device cpu|cuda] DATA OUT [EPOCHS_TEACHER] [EPOCHS_STUDENT] [SEEDS]}
OUT=${2:?usage: gpu_issue33.sh [--device cpu|cuda] DATA OUT [EPOCHS_TEACHER] [EPOCHS_STUDENT] [SEEDS]}
TEACHER_EPOCHS=${3:-}
EPOCHS=${4:-100}
SEEDS=${5:-3}
FINDER=${FINDER:-$(( EPOCHS / 5 > 0 ? EPOCHS / 5 : 1 ))}
FIXED=${FIXED:-"meta.values.beta1=0.01 meta.values.beta2=0.99 meta.values.temperature=8"}
EXTRA=${EXTRA:-}         # overrides for every metakd command (a dry run's data sizes)
BENCH=${BENCH:-end}      # end | first | skip
DEADLINE=${DEADLINE:-520}
ROWS_END=${ROWS_END:-400}
TEACHER_END=${TEACHER_END:-280}
PY=${PYTHON:-python3}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-/tmp/metakd-issue33}
rm -rf "$WORK"
mkdir -p "$WORK/teachers" "$WORK/logs"
T0=$(date +%s)
TIMINGS="$OUT/timings.txt"
echo "# step | start (s after launch) | seconds | exit status (124: cut by its time cap)" > "$TIMINGS"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled MPLBACKEND=Agg PYTHONWARNINGS="ignore::FutureWarning"

now() { echo $(( $(date +%s) - T0 )); }
cap() {  # cap LIMIT END: seconds a step may take: LIMIT, but not past END seconds after the launch
  local left=$(( $2 - $(now) )); (( left < $1 )) && echo $(( left > 0 ? left : 0 )) || echo "$1"
}
step() {  # step NAME SECONDS CMD...: run CMD under `timeout`, log to logs/NAME.log, record its timing
  local name=$1 secs=$2 start rc; shift 2
  start=$(now)
  if (( secs < 5 )); then
    echo "$name | $start | 0 | skipped (no time left)" >> "$TIMINGS"; return 1
  fi
  timeout -k 10 "$secs" "$@" > "$WORK/logs/$name.log" 2>&1
  rc=$?
  echo "$name | $start | $(( $(now) - start )) | $rc" >> "$TIMINGS"
  echo "[$(now) s] $name: exit $rc after $(( $(now) - start )) s"
  return $rc
}

# --- 1. packages, data -------------------------------------------------------------------------------------
SHIM="$WORK/shim"  # metakd_cli is the cli/ folder (pyproject's package-dir): import it without installing
mkdir -p "$SHIM" && ln -sfn "$ROOT/cli" "$SHIM/metakd_cli"
export PYTHONPATH="$ROOT:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
WHEELS=${WHEELS:-$(dirname "$SRC")/wheels}
if ! "$PY" -c "import pydantic, optuna, higher, torchopt, metakd_cli.main" 2>/dev/null && [[ -d $WHEELS ]]; then
  step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/metakd-site "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/metakd-site"
fi
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ) | device: $DEVICE | teacher epochs: ${TEACHER_EPOCHS:-config}"
  echo "student epochs: $EPOCHS | seeds: $SEEDS | finder epochs: $FINDER | fixed: $FIXED | extra: $EXTRA"
  nvidia-smi -L 2>/dev/null || echo "nvidia-smi not available"
  "$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available())"
} 2>&1 | tee "$WORK/env.txt"
mk() { "$PY" -m metakd_cli.main "$@"; }

if [[ $SRC == *.tar.gz || $SRC == *.tgz ]]; then
  mkdir -p "$WORK/data"
  step unpack 60 tar xzf "$SRC" -C "$WORK/data"
  SRC=$(find "$WORK/data" -maxdepth 3 -type d -name train | head -1)
  [[ -n $SRC ]] || SRC="$WORK/data"
fi
DATA="data.root=$SRC"
# shellcheck disable=SC2086
step decode 120 "$PY" -c "
import sys
from metakd.data import load_data
from metakd.runs.config import load_config
cfg = load_config('configs/cifar10.yaml', sys.argv[1:])
splits = load_data(cfg.data, cfg.seed, 'cpu')
print('images:', {k: len(getattr(splits, k)) for k in ('teacher', 'train', 'val', 'test')})
" "$DATA" $EXTRA || { echo "cannot read the images under $SRC"; exit 1; }

run_bench() {  # the prepared GPU bench, alone on the GPU (it refuses to run without CUDA)
  step bench "$1" env PYTHON="$PY" bash benchmarks/gpu.sh "$WORK/bench"
}
if [[ $BENCH == first ]]; then run_bench "$(cap 240 "$DEADLINE")"; fi

# --- 2./3. teachers and student rows -----------------------------------------------------------------------
rows() {  # rows NAME: baseline + fixed (one experiment) and metakd-t4 (one search per seed)
  local name=$1 ckpt="$WORK/teachers/$1.pt" dir="$WORK/$1" pids=() s ok=1
  local common=(configs/cifar10.yaml "$DATA" "teacher.checkpoint=$ckpt" "train.epochs=$EPOCHS"
    train.normalize_weights=true train.eval_every=790 train.checkpoint_every=10)
  mkdir -p "$dir"
  # shellcheck disable=SC2086
  step "$name-grid" "$(cap 600 "$ROWS_END")" "$PY" -m metakd_cli.main experiment "${common[@]}" $FIXED $EXTRA \
    --seeds "$SEEDS" --methods baseline,fixed --workers $(( 2 * SEEDS )) --out "$dir/grid" \
    --device "$DEVICE" --wandb disabled -q &
  pids+=($!)
  local t4=(meta.hypergrad.method=reverse meta.unroll=20 meta.every=20 meta.lr=0.15
    meta.params.beta1.init=0.1 meta.params.beta2.init=0.9 meta.params.temperature.init=4
    meta.params.temperature.lo=3.99 meta.params.temperature.hi=4.01)
  for (( s = 0; s < SEEDS; s++ )); do
    # shellcheck disable=SC2086
    step "$name-t4-seed$s" "$(cap 600 "$ROWS_END")" "$PY" -m metakd_cli.main search "${common[@]}" "${t4[@]}" \
      $EXTRA --sampler hypergrad --finder-epochs "$FINDER" --retrain-seeds "$s," --out "$dir/metakd-t4" \
      --device "$DEVICE" --wandb disabled -q &
    pids+=($!)
  done
  for p in "${pids[@]:1}"; do wait "$p" || ok=0; done
  # every seed finished: one call over all seeds trains nothing and writes the study's results once more
  if (( ok )); then
    # shellcheck disable=SC2086
    step "$name-t4-results" "$(cap 60 "$DEADLINE")" "$PY" -m metakd_cli.main search "${common[@]}" "${t4[@]}" \
      $EXTRA --sampler hypergrad --finder-epochs "$FINDER" --retrain-seeds "$(seq -s, 0 $(( SEEDS - 1 )))," \
      --out "$dir/metakd-t4" --device "$DEVICE" --wandb disabled -q
  fi
  wait "${pids[0]}"
}

after_teacher() {  # after_teacher NAME: its metrics as JSON; its logits on the student splits, cached once
  local ckpt="$WORK/teachers/$1.pt"
  "$PY" -c "
import json, sys, torch
ckpt = torch.load(sys.argv[1], map_location='cpu', weights_only=True)
print(json.dumps({'metrics': ckpt['metrics'], 'teacher': ckpt['config']['teacher']}, indent=1))
" "$ckpt" > "$WORK/teachers/$1.json"
  # shellcheck disable=SC2086
  step "$1-logits" "$(cap 120 "$ROWS_END")" "$PY" -c "
import sys
from metakd.data import load_data
from metakd.data.teacher import teacher_logits
from metakd.runs.config import load_config
cfg = load_config(sys.argv[1], sys.argv[3:])
teacher_logits(cfg, load_data(cfg.data, cfg.seed, 'cpu'), sys.argv[2])
" configs/cifar10.yaml "$DEVICE" "$DATA" "teacher.checkpoint=$ckpt" $EXTRA
}

# the teachers side by side (the CNN's ~20 epochs take a fraction of the ResNet-18's), then every row at once:
# the rows do not share the GPU with the ResNet-18 teacher, so its wall_seconds is nearly its own
R_OPTS=()
[[ -n $TEACHER_EPOCHS ]] && R_OPTS+=("teacher.epochs=$TEACHER_EPOCHS")
(
  # shellcheck disable=SC2086
  step teacher-resnet18 "$(cap 600 "$TEACHER_END")" "$PY" -m metakd_cli.main teacher configs/teacher_resnet18.yaml \
    "$DATA" "${R_OPTS[@]}" $EXTRA --out "$WORK/teachers/resnet18.pt" --device "$DEVICE" -q --force
  rc=$?
  if (( rc != 0 && rc != 124 && rc != 137 )); then  # a quick failure: once more without bf16/channels-last
    # shellcheck disable=SC2086
    step teacher-resnet18-fp32 "$(cap 600 "$TEACHER_END")" "$PY" -m metakd_cli.main teacher \
      configs/teacher_resnet18.yaml "$DATA" "${R_OPTS[@]}" teacher.bf16=false teacher.channels_last=false \
      $EXTRA --out "$WORK/teachers/resnet18.pt" --device "$DEVICE" -q --force
  fi
  [[ -f $WORK/teachers/resnet18.pt ]] && after_teacher resnet18
) &
RESNET=$!
(
  # shellcheck disable=SC2086
  step teacher-cnn "$(cap 180 "$TEACHER_END")" "$PY" -m metakd_cli.main teacher configs/teacher_tiny.yaml "$DATA" \
    teacher.epochs=20 $EXTRA --out "$WORK/teachers/cnn.pt" --device "$DEVICE" -q --force && after_teacher cnn
) &
CNN=$!
wait "$RESNET" "$CNN"
ROWS=()
for t in cnn resnet18; do
  if [[ -f $WORK/teachers/$t.pt ]]; then rows "$t" & ROWS+=($!); fi
done
(( ${#ROWS[@]} )) && wait "${ROWS[@]}"

# reports (CPU only) before the bench, so that nothing runs beside it
REPORTS=()
for t in cnn resnet18; do
  for d in grid metakd-t4/retrain; do
    [[ -d $WORK/$t/$d ]] || continue
    REPORTS+=("$WORK/$t/$d")
    step "report-$t-${d%%/*}" "$(cap 60 "$DEADLINE")" "$PY" -m metakd_cli.main report "$WORK/$t/$d" \
      --out "$WORK/$t/report-${d%%/*}" -q &
  done
done
wait

# --- 4. the bench, alone on the GPU -------------------------------------------------------------------------
if [[ $BENCH == end ]]; then run_bench "$(cap 600 "$DEADLINE")"; fi

# --- 5. the archive ----------------------------------------------------------------------------------------
{
  echo "# Issue 33: student rows per teacher ($DEVICE, $EPOCHS epochs, $SEEDS seeds)"
  echo
  for t in cnn resnet18; do
    [[ -f $WORK/teachers/$t.json ]] &&
      "$PY" -c "
import json, sys
m = json.load(open(sys.argv[1]))['metrics']
print(f\"- teacher {sys.argv[2]} ({m['model']}): test accuracy {m['test_accuracy']:.4f}, \"
      f\"{m['epochs']} epochs, {m['wall_seconds']:.0f} s of training on {m['device']}\")
" "$WORK/teachers/$t.json" "$t"
  done
  echo
  echo "Rows: DIR = <teacher>/grid (baseline, fixed at $FIXED) and <teacher>/metakd-t4/retrain (the pipeline's"
  echo "fixed-λ retrains; its finders: <teacher>/metakd-t4/results.md)."
  echo
  (( ${#REPORTS[@]} )) && (cd "$WORK" && "$PY" "$ROOT/benchmarks/cifar_table.py" "${REPORTS[@]#"$WORK"/}")
  [[ -f $WORK/bench/step.md ]] && { echo; echo "## Step bench"; cat "$WORK/bench/step.md"; }
} > "$OUT/summary.md" 2> "$WORK/logs/summary.log"
cp "$OUT/summary.md" "$WORK/summary.md"
cp "$TIMINGS" "$WORK/timings.txt"
(
  cd "$WORK" || exit 1
  find . -path ./data -prune -o -path ./shim -prune -o -type f \( -name summary.json -o -name 'results.*' \
    -o -name report.md -o -name runs.csv -o -name results.csv -o -name trials.csv -o -name search.json \
    -o -name config.yaml \
    -o -name '*.png' -o -name '*.log' -o -name '*.txt' -o -name '*.md' -o -path './teachers/*.json' \
    -o -path './bench/*.json' \) -print | grep -v /checkpoints/ | sort > "$WORK/files.txt"
  tar czf "$OUT/reports.tar.gz" -T "$WORK/files.txt"
)
echo "[$(now) s] done: $OUT/reports.tar.gz ($(wc -l < "$WORK/files.txt") files), $OUT/summary.md, $TIMINGS"
ls -la "$OUT"
