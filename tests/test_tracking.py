"""W&B callback (offline files, failure isolation), report logging, and progress display."""

from __future__ import annotations

import io
import logging
import sys
import time
from pathlib import Path

from rich.console import Console

from metakd.reporting.progress import (
    ExperimentProgress,
    ProgressCallback,
    estimate_total_steps,
    format_meta,
)
from metakd.reporting.tracking import WandbCallback, flatten_row, log_report, sync_command
from metakd.runs.config import load_config


def _rows(n: int = 20) -> list[dict]:
    """Metrics rows in the docs/architecture.md format."""
    rows = []
    for s in range(1, n + 1):
        row = {
            "step": s,
            "epoch": s,
            "phase": "optimize" if (s // 5) % 2 == 0 else "predict",
            "train_loss": 1.0 / s,
            "step_time": 0.01,
            "meta": {"beta1": 0.5 + 0.01 * s, "beta2": 0.5, "temperature": 2.0},
            "meta_raw": {"beta1": 0.0, "beta2": 0.0, "temperature": -1.0},
            "hypergrad": {"beta1": 0.01, "beta2": -0.02, "temperature": 0.0},
            "hypergrad_norm": 0.0224,
            "meta_forecast": None,
            "forecast_error": None,
        }
        if s % 10 == 0:
            row.update(val_accuracy=0.7, val_loss=0.6, test_accuracy=0.71, test_loss=0.58)
        rows.append(row)
    return rows


def _fake_training(cb: object, cfg, run_dir: Path, rows: list[dict]) -> dict:
    """What the trainer does with a callback: start, every row, eval rows, end."""
    cb.on_run_start(cfg, run_dir, {"steps_per_epoch": 1})
    for row in rows:
        cb.on_step(row)
        if "val_accuracy" in row:
            cb.on_eval(row)
    summary = {
        "method": cfg.meta.method,
        "seed": cfg.seed,
        "test_accuracy": 0.71,
        "meta": {"beta1": 0.7, "beta2": 0.5, "temperature": 2.0},
        "phase_seconds": {"train": 1.0, "hypergrad": 2.0},
        "forecaster": None,
    }
    cb.on_run_end(summary)
    return summary


def test_flatten_row_nests_lists_and_phase():
    row = {
        "step": 3,
        "phase": "predict",
        "meta": {"beta1": 0.4, "temperature": [1.0, 2.0]},
        "hypergrad": None,
        "forecast_error": {"beta1": 0.03},
        "big": list(range(40)),
    }
    flat = flatten_row(row)
    assert flat == {
        "step": 3,
        "phase_id": 2,
        "meta/beta1": 0.4,
        "meta/temperature/0": 1.0,
        "meta/temperature/1": 2.0,
        "forecast_error/beta1": 0.03,
        "big": list(range(40)),
    }


def test_offline_writes_wandb_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_config(None, ["wandb.mode=offline", "wandb.init_timeout=20", "seed=3"])
    cb = WandbCallback(cfg, tmp_path)
    _fake_training(cb, cfg, tmp_path, _rows())
    assert not cb.failed
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    run_id = (tmp_path / "wandb-run-id").read_text().strip()
    assert files[0].name == f"run-{run_id}.wandb"
    assert cb.sync_hint == sync_command(tmp_path)
    assert str(tmp_path / "wandb") in cb.sync_hint


def test_disabled_mode_creates_nothing(tmp_path):
    cfg = load_config(None, ["wandb.mode=disabled"])
    cb = WandbCallback(cfg, tmp_path)
    _fake_training(cb, cfg, tmp_path, _rows(5))
    assert not (tmp_path / "wandb").exists()
    assert cb.run is None and not cb.failed and cb.sync_hint is None


def test_unreachable_online_server_warns_once_and_training_completes(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    cfg = load_config(None, ["wandb.mode=online", "wandb.init_timeout=2"])
    cb = WandbCallback(cfg, tmp_path, quiet=True)
    rows = _rows()
    seen = []

    class Recorder:  # stands in for the local metrics writer that must keep working
        def on_step(self, row):
            seen.append(row["step"])

    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="metakd.reporting.tracking"):
        cb.on_run_start(cfg, tmp_path, {})
        for row in rows:
            cb.on_step(row)
            Recorder().on_step(row)
        cb.on_run_end({"test_accuracy": 0.7})
    elapsed = time.monotonic() - start
    assert elapsed < 60, f"W&B failure took {elapsed:.0f} s"
    assert seen == [r["step"] for r in rows]
    warnings = [r for r in caplog.records if r.name == "metakd.reporting.tracking"]
    assert len(warnings) == 1 and "W&B init failed" in warnings[0].getMessage()
    assert cb.failed and cb.run is None and cb.sync_hint is None


def test_log_failure_mid_run_disables_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_config(None, ["wandb.mode=offline"])
    cb = WandbCallback(cfg, tmp_path, quiet=True)
    cb.on_run_start(cfg, tmp_path, {})
    assert cb.active
    calls = []

    def broken_log(data):
        calls.append(data)
        raise ConnectionError("server error 500\nmore detail")

    monkeypatch.setattr(cb.run, "log", broken_log)
    with caplog.at_level(logging.WARNING, logger="metakd.reporting.tracking"):
        for row in _rows(6):
            cb.on_step(row)
        cb.on_run_end({"test_accuracy": 0.7})
    assert len(calls) == 1  # disabled after the first failure
    msgs = [r.getMessage() for r in caplog.records if r.name == "metakd.reporting.tracking"]
    assert len(msgs) == 1 and "ConnectionError: server error 500" in msgs[0]


def test_log_report_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    from PIL import Image

    fig = tmp_path / "accuracy.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(fig)
    rows = [{"method": "hypergrad", "seed": 0, "test_accuracy": 0.8, "meta": {"beta1": 0.3}}]
    assert log_report(tmp_path / "rep", {"accuracy": fig}, rows, mode="offline")
    assert list((tmp_path / "rep" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert not log_report(tmp_path / "rep2", {}, rows, mode="disabled")
    assert not (tmp_path / "rep2").exists()


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=200), buf


def test_progress_quiet_prints_nothing(tmp_path):
    cfg = load_config(None, ["train.epochs=20"])
    for terminal in (True, False):
        console, buf = _console(terminal)
        _fake_training(ProgressCallback(quiet=True, console=console), cfg, tmp_path, _rows())
        assert buf.getvalue() == ""


def test_progress_plain_lines_when_not_a_terminal(tmp_path):
    cfg = load_config(None, ["train.epochs=20"])
    console, buf = _console(False)
    cb = ProgressCallback(console=console)
    _fake_training(cb, cfg, tmp_path, _rows())
    text = buf.getvalue()
    assert cb.total_steps == 20 and cb.run_dir == tmp_path
    assert "step 10/20 (50%)" in text and "val 0.700 test 0.710" in text
    assert "β1=0.7" in text.splitlines()[-1]  # the final λ from the summary
    assert "\x1b[" not in text


def test_progress_bar_on_a_terminal(tmp_path):
    cfg = load_config(None, ["train.epochs=20"])
    console, buf = _console(True)
    cb = ProgressCallback(console=console)
    _fake_training(cb, cfg, tmp_path, _rows())
    text = buf.getvalue()
    assert "20/20" in text and "hypergrad seed 0" in text and "T=2" in text


def test_experiment_progress_counts_runs(tmp_path):
    cfg = load_config(None, ["train.epochs=20"])
    console, buf = _console(False)
    with ExperimentProgress(2, console=console) as bar:
        for _ in range(2):
            _fake_training(bar.run_callback(), cfg, tmp_path, _rows())
    assert bar.done == 2 and "runs done: 2/2" in buf.getvalue()


def test_in_process_teacher_progress():
    assert ProgressCallback(quiet=True).teacher_progress(10) is None
    console, buf = _console(True)
    with ProgressCallback(console=console).teacher_progress(10) as bar:  # a bar of its own
        for epoch in range(10):
            bar(epoch, {"loss": 0.5, "test_accuracy": 0.75})
    assert "10/10" in buf.getvalue() and "0.750" in buf.getvalue()
    console, buf = _console(True)
    with ExperimentProgress(1, console=console) as exp:  # beside the experiment's bars: lines
        teacher_bar = exp.run_callback(5).teacher_progress(4)
        assert teacher_bar is not None and teacher_bar.plain
        with teacher_bar as bar:
            bar(3, {"loss": 0.25, "test_accuracy": 0.5})
    assert "teacher: epoch 4/4 loss 0.2500 test 0.500" in buf.getvalue()


def test_estimates_and_formatting():
    cfg = load_config(None, ["data.n_train=1000", "train.batch_size=128", "train.epochs=3"])
    assert estimate_total_steps(cfg) == 3 * 8
    assert estimate_total_steps(load_config(None, ["train.epochs=7"])) == 7
    assert format_meta({"beta1": 0.4, "temperature": [1.0, 3.0]}) == "β1=0.4 T~=2"
    assert format_meta(None) == ""


def test_import_metakd_does_not_import_wandb():
    import subprocess

    code = "import sys, metakd, metakd.reporting.tracking, metakd.reporting.progress; print('wandb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_step_rows_are_throttled_to_the_rate_and_eval_rows_always_sent(monkeypatch):
    cfg = load_config(None, ["wandb.max_rows_per_second=10"])
    cb = WandbCallback(cfg, None)
    logged: list[int] = []
    cb.run = type("Run", (), {"log": lambda self, data: logged.append(data["step"])})()
    clock = iter(
        [0.0, 0.05, 0.099, 0.1, 0.15, 0.31, 0.32, 0.33, 0.34]
    )  # time.monotonic per step row
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    rows = _rows(10)
    for row in rows[:6]:
        cb.on_step(row)
    cb.on_eval(rows[9])  # evaluation rows are never dropped
    assert logged == [1, 4, 6, 10] and cb.throttled == 2 + 1
    every = WandbCallback(load_config(None, ["wandb.max_rows_per_second=0"]), None)
    every.run = cb.run
    for row in rows[:3]:
        every.on_step(row)
    assert logged[-3:] == [1, 2, 3] and every.throttled == 0
