"""The table of issue 32's study from the run directories of benchmarks/noise_study.sh.

    python benchmarks/noise_table.py OUT [--rows ce,kd,grid,tpe,scalar,free,mwn] [--figure acc.png]
    python benchmarks/noise_table.py OUT1 OUT2 ... [--rows ce,kd,grid,mwn10]    # one column per condition

One row per study row (``OUT/<row>/seed-<s>/``): seeds finished, the final test accuracy and the
**early-stopped** one (the test accuracy at the epoch of the best accuracy on the clean validation set,
which every row — cross-entropy included — is judged by), the compute in plain runs (the run's ledger
entry, ``summary.json`` ``cost.plain_runs``: wall time over a fixed-λ run's of the same config), and for
per-sample rows the AUROC of ``-β1`` for finding the flipped labels (``per_sample.pt``; 1: every flipped
label gets a lower β1 than every clean one, 0.5: chance), the mean final β1 share β1ᵢ/(β1ᵢ + β2ᵢ) and the
mean final weight β1ᵢ + β2ᵢ (1 with normalized weights; below 1 an example is turned down as a whole) of the
clean and the flipped examples (with per-sample β1 and β2), the final T, and a network's example weights vᵢ
(``objective_kwargs.example_weight``: clean and flipped means, AUROC of −vᵢ). Unfinished runs are counted, not used. A searcher's
row (``grid``, ``tpe``: a ``metakd search`` study per seed) is its trial with the best clean-validation
accuracy, and its cost is the whole study's; a study that does not yet hold its budget of trials is counted,
not used. ``--pick NAME=ROW+ROW+...`` adds a searcher's row put together from fixed-λ rows run one by
one (``u-s<S>-T<T>``, the same runs a ``metakd search`` trial makes): per seed, the member run with the
best clean-validation accuracy, at the sum of the members' costs; a seed missing a member is not used.
``--figure`` draws early-stopped test accuracy against compute: each seed a faint dot, each row's
mean ± standard deviation a marker with error bars.

With several OUTs (the study's conditions: ``runs/noise0 runs/noise20 runs/noise40 ...``) it prints one
table instead, a column per condition: each row's early-stopped test accuracy, mean ± std over its finished
seeds (n), and its mean cost in plain runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score


def _rows(run: Path) -> list[dict]:
    return [
        r
        for r in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
        if r.get("val_accuracy") is not None and r.get("test_accuracy") is not None
    ]


def early_stopped(run: Path) -> tuple[float, int, float]:
    """(test accuracy, epoch, validation accuracy) at the first evaluation with the best validation
    accuracy."""
    rows = _rows(run)
    best = max(rows, key=lambda r: r["val_accuracy"])  # max keeps the first of equal values
    return float(best["test_accuracy"]), int(best["epoch"]), float(best["val_accuracy"])


def _per_sample(run: Path) -> dict | None:
    """The run's per_sample.pt, or None."""
    path = run / "per_sample.pt"
    return torch.load(path, weights_only=True) if path.is_file() else None


def auroc(data: dict | None) -> float | None:
    """AUROC of −β1 for the flipped labels of a per_sample.pt; None without per-sample β1 or noise."""
    if data is None or "beta1" not in data or not bool(data["flipped"].any()):
        return None
    return float(roc_auc_score(data["flipped"].numpy(), (-data["beta1"]).numpy()))


def _share(data: dict | None) -> torch.Tensor | None:
    """Each example's final β1 share β1ᵢ/(β1ᵢ + β2ᵢ); None without per-sample β1 and β2."""
    if data is None or "beta1" not in data or "beta2" not in data:
        return None
    return data["beta1"] / (data["beta1"] + data["beta2"])


def shares(data: dict | None) -> tuple[float, float | None] | None:
    """Mean final β1 share of the clean and of the flipped examples (None without flipped labels);
    None without per-sample β1 and β2."""
    share = _share(data)
    if data is None or share is None:
        return None
    flipped = data["flipped"]
    return float(share[~flipped].mean()), float(share[flipped].mean()) if bool(
        flipped.any()
    ) else None


def weights(data: dict | None) -> tuple[float, float] | None:
    """Mean final weight β1ᵢ + β2ᵢ of the clean and of the flipped examples; None without per-sample β1
    and β2 or without flipped labels."""
    if (
        data is None
        or "beta1" not in data
        or "beta2" not in data
        or not bool(data["flipped"].any())
    ):
        return None
    w, flipped = data["beta1"] + data["beta2"], data["flipped"]
    return float(w[~flipped].mean()), float(w[flipped].mean())


