"""The compiled reverse look-ahead (metakd.training.methods.compiled): the same training as the eager engine
(λ, weights, the torch optimizer's state), hypergradients equal to the eager reverse engine and to
the forward engine, exact resume, the train.compile plan, and a fallback when compilation fails.

Each compiled trainer compiles two functions (a few seconds each once torch's inductor cache is warm;
~45 s the first time on a machine), so the tests share trainers where they can."""

from __future__ import annotations

import logging

import pytest
import torch

from metakd import hypergrad
from metakd.bench import e2e as bench_e2e
from metakd.config import ConfigError
from metakd.data.models import build_model
from metakd.runs.config import load_config
from metakd.training.methods import CompiledLookAhead, LookAhead, compiled
from metakd.training.trainer import Trainer


def _trainer(mode: str, **train):
    cfg, splits, logits = bench_e2e._case("synthetic")
    cfg.train.compile = mode
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return bench_e2e._trainer(cfg, splits, logits)


def _assert_same_training(a: Trainer, b: Trainer, rtol: float = 1e-5) -> None:
    assert a.meta is not None and b.meta is not None
    for n in a.meta.names:
        torch.testing.assert_close(a.meta.raw[n], b.meta.raw[n], rtol=rtol, atol=1e-6, msg=n)
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-7, msg=k)
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sb:
        for key in sb[i]:
            torch.testing.assert_close(sa[i][key], sb[i][key], rtol=rtol, atol=1e-10, msg=key)


@pytest.fixture(scope="module")
def pair():
    """A compiled and an eager trainer of the synthetic default after the same 40 steps."""
    comp, eager = _trainer("on"), _trainer("off")
    assert type(comp.hypergrad_method) is CompiledLookAhead
    assert type(eager.hypergrad_method) is LookAhead
    for s in range(40):
        comp._one_step(s)
        eager._one_step(s)
    return comp, eager


def test_compiled_training_equals_eager(pair):
    comp, eager = pair
    steps = comp.hypergrad_method.compiled
    # step 0 runs eager (torch's Adam creates its state there), every later step compiled
    assert steps.calls == {"hypergradient": 39, "real training step": 39} and not steps.eager
    _assert_same_training(comp, eager)
    assert comp.counters == eager.counters


def test_compiled_hypergradient_equals_reverse_and_forward(pair):
    comp, eager = pair
    _assert_same_training(comp, eager)
    got, finite = comp.hypergradient(40)
    ref, ref_finite = eager.hypergradient(40)
    assert finite and ref_finite
    # an independent engine on the compiled trainer's own state: forward mode (tangents, no reverse)
    inner, state = comp.inner_optimizer()
    fwd = hypergrad.hypergradient(
        comp.train_loss, comp.val_loss,
        {k: p.detach() for k, p in comp.model.named_parameters()}, comp.meta.raw,
        [comp.batch(40)], comp.val_batch(40), optimizer=inner, opt_state=state, method="forward",
    )  # fmt: skip
    for n in got:
        assert got[n].abs() > 0
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-9, msg=n)
        torch.testing.assert_close(got[n], fwd.grads[n], rtol=1e-4, atol=1e-9, msg=n)
    # a guard the compiled call skips must not hide a change of torch's global state: other threads
    torch.set_num_threads(2)
    again, _ = comp.hypergradient(40)
    for n in got:
        torch.testing.assert_close(again[n], got[n], rtol=1e-6, atol=1e-10, msg=n)


def test_compiled_resume_is_exact(pair):
    comp, _ = pair
    state = {k: v for k, v in comp.state_dict().items()}
    straight = comp
    resumed = _trainer("on")
    resumed.load_state_dict(torch.utils._pytree.tree_map(
        lambda t: t.clone() if isinstance(t, torch.Tensor) else t, state))  # fmt: skip
    for s in range(40, 50):
        straight._one_step(s)
        resumed._one_step(s)
    _assert_same_training(straight, resumed, rtol=0)


@pytest.mark.slow  # two more graphs to compile: ~21 s with an empty inductor cache (CI's test budget)
def test_compiled_sgd_momentum_two_step_unroll():
    """SGD with momentum (its first step eager: b = g) and η = 2, against the eager engine."""
    comp, eager = (_trainer(m, optimizer="sgd", lr=0.1, momentum=0.9) for m in ("on", "off"))
    for t in (comp, eager):
        t.cfg.meta.unroll = 2
        t.hypergrad_method.eta = t.hypergrad_method.unroll = 2
    for s in range(12):
        comp._one_step(s)
        eager._one_step(s)
    assert comp.hypergrad_method.compiled.calls["hypergradient"] == 11
    _assert_same_training(comp, eager, rtol=1e-4)
    got, ref = comp.hypergradient(12)[0], eager.hypergradient(12)[0]
    for n in got:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-9, msg=n)


