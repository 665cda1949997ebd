"""Checkpoint and resume: a run killed by SIGKILL and resumed in a fresh process ends exactly as an
uninterrupted run; a corrupt newest checkpoint falls back to the previous one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metakd.runs.config import load_config
from metakd.runs.run import train_run
from metakd.runs.rundir import RunDir

EXACT = (
    "meta", "meta_raw", "test_accuracy", "best_test_accuracy", "val_accuracy", "best_val_accuracy",
    "train_loss", "test_loss", "hypergradient_steps", "predicted_steps", "skipped_meta_steps",
    "steps", "epochs",
)  # fmt: skip

DRIVER = """
import json, sys, time
import torch
torch.set_num_threads(1)
from metakd.runs.config import load_config
from metakd.runs.run import train_run
from metakd.training.trainer import Callback

args = json.loads(sys.argv[1])

class Slow(Callback):  # gives the test time to kill the run between checkpoints
    def on_step(self, row):
        time.sleep(args["sleep"])
    on_eval = on_step

train_run(load_config(None, args["overrides"]), args["out"], resume=args["resume"],
          callbacks=[Slow()] if args["sleep"] else [])
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Run A, uninterrupted, in this process (the teacher-logit cache is shared with the others)."""
    root = tmp_path_factory.mktemp("resume")
    overrides = [
        "device=cpu", "seed=3", "teacher.epochs=200", f"data.cache_dir={root / 'cache'}",
        "meta.method=forecast", "meta.optimizer=adam", "meta.lr=0.1", "forecast.window=7",
        "train.epochs=40", "train.batch_size=4", "train.eval_every=9", "train.log_every=3",
        "train.lr=0.05", "train.checkpoint_every=5", "wandb.mode=disabled",
    ]  # fmt: skip
    torch.set_num_threads(1)
    summary = train_run(load_config(None, overrides), root / "A")
    return {"root": root, "overrides": overrides, "summary": summary}


def _driver(root: Path, overrides: list[str], out: Path, resume: bool, sleep: float) -> list[str]:
    script = root / "driver.py"
    script.write_text(DRIVER)
    args = {"overrides": overrides, "out": str(out), "resume": resume, "sleep": sleep}
    return [sys.executable, str(script), json.dumps(args)]


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "step_time"} for r in RunDir(run).read_metrics()]


def test_killed_run_resumes_in_a_fresh_process_to_the_same_summary(setup):
    root, overrides, a = setup["root"], setup["overrides"], setup["summary"]
    run_b = root / "B"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_driver(root, overrides, run_b, False, 0.01), cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = RunDir(run_b).checkpoints() if run_b.exists() else []
            if done and int(done[0].stem.split("-")[1]) >= 10:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"run B ended before it could be killed: {proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_b / "summary.json").exists()
    newest = int(RunDir(run_b).checkpoints()[0].stem.split("-")[1])
    assert 10 <= newest < 40

    resumed = subprocess.run(_driver(root, overrides, run_b, True, 0.0), cwd=root, env=env,
                             capture_output=True, text=True, timeout=240)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    b = json.loads((run_b / "summary.json").read_text())
    for key in EXACT:
        assert b[key] == a[key], key
    assert _rows(run_b) == _rows(root / "A")  # the whole record, row for row


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(setup, caplog):
    root, overrides, a = setup["root"], setup["overrides"], setup["summary"]
    run_c = root / "C"
    shutil.copytree(root / "A", run_c)
    newest, previous = RunDir(run_c).checkpoints()
    assert (newest.name, previous.name) == ("epoch-00040.pt", "epoch-00035.pt")
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn file
    with caplog.at_level("WARNING", logger="metakd"):
        c = train_run(load_config(None, overrides), run_c, resume=True)
    falls = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert len(falls) == 1, falls  # one warning, not one per channel
    assert "epoch-00040.pt is corrupt" in falls[0] and "falling back to epoch-00035.pt" in falls[0]
    for key in EXACT:
        assert c[key] == a[key], key
    assert _rows(run_c) == _rows(root / "A")


def test_no_valid_checkpoint_is_a_clear_error(tmp_path):
    rd = RunDir(tmp_path)
    rd.save_checkpoint({"x": torch.ones(2)}, 1)
    rd.save_checkpoint({"x": torch.zeros(2)}, 2)
    rd.save_checkpoint({"x": torch.full((2,), 3.0)}, 3)
    assert [p.name for p in rd.checkpoints()] == ["epoch-00003.pt", "epoch-00002.pt"]
    assert torch.equal(rd.load_checkpoint()["x"], torch.full((2,), 3.0))
    for p in rd.checkpoints():
        p.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"no valid checkpoint.*--out"):
        rd.load_checkpoint()
