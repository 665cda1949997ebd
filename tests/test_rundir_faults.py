"""Fault injection on run directories (issue 23, items 3, 4, 6, 7, 8): a run directory never loses or
silently replaces a result, and every fault is one ``Error:`` line (exit 2) or one warning."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from metakd.config import ConfigError
from metakd.runs.config import load_config
from metakd.runs.run import train_run
from metakd.runs.rundir import DiskFullError, RunDir, RunDirLockedError, atomic_torch_save, lock_dir
from metakd_cli.main import app

runner = CliRunner()

OVERRIDES = [
    "device=cpu", "train.epochs=20", "teacher.epochs=20", "train.eval_every=10",
    "train.checkpoint_every=5", "train.log_every=1", "wandb.mode=disabled",
]  # fmt: skip
EXACT = ("meta", "meta_raw", "test_accuracy", "best_test_accuracy", "val_accuracy", "steps")


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _error_lines(text: str) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    """One finished run (checkpoints at epochs 15 and 20); tests copy it before damaging it."""
    root = tmp_path_factory.mktemp("faults")
    overrides = [*OVERRIDES, f"data.cache_dir={root / 'cache'}"]
    torch.set_num_threads(1)
    summary = train_run(load_config(None, overrides), root / "A")
    return {"root": root, "overrides": overrides, "summary": summary, "run": root / "A"}


def _copy(finished: dict, tmp_path: Path, name: str = "run") -> Path:
    dest = tmp_path / name
    shutil.copytree(finished["run"], dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


# --------------------------------------------------------------------------- item 3


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "is empty"),
        (b"- 1\n- 2\n", "holds a list"),
        (b"seed: [1\n", "not valid YAML"),
        (b"seed: 1\n\xff\xfe\n", "not UTF-8"),
    ],
)
def test_resume_refuses_an_unreadable_config_and_keeps_the_summary(
    finished, tmp_path, content, says
):
    run = _copy(finished, tmp_path)
    (run / "config.yaml").write_bytes(content)
    before = {p.name: p.read_bytes() for p in (run / "summary.json", run / "metrics.jsonl")}
    result = invoke("train", "--resume", run, "-q")
    assert result.exit_code == 2, result.output
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert str(run / "config.yaml") in lines[0] and says in lines[0]
    assert "Traceback" not in result.output
    # the library refuses too (a config given in code does not replace the unreadable one)
    with pytest.raises(ConfigError, match=r"config\.yaml"):
        train_run(load_config(None, finished["overrides"]), run, resume=True)
    after = {p.name: p.read_bytes() for p in (run / "summary.json", run / "metrics.jsonl")}
    assert after == before and (run / "config.yaml").read_bytes() == content


# --------------------------------------------------------------------------- item 4


@pytest.mark.parametrize("damage", ["empty", "no-trainer"])
def test_bad_newest_checkpoint_falls_back_with_one_warning(finished, tmp_path, caplog, damage):
    run = _copy(finished, tmp_path)
    newest, previous = RunDir(run).checkpoints()
    assert (newest.name, previous.name) == ("epoch-00020.pt", "epoch-00015.pt")
    if damage == "empty":
        newest.write_bytes(b"")
    else:
        torch.save({"epoch": 20, "step": 20}, newest)  # a dict, but not a run checkpoint
    (run / "summary.json").unlink()
    with caplog.at_level("WARNING", logger="metakd"):
        summary = train_run(load_config(None, finished["overrides"]), run, resume=True)
    falls = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert len(falls) == 1, falls
    assert "epoch-00020.pt" in falls[0] and "falling back to epoch-00015.pt" in falls[0]
    assert ("empty file" if damage == "empty" else "'trainer'") in falls[0]
    for key in EXACT:  # resumed from epoch 15, the run ends as the uninterrupted one
        assert summary[key] == finished["summary"][key], key


def test_bad_checkpoint_warning_is_printed_once_on_the_cli(finished, tmp_path):
    run = _copy(finished, tmp_path)
    RunDir(run).checkpoints()[0].write_bytes(b"")
    result = invoke("train", "--resume", run, "--wandb", "disabled")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("falling back") == 1, result.stderr
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- item 6


def test_disk_full_in_an_atomic_write_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    def full_save(obj, fh):  # torch.save wraps the OSError in a RuntimeError, as on a full disk
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from exc

    monkeypatch.setattr(torch, "save", full_save)
    target = tmp_path / "checkpoints" / "epoch-00001.pt"
    with pytest.raises(DiskFullError) as info:
        atomic_torch_save({"x": 1}, target)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert list(target.parent.iterdir()) == []


def test_disk_full_during_a_run_is_one_line_with_the_resume_command(tmp_path, monkeypatch):
    import metakd.runs.run

    out = tmp_path / "run"

    def train_run(cfg, run_dir=None, *, resume=False, callbacks=()):
        Path(run_dir).mkdir(parents=True)
        (Path(run_dir) / "metrics.jsonl").write_text("{}\n")
        raise DiskFullError(errno.ENOSPC, "No space left on device", str(out / "metrics.jsonl"))

    monkeypatch.setattr(metakd.runs.run, "train_run", train_run)
    result = invoke("train", "--out", out, "--wandb", "disabled", "-q")
    assert result.exit_code == 2, result.output
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, lines
    assert "disk is full" in lines[0] and str(out / "metrics.jsonl") in lines[0]
    assert f"{out} is kept" in lines[0] and f"metakd train --resume {out}" in lines[0]
    assert (out / "metrics.jsonl").is_file()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 2 MB tmpfs, nearly filled (mount needs root: skipped where it is not permitted)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
            capture_output=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        free = shutil.disk_usage(mnt).free
        (mnt / "filler").write_bytes(b"\0" * (free - 60 * 1024))  # 60 KB left: a few checkpoints
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=10)


def test_disk_full_on_a_real_tmpfs(finished, tiny_tmpfs):
    out = tiny_tmpfs / "run"
    result = invoke(
        "train", *finished["overrides"], "train.epochs=400", "train.checkpoint_every=1",
        "--out", out, "-q",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, lines
    assert "disk is full" in lines[0] and str(out) in lines[0]
    assert f"metakd train --resume {out}" in lines[0]
    assert "Traceback" not in result.output
    assert (out / "config.yaml").is_file()  # the run directory is kept
    assert not [p for p in out.rglob("*.tmp")]
    (tiny_tmpfs / "filler").unlink()  # space freed: the run continues
    resumed = invoke("train", "--resume", out, "-q")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


# --------------------------------------------------------------------------- item 7

HOLDER = """
import sys, time
from metakd.runs.config import load_config
from metakd.runs.experiment import run_experiment
from metakd.runs.run import train_run
from metakd.training.trainer import Callback

