"""torch's threads per run: the user's choice wins, small work runs on one thread, and it is undone."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from metakd import threads
from metakd.runs.config import load_config
from metakd.runs.run import train_run
from metakd.training.trainer import Callback


@pytest.fixture
def nobody_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    """No environment variable, no set_threads, and torch at its count 'at import' (here: 2)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    torch.set_num_threads(2)
    monkeypatch.setitem(threads._state, "user", None)
    monkeypatch.setitem(threads._state, "base", 2)
    monkeypatch.setitem(threads._state, "auto", None)


def test_work_size_and_choice(nobody_chose: None) -> None:
    assert threads.work_size(15, (2,), 6) == 36  # the synthetic default's logistic regression
    assert threads.work_size(128, (3, 32, 32), 15_050) == 128 * 3072 + 15_050  # CIFAR student
    n, reason = threads.choose_threads(36)
    assert n == 1 and "36 < 262,144" in reason
    n, reason = threads.choose_threads(128 * 3072 + 15_050)
    assert n == 2 and "torch's default" in reason
    assert torch.get_num_threads() == 2  # choosing changes nothing


@pytest.mark.parametrize("how", ["env", "set_threads", "torch"])
def test_the_users_choice_wins(
    nobody_chose: None, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    if how == "env":
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        expected = "OMP_NUM_THREADS=2"
    elif how == "set_threads":
        threads.set_threads(2)
        expected = "threads=2 (--threads)"
    else:
        torch.set_num_threads(1)
        expected = "torch.set_num_threads(1)"
    n, reason = threads.choose_threads(36)
    assert n == torch.get_num_threads() and reason == f"set by {expected}"
    with pytest.raises(ValueError, match="threads must be >= 1"):
        threads.set_threads(0)


def test_run_threads_sets_logs_and_restores(
    nobody_chose: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="metakd.threads"), threads.run_threads(36) as n:
        assert n == 1 and torch.get_num_threads() == 1
        assert threads.user_choice() is None  # our own choice is not mistaken for the user's
    assert torch.get_num_threads() == 2
    assert "torch threads: 1 (work per step 36 < 262,144 elements)" in caplog.text


def test_a_run_uses_the_chosen_threads(
    nobody_chose: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(
        None, ["train.epochs=3", "teacher.epochs=3", f"data.cache_dir={tmp_path / 'cache'}"]
    )
    seen: list[int] = []

    class Probe(Callback):
        def on_step(self, row: dict) -> None:
            seen.append(torch.get_num_threads())

    with caplog.at_level(logging.INFO, logger="metakd"):
        train_run(cfg, tmp_path / "run", callbacks=[Probe()])
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    # 15 rows x 3 inputs + 8 parameters of the logistic regression
    assert "torch threads: 1 (work per step 53 < 262,144 elements)" in caplog.text
    assert "torch threads: 1" in (tmp_path / "run" / "run.log").read_text()
