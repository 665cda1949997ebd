"""Errors at the start of a run: messages that say what is wrong, and no empty run directories
left behind (issue 23, item 9)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import metakd.runs.build
from metakd.config import ConfigError
from metakd.runs.config import load_config
from metakd.runs.run import train_run
from metakd_cli.main import app

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def _cfg(tmp_path: Path, *overrides: str):
    base = ["device=cpu", "teacher.epochs=5", "train.epochs=4", "wandb.mode=disabled"]
    return load_config(None, [*base, f"data.cache_dir={tmp_path / 'cache'}", *overrides])


def test_a_directory_as_config_says_it_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"is a directory; pass a YAML file"):
        load_config(tmp_path)
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(ConfigError, match=r"is a directory.*a run directory: its config\.yaml"):
        load_config(tmp_path)


def test_a_directory_as_teacher_checkpoint_fails_before_the_run_dir(tmp_path):
    folder = tmp_path / "teachers"
    folder.mkdir()
    out = tmp_path / "run"
    with pytest.raises(
        IsADirectoryError, match=r"teacher checkpoint .* is a directory; pass the \.pt"
    ):
        train_run(_cfg(tmp_path, f"teacher.checkpoint={folder}"), out)
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_run(_cfg(tmp_path, f"teacher.checkpoint={folder / 'no.pt'}"), out)
    assert not out.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["seed=-1"],
        ["seed=100000000000000000000"],
        ["--seed", "-1"],
        ["--seed", "100000000000000000000"],
    ],
)
def test_seed_out_of_range_is_refused_before_a_run_dir(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    result = invoke("train", *args, "wandb.mode=disabled", "-q")
    assert result.exit_code == 2, result.output
    assert "seed" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_an_error_whose_fix_is_a_new_out_gets_no_resume_hint(tmp_path, monkeypatch):
    def train_run(cfg, run_dir=None, *, resume=False, callbacks=()):
        Path(run_dir).mkdir(parents=True)
        raise ValueError("the data changed since its checkpoint; start a new run with a new --out")

    monkeypatch.setattr(metakd.runs.run, "train_run", train_run)
    result = invoke("train", "--out", tmp_path / "r", "-q")
    assert result.exit_code == 2
    assert "new --out" in result.stderr and "--resume" not in result.stderr


def test_teacher_out_directory_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    for extra in ([], ["--force"]):
        result = invoke("teacher", "teacher.epochs=100000", "--out", "adir", *extra, "-q")
        assert result.exit_code == 2, result.output
        assert "Error: --out adir is a directory; give the checkpoint file" in result.stderr
        assert ".tmp" not in result.stderr and "already exists" not in result.stderr


def test_a_failed_start_writes_its_error_into_run_log(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("data.root holds no images")

    monkeypatch.setattr(metakd.runs.build.data, "load_data", broken)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="no images"):
        train_run(_cfg(tmp_path), out)
    log = (out / "run.log").read_text()
    assert "ERROR metakd.runs.run: run failed: ValueError: data.root holds no images" in log


def test_experiment_seeds_out_of_range_are_refused():
    from metakd_cli.app import parse_seeds

    with pytest.raises(ConfigError, match=r"seeds must be 0 \.\. 2\*\*32 - 1, got \[-1\]"):
        parse_seeds("-1,2")
    with pytest.raises(ConfigError, match="4294967296"):
        parse_seeds("2", first=2**32 - 1)
    assert parse_seeds("2", first=2**32 - 2) == [2**32 - 2, 2**32 - 1]
