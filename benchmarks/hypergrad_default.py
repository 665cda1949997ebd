"""Which settings should ``meta.method=hypergrad`` default to on a user's own data (issue 34, item 14)?

Runs the digits example of docs/your-data.md (scikit-learn's digits, tests/plugins/my_data.py's factory
and SmallNet, an in-process teacher), longer than the docs' 20 epochs so that λ has time to drift, with
several hypergradient settings and the two references (no distillation, the digits grid's best fixed λ
from the same command's ``--grid``), and prints one table row per setting: mean test accuracy over seeds,
the final λ, and how many meta steps T spent at its lower bound (``summary['meta_at_bound']`` is not
kept, so it is read from ``metrics.jsonl``: T within 1 % of its range from 0.1).

    python benchmarks/hypergrad_default.py runs/hg-default --seeds 0,1,2 --epochs 100

Each run is a fresh process with one torch thread, two at a time (``--jobs``); finished runs
(a summary.json) are reused, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The digits example of docs/your-data.md (tests/plugins/my_data.py); train.epochs is set by --epochs.
sys.path.insert(0, str(ROOT / "tests"))
from plugins.my_data import DIGITS_EXAMPLE as DIGITS  # noqa: E402

# name -> overrides on top of DIGITS; "default" is what `meta.method=hypergrad` gives with nothing else set
H = ["meta.method=hypergrad"]
SETTINGS: dict[str, list[str]] = {
    "baseline": ["meta.method=baseline"],
    "fixed": [
        "meta.method=fixed",
        "meta.values.beta1=0.5",
        "meta.values.beta2=0.5",
        "meta.values.temperature=4",
    ],
    "eta1-sgd1": [*H, "meta.unroll=1", "meta.every=1", "meta.optimizer=sgd", "meta.lr=1.0"],
    "eta1-adam0.01": [*H, "meta.unroll=1", "meta.every=1", "meta.optimizer=adam", "meta.lr=0.01"],
    "eta10-adam0.05": [
        *H,
        "meta.unroll=10",
        "meta.every=10",
        "meta.optimizer=adam",
        "meta.lr=0.05",
    ],
    "eta20-adam0.15": [
        *H,
        "meta.unroll=20",
        "meta.every=20",
        "meta.optimizer=adam",
        "meta.lr=0.15",
    ],
    "online-adam0.05": [
        *H,
        "meta.every=10",
        "meta.optimizer=adam",
        "meta.lr=0.05",
        "meta.hypergrad.method=online",
        "meta.hypergrad.online_decay=0.999",
    ],
    "default": ["meta.method=hypergrad"],
}


def run_one(out: Path, name: str, overrides: list[str], seed: int, epochs: int) -> dict:
    run_dir = out / name / f"seed{seed}"
    summary = run_dir / "summary.json"
    if not summary.exists():
        env = dict(
            os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests")
        )
        cmd = [
            sys.executable,
            "-m",
            "metakd_cli.main",
            "train",
            "--out",
            str(run_dir),
            "--overwrite",
            "-q",
        ]
        cmd += [*DIGITS, f"train.epochs={epochs}", f"seed={seed}", *overrides]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    result = json.loads(summary.read_text())
    lo_steps = 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        t = (row.get("meta") or {}).get("temperature")
        if isinstance(t, (int, float)) and t < 0.1 + 0.01 * 9.9:
            lo_steps += 1
    result["rows_T_at_lower_bound"] = lo_steps
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated setting names ")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n for n in SETTINGS if not args.only or n in args.only.split(",")]
    jobs = [(n, s) for n in names for s in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(
            pool.map(lambda j: run_one(args.out, j[0], SETTINGS[j[0]], j[1], args.epochs), jobs)
        )
    by_name: dict[str, list[dict]] = {}
    for (name, _), res in zip(jobs, results, strict=True):
        by_name.setdefault(name, []).append(res)
    print(f"digits, {args.epochs} epochs (5 steps each), seeds {args.seeds}")
    print(
        "| setting | test acc (mean ± std) | final λ per seed (β1, β2, T) | metric rows with T at its floor |"
    )
    print("|---|---:|---|---:|")
    for name, rows in by_name.items():
        accs = [r["test_accuracy"] for r in rows]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lam = "; ".join(
            ", ".join(f"{r['meta'][k]:.3g}" for k in ("beta1", "beta2", "temperature"))
            if r.get("meta")
            else "–"
            for r in rows
        )
        floor = sum(r["rows_T_at_lower_bound"] for r in rows)
        wall = statistics.mean(r["wall_seconds"] for r in rows)
        print(f"| {name} | {statistics.mean(accs):.4f} ± {sd:.4f} | {lam} | {floor} | {wall:.1f} |")


if __name__ == "__main__":
    main()
