"""The bound warning (metakd.training.diagnostics): a metaparameter at its bound for a tenth of the run."""

from __future__ import annotations

import logging

import pytest
import torch

from metakd.config import Config, MetaParamSpec
from metakd.data import Split, Splits
from metakd.runs.config import load_config
from metakd.training.diagnostics import BoundWatch
from metakd.training.trainer import Trainer

T_SPEC = MetaParamSpec(lo=0.1, hi=10.0)


def test_warns_once_after_patience_meta_steps_at_the_lower_bound() -> None:
    watch = BoundWatch({"temperature": T_SPEC}, planned_meta_steps=1000, patience=100)
    at_floor = {"temperature": torch.tensor(-6.0)}  # σ(-6) = 0.0025 < 1 %: T = 0.125
    due = [i for i in range(1, 301) if watch.update(at_floor)]
    assert due == [100]  # the 100th meta step at the bound, and only once


def test_leaving_the_bound_restarts_the_count() -> None:
    watch = BoundWatch({"temperature": T_SPEC}, planned_meta_steps=1000, patience=100)
    inside = {"temperature": torch.tensor(-4.0)}  # σ(-4) = 0.018: 1.8 % of the range, not at it
    at_floor = {"temperature": torch.tensor(-6.0)}
    messages = [watch.update(at_floor if i % 80 else inside) for i in range(1, 401)]
    assert not any(messages)  # never 100 steps in a row at the bound


def test_the_upper_bound_and_softplus_floor_count_too() -> None:
    specs = {
        "beta": MetaParamSpec(lo=0.0, hi=1.0),
        "lr": MetaParamSpec(constraint="softplus", lo=0.0),
    }
    watch = BoundWatch(specs, planned_meta_steps=100, patience=10)
    raw = {"beta": torch.tensor(7.0), "lr": torch.tensor(-9.0)}  # σ(7) > 0.99; softplus(-9) ~ 1e-4
    messages = [m for _ in range(10) for m in watch.update(raw)]
    assert len(messages) == 2
    assert "beta has sat at its upper bound 1" in messages[0]
    assert "lr has sat at its lower bound 0" in messages[1]


def _task() -> Splits:
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        x = torch.randn(n, 3, generator=gen)
        return Split(x, (x[:, 0] * x[:, 1] > 0).long(), x)

    return Splits(split(4), split(15), split(15), split(20), num_classes=2, info={})


def test_a_run_whose_temperature_sits_at_its_floor_says_so(caplog) -> None:
    # T starts at its floor and a tiny meta lr keeps it there: 400 meta steps, patience 100
    cfg: Config = load_config(None, [
        "train.epochs=400", "meta.lr=1e-9", "meta.params.temperature.init=0.1001",
        "meta.params.beta1.init=0.5", "train.compile=off",
    ])  # fmt: skip
    splits = _task()
    logits = {k: torch.zeros(len(getattr(splits, k)), 2) for k in ("train", "val", "test")}
    trainer = Trainer(cfg, torch.nn.Linear(3, 2), splits, logits, device="cpu")
    with caplog.at_level(logging.WARNING, logger="metakd"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "has sat at its" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("λ temperature has sat at its lower bound 0.1")


def test_a_step_size_that_overflows_float32_is_a_divergence_naming_train_lr() -> None:
    # Adam's first step size lr / (1 - β1) = 1e39 > float32's 3.4e38: torch raises a RuntimeError
    cfg: Config = load_config(None, ["train.epochs=5", "train.lr=1e38", "train.compile=off"])
    splits = _task()
    logits = {k: torch.zeros(len(getattr(splits, k)), 2) for k in ("train", "val", "test")}
    trainer = Trainer(cfg, torch.nn.Linear(3, 2), splits, logits, device="cpu")
    with pytest.raises(FloatingPointError, match=r"overflowed float32 at step 1 .*train\.lr"):
        trainer.train()