def example_weights(data: dict | None) -> tuple[float, float, float] | None:
    """A meta-weight network's example weights vᵢ (``objective_kwargs.example_weight``, before the
    per-batch normalization): mean of the clean and of the flipped examples, and the AUROC of −vᵢ for the
    flipped labels; None without them or without flipped labels."""
    if data is None or "weight" not in data or not bool(data["flipped"].any()):
        return None
    v, flipped = data["weight"], data["flipped"]
    a = float(roc_auc_score(flipped.numpy(), (-v).numpy()))
    return float(v[~flipped].mean()), float(v[flipped].mean()), a


def spread(data: dict | None) -> list[float] | None:
    """The 1st, 50th and 99th percentiles of the final β1 share over all N examples (linear
    interpolation, numpy's default); None without per-sample β1 and β2."""
    share = _share(data)
    if share is None:
        return None
    q = torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64)
    return torch.quantile(share.double(), q).tolist()


def completed(run: Path) -> dict | None:
    """The summary.json of a run that completed; None for a missing or unfinished one."""
    path = run / "summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    return s if s.get("status") == "completed" else None


def finished(study: Path) -> bool:
    """Whether a ``metakd search`` study holds its budget of trials (its results.json is rewritten after
    every trial, so a running study is counted, not used)."""
    path = study / "results.json"
    if not path.is_file():
        return False
    r = json.loads(path.read_text())
    return len(r.get("trials") or []) >= int(r.get("budget_trials") or 1)


def best_trial(study: Path, trials: bool = False) -> tuple[float, float, float, int] | None:
    """A searcher's row: (early-stopped test accuracy, its validation accuracy, the study's cost in plain
    runs, finished trials) of the trial with the best clean-validation accuracy at any epoch; ``trials``
    prints each trial's line first."""
    done = [
        (t, s)
        for t in sorted((study / "trials").glob("trial-*"))
        if (s := completed(t)) is not None
    ]
    if trials:
        for trial, s in done:
            test, epoch, val = early_stopped(trial)
            lam = ", ".join(f"{k} {v:.3g}" for k, v in (s.get("meta") or {}).items())
            print(f"|   {trial.name}: {lam} | val {val:.4f} → test {test:.4f} (epoch {epoch}) |")
    best = _best_by_val(done)
    return None if best is None else (best[0], best[1], best[2], len(done))


def _best_by_val(runs: list[tuple[Path, dict]]) -> tuple[float, float, float, Path] | None:
    """Of completed runs (directory, summary): the early-stopped test and validation accuracy of the first
    run with the best clean-validation accuracy, the runs' summed cost in plain runs, and that run; None
    without runs. A searcher's pick (grid trials, or ``--pick``'s rows)."""
    best: tuple[float, float, Path] | None = None
    cost = 0.0
    for run, s in runs:
        cost += _cost(s) or 1.0
        test, _, val = early_stopped(run)
        if best is None or val > best[1]:
            best = (test, val, run)
    return None if best is None else (best[0], best[1], cost, best[2])


def _cost(summary: dict) -> float | None:
    """A run's ledger cost in plain runs (``summary.json`` ``cost.plain_runs``); a cross-entropy run costs 1
    plain run by definition."""
    cost = summary.get("cost")
    c = cost.get("plain_runs") if isinstance(cost, dict) else None
    if c is None and summary.get("method") == "baseline":
        return 1.0
    return None if c is None else float(c)


def accuracies(out: Path, row: str) -> list[tuple[float, float]]:
    """(early-stopped test accuracy, cost in plain runs) of each finished seed of ``OUT/row``: a searcher's
    best trial by clean validation accuracy and its study's cost, or a run (cross-entropy costs 1)."""
    found = []
    for run in sorted((out / row).glob("seed-*")):
        if (run / "trials").is_dir():
            b = best_trial(run) if finished(run) else None
            if b is not None:
                found.append((b[0], b[2]))
        elif (s := completed(run)) is not None:
            found.append((early_stopped(run)[0], _cost(s) or 1.0))
    return found


