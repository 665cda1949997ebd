"""The command line starts light (no torch before a command runs: ``--help`` is fast), the facade
``import metakd`` imports its names on first use, and the W&B mode's precedence: ``--wandb``, then
W&B's own ``WANDB_MODE`` environment variable, then the config's ``wandb.mode``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metakd_cli.app import load_cli_config
from metakd_cli.main import COMMANDS, app

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "optuna", "matplotlib", "wandb")
runner = CliRunner()


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


# --------------------------------------------------------------------------- light start


def test_importing_the_cli_imports_nothing_heavy():
    proc = _python(
        f"""
        import sys
        import metakd_cli.main
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_help_of_every_command_without_torch():
    proc = _python(
        f"""
        import sys
        from typer.testing import CliRunner
        from metakd_cli.main import app
        runner = CliRunner()
        for cmd in ([], *([c] for c in {COMMANDS!r})):
            result = runner.invoke(app, [*cmd, "--help"])
            assert result.exit_code == 0, (cmd, result.output)
            assert "Usage" in result.output, (cmd, result.output)
            heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
            assert not heavy, (cmd, heavy)
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_facade_imports_its_names_on_first_use():
    proc = _python(
        """
        import sys
        import metakd
        import metakd.config
        assert "torch" not in sys.modules, "import metakd imported torch"
        assert metakd.__version__
        assert set(metakd.__all__) <= set(dir(metakd))
        from metakd import hypergradient
        import metakd.functional.optim, metakd.functional.losses, metakd.functional.metaparams
        from metakd.hypergrad import hypergradient as core
        assert hypergradient is core is metakd.hypergradient
        assert metakd.optim is metakd.functional.optim
        assert metakd.losses is metakd.functional.losses
        assert metakd.metaparams is metakd.functional.metaparams
        from metakd.functional.nn import FunctionalModel
        assert metakd.FunctionalModel is FunctionalModel
        for name in metakd.__all__:
            getattr(metakd, name)
        try:
            metakd.no_such_name
        except AttributeError as exc:
            assert "no_such_name" in str(exc)
        else:
            raise AssertionError("metakd.no_such_name did not raise")
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# --------------------------------------------------------------------------- W&B mode precedence


@pytest.fixture
def offline_config(tmp_path):
    path = tmp_path / "offline.yaml"
    path.write_text("wandb:\n  mode: offline\n")
    return str(path)


@pytest.fixture
def captured_train(monkeypatch, tmp_path):
    """metakd.runs.run.train_run replaced by one that records the config it gets (no training, no
    W&B run is opened)."""
    import metakd.runs.run

    seen: list = []

    def train_run(cfg, run_dir=None, *, resume=False, callbacks=()):
        seen.append(cfg)
        return {"run_dir": str(run_dir or tmp_path / "run")}

    monkeypatch.setattr(metakd.runs.run, "train_run", train_run)
    return seen


def test_wandb_mode_env_wins_over_config(monkeypatch, offline_config):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert load_cli_config([offline_config], wandb_env=True).wandb.mode == "disabled"


def test_wandb_option_wins_over_env(monkeypatch, offline_config):
    from metakd_cli.app import WandbMode

    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = load_cli_config([offline_config], wandb=WandbMode.offline, wandb_env=True)
    assert cfg.wandb.mode == "offline"


def test_wandb_mode_config_without_env_or_option(monkeypatch, offline_config):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert load_cli_config([offline_config], wandb_env=True).wandb.mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "")  # empty: unset
    assert load_cli_config([offline_config], wandb_env=True).wandb.mode == "offline"


def test_wandb_mode_env_aliases(monkeypatch, offline_config):
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # W&B's old name of offline
    assert (
        load_cli_config([offline_config, "wandb.mode=online"], wandb_env=True).wandb.mode
        == "offline"
    )


def test_commands_without_wandb_ignore_the_env(monkeypatch, offline_config):
    """teacher and check-grad log nothing to W&B: WANDB_MODE neither changes nor breaks them."""
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    assert load_cli_config([offline_config]).wandb.mode == "offline"


def test_train_honours_wandb_mode_env(monkeypatch, offline_config, captured_train, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    result = runner.invoke(app, ["train", offline_config, "--out", str(tmp_path / "a"), "-q"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["train", offline_config, "--out", str(tmp_path / "b"), "--wandb", "offline", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert [cfg.wandb.mode for cfg in captured_train] == ["disabled", "offline"]


def test_bad_wandb_mode_env_is_one_error_line(monkeypatch, offline_config, captured_train):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    result = runner.invoke(app, ["train", offline_config, "-q"])
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: the environment variable WANDB_MODE='sometimes'")
    assert "Traceback" not in result.output and captured_train == []
    # an explicit --wandb does not consult the variable
    result = runner.invoke(app, ["train", offline_config, "--wandb", "disabled", "-q"])
    assert result.exit_code == 0, result.output


def test_teacher_help_says_it_logs_nothing_to_wandb():
    result = runner.invoke(app, ["teacher", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Logs nothing to W&B" in result.output
    assert "--wandb" in result.output  # named in that sentence, but no such option:
    assert runner.invoke(app, ["teacher", "--wandb", "offline"]).exit_code == 2
