"""metakd.reporting.report on synthetic run directories written in the exact formats of docs/architecture.md.

Statistics reference: numpy mean and the *sample* std (ddof=1), computed here independently of the
module, from the summaries the test itself wrote.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from metakd.config import Config, config_to_dict
from metakd.reporting.figures import FORECAST_LABEL
from metakd.reporting.report import (
    aggregate,
    build_report,
    find_runs,
    load_run,
    load_runs,
    make_figures,
)
from metakd.runs.config import apply_overrides

NAMES = ("beta1", "beta2", "temperature")


RANGES = {"beta1": (0.0, 1.0), "beta2": (0.0, 1.0), "temperature": (0.1, 10.0)}  # default specs


def _logit(v: float, name: str) -> float:
    """Raw value of a constrained one: the default sigmoid constraint's inverse."""
    lo, hi = RANGES[name]
    u = min(max((v - lo) / (hi - lo), 1e-6), 1 - 1e-6)
    return float(np.log(u) - np.log1p(-u))


def _sigmoid(r: float, name: str) -> float:
    lo, hi = RANGES[name]
    return lo + (hi - lo) / (1 + np.exp(-r))


def _phase(method: str, step: int, window: int, optimize: int, predict: int) -> str:
    if method == "forecast":
        return "optimize" if (step // window) % (optimize + predict) < optimize else "predict"
    return "optimize" if method == "hypergrad" else "train"


def write_run(
    run_dir: Path,
    *,
    method: str,
    seed: int,
    steps: int = 200,
    eval_every: int = 20,
    log_every: int = 10,
    window: int = 10,
    optimize: int = 1,
    predict: int = 1,
    values: dict[str, float] | None = None,
    name: str = "synthetic",
    wall_seconds: float | None = None,
) -> dict[str, Any]:
    """A finished run directory in the contract format; returns its summary."""
    rng = np.random.default_rng([seed, len(method), window, steps])
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"name={name}",
        f"seed={seed}",
        f"meta.method={'fixed' if method == 'optimal' else method}",
        f"forecast.window={window}",
        f"forecast.optimize={optimize}",
        f"forecast.predict={predict}",
        f"train.epochs={steps}",
        f"train.eval_every={eval_every}",
        f"train.log_every={log_every}",
        f"out={run_dir}",
        "wandb.mode=disabled",
    ]
    cfg = Config.model_validate(apply_overrides({}, overrides))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))

    if method == "baseline":
        start = {"beta1": 1.0, "beta2": 0.0, "temperature": 1.0}
    elif method in ("random", "fixed", "optimal"):
        start = values or {
            "beta1": rng.uniform(),
            "beta2": rng.uniform(),
            "temperature": rng.uniform(0.1, 10),
        }
    else:
        start = {"beta1": 0.5, "beta2": 0.5, "temperature": 2.0}
    drift = {"beta1": -0.001, "beta2": 0.0015, "temperature": -0.005}
    moving = method in ("hypergrad", "forecast")
    rows = []
    best_test = 0.0
    last: dict[str, float] = {}
    for step in range(0, steps, log_every):
        phase = _phase(method, step, window, optimize, predict)
        meta = {n: start[n] + (drift[n] * step if moving else 0.0) for n in NAMES}
        row: dict[str, Any] = {
            "step": step,
            "epoch": step,
            "phase": phase,
            "train_loss": float(1.0 / (1 + step / 50)),
            "step_time": 0.01,
            "meta": meta,
            "meta_raw": (raw := {n: _logit(v, n) for n, v in meta.items()}),
            "hypergrad": {n: 0.01 for n in NAMES} if phase == "optimize" else None,
            "hypergrad_norm": 0.02 if phase == "optimize" else None,
            # the forecaster extrapolates raw values (forecast.target: values)
            "meta_forecast": {n: r + 0.05 for n, r in raw.items()} if phase == "predict" else None,
            "forecast_error": {n: 0.01 for n in NAMES} if phase == "predict" else None,
        }
        if step % eval_every == 0:
            base = 0.6 + 0.15 * (1 - np.exp(-step / 60)) + (0.03 if moving else 0.0)
            row["val_accuracy"] = float(base + rng.normal(0, 0.01))
            row["test_accuracy"] = float(base + rng.normal(0, 0.01))
            row["val_loss"] = row["test_loss"] = 0.5
            best_test = max(best_test, row["test_accuracy"])
            last = row
        rows.append(row)
    with (run_dir / "metrics.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    n_opt = sum(r["phase"] == "optimize" for r in rows) * log_every
    n_pred = sum(r["phase"] == "predict" for r in rows) * log_every
    summary = {
        "name": name,
        "method": cfg.meta.method,
        "seed": seed,
        "test_accuracy": last["test_accuracy"],
        "best_test_accuracy": best_test,
        "val_accuracy": last["val_accuracy"],
        "best_val_accuracy": last["val_accuracy"],
        "train_loss": rows[-1]["train_loss"],
        "meta": rows[-1]["meta"],
        "meta_raw": rows[-1]["meta_raw"],
        "hypergradient_steps": n_opt,
        "predicted_steps": n_pred,
        "skipped_meta_steps": n_pred,
        "steps": steps,
        "epochs": steps,
        "wall_seconds": wall_seconds
        if wall_seconds is not None
        else float(1 + rng.uniform() + n_opt / 100),
        "phase_seconds": {"train": 1.0, "hypergrad": 0.5, "forecast": 0.1, "eval": 0.1},
        "device": "cpu",
        "metakd_version": "0.1.0",
        "git_commit": None,
        "forecaster": "linear" if method == "forecast" else None,
        "window": window,
        "unroll": 1,
        "forecast_target": "values" if method == "forecast" else None,
        "status": "completed",
        "command": None,
    }
    if method == "optimal":
        summary["label"] = "optimal"
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return summary


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """4 methods x 2 seeds of synthetic runs."""
    root = tmp_path_factory.mktemp("exp")
    summaries = [
        write_run(root / m / f"seed-{s}", method=m, seed=s)
        for m in ("baseline", "random", "hypergrad", "forecast")
        for s in (0, 1)
    ]
    return root, summaries


@pytest.fixture(scope="module")
def report_dir(
    experiment: tuple[Path, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The report of ``experiment`` (built once: rendering dominates the test time)."""
    out = tmp_path_factory.mktemp("report")
    assert build_report([experiment[0]], out) == out / "report.md"
    return out


def _check_png(path: Path) -> None:
    assert path.stat().st_size > 0
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_report_writes_every_file(report_dir: Path) -> None:
    out = report_dir
    report = out / "report.md"
    for name in ("accuracy", "metaparams", "sensitivity", "cost"):
        _check_png(out / f"{name}.png")
        assert f"![{name}]({name}.png)" in report.read_text()
    assert not (out / "sweep.png").exists()  # all forecast runs share window and n
    text = report.read_text()
    assert "Skipped: the forecast runs do not differ in window size or n" in text
    assert "sample standard deviation (ddof=1)" in text
    assert "## Forecast error" in text
    with (out / "runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 8
    assert {r["method"] for r in runs} == {"baseline", "random", "hypergrad", "forecast"}
    assert all(r["data"] == "synthetic" and r["epochs"] == "200" for r in runs)


def test_table_numbers_equal_summaries(
    experiment: tuple[Path, list[dict[str, Any]]], report_dir: Path
) -> None:
    _, summaries = experiment
    out = report_dir
    with (out / "results.csv").open() as f:
        table = {r["method"]: r for r in csv.DictReader(f)}
    assert list(table) == ["baseline", "random", "hypergrad", "forecast"]  # canonical order
    text = (out / "report.md").read_text()
    for method, row in table.items():
        group = [s for s in summaries if s["method"] == method]
        assert int(row["n"]) == len(group) == 2
        for key in (
            "test_accuracy",
            "best_test_accuracy",
            "val_accuracy",
            "hypergradient_steps",
            "wall_seconds",
        ):
            values = np.array([s[key] for s in group], dtype=float)
            assert float(row[f"{key}_mean"]) == pytest.approx(values.mean(), abs=1e-12)
            assert float(row[f"{key}_std"]) == pytest.approx(values.std(ddof=1), abs=1e-12)
        best = [s["best_test_accuracy"] for s in group]
        assert float(row["best_test_accuracy_max"]) == pytest.approx(max(best))
        for name in NAMES:
            assert float(row[f"meta_{name}_mean"]) == pytest.approx(
                np.mean([s["meta"][name] for s in group])
            )
        acc = np.array([s["test_accuracy"] for s in group])
        assert f"| {method} | 2 | {acc.mean():.4f} ± {acc.std(ddof=1):.4f} |" in text


def test_single_seed_has_no_std(tmp_path: Path) -> None:
    s = write_run(tmp_path / "r", method="hypergrad", seed=3)
    (row,) = aggregate([s])
    assert row["n"] == 1 and row["test_accuracy_std"] is None
    assert row["test_accuracy_mean"] == s["test_accuracy"]


def test_figures_are_labelled(experiment: tuple[Path, list[dict[str, Any]]]) -> None:
    root, _ = experiment
    figures = make_figures(load_runs([root]), logx=True)
    assert set(figures) == {"accuracy", "metaparams", "sensitivity", "cost"}
    for name, fig in figures.items():
        axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        assert axes, name
        for ax in axes:
            assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), (name, ax.get_title())
            # its own legend, or the figure's one legend of panels sharing their entries
            assert ax.get_legend() is not None or fig.legends, (name, ax.get_title())
    assert all(ax.get_xscale() == "log" for ax in figures["accuracy"].axes)
    assert len(figures["metaparams"].axes) == 3  # one panel per metaparameter


def test_accuracy_mean_and_band_are_aligned_by_step(tmp_path: Path) -> None:
    # two seeds evaluated at different steps: the mean is taken on the interpolated union grid
    write_run(tmp_path / "a", method="hypergrad", seed=0, eval_every=20)
    write_run(tmp_path / "b", method="hypergrad", seed=1, eval_every=30)
    runs = load_runs([tmp_path])
    fig = make_figures(runs)["accuracy"]
    line = fig.axes[1].lines[0]  # test accuracy, hypergrad mean
    sa, va = runs[0].series("test_accuracy")
    sb, vb = runs[1].series("test_accuracy")
    hi = min(sa[-1], sb[-1])
    grid = np.unique(np.concatenate([sa, sb]))
    grid = grid[grid <= hi]
    np.testing.assert_allclose(line.get_xdata(), grid)
    np.testing.assert_allclose(
        line.get_ydata(), (np.interp(grid, sa, va) + np.interp(grid, sb, vb)) / 2
    )


def test_metaparams_shade_predicted_windows_and_draw_forecast(tmp_path: Path) -> None:
    write_run(tmp_path / "f0", method="forecast", seed=0, steps=200, window=10, log_every=5)
    write_run(tmp_path / "h0", method="hypergrad", seed=0)
    fig = make_figures(load_runs([tmp_path]))["metaparams"]
    ax = fig.axes[0]
    # windows of 10 steps alternate optimize/predict over 200 steps: 10 predicted windows
    spans = list(ax.patches)  # the axvspan rectangles
    assert len(spans) == 10
    assert sorted(p.get_x() for p in spans)[:2] == [10.0, 30.0]
    dashed = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_label() == FORECAST_LABEL
    # the raw forecast is drawn through the constraint, beside the constrained trajectory
    rows = [
        json.loads(line) for line in (tmp_path / "f0" / "metrics.jsonl").read_text().splitlines()
    ]
    raw = [(r["step"], r["meta_forecast"]["beta1"]) for r in rows if r["meta_forecast"]]
    x, y = np.asarray(dashed[0].get_xdata(), float), np.asarray(dashed[0].get_ydata(), float)
    np.testing.assert_allclose(x[~np.isnan(x)], [st for st, _ in raw])
    np.testing.assert_allclose(y[~np.isnan(y)], [_sigmoid(r, "beta1") for _, r in raw], rtol=1e-9)
    assert len(raw) == 20 and np.isnan(y).sum() == 9  # one segment per predicted window
    labels = ax.get_legend_handles_labels()[1]
    assert "predicted window" in labels and FORECAST_LABEL in labels


def test_sweep_figure_when_forecast_settings_differ(tmp_path: Path) -> None:
    for w in (10, 20):
        for s in (0, 1):
            write_run(tmp_path / f"w{w}" / f"seed-{s}", method="forecast", seed=s, window=w)
    out = tmp_path / "report"
    build_report([tmp_path / "w10", tmp_path / "w20"], out)
    _check_png(out / "sweep.png")
    text = (out / "report.md").read_text()
    assert "Skipped: no random or fixed-λ runs" in text
    fig = make_figures(load_runs([tmp_path]))["sweep"]
    (ax,) = fig.axes  # only the window differs (n = 2 in both)
    assert ax.get_legend_handles_labels()[1] == ["window=10 (n=2)", "window=20 (n=2)"]


def test_commands_and_optimal_label(tmp_path: Path) -> None:
    write_run(tmp_path / "h", method="hypergrad", seed=0)
    write_run(
        tmp_path / "o",
        method="optimal",
        seed=0,
        values={"beta1": 0.3, "beta2": 0.7, "temperature": 1.5},
    )
    summary = json.loads((tmp_path / "h" / "summary.json").read_text())
    summary["command"] = ["metakd", "train", "configs/synthetic.yaml", "seed=0"]
    (tmp_path / "h" / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "report"
    text = build_report([tmp_path / "h", tmp_path / "o"], out).read_text()
    assert "metakd train configs/synthetic.yaml seed=0" in text
    assert (
        "| optimal | 1 |" in text and "| hypergrad | 1 |" in text
    )  # optimal not merged into fixed


def test_reader_tolerates_resume_and_truncation(tmp_path: Path) -> None:
    run = tmp_path / "r"
    write_run(run, method="hypergrad", seed=0)
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 180, "phase": "optimize", "test_accuracy": 0.5}) + "\n")
        f.write('{"step": 190, "pha')  # killed mid-write
    steps, values = load_run(run).series("test_accuracy")
    assert steps[-1] == 180 and values[-1] == 0.5  # the re-logged step keeps its last value
    assert len(steps) == len(set(steps))


def test_missing_paths_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        find_runs([tmp_path / "empty"])
