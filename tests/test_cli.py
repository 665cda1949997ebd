"""The ``metakd`` command line: argument handling, error reporting, and a tiny real run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import metakd.threads
from metakd import __version__
from metakd.config import config_to_dict
from metakd.runs.config import load_config
from metakd_cli.app import parse_seeds, split_args
from metakd_cli.main import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _summary(cfg, run_dir) -> dict:
    return {
        "name": cfg.name,
        "method": cfg.meta.method,
        "seed": cfg.seed,
        "test_accuracy": 0.8125,
        "best_test_accuracy": 0.83,
        "val_accuracy": 0.8,
        "meta": {"beta1": 0.25, "beta2": 0.5, "temperature": 3.0},
        "hypergradient_steps": 12,
        "predicted_steps": 8,
        "wall_seconds": 1.5,
        "device": "cpu",
        "run_dir": str(run_dir),
    }


@pytest.fixture
def fake_train(monkeypatch, tmp_path):
    """Replace metakd.runs.run.train_run by a fake that drives the callbacks like the trainer."""
    import metakd.runs.run

    calls: list[dict] = []

    def train_run(cfg, run_dir=None, *, resume=False, callbacks=()):
        run_dir = Path(run_dir if run_dir is not None else tmp_path / "default-run")
        run_dir.mkdir(parents=True, exist_ok=True)
        calls.append({"cfg": cfg, "run_dir": run_dir, "resume": resume, "callbacks": callbacks})
        for cb in callbacks:
            cb.on_run_start(cfg, run_dir, {"total_steps": 4, "start_step": 0})
        for step in range(1, 5):
            row = {"step": step, "epoch": step, "phase": "optimize", "meta": {"beta1": 0.3}}
            for cb in callbacks:
                cb.on_step(row)
        summary = _summary(cfg, run_dir)
        for cb in callbacks:
            cb.on_run_end(summary)
        return summary

    monkeypatch.setattr(metakd.runs.run, "train_run", train_run)
    return calls


# --------------------------------------------------------------------------- basics


def test_version_and_help():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"metakd {__version__}"
    for cmd in ("train", "teacher", "experiment", "report", "bench", "check-grad", "forecasters"):
        result = invoke(cmd, "--help")
        assert result.exit_code == 0, cmd
        assert "Examples" in result.stdout or "Example" in result.stdout, cmd


def test_forecasters_lists_the_registry():
    from metakd.training.forecast import available

    result = invoke("forecasters")
    assert result.exit_code == 0
    lines = dict(line.split("\t", 1) for line in result.stdout.strip().splitlines())
    assert lines == available() and "linear" in lines


def test_split_args_and_seeds():
    assert split_args(["c.yaml", "a=1"]) == ("c.yaml", ["a=1"])
    assert split_args(["a=1", "b.c=2"]) == (None, ["a=1", "b.c=2"])
    assert split_args(None) == (None, [])
    assert parse_seeds("3", first=5) == [5, 6, 7]
    assert parse_seeds("0,4,9") == [0, 4, 9]


# --------------------------------------------------------------------------- bad configs

BAD_CONFIGS = [
    (["meta.unrol=3"], "unknown config key 'meta.unrol'; did you mean 'meta.unroll'?"),
    (["train.epochs=lots"], "'train.epochs': Input should be a valid integer"),
    (["train.lr=-1"], "'train.lr': Input should be greater than 0 (got -1)"),
    (["meta.unroll=0"], "'meta.unroll': Input should be greater than or equal to 1 (got 0)"),
    (
        ["meta.params.temperature.lo=5", "meta.params.temperature.hi=5"],
        "'meta.params.temperature': range needs lo < hi, got lo=5.0, hi=5.0",
    ),
    (["missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["unroll", "meta.unroll=2"], "overrides are written key=value"),
    (["configs/synthetic.yaml", "seed"], "not of the form key=value"),
]


@pytest.mark.parametrize(
    ("args", "message"), BAD_CONFIGS, ids=[" ".join(a) for a, _ in BAD_CONFIGS]
)
@pytest.mark.parametrize("command", ["train", "check-grad", "experiment", "teacher"])
def test_bad_config_exits_2_with_one_message(command, args, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = invoke(command, *args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_bad_yaml_file_lists_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: -1\nmeta:\n  unrol: 2\n")
    result = invoke("train", bad)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("Error: ") for line in lines)
    assert any("did you mean 'meta.unroll'" in line for line in lines)


def test_bad_option_value_is_a_usage_error():
    result = invoke("train", "--device", "gpu")
    assert result.exit_code == 2 and "gpu" in result.output


def test_bad_config_as_a_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "metakd_cli.main", "train", "meta.unrol=3", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip() == (
        "Error: unknown config key 'meta.unrol'; did you mean 'meta.unroll'?"
    )


def test_console_script_points_at_the_app():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "metakd"]
    assert ep.value == "metakd_cli.main:app" and ep.load() is app


# --------------------------------------------------------------------------- train plumbing


def test_train_maps_options_onto_config_keys(fake_train, tmp_path):
    out = tmp_path / "run"
    result = invoke(
        "train", ROOT / "configs" / "forecasters.yaml", "forecast.window=20", "meta.unroll=2",
        "--seed", "3", "--device", "cpu", "--out", out, "--wandb", "disabled", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (call,) = fake_train
    cfg = call["cfg"]
    assert (cfg.seed, cfg.device, cfg.out, cfg.wandb.mode) == (3, "cpu", str(out), "disabled")
    assert (cfg.meta.method, cfg.forecast.window, cfg.meta.unroll) == ("forecast", 20, 2)
    assert call["run_dir"] == out and call["resume"] is False
    text = result.stdout
    assert f"Run directory: {out}" in text
    assert "test accuracy        0.8125 (best 0.8300)" in text
    assert "β1=0.25 β2=0.5 T=3" in text
    assert "hypergradient steps  12 (predicted 8)" in text and "1.5 s on cpu" in text
    assert "wandb sync" not in text
    assert result.stderr == ""  # --quiet


def test_train_options_win_over_overrides(fake_train, tmp_path):
    result = invoke("train", "seed=1", "device=cuda", f"out={tmp_path}/a", "--seed", "2",
                    "--device", "cpu", "--wandb", "disabled", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    cfg = fake_train[0]["cfg"]
    assert (cfg.seed, cfg.device, cfg.out) == (2, "cpu", f"{tmp_path}/a")


def test_train_json_summary_on_stdout(fake_train, tmp_path):
    result = invoke("train", "--out", tmp_path / "r", "--wandb", "disabled", "--json", "-q")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["test_accuracy"] == 0.8125 and data["run_dir"] == str(tmp_path / "r")


def test_train_offline_prints_wandb_sync(fake_train, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    result = invoke("train", "--out", out, "--wandb", "offline", "--quiet")
    assert result.exit_code == 0, result.output
    assert f"upload with: wandb sync {out / 'wandb'}/offline-run-*" in result.stdout
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_train_progress_goes_to_stderr(fake_train, tmp_path):
    result = invoke("train", "--out", tmp_path / "r", "--wandb", "disabled")
    assert result.exit_code == 0
    assert "hypergrad seed 0" in result.stderr and "step 4/4" in result.stderr
    assert "step 4/4" not in result.stdout


def test_resume_reads_the_run_directory(fake_train, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(None, ["seed=7", "meta.unroll=3", "wandb.mode=disabled", f"out={run}"])
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    for args in (["--resume", run], ["--resume", "--out", run]):
        result = invoke("train", *args, "-q")
        assert result.exit_code == 0, result.output
        call = fake_train[-1]
        assert call["resume"] is True and call["run_dir"] == run
        assert (call["cfg"].seed, call["cfg"].meta.unroll) == (7, 3)


def test_resume_errors(fake_train, tmp_path):
    result = invoke("train", "--resume", tmp_path / "nope")
    assert result.exit_code == 2 and "nothing to resume" in result.stderr
    result = invoke("train", "--resume")
    assert result.exit_code == 2 and "--resume needs the run directory" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("train", "--resume", empty)
    assert result.exit_code == 2 and "has no config.yaml" in result.stderr
    result = invoke("train", empty)
    assert result.exit_code == 2 and "add --resume" in result.stderr
    assert not fake_train


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (FloatingPointError("training loss became nan at step 3; lower train.lr"), "became nan"),
        (
            FileNotFoundError(2, "No such file or directory", "runs/teachers/t.pt"),
            "runs/teachers/t.pt",
        ),
        (ValueError("the data changed since its checkpoint"), "the data changed"),
    ],
)
def test_user_errors_from_training_keep_the_run_dir(monkeypatch, tmp_path, exc, message):
    import metakd.runs.run

    out = tmp_path / "run"

    def train_run(cfg, run_dir=None, *, resume=False, callbacks=()):
        Path(run_dir).mkdir(parents=True)
        (Path(run_dir) / "metrics.jsonl").write_text("{}\n")
        for cb in callbacks:
            cb.on_run_start(cfg, Path(run_dir), {"total_steps": 5})
        raise exc

    monkeypatch.setattr(metakd.runs.run, "train_run", train_run)
    result = invoke("train", "--out", out, "--wandb", "disabled", "-q")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Error: ") and message in lines[0]
    assert f"metakd train --resume {out}" in lines[-1]
    assert "Traceback" not in result.output
    assert (out / "metrics.jsonl").is_file()  # never deleted


def test_unexpected_errors_keep_their_traceback(monkeypatch, tmp_path):
    import metakd.runs.run

    def train_run(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(metakd.runs.run, "train_run", train_run)
    result = invoke("train", "--out", tmp_path / "r", "--wandb", "disabled", "-q")
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


# --------------------------------------------------------------------------- other commands


def test_experiment_passes_the_grid(monkeypatch, tmp_path):
    import metakd.runs.experiment

    seen = {}

    def run_experiment(cfg, *, methods, seeds, out_dir, workers=1, callbacks_factory=None,
                       quiet=False, threads=None):  # fmt: skip
        seen.update(cfg=cfg, methods=methods, seeds=seeds, out_dir=out_dir, workers=workers,
                    threads=threads)  # fmt: skip
        seen["callbacks"] = callbacks_factory(cfg, Path(out_dir) / "x")
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "results.md").write_text(
            "| method | test |\n|---|---|\n| hypergrad | 0.8 |\n"
        )
        return []

    monkeypatch.setattr(metakd.runs.experiment, "run_experiment", run_experiment)
    out = tmp_path / "exp"
    result = invoke("experiment", ROOT / "configs" / "synthetic.yaml", "train.epochs=5",
                    "--seeds", "3", "--seed", "10", "--methods", "baseline,hypergrad",
                    "--out", out, "--wandb", "disabled", "-q", "--threads", "3")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen["threads"] == 3
    assert seen["methods"] == ["baseline", "hypergrad"] and seen["seeds"] == [10, 11, 12]
    assert seen["out_dir"] == out and seen["cfg"].train.epochs == 5
    from metakd.reporting.progress import ProgressCallback
    from metakd.reporting.tracking import WandbCallback

    assert {type(c) for c in seen["callbacks"]} == {ProgressCallback, WandbCallback}
    assert "| hypergrad | 0.8 |" in result.stdout

    result = invoke("experiment", "--methods", "baseline,hypergrd")
    assert result.exit_code == 2 and "did you mean 'hypergrad'?" in result.stderr
    result = invoke("experiment", "--seeds", "x")
    assert result.exit_code == 2 and "--seeds" in result.stderr


def test_report_command(monkeypatch, tmp_path):
    import metakd.reporting.report

    def build_report(paths, out_dir, *, logx=False):
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "report.md").write_text(f"logx={logx} runs={len(paths)}")
        return Path(out_dir) / "report.md"

    monkeypatch.setattr(metakd.reporting.report, "build_report", build_report)
    runs = tmp_path / "runs"
    runs.mkdir()
    result = invoke("report", runs, "--out", tmp_path / "rep", "--logx")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"Report: {tmp_path / 'rep' / 'report.md'}"
    assert (tmp_path / "rep" / "report.md").read_text() == "logx=True runs=1"
    result = invoke("report", tmp_path / "missing", "--out", tmp_path / "rep2")
    assert result.exit_code == 2 and "missing" in result.stderr


def test_bench_command(monkeypatch, tmp_path):
    seen = {}

    def run_bench(model, batch_size, device, etas, repeats, out, engines=None, *, threads=None):
        seen.update(model=model, batch_size=batch_size, device=device, etas=etas,
                    repeats=repeats, out=out, engines=engines, threads=threads)  # fmt: skip
        return {}

    def run_epoch_bench(model, device, *, threads=None, out=None):
        seen.update(e2e=(model, device, threads, out))
        return {}

    fake = types.ModuleType("metakd.bench.engines")
    fake.run_bench = run_bench
    fake.run_epoch_bench = run_epoch_bench
    monkeypatch.setitem(sys.modules, "metakd.bench.engines", fake)
    result = invoke("bench", "--model", "mlp", "--batch-size", "32", "--device", "cpu",
                    "--etas", "1,4", "--repeats", "2", "--out", tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen == {"model": "mlp", "batch_size": 32, "device": "cpu", "etas": [1, 4],
                    "repeats": 2, "out": tmp_path, "engines": None, "threads": None}  # fmt: skip
    result = invoke("bench", "--engines", "plain,metakd/reverse", "--threads", "1", "--e2e")
    assert result.exit_code == 0, result.output
    assert seen["engines"] == ["plain", "metakd/reverse"] and seen["threads"] == 1
    assert seen["e2e"] == ("cifar_very_tiny", "auto", 1, None)
    result = invoke("bench", "--etas", "1,x")
    assert result.exit_code == 2 and "--etas" in result.stderr
    step = types.ModuleType("metakd.bench.e2e")
    step.run_step_bench = lambda *, out=None, quiet=False: seen.update(step=(out, quiet))
    monkeypatch.setitem(sys.modules, "metakd.bench.e2e", step)
    monkeypatch.setitem(metakd.threads._state, "user", None)
    old_threads = torch.get_num_threads()
    result = invoke("bench", "--step", "--out", tmp_path, "--threads", "1")
    torch.set_num_threads(old_threads)
    assert result.exit_code == 0, result.output
    assert seen["step"] == (tmp_path, False)


def test_check_grad_table_and_exit_code(monkeypatch):
    import metakd.runs.run

    result_ok = {
        "beta1": {"hypergrad": 0.1, "finite_difference": 0.1001, "rel_error": 1e-3},
        "temperature": {"hypergrad": [1.0, 2.0], "finite_difference": [1.0, 2.0],
                        "rel_error": [0.0, 2e-3]},
    }  # fmt: skip
    monkeypatch.setattr(metakd.runs.run, "check_grad", lambda cfg, eps=1e-3, **kw: result_ok)
    result = invoke("check-grad", "--eps", "1e-4")
    assert result.exit_code == 0, result.output
    assert "beta1" in result.stdout and "max relative error 0.002" in result.stdout
    assert "OK" in result.stdout
    bad = {"beta1": {"hypergrad": 0.1, "finite_difference": 0.2, "rel_error": 0.5}}
    monkeypatch.setattr(metakd.runs.run, "check_grad", lambda cfg, eps=1e-3, **kw: bad)
    result = invoke("check-grad")
    assert result.exit_code == 3 and "MISMATCH" in result.stdout
    tiny = {
        "beta1": {"hypergrad": -5.4e-11, "finite_difference": -9.7e-11, "rel_error": 0.44,
                  "resolution": 2e-12, "resolved": True, "val_loss": 0.67},
        "beta2": {"hypergrad": 2e-13, "finite_difference": 2.7e-13, "rel_error": 0.26,
                  "resolution": 2e-12, "resolved": False, "val_loss": 0.67},
    }  # fmt: skip
    monkeypatch.setattr(metakd.runs.run, "check_grad", lambda cfg, eps=1e-3, **kw: tiny)
    result = invoke("check-grad")
    assert result.exit_code == 3
    assert "UNRESOLVED: beta2:" in result.stdout and "OK" not in result.stdout
    assert "scale: max |hypergradient|, |finite difference| = 9.7e-11" in result.stdout
    assert "Error: the hypergradient of beta2 is below the check's resolution (2e-12)" in (
        result.stderr
    )
    tiny.pop("beta2")
    result = invoke("check-grad")
    assert result.exit_code == 3 and "MISMATCH" in result.stdout
    assert "below the float32 round-off of L_val" in result.stdout


def test_check_grad_default_is_well_above_float_noise(tmp_path, monkeypatch):
    """Without a CONFIG the check runs where the hypergradient is ~1e-4 (issue 23, item 1), shows
    the scale and passes; the train defaults' ~1e-10 would be float noise."""
    monkeypatch.chdir(tmp_path)
    result = invoke("check-grad", "teacher.epochs=200", "data.cache_dir=cache", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "η = 3, adam lr 0.05" in result.stdout and "OK" in result.stdout
    scale = float(result.stdout.split("finite difference| = ")[1].split(";")[0])
    floor = float(result.stdout.split("check resolution ")[1].split(" ")[0])
    assert scale > 1e-5 and floor < 1e-4 * scale


# η = 1 SGD at lr 0.5: a hypergradient of ~1e-2 (β1), far above the check's resolution; the
# finite-difference *method* (DARTS, error O(fd_eps²)) with a large fd_eps is a wrong hypergradient
# reached through the real code path (no monkeypatch): ~4 % off at fd_eps = 1, ~27 % at 3.
WRONG = ["teacher.epochs=200", "data.cache_dir=cache", "--device", "cpu", "train.optimizer=sgd",
         "train.lr=0.5", "meta.unroll=1", "meta.hypergrad.method=finite-difference"]  # fmt: skip


def _worst(stdout: str) -> float:
    return float(stdout.split("max relative error ")[1].split(" ")[0])


def test_check_grad_reports_a_wrong_hypergradient(tmp_path, monkeypatch):
    """A real check-grad of a deliberately wrong hypergradient (fd_eps = 3): MISMATCH, exit 3, the
    entries past --tol marked NO; at the default fd_eps = 0.01 the same setting passes (the O(ε²)
    error shrinks 9e4-fold), so the mismatch is the hypergradient's, not the check's."""
    monkeypatch.chdir(tmp_path)
    result = invoke("check-grad", *WRONG, "meta.hypergrad.fd_eps=3")
    assert result.exit_code == 3, result.output
    assert "(tolerance 0.01): MISMATCH" in result.stdout and "NO" in result.stdout
    assert _worst(result.stdout) > 0.1
    good = invoke("check-grad", *WRONG)
    assert good.exit_code == 0, good.output
    assert "(tolerance 0.01): OK" in good.stdout and _worst(good.stdout) < 0.01


def test_check_grad_tol_decides_a_borderline_case(tmp_path, monkeypatch):
    """fd_eps = 1: a relative error X of a few percent (exit 3 at the default --tol 0.01); the same
    check passes with --tol 5 % above X and fails 5 % below it (the run is deterministic, X is
    printed to 3 digits: 0.5 % at most)."""
    monkeypatch.chdir(tmp_path)
    first = invoke("check-grad", *WRONG, "meta.hypergrad.fd_eps=1")
    assert first.exit_code == 3, first.output
    worst = _worst(first.stdout)
    assert 0.01 < worst < 0.1
    above = invoke("check-grad", *WRONG, "meta.hypergrad.fd_eps=1", "--tol", f"{1.05 * worst:.5g}")
    assert above.exit_code == 0, above.output
    assert f"(tolerance {1.05 * worst:.5g}): OK" in above.stdout
    below = invoke("check-grad", *WRONG, "meta.hypergrad.fd_eps=1", "--tol", f"{0.95 * worst:.5g}")
    assert below.exit_code == 3 and f"(tolerance {0.95 * worst:.5g}): MISMATCH" in below.stdout


# --------------------------------------------------------------------------- real runs

HAS_RUN = importlib.util.find_spec("metakd.runs.run") is not None


@pytest.mark.skipif(not HAS_RUN, reason="metakd.runs.run is not available")
def test_tiny_real_train(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    result = invoke(
        "train", "train.epochs=50", "teacher.epochs=50", "train.eval_every=10",
        "wandb.mode=disabled", "data.cache_dir=cache", "--device", "cpu", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "run.log"):
        assert (out / name).is_file(), name
    assert list((out / "checkpoints").glob("*.pt"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hypergradient_steps"] == 50
    assert f"Run directory: {out}" in result.stdout
    assert f"test accuracy        {summary['test_accuracy']:.4f}" in result.stdout
    assert "step 50/50" in result.stderr  # progress on stderr, plain lines when not a terminal
    # the in-process teacher says it trains, shows its epochs, and is not retrained by the next run
    assert "teacher: training the in-process teacher logreg (50 epochs" in result.stderr
    assert "teacher: epoch 50/50" in result.stderr
    again = invoke(
        "train", "train.epochs=5", "teacher.epochs=50", "wandb.mode=disabled",
        "data.cache_dir=cache", "--device", "cpu", "--out", tmp_path / "again",
    )  # fmt: skip
    assert again.exit_code == 0, again.output
    assert "teacher logits: cached" in again.stderr and "not recomputed" in again.stderr
    assert "teacher: training" not in again.stderr and "teacher: epoch" not in again.stderr
    # the resolved config in the run directory reloads to the same config
    assert load_config(out / "config.yaml") == load_config(
        None, ["train.epochs=50", "teacher.epochs=50", "train.eval_every=10",
               "wandb.mode=disabled", "data.cache_dir=cache", "device=cpu", f"out={out}"],
    )  # fmt: skip


@pytest.mark.skipif(not HAS_RUN, reason="metakd.runs.run is not available")
def test_tiny_real_teacher(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "t" / "teacher.pt"
    result = invoke("teacher", "teacher.epochs=30", "--out", ckpt, "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    assert ckpt.is_file() and f"Teacher checkpoint: {ckpt}" in result.stdout
    assert "test_accuracy" in result.stdout
    again = invoke("teacher", "teacher.epochs=30", "--out", ckpt, "-q")
    assert again.exit_code == 2 and "--force" in again.stderr


def test_check_grad_checks_a_users_method_by_import_path(tmp_path, monkeypatch):
    """check-grad runs a user's method (import path) through the trainer's seam: the recording
    look-ahead passes, one returning 1.5x the hypergradient exits 3 with a relative error of 1/3."""
    monkeypatch.chdir(tmp_path)
    ok = invoke("check-grad", "meta.hypergrad.method=plugins.my_method:RecordingLookAhead")
    assert ok.exit_code == 0, ok.output
    wrong = invoke("check-grad", "meta.hypergrad.method=plugins.my_method:ScaledLookAhead")
    assert wrong.exit_code == 3, wrong.output
    assert abs(_worst(wrong.stdout) - 1 / 3) < 1e-3  # |1.5 g - g| / |1.5 g|