def picked(out: Path, members: list[str]) -> list[tuple[float, float, float, str]]:
    """``--pick``'s row: per seed that every member finished, (early-stopped test accuracy, validation
    accuracy, summed cost in plain runs, the picked member) of the member with the best clean-validation
    accuracy (the first of equal ones, as :func:`best_trial`)."""
    seeds = sorted({run.name for m in members for run in (out / m).glob("seed-*")})
    found = []
    for seed in seeds:
        runs = [(out / m / seed, completed(out / m / seed)) for m in members]
        done = [(run, s) for run, s in runs if s is not None]
        best = _best_by_val(done) if len(done) == len(members) else None
        if best is not None:
            found.append((best[0], best[1], best[2], best[3].parent.name))
    return found


def by_condition(outs: list[Path], rows: list[str]) -> None:
    """The condition table: a row per study row, a column per OUT (its directory name)."""
    print("| row | " + " | ".join(out.name for out in outs) + " |")
    print("|---|" + "---:|" * len(outs))
    for row in rows:
        cells = []
        for out in outs:
            found = accuracies(out, row)
            cost = f", {statistics.mean(c for _, c in found):.1f} runs" if found else ""
            cells.append(f"{_fmt([a for a, _ in found])} (n={len(found)}{cost})" if found else "–")
        print(f"| {row} | " + " | ".join(cells) + " |")