@pytest.mark.parametrize("method", ["fixed", "baseline"])
def test_compiled_plain_runs_equal_eager(method):
    """Runs without meta steps (a search's trials, the ledger's reference) compile their real step."""
    comp, eager = _trainer("on"), _trainer("off")
    for t in (comp, eager):
        t.cfg.meta.method = method
        t.cfg.meta.values = {"beta1": 0.6, "beta2": 0.3, "temperature": 3.0}
    comp, eager = (bench_e2e._trainer(t.cfg, t.splits, t.teacher_logits) for t in (comp, eager))
    assert comp.schedule.compiled is not None and eager.schedule.compiled is None
    for s in range(25):
        comp._one_step(s)
        eager._one_step(s)
    assert comp.schedule.compiled.calls == {"real training step": 24}
    for (k, x), y in zip(comp.model.state_dict().items(), eager.model.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, msg=k)


def test_compile_plan_auto_on_off():
    # YAML reads a bare on/off as booleans; the key takes them as the words
    assert [load_config(None, [f"train.compile={v}"]).train.compile for v in ("on", "off", "auto")] == [
        "on", "off", "auto"
    ]  # fmt: skip
    auto = _trainer("auto")
    assert compiled.compile_plan(auto, auto.hypergrad_method)[
        0
    ]  # the embedded default: 20,000 steps
    short = _trainer("auto", epochs=500)
    use, why = compiled.compile_plan(short, short.hypergrad_method)
    assert not use and "500 steps" in why and type(short.hypergrad_method) is LookAhead
    off = _trainer("off")
    assert compiled.compile_plan(off, off.hypergrad_method) == (False, "train.compile=off")
    # a student with BatchNorm buffers: auto says why, on refuses with the fix
    cfg, splits, logits = bench_e2e._case("cifar")
    cfg.train.compile = "on"
    torch.manual_seed(0)
    model = build_model(cfg.student, tuple(splits.train.x.shape[1:]), splits.num_classes)
    with pytest.raises(ConfigError, match=r"train\.compile=on: the student has buffers"):
        Trainer(cfg, model, splits, logits, device="cpu")
    cfg.train.compile = "auto"
    trainer = Trainer(cfg, model, splits, logits, device="cpu")
    assert type(trainer.hypergrad_method) is LookAhead
    assert "buffers" in compiled.compile_plan(trainer, trainer.hypergrad_method)[1]


def test_failed_compilation_falls_back_to_eager(monkeypatch, caplog):
    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("inductor exploded\nsecond line")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    comp, eager = _trainer("auto"), _trainer("off")
    with caplog.at_level(logging.WARNING, logger="metakd.training.methods.compiled"):
        for s in range(5):
            comp._one_step(s)
            eager._one_step(s)
    assert comp.hypergrad_method.compiled.eager
    assert (
        "torch.compile failed for the hypergradient (RuntimeError: inductor exploded)"
        in caplog.text
    )
    _assert_same_training(comp, eager, rtol=0)  # eager from the failure on: bit for bit
    required = _trainer("on")
    required._one_step(0)
    with pytest.raises(RuntimeError, match="inductor exploded"):
        required._one_step(1)


def test_a_compiled_run_is_priced_in_compiled_plain_runs(tmp_path):
    from metakd.runs import ledger
    from metakd.runs.run import train_run

    over = [f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=40", "wandb.mode=disabled"]
    cfg = load_config(None, [*over, "train.compile=on"])
    summary = train_run(cfg, tmp_path / "run")
    assert summary["compiled"] and summary["compile_seconds"] > 0
    assert summary["cost"]["reference"]["source"] == "calibration"
    # the calibration (2 steps) ran compiled and is recorded under the compiled key only
    assert ledger.lookup_reference(cfg) is not None
    assert ledger.lookup_reference(load_config(None, [*over, "train.compile=off"])) is None
    eager = train_run(load_config(None, [*over, "train.compile=off"]), tmp_path / "eager")
    assert not eager["compiled"] and eager["compile_seconds"] == 0.0


def test_compiled_forecast_schedule_equals_eager():
    """Predict windows set raw λ from the forecaster; the compiled real step reads it from there."""
    pairs = []
    for mode in ("on", "off"):
        t = _trainer(mode)
        t.cfg.meta.method = "forecast"
        t.cfg.forecast.window = 4
        pairs.append(bench_e2e._trainer(t.cfg, t.splits, t.teacher_logits))
    comp, eager = pairs
    assert type(comp.hypergrad_method) is CompiledLookAhead
    for s in range(24):  # windows of 4: optimize, predict, optimize, ...
        comp._one_step(s)
        eager._one_step(s)
    assert comp.counters == eager.counters and comp.counters["predicted_steps"] > 0
    assert comp.hypergrad_method.compiled.calls["real training step"] == 23
    _assert_same_training(comp, eager)
