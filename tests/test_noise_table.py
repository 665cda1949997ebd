"""benchmarks/noise_table.py, the table of issue 32's study, on run directories written here by hand: the
early-stopped test accuracy (at the best clean-validation epoch), a searcher's best trial over finished studies
only, the AUROC of −β1 for the flipped labels (against scikit-learn's on the same scores), the mean β1 shares of
clean and flipped examples (against the closed form), the final T, a network's example weights (by hand) and
the figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]


def _run(
    path: Path, evals: list[tuple[float, float]], *, cost: float = 1.0, meta: dict | None = None
) -> None:
    """A completed run: one eval row per epoch (val, test), a summary with the final test accuracy."""
    path.mkdir(parents=True)
    rows = [
        {"step": 10 * e, "epoch": e + 1, "val_accuracy": v, "test_accuracy": t}
        for e, (v, t) in enumerate(evals)
    ]
    rows.insert(
        1, {"step": 5, "epoch": 1, "train_loss": 1.0}
    )  # a row without evaluations is skipped
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"status": "completed", "test_accuracy": evals[-1][1], "wall_seconds": 120.0,
               "cost": {"plain_runs": cost}, "meta": meta or {}}  # fmt: skip
    (path / "summary.json").write_text(json.dumps(summary))


def _study(path: Path, trials: list[list[tuple[float, float]]], budget: int) -> None:
    for i, evals in enumerate(trials):
        _run(path / "trials" / f"trial-{i:04d}", evals, meta={"beta1": 0.1 * (i + 1)})
    results = {"budget_trials": budget, "trials": [{} for _ in trials]}
    (path / "results.json").write_text(json.dumps(results))


def test_the_table_early_stops_uses_finished_studies_only_and_scores_the_noise(tmp_path):
    out = tmp_path / "noise40"
    _run(out / "ce" / "seed-0", [(0.40, 0.41), (0.50, 0.47), (0.45, 0.30)])  # best val at epoch 2
    _run(out / "ce" / "seed-1", [(0.52, 0.49), (0.44, 0.31)])
    _run(out / "free" / "seed-0", [(0.55, 0.56)], cost=3.0, meta={"temperature": 4.5})
    flipped = torch.tensor([True, False, True, False, False, True])
    beta1 = torch.tensor(
        [0.1, 0.9, 0.6, 0.5, 0.8, 0.2]
    )  # one flipped example (0.6) above a clean one (0.5)
    beta2 = (
        1.0 - beta1 / 2
    )  # shares β1/(β1 + β2): clean 0.9/1.45, 0.5/1.25, 0.8/1.4; flipped 0.1/1.05, 0.6/1.3, 0.2/1.1
    weight = torch.tensor(
        [0.2, 0.7, 0.4, 0.3, 0.9, 0.5]
    )  # example weights vᵢ (one flipped 0.4 > 0.3)
    torch.save(
        {"flipped": flipped, "beta1": beta1, "beta2": beta2, "weight": weight},
        out / "free" / "seed-0" / "per_sample.pt",
    )
    _study(out / "grid" / "seed-0", [[(0.60, 0.58)], [(0.62, 0.61), (0.61, 0.65)]], budget=2)
    _study(out / "grid" / "seed-1", [[(0.90, 0.90)]], budget=2)  # still running: counted, not used
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "noise_table.py"), str(out), "--rows", "ce,grid,free",
         "--figure", str(tmp_path / "acc.png")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in proc.stdout.splitlines()[2:]
    }
    assert rows["ce"][:3] == [
        "2/2",
        "0.4800 ± 0.0141",
        "2, 1",
    ]  # (0.47 + 0.49) / 2, epochs of best val
    assert rows["ce"][4] == "0.3050 ± 0.0071"  # final test accuracy
    grid = rows["grid (best trial by clean val)"]
    assert grid[:2] == [
        "1/2 (trials 2)",
        "0.6100",
    ]  # the best trial's test at its best val; seed 1 not used
    assert grid[5] == "2.00"  # the whole study's cost
    want = roc_auc_score(flipped.numpy(), (-beta1).numpy())
    assert rows["free"][-5] == f"{want:.3f}" and 0.5 < want < 1.0
    clean = (0.9 / 1.45 + 0.5 / 1.25 + 0.8 / 1.4) / 3
    noisy = (0.1 / 1.05 + 0.6 / 1.3 + 0.2 / 1.1) / 3
    # the weights β1 + β2 = 1 + β1/2: clean (0.9, 0.5, 0.8), flipped (0.1, 0.6, 0.2)
    w_clean, w_noisy = 1 + (0.9 + 0.5 + 0.8) / 6, 1 + (0.1 + 0.6 + 0.2) / 6
    assert rows["free"][-4:-1] == [
        f"{clean:.3f} / {noisy:.3f}",
        f"{w_clean:.3f} / {w_noisy:.3f}",
        "4.50",
    ]
    # example weights: clean (0.7, 0.3, 0.9), flipped (0.2, 0.4, 0.5); AUROC of −vᵢ: of the 9 (flipped,
    # clean) pairs the flipped one is lower in all but (0.4, 0.3) and (0.5, 0.3): 7/9
    assert rows["free"][-1] == f"{1.9 / 3:.3f} / {1.1 / 3:.3f} ({7 / 9:.3f})"
    assert rows["ce"][-4:] == [
        "–",
        "–",
        "–",
        "–",
    ]  # no per-sample β or v, no temperature in its summary
    assert (tmp_path / "acc.png").stat().st_size > 10_000


def test_spread_prints_the_share_percentiles_of_all_examples(tmp_path):
    """--spread: the 1st / 50th / 99th percentile of β1ᵢ/(β1ᵢ + β2ᵢ) over all examples, by linear
    interpolation between the sorted shares (worked by hand for six examples)."""
    out = tmp_path / "noise0"
    _run(out / "free" / "seed-0", [(0.55, 0.56)])
    beta1 = torch.tensor([0.1, 0.9, 0.6, 0.5, 0.8, 0.2], dtype=torch.float64)
    torch.save(
        {"flipped": torch.zeros(6, dtype=torch.bool), "beta1": beta1, "beta2": 1.0 - beta1 / 2},
        out / "free" / "seed-0" / "per_sample.pt",
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "noise_table.py"), str(out), "--rows", "free", "--spread"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    s = sorted(b / (b + 1.0 - b / 2) for b in [0.1, 0.9, 0.6, 0.5, 0.8, 0.2])
    # position p·(N - 1) in the sorted shares: 0.05, 2.5 and 4.95
    want = [s[0] + 0.05 * (s[1] - s[0]), (s[2] + s[3]) / 2, s[4] + 0.95 * (s[5] - s[4])]
    line = proc.stdout.strip().splitlines()[-1]
    assert line == "free seed-0: β1 share percentiles 1 / 50 / 99: " + " / ".join(
        f"{v:.4f}" for v in want
    )


def test_several_outs_give_one_column_per_condition(tmp_path):
    """Several OUTs: each row's early-stopped test accuracy per condition (mean ± std over finished seeds),
    with n and the mean cost; a searcher counts its best trial and its whole study's cost, a cross-entropy
    run 1 plain run without a ledger entry, an unfinished study nothing."""
    a, b = tmp_path / "noise0", tmp_path / "noise20"
    _run(a / "kd" / "seed-0", [(0.60, 0.62), (0.58, 0.70)], cost=1.0)  # best val at epoch 1: 0.62
    _run(b / "kd" / "seed-0", [(0.50, 0.51)], cost=1.0)
    _run(b / "kd" / "seed-1", [(0.50, 0.53)], cost=1.6)
    ce = b / "ce" / "seed-0"
    _run(ce, [(0.40, 0.44)])
    summary = json.loads((ce / "summary.json").read_text())
    summary.pop("cost")
    summary["method"] = "baseline"
    (ce / "summary.json").write_text(json.dumps(summary))
    _study(a / "grid" / "seed-0", [[(0.60, 0.58)], [(0.62, 0.61)]], budget=2)
    _study(b / "grid" / "seed-0", [[(0.60, 0.58)]], budget=2)  # unfinished
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "noise_table.py"), str(a), str(b),
         "--rows", "ce,kd,grid"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    assert lines[0] == "| row | noise0 | noise20 |"
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]
    }
    assert rows["ce"] == ["–", "0.4400 (n=1, 1.0 runs)"]
    assert rows["kd"] == ["0.6200 (n=1, 1.0 runs)", "0.5200 ± 0.0141 (n=2, 1.3 runs)"]
    assert rows["grid"] == ["0.6100 (n=1, 2.0 runs)", "–"]


def test_pick_puts_a_searcher_together_from_fixed_lambda_rows(tmp_path):
    """--pick: per seed, the member run with the best clean-validation accuracy at any epoch (its test
    accuracy at that epoch), at the sum of the members' costs; a seed where a member has not finished is
    not used."""
    out = tmp_path / "noise40m"
    # seed 0: u-a's best val 0.53 (test 0.51), u-b's 0.56 (test 0.47): u-b is picked
    _run(out / "u-a" / "seed-0", [(0.50, 0.48), (0.53, 0.51)], cost=1.0)
    _run(out / "u-b" / "seed-0", [(0.56, 0.47), (0.52, 0.55)], cost=1.5)
    _run(out / "u-a" / "seed-1", [(0.60, 0.60)], cost=1.0)
    (out / "u-b" / "seed-1").mkdir(parents=True)  # started, not finished: seed 1 is not used
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "noise_table.py"), str(out), "--rows", "u-a",
         "--pick", "grid2=u-a+u-b"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    line = proc.stdout.strip().splitlines()[-1]
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[0] == "grid2 (best of 2 rows by clean val: u-b)"
    assert cells[1:4] == ["1", "0.4700", "–"] and cells[4] == "0.5600"
    assert cells[6] == "2.50"
