"""``metakd train --nproc 2`` (torchrun's launcher, gloo on the CPU): rank 0 alone writes the run
directory; one process reproduces its λ; a rank killed with SIGKILL ends the run with one line naming
it, and ``--resume`` finishes with the summary of the uninterrupted two-rank run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

ARGS = [
    "data.n_train=24", "data.n_val=16", "train.batch_size=8", "train.epochs=120",
    "train.optimizer=sgd", "train.lr=0.2", "train.momentum=0.9", "meta.unroll=2", "meta.every=2",
    "meta.lr=0.5", "teacher.epochs=300", "train.checkpoint_every=10", "train.eval_every=60",
    "train.compile=off",
]  # fmt: skip


def _env(cache: Path, marker: str = "") -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "METAKD_TEST_MARK": marker,
            "OMP_NUM_THREADS": "1"}  # fmt: skip


def _train(out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "metakd_cli.main", "train", *ARGS, f"data.cache_dir={cache}",
           "--out", str(out), "-q", *extra]  # fmt: skip
    return subprocess.run(cmd, env=_env(cache), capture_output=True, text=True, timeout=240)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted two-rank run (and its cache dir)."""
    root = tmp_path_factory.mktemp("ddp")
    cache = root / "cache"
    res = _train(root / "ref", cache, "--nproc", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    return root / "ref", cache


def test_rank_zero_alone_writes_and_one_process_has_the_same_lambda(two_ranks, tmp_path) -> None:
    ref, cache = two_ranks
    one = _train(tmp_path / "one", cache)
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = _summary(ref), _summary(tmp_path / "one")
    assert a["world_size"] == 2 and b["world_size"] == 1
    for name, raw in b[
        "meta_raw"
    ].items():  # float32 sums in another order (tests/test_distributed.py)
        assert abs(a["meta_raw"][name] - raw) <= 1e-5 * max(1.0, abs(raw)), name
    # one writer: the rows of one process, one config, one log, no second run directory
    rows = (ref / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines())
    assert len({json.loads(r)["step"] for r in rows}) == len(rows)
    assert sorted(p.name for p in ref.iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    assert a["cost"]["plain_runs"] is not None  # priced in plain runs of two ranks


def _rank_pid(marker: str, rank: int) -> int | None:
    """The PID of the worker of ``rank`` started with METAKD_TEST_MARK=marker (from /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(
                kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv
            )
        except OSError:
            continue
        if env.get("METAKD_TEST_MARK") == marker and env.get("RANK") == str(rank):
            return int(proc.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's PID in /proc")
def test_a_killed_rank_ends_the_run_in_one_line_and_resume_finishes_it(two_ranks, tmp_path) -> None:
    ref, cache = two_ranks
    out, marker = tmp_path / "run", uuid.uuid4().hex
    cmd = [sys.executable, "-m", "metakd_cli.main", "train", *ARGS, f"data.cache_dir={cache}",
           "--out", str(out), "-q", "--nproc", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(cache, marker), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("epoch-*.pt")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    pid = _rank_pid(marker, 1)
    assert pid is not None and proc.poll() is None, "the run ended before a rank could be killed"
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - killed < 60  # torchrun's agent stops the survivor (monitor 0.5 s)
    assert proc.returncode == 2
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"rank 1 (pid {pid}) was killed by SIGKILL" in errors[0], err[
        -2000:
    ]
    assert "Traceback" not in err
    assert not (out / "summary.json").exists() and list((out / "checkpoints").glob("epoch-*.pt"))
    resumed = _train(out, cache, "--resume", "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _summary(ref), _summary(out)
    assert b["meta_raw"] == a["meta_raw"] and b["test_accuracy"] == a["test_accuracy"]
    final_a = torch.load(ref / "checkpoints" / "epoch-00120.pt", weights_only=True)["trainer"]
    final_b = torch.load(out / "checkpoints" / "epoch-00120.pt", weights_only=True)["trainer"]
    for name, w in final_a["model"].items():
        assert torch.equal(final_b["model"][name], w), name


def test_the_failure_line_names_the_rank_that_died_not_the_survivor_it_aborted(tmp_path) -> None:
    """torchrun records failures with whole-second timestamps, so a survivor's gloo abort (SIGABRT) or
    peer-loss exit (code 1) often ties with the rank that was killed: the line names the killed rank,
    whatever the rank order; with knock-on failures only, the earliest one (torch's ProcessFailure)."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from metakd_cli.launch import first_failure

    def failure(rank: int, pid: int, code: int, timestamp: int) -> ProcessFailure:
        f = ProcessFailure(rank, pid, code, str(tmp_path / f"missing-{rank}.json"))
        f.timestamp = timestamp
        return f

    aborted, killed = failure(0, 100, -signal.SIGABRT, 50), failure(1, 101, -signal.SIGKILL, 50)
    line = "rank 1 (pid 101) was killed by SIGKILL (1 more rank(s) stopped)"
    assert first_failure({0: aborted, 1: killed}) == line
    assert first_failure({0: aborted, 1: failure(1, 101, -signal.SIGKILL, 51)}) == line
    assert first_failure({1: killed}) == "rank 1 (pid 101) was killed by SIGKILL"
    # a user error on rank 1 (exit 1) and the peer it stopped (exit 1): the earlier one
    knocks = {0: failure(0, 100, 1, 52), 1: failure(1, 101, 1, 51)}
    assert first_failure(knocks) == "rank 1 (pid 101) exited with code 1 (1 more rank(s) stopped)"
