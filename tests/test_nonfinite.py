"""Numbers that must not pass silently (issue 23, item 10): non-finite or out-of-range config
values, runs whose meta steps all failed, and a divergence message that names the right knob."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import metakd.hypergrad
from metakd.config import ConfigError
from metakd.hypergrad import HypergradResult
from metakd.runs.config import load_config
from metakd.runs.run import train_run
from metakd_cli.main import app


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def _cfg(cache: str, *overrides: str):
    base = ["device=cpu", "teacher.epochs=50", "train.epochs=12", "wandb.mode=disabled"]
    return load_config(None, [*base, f"data.cache_dir={cache}", *overrides])


def _fake(values: list[float]):
    """A hypergradient that returns values[i % len] for the i-th call (finite flag to match)."""
    calls = [0]

    def hypergradient(train_loss, val_loss, params, meta, *args, **kwargs):
        value = values[calls[0] % len(values)]
        calls[0] += 1
        grads = {k: torch.full_like(v, value) for k, v in meta.items()}
        return HypergradResult(grads, dict(params), 0.0, finite=math.isfinite(value))

    return hypergradient


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("meta.lr=.inf", "meta.lr"),
        ("train.lr=.nan", "train.lr"),
        ("meta.lr_end=.inf", "meta.lr_end"),
        ("meta.params.temperature.lo=0", "temperature must stay > 0"),
        ("meta.params.temperature.lo=-1", "temperature must stay > 0"),
        ("meta.params.temperature.constraint=identity", "temperature must stay > 0"),
        ("meta.values.temperature=0", "values.temperature must be > 0"),
    ],
)
def test_non_finite_and_out_of_range_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_exp_temperature_and_positive_lo_are_accepted():
    assert load_config(None, ["meta.params.temperature.constraint=exp"]).meta.params
    assert load_config(None, ["meta.params.temperature.lo=0.01"]).meta.params


def test_a_run_whose_every_meta_step_failed_ends_failed(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(metakd.hypergrad, "hypergradient", _fake([math.nan]))
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"every meta step was skipped \(12 of 12\)"):
        train_run(_cfg(cache), out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "never finite" in summary["error"]
    assert summary["skipped_meta_steps"] == summary["hypergradient_steps"] == 12


def test_skipped_meta_steps_are_in_the_summary_line(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(metakd.hypergrad, "hypergradient", _fake([0.0, math.nan, 0.0]))
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["train", "teacher.epochs=50", "train.epochs=12", "wandb.mode=disabled",
         f"data.cache_dir={cache}", "--device", "cpu", "--out", str(out), "-q"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert "hypergradient steps  12 (predicted 0, skipped as non-finite 4)" in result.stdout


def test_a_tiny_temperature_is_named_as_the_cause_not_train_lr(cache, tmp_path):
    cfg = _cfg(
        cache, "meta.method=fixed", "meta.values.beta1=0.5", "meta.values.beta2=0.5",
        "meta.values.temperature=1e-45", "meta.params.temperature.lo=1e-46",
        "meta.params.temperature.hi=1e-20",
    )  # fmt: skip
    with pytest.raises(
        FloatingPointError, match=r"the temperature is 1\.4e-45: raise meta\.params"
    ):
        train_run(cfg, Path(tmp_path) / "run")


def test_non_finite_metaparameters_are_named_as_the_cause(cache, tmp_path, monkeypatch):
    import metakd.training.trainer

    def lambdas(self, raw=None):
        return {"beta1": torch.tensor(math.nan), "beta2": 0.5, "temperature": 2.0}

    monkeypatch.setattr(metakd.training.trainer.Trainer, "lambdas", lambdas)
    with pytest.raises(FloatingPointError, match=r"beta1 are not finite.*lower meta\.lr") as info:
        train_run(_cfg(cache), Path(tmp_path) / "run")
    assert "train.lr" not in str(info.value)