def _fmt(values: list[float], digits: int = 4) -> str:
    if not values:
        return "–"
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "out", type=Path, nargs="+", help="the study's directory; several: by condition"
    )
    parser.add_argument("--trials", action="store_true", help="also each grid trial's line")
    parser.add_argument("--rows", default="ce,kd,grid,tpe,scalar,free,freewarm,mwn,mwn10")
    parser.add_argument(
        "--figure", type=Path, help="write the accuracy-against-compute figure here"
    )
    parser.add_argument(
        "--spread", action="store_true",
        help="after the table, each per-sample run's β1 share percentiles 1 / 50 / 99 over all examples",
    )  # fmt: skip
    parser.add_argument(
        "--pick", action="append", default=[], metavar="NAME=ROW+ROW+...",
        help="a searcher's row put together from fixed-λ rows: per seed the best by clean val (repeatable)",
    )  # fmt: skip
    args = parser.parse_args()
    if len(args.out) > 1:
        by_condition(args.out, args.rows.split(","))
        return
    args.out = args.out[0]
    print(
        "| row | seeds (done/started) | early-stopped test acc | (epoch) | best clean val acc | final test acc "
        "| cost (plain runs) | wall min | AUROC of −β1 for flipped labels | final β1 share clean / flipped "
        "| final β1 + β2 clean / flipped | final T | example weight vᵢ clean / flipped (AUROC of −vᵢ) |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    # row -> [(cost, early-stopped test acc)] per seed; the searcher rows among them
    points: dict[str, list[tuple[float, float]]] = {}
    searchers: list[str] = []
    spreads: list[str] = []  # --spread's lines, printed after the table
    for row in args.rows.split(","):
        runs = sorted((args.out / row).glob("seed-*"))
        if runs and (runs[0] / "trials").is_dir():  # a searcher: a study per seed, its best trial
            found = [
                b for b in (best_trial(r, args.trials) for r in runs if finished(r)) if b is not None
            ]  # fmt: skip
            points[row] = [(b[2], b[0]) for b in found]
            searchers.append(row)
            trials = "/".join(str(b[3]) for b in found)
            print(
                f"| {row} (best trial by clean val) | {len(found)}/{len(runs)} (trials {trials or 0}) "
                f"| {_fmt([b[0] for b in found])} | – | {_fmt([b[1] for b in found])} | – "
                f"| {_fmt([b[2] for b in found], 2)} | – | – | – | – | – | – |"
            )
            continue
        if not runs:
            continue
        done = [(run, s) for run in runs if (s := completed(run)) is not None]
        early, epochs, vals, final, cost, au, wall, clean, noisy, temps = ([] for _ in range(10))
        w_clean: list[float] = []
        w_noisy: list[float] = []
        v_clean: list[float] = []  # example weights, their flipped mean and AUROC
        v_noisy: list[float] = []
        v_au: list[float] = []
        for run, s in done:
            acc, epoch, val = early_stopped(run)
            early.append(acc)
            vals.append(val)
            epochs.append(str(epoch))
            final.append(float(s["test_accuracy"]))
            wall.append(float(s["wall_seconds"]) / 60)
            c = _cost(s)
            if c:
                cost.append(float(c))
            points.setdefault(row, []).append((float(c or 1.0), acc))
            data = _per_sample(run)
            a = auroc(data)
            if a is not None:
                au.append(a)
            q = spread(data) if args.spread else None
            if q is not None:
                spreads.append(f"{row} {run.name}: β1 share percentiles 1 / 50 / 99: "
                               + " / ".join(f"{v:.4f}" for v in q))  # fmt: skip
            sh = shares(data)
            if sh is not None:
                clean.append(sh[0])
                if sh[1] is not None:
                    noisy.append(sh[1])
            w = weights(data)
            if w is not None:
                w_clean.append(w[0])
                w_noisy.append(w[1])
            v = example_weights(data)
            if v is not None:
                v_clean.append(v[0])
                v_noisy.append(v[1])
                v_au.append(v[2])
            t = (s.get("meta") or {}).get("temperature")
            if isinstance(t, (int, float)):
                temps.append(float(t))
        print(
            f"| {row} | {len(done)}/{len(runs)} | {_fmt(early)} | {', '.join(epochs) or '–'} | {_fmt(vals)} "
            f"| {_fmt(final)} "
            f"| {_fmt(cost, 2)} | {_fmt(wall, 1)} | {_fmt(au, 3)} "
            f"| {_fmt(clean, 3) + ' / ' + _fmt(noisy, 3) if clean else '–'} "
            f"| {_fmt(w_clean, 3) + ' / ' + _fmt(w_noisy, 3) if w_clean else '–'} | {_fmt(temps, 2)} "
            f"| {f'{_fmt(v_clean, 3)} / {_fmt(v_noisy, 3)} ({_fmt(v_au, 3)})' if v_clean else '–'} |"
        )
    for spec in args.pick:
        name, _, joined = spec.partition("=")
        members = joined.split("+")
        picks = picked(args.out, members)
        points[name] = [(c, t) for t, _, c, _ in picks]
        searchers.append(name)
        which = "/".join(m for *_, m in picks) or "–"
        print(
            f"| {name} (best of {len(members)} rows by clean val: {which}) | {len(picks)} "
            f"| {_fmt([f[0] for f in picks])} | – | {_fmt([f[1] for f in picks])} | – "
            f"| {_fmt([f[2] for f in picks], 2)} | – | – | – | – | – | – |"
        )
    if spreads:
        print("\n" + "\n".join(spreads))
    if args.figure is not None:
        figure(points, args.figure, args.out.name, searchers)


def figure(
    points: dict[str, list[tuple[float, float]]], path: Path, title: str, searchers: list[str]
) -> None:
    """Early-stopped test accuracy against compute in plain runs, per row: seeds as dots, mean ± std; with
    a searcher, issue 32's target region (≥ its mean + 3 points at ≤ half its mean compute) shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, (row, pts) in enumerate(p for p in points.items() if p[1]):
        color = f"C{i % 10}"
        xs, ys = [c for c, _ in pts], [a for _, a in pts]
        ax.scatter(xs, ys, s=12, alpha=0.35, color=color)
        sd_x = statistics.stdev(xs) if len(xs) > 1 else 0.0
        sd_y = statistics.stdev(ys) if len(ys) > 1 else 0.0
        ax.errorbar(statistics.mean(xs), statistics.mean(ys), xerr=sd_x, yerr=sd_y, fmt="o", color=color,
                    capsize=3, label=f"{row} (n={len(pts)})")  # fmt: skip
    best = max(
        (r for r in searchers if points.get(r)), default=None,
        key=lambda r: statistics.mean(a for _, a in points[r]),
    )  # fmt: skip
    if best is not None:
        acc = statistics.mean(a for _, a in points[best]) + 0.03
        half = statistics.mean(c for c, _ in points[best]) / 2
        ax.axhline(acc, color="0.5", ls="--", lw=0.8)
        ax.axvline(half, color="0.5", ls=":", lw=0.8)
        ax.fill_between([0.5, half], acc, acc + 0.05, color="0.85", zorder=0,
                        label=f"target: {best} + 3 points at ≤ half its compute")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlim(0.8, None)
    ax.set_xlabel("compute (plain runs, log scale)")
    ax.set_ylabel("test accuracy, early-stopped on clean val")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