class Slow(Callback):  # holds the run for a while
    def on_step(self, row):
        time.sleep(0.05)

kind, out, cfg = sys.argv[1], sys.argv[2], load_config(None, sys.argv[3:])
if kind == "train":
    train_run(cfg, out, callbacks=[Slow()])
else:
    run_experiment(cfg, methods=["baseline"], seeds=[0], out_dir=out, quiet=True,
                   callbacks_factory=lambda c, d: [Slow()])
"""


def _start_holder(tmp_path: Path, kind: str, out: Path, overrides: list[str]) -> subprocess.Popen:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(
        [sys.executable, str(script), kind, str(out), *overrides, "train.epochs=400"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    lock = out / ".lock"
    while time.monotonic() < deadline and proc.poll() is None:
        started = kind == "experiment" or (out / "metrics.jsonl").is_file()
        if started and lock.is_file() and lock.read_text().strip() == str(proc.pid):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the holder did not take the lock: {proc.stderr.read().decode()}")


def test_a_second_train_on_the_same_out_is_refused_naming_the_pid(finished, tmp_path):
    out = tmp_path / "shared"
    proc = _start_holder(tmp_path, "train", out, finished["overrides"])
    try:
        rows = (out / "metrics.jsonl").read_bytes()
        result = invoke("train", *finished["overrides"], "train.epochs=400", "--out", out, "-q")
        assert proc.poll() is None, "the first run must still be running"
        assert result.exit_code == 2, result.output
        lines = _error_lines(result.stderr)
        assert len(lines) == 1 and f"PID {proc.pid}" in lines[0] and str(out) in lines[0], lines
        assert (out / "metrics.jsonl").read_bytes().startswith(rows)  # not truncated
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with lock_dir(out):  # the kernel released the killed holder's lock
        pass


def test_a_second_experiment_on_the_same_out_is_refused_naming_the_pid(finished, tmp_path):
    out = tmp_path / "exp"
    proc = _start_holder(tmp_path, "experiment", out, finished["overrides"])
    try:
        result = invoke(
            "experiment", *finished["overrides"], "--out", out, "--seeds", "1",
            "--methods", "baseline", "-q",
        )  # fmt: skip
        assert result.exit_code == 2, result.output
        lines = _error_lines(result.stderr)
        assert len(lines) == 1 and f"PID {proc.pid}" in lines[0], lines
        with pytest.raises(RunDirLockedError, match=f"PID {proc.pid}"), lock_dir(out):
            pass
        assert proc.poll() is None, "the first experiment must still be running"
    finally:
        proc.kill()
        proc.wait(timeout=30)


# --------------------------------------------------------------------------- item 8


@pytest.mark.parametrize("command", ["train", "experiment", "report", "teacher"])
def test_out_naming_an_existing_file_is_one_error_line(finished, tmp_path, command):
    existing = tmp_path / "a-file"
    existing.write_text("keep me\n")
    args = {
        "train": ["train", "--out", existing],
        "experiment": ["experiment", "--out", existing, "--seeds", "1", "--methods", "baseline"],
        "report": ["report", finished["run"], "--out", existing],
        "teacher": ["teacher", "teacher.epochs=1", "--out", existing / "teacher.pt"],
    }[command]
    result = invoke(*args, "-q")
    assert result.exit_code == 2, result.output
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(existing) in lines[0], lines
    assert "--out" in lines[0]
    assert existing.read_text() == "keep me\n"


def test_a_huge_override_value_is_one_short_error_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("train", "name=" + "x" * 100_000, "device=cpu", "--wandb", "disabled", "-q")
    assert result.exit_code == 2, result.output[:2000]
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and "too long" in lines[0] and len(lines[0]) < 400, lines[0][:500]


def test_orphaned_temporary_files_are_removed_on_resume(finished, tmp_path):
    run = _copy(finished, tmp_path)
    orphans = [
        run / "checkpoints" / ".epoch-00025.pt.k3j2x9.tmp",  # a kill during a checkpoint write
        run / ".summary.json.a81bq0.tmp",
    ]
    for p in orphans:
        p.write_bytes(b"half a file")
    keep = run / "checkpoints" / "notes.txt"  # files that are not metakd's temporaries stay
    keep.write_text("mine\n")
    train_run(load_config(None, finished["overrides"]), run, resume=True)
    assert not [p for p in orphans if p.exists()]
    assert keep.read_text() == "mine\n"
    assert [p.name for p in RunDir(run).checkpoints()] == ["epoch-00020.pt", "epoch-00015.pt"]


# --------------------------------------------------------------------------- item 5 (resume)


@pytest.mark.parametrize("damage", ["truncated", "undecodable"])
def test_resume_warns_when_metrics_rows_were_lost(finished, tmp_path, caplog, damage):
    run = _copy(finished, tmp_path)
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    step15 = [i for i, line in enumerate(lines) if json.loads(line)["step"] <= 15]
    expected = len(step15)  # rows logged up to the epoch-15 checkpoint (the newest is made bad)
    RunDir(run).checkpoints()[0].write_bytes(b"")
    if damage == "truncated":
        text = b"".join(lines[: expected // 2]) + lines[expected // 2][:7]  # cut mid-row
    else:
        text = b"".join(lines[:2]) + b'{"step": \xff\xfe}\n' + b"".join(lines[3:])
    (run / "metrics.jsonl").write_bytes(text)
    with caplog.at_level("WARNING", logger="metakd"):
        train_run(load_config(None, finished["overrides"]), run, resume=True)
    lost = [r.getMessage() for r in caplog.records if "lost rows" in r.getMessage()]
    kept = expected // 2 if damage == "truncated" else expected - 1
    assert len(lost) == 1 and f"holds {kept} of the {expected} rows" in lost[0], lost
    assert "metrics.jsonl" in lost[0]


def test_resume_of_intact_metrics_does_not_warn(finished, tmp_path, caplog):
    run = _copy(finished, tmp_path)
    RunDir(run).checkpoints()[0].write_bytes(b"")
    with caplog.at_level("WARNING", logger="metakd"):
        train_run(load_config(None, finished["overrides"]), run, resume=True)
    assert not [r for r in caplog.records if "lost rows" in r.getMessage()]

    def rows(path: Path) -> list[dict]:
        return [
            {k: v for k, v in r.items() if k != "step_time"} for r in RunDir(path).read_metrics()
        ]

    assert rows(run) == rows(finished["run"])


def test_summary_records_the_original_command_and_each_resume(finished, tmp_path):
    run = tmp_path / "cmd"
    cfg = load_config(None, [*finished["overrides"], "train.epochs=10"])
    train_run(cfg, run, command="metakd train train.epochs=10 --out cmd")
    cfg20 = load_config(None, finished["overrides"])
    summary = train_run(
        cfg20, run, resume=True, command="metakd train --resume cmd train.epochs=20"
    )
    assert summary["command"] == "metakd train --resume cmd train.epochs=20"
    assert summary["commands"] == [
        "metakd train train.epochs=10 --out cmd", "metakd train --resume cmd train.epochs=20",
    ]  # fmt: skip
