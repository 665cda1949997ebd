"""The meta-trainer on a tiny in-memory task: methods, forecast schedule, NaN handling, plug-ins."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import metakd.hypergrad
from metakd.config import Config, ConfigError
from metakd.data import Split, Splits
from metakd.functional import optim
from metakd.hypergrad import HypergradResult
from metakd.runs.config import load_config
from metakd.training.trainer import Callback, Trainer

BOUNDS = {"beta1": (0.0, 1.0), "beta2": (0.0, 1.0), "temperature": (0.1, 10.0)}


def _split(n: int, gen: torch.Generator) -> Split:
    x2 = torch.randn(n, 2, generator=gen)
    x = torch.cat([x2, x2[:, :1] * x2[:, 1:]], dim=1)  # the paper's student features
    y = (x2[:, 0] * x2[:, 1] + 0.5 * torch.randn(n, generator=gen) > 0).long()
    return Split(x, y, x)


@pytest.fixture(scope="module")
def task() -> tuple[Splits, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(123)
    parts = {
        name: _split(n, gen)
        for name, n in [("teacher", 4), ("train", 15), ("val", 15), ("test", 60)]
    }
    splits = Splits(**parts, num_classes=2, info={"fingerprint": "test"})
    w = torch.tensor([[0.0, 0.0, -2.0], [0.0, 0.0, 2.0]])  # a teacher that knows the rule x1·x2
    logits = {k: getattr(splits, k).x @ w.T for k in ("train", "val", "test")}
    return splits, logits


class Rows(Callback):
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_step(self, row):
        self.rows.append(dict(row))

    def on_eval(self, row):
        self.rows.append({**row, "_eval": True})


def _cfg(*overrides: str) -> Config:
    base = ["train.epochs=60", "train.lr=0.05", "train.eval_every=20", "train.log_every=1"]
    base += ["meta.lr=1.0", "forecast.window=5"]
    return load_config(None, [*base, *overrides])


def _run(task, *overrides: str) -> tuple[Trainer, list[dict], dict]:
    splits, logits = task
    cfg = _cfg(*overrides)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    rec = Rows()
    trainer = Trainer(cfg, model, splits, logits, device="cpu", callbacks=[rec])
    summary = trainer.train()
    return trainer, rec.rows, summary


def _in_range(meta: dict) -> bool:
    return all(BOUNDS[k][0] < v < BOUNDS[k][1] for k, v in meta.items())


@pytest.mark.parametrize(
    "overrides",
    [
        ["meta.method=baseline"],
        ["meta.method=fixed", "meta.values={beta1: 0.3, beta2: 0.6, temperature: 3.0}"],
        ["meta.method=random"],
        ["meta.method=hypergrad"],
        ["meta.method=forecast", "forecast.forecaster=linear"],
        ["meta.method=forecast", "forecast.target=gradients", "train.batch_size=5"],
    ],
    ids=["baseline", "fixed", "random", "hypergrad", "forecast", "forecast-gradients-minibatch"],
)
def test_every_method_trains_and_keeps_lambda_in_range(task, overrides):
    trainer, rows, summary = _run(task, *overrides)
    method = summary["method"]
    assert summary["steps"] == trainer.total_steps == 60 * trainer.steps_per_epoch
    assert rows[0]["train_loss"] > summary["train_loss"] + 0.05  # it learns
    assert (
        summary["test_accuracy"] is not None
        and summary["best_test_accuracy"] >= summary["test_accuracy"]
    )
    evals = [r for r in rows if r.get("_eval")]
    assert [r["step"] for r in evals] == list(range(20, trainer.total_steps + 1, 20))
    if method == "baseline":
        assert all(r["meta"] == {"beta1": 1.0, "beta2": 0.0, "temperature": 1.0} for r in rows)
        return
    assert all(_in_range(r["meta"]) for r in rows)
    first, last = rows[0]["meta"], summary["meta"]
    if method == "fixed":
        assert last == pytest.approx({"beta1": 0.3, "beta2": 0.6, "temperature": 3.0}, rel=1e-5)
    if method in ("fixed", "random"):
        assert first == last and summary["hypergradient_steps"] == 0
    else:
        assert first != last and summary["hypergradient_steps"] > 0
    if method == "hypergrad":
        assert summary["hypergradient_steps"] == trainer.total_steps
        assert all(r["phase"] == "optimize" and r["hypergrad_norm"] is not None for r in rows)


def test_random_lambda_depends_on_the_seed_only(task):
    a = _run(task, "meta.method=random", "train.epochs=2")[2]["meta"]
    b = _run(task, "meta.method=random", "train.epochs=2")[2]["meta"]
    c = _run(task, "meta.method=random", "train.epochs=2", "seed=1")[2]["meta"]
    assert a == b != c


def test_fixed_needs_every_value(task):
    splits, logits = task
    cfg = _cfg("meta.method=fixed", "meta.values={beta1: 0.5}")
    with pytest.raises(ValueError, match=r"meta\.values\.beta2"):
        Trainer(cfg, torch.nn.Linear(3, 2), splits, logits)


def _count_calls(monkeypatch, trainer_ref: list) -> list[int]:
    calls: list[int] = []
    real = metakd.hypergrad.hypergradient

    def counting(*args, **kwargs):
        calls.append(trainer_ref[0].step)  # 0-based step of the meta step
        return real(*args, **kwargs)

    monkeypatch.setattr(metakd.hypergrad, "hypergradient", counting)
    return calls


@pytest.mark.parametrize(
    ("window", "optimize", "predict", "every"), [(5, 1, 1, 1), (3, 2, 1, 1), (4, 1, 3, 2)]
)
def test_forecast_schedule_computes_no_hypergradients_in_predict_windows(
    task, monkeypatch, window, optimize, predict, every
):
    splits, logits = task
    cfg = _cfg(
        "meta.method=forecast", f"forecast.window={window}", f"forecast.optimize={optimize}",
        f"forecast.predict={predict}", f"meta.every={every}", "train.epochs=47",
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = Trainer(cfg, torch.nn.Linear(3, 2), splits, logits)
    calls = _count_calls(monkeypatch, [trainer])
    summary = trainer.train()
    optimize_steps = [s for s in range(47) if (s // window) % (optimize + predict) < optimize]
    assert calls == [s for s in optimize_steps if s % every == 0]  # never in a predict window
    assert summary["hypergradient_steps"] == len(calls)
    assert summary["predicted_steps"] == 47 - len(optimize_steps)
    assert summary["skipped_meta_steps"] == 0


def test_predicted_values_follow_a_line_through_the_last_optimize_window(task):
    _, rows, _ = _run(task, "meta.method=forecast", "forecast.window=6", "train.epochs=30")
    by_step = {r["step"]: r for r in rows}  # log_every=1: one row per step (1-based)
    for start in (7, 19):  # first step of each predict window
        fit = [by_step[s] for s in range(start - 6, start)]
        for name in BOUNDS:
            coef = np.polyfit([r["step"] for r in fit], [r["meta_raw"][name] for r in fit], 1)
            for s in range(start, start + 6):
                assert by_step[s]["phase"] == "predict" and by_step[s]["hypergrad"] is None
                assert by_step[s]["meta_raw"][name] == pytest.approx(np.polyval(coef, s), abs=1e-5)
    # forecast quality: the extrapolation over the next optimize window vs the λ reached there
    for end in (18, 30):
        window = [by_step[s] for s in range(end - 5, end + 1)]
        err = by_step[end]["forecast_error"]
        for name in BOUNDS:
            mae = np.mean([abs(r["meta_forecast"][name] - r["meta_raw"][name]) for r in window])
            assert err[name] == pytest.approx(mae, rel=1e-4, abs=1e-7)
    assert sum(r["forecast_error"] is not None for r in rows) == 2


def test_gradient_target_feeds_predicted_gradients_to_the_meta_optimizer(task):
    over = [
        "meta.method=forecast",
        "forecast.target=gradients",
        "forecast.window=6",
        "train.epochs=12",
    ]
    _, rows, _ = _run(task, *over, "meta.clip=null", "meta.lr=0.5")
    by_step = {r["step"]: r for r in rows}
    grads = {n: [by_step[s]["hypergrad"][n] for s in range(1, 7)] for n in BOUNDS}
    for name in BOUNDS:
        coef = np.polyfit(range(1, 7), grads[name], 1)
        for s in range(7, 13):  # plain SGD: r_s = r_{s-1} - lr · ĝ(s)
            expected = by_step[s - 1]["meta_raw"][name] - 0.5 * np.polyval(coef, s)
            assert by_step[s]["meta_raw"][name] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_user_forecaster_by_import_path_is_called(task):
    from plugins.my_forecaster import MeanForecaster

    over = ["meta.method=forecast", "forecast.forecaster=plugins.my_forecaster:MeanForecaster"]
    trainer, rows, _ = _run(task, *over, "forecast.kwargs={offset: 0.25}", "train.epochs=20")
    fc = trainer.schedule.forecaster
    assert isinstance(fc, MeanForecaster) and fc.offset == 0.25
    assert fc.fit_calls == 2 and fc.predict_calls == 2
    by_step = {r["step"]: r for r in rows}
    for name in BOUNDS:
        mean = np.mean([by_step[s]["meta_raw"][name] for s in range(1, 6)])
        assert by_step[7]["meta_raw"][name] == pytest.approx(mean + 0.25, abs=1e-5)


def test_nan_hypergradients_are_skipped_and_never_touch_the_student(task, monkeypatch):
    def fake(value: float):
        def hypergradient(train_loss, val_loss, params, meta, *args, **kwargs):
            grads = {k: torch.full_like(v, value) for k, v in meta.items()}
            return HypergradResult(grads, dict(params), 0.0, finite=math.isfinite(value))

        return hypergradient

    over = ["meta.method=hypergrad", "meta.optimizer=sgd", "meta.momentum=0", "train.epochs=30"]
    monkeypatch.setattr(metakd.hypergrad, "hypergradient", fake(math.nan))
    nan_trainer, rows, summary = _run(task, *over)
    monkeypatch.setattr(metakd.hypergrad, "hypergradient", fake(0.0))
    zero_trainer, _, zero_summary = _run(task, *over)
    assert summary["skipped_meta_steps"] == summary["hypergradient_steps"] == 30
    assert zero_summary["skipped_meta_steps"] == 0
    assert summary["meta_raw"] == rows[0]["meta_raw"] and _in_range(summary["meta"])
    # a skipped step leaves the student exactly where a zero meta update does
    for (k, a), (_, b) in zip(
        nan_trainer.model.state_dict().items(),
        zero_trainer.model.state_dict().items(),
        strict=True,
    ):
        assert torch.equal(a, b), k
    assert all(torch.isfinite(p).all() for p in nan_trainer.model.parameters())


def test_diverging_student_raises_with_the_step_and_the_fix(task):
    with pytest.raises(FloatingPointError, match=r"step \d+.*lower train.lr"):
        _run(task, "meta.method=baseline", "train.optimizer=sgd", "train.lr=1e38")


def test_state_dict_round_trip_continues_identically(task):
    splits, logits = task
    over = ["meta.method=forecast", "train.batch_size=4", "train.epochs=12", "meta.optimizer=adam"]
    cfg = _cfg(*over)
    torch.manual_seed(0)
    full = Trainer(cfg, torch.nn.Linear(3, 2), splits, logits)
    saved: dict = {}
    full.train(
        on_epoch_end=lambda e: (
            saved.setdefault(e, copy.deepcopy(full.state_dict())) if e == 5 else None
        )
    )
    torch.manual_seed(1)  # a different initial model: everything must come from the state
    resumed = Trainer(cfg, torch.nn.Linear(3, 2), splits, logits)
    resumed.load_state_dict(saved[5])
    assert resumed.step == 5 * resumed.steps_per_epoch
    a, b = full.summary(), resumed.train()
    for key in (
        "meta_raw",
        "test_accuracy",
        "best_val_accuracy",
        "hypergradient_steps",
        "predicted_steps",
    ):
        assert a[key] == b[key], key


@pytest.mark.parametrize("every", [1, 3, 5, 10])
def test_rows_carry_the_hypergradients_when_meta_steps_are_sparse(task, every):
    """Meta steps at s ≡ 0 (mod every) and plain rows at s + 1 ≡ 0 (mod log_every) never meet
    for every > 1; those runs log the meta steps themselves, one in ⌈log_every / every⌉."""
    trainer, rows, _ = _run(
        task, "meta.method=hypergrad", f"meta.every={every}", "train.log_every=10"
    )
    total = trainer.total_steps
    with_grads = {r["step"] for r in rows if r["hypergrad"] is not None}
    evals = {r["step"] for r in rows if r.get("_eval")}  # forced rows, logged whatever the step
    stride = every * -(-10 // every) if every > 1 else 10
    if every == 1:  # unchanged: a row every log_every steps (besides the forced first/eval rows)
        assert with_grads >= set(range(10, total + 1, 10))
    else:
        assert with_grads - evals == {s + 1 for s in range(0, total, stride)} - evals
        assert all(r["hypergrad_norm"] > 0 for r in rows if r["hypergrad"] is not None)


def test_meta_steps_leave_the_training_state_untouched(task):
    """A hypergrad run whose meta steps cannot move λ (SGD, lr 1e-30) trains exactly like ``random``
    with the same λ: the unrolls (Adam state, BatchNorm statistics, batches) have no side effects."""

    def run(*overrides: str) -> tuple[Trainer, dict]:
        splits, logits = task
        cfg = _cfg(
            "train.epochs=8", "train.optimizer=adam", "train.lr=0.01", "train.batch_size=5",
            "meta.unroll=3", "meta.every=2", "train.eval_every=4", *overrides,
        )  # fmt: skip
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
        )
        trainer = Trainer(cfg, model, splits, logits, device="cpu")
        return trainer, trainer.train()

    frozen, summary = run("meta.method=hypergrad", "meta.optimizer=sgd", "meta.lr=1e-30")
    plain, plain_summary = run("meta.method=random")
    assert summary["hypergradient_steps"] > 0
    assert summary["meta"] == plain_summary["meta"]  # bit-identical λ
    for (name, a), b in zip(
        frozen.model.state_dict().items(), plain.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_meta_lr_schedule_sets_each_meta_step(task, kind):
    """With plain SGD meta steps and no clipping, r_{s+1} = r_s − lr(s)·g_s where lr(s) follows
    ``meta.lr_schedule`` from meta.lr at step 0 to meta.lr_end at the last step; rows log it."""
    over = ["meta.method=hypergrad", "meta.optimizer=sgd", "meta.clip=null", "train.epochs=20"]
    over += ["meta.lr=0.8", "meta.lr_end=0.1", f"meta.lr_schedule={kind}"]
    trainer, rows, _ = _run(task, *over)
    by_step = {r["step"]: r for r in rows}
    total = trainer.total_steps
    for s in range(2, total + 1):  # row s: the hypergradient of 0-based step s − 1 and λ after it
        p = (s - 1) / (total - 1)
        lr = 0.8 + (0.1 - 0.8) * p if kind == "linear" else 0.1 + 0.35 * (1 + math.cos(math.pi * p))
        assert by_step[s]["meta_lr"] == pytest.approx(lr, rel=1e-9)
        for name in BOUNDS:
            expected = by_step[s - 1]["meta_raw"][name] - lr * by_step[s]["hypergrad"][name]
            assert by_step[s]["meta_raw"][name] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert by_step[total]["meta_lr"] == pytest.approx(0.1)
    constant = _run(task, *over[:-2])[1]
    assert {r["meta_lr"] for r in constant} == {0.8}
    assert {r["meta_lr"] for r in _run(task, "meta.method=random", "train.epochs=2")[1]} == {None}


def test_hypergradient_is_the_meta_steps_gradient_and_changes_nothing(task):
    """``Trainer.hypergradient`` returns what the next meta step applies, leaves weights, λ, and the
    meta optimizer as they were, and its train_steps / val_batch arguments change the result."""
    splits, logits = task
    cfg = _cfg(
        "meta.method=hypergrad", "meta.unroll=3", "train.batch_size=5", "meta.val_batch_size=6"
    )
    torch.manual_seed(0)
    trainer = Trainer(cfg, torch.nn.Linear(3, 2), splits, logits)
    before = copy.deepcopy(trainer.state_dict())
    g, finite = trainer.hypergradient(0)
    assert finite
    after = trainer.state_dict()
    assert after["meta"] == before["meta"] and after["step"] == 0
    assert after["meta_optimizer"] == before["meta_optimizer"]
    for k, v in before["model"].items():
        assert torch.equal(v, after["model"][k]), k
    g_again, _ = trainer.hypergradient(0)
    assert all(torch.equal(g[n], g_again[n]) for n in g)
    other_window, _ = trainer.hypergradient(0, train_steps=range(1, 4))
    full_val, _ = trainer.hypergradient(0, val_batch=(splits.val.x, splits.val.y))
    assert any(not torch.equal(g[n], other_window[n]) for n in g)
    assert any(not torch.equal(g[n], full_val[n]) for n in g)
    applied, _ = trainer.meta_step(0)
    assert all(torch.equal(g[n], applied[n]) for n in g)


def test_online_hypergradient_differentiates_the_steps_trained_so_far(task):
    """meta.hypergrad.method=online: after K real steps with λ held (no meta step before K), the
    trainer's hypergradient is dL_val(w_K)/dλ through those K steps — the exact reverse-mode unroll of
    the same batches from the initial weights (an independent engine). The step-0 meta step has no
    history: it is skipped, not counted, and λ stays put."""
    splits, logits = task
    k = 6
    cfg = _cfg(
        "meta.method=hypergrad", "meta.hypergrad.method=online", f"meta.every={k}",
        "train.batch_size=5", "train.optimizer=adam", "meta.val_batch_size=6",
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = Trainer(cfg, torch.nn.Linear(3, 2), splits, logits)
    w0 = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    raw0 = {n: v.detach().clone() for n, v in trainer.meta.raw.items()}
    for s in range(k):
        trainer._one_step(s)
    assert trainer.counters["hypergradient_steps"] == 0
    assert all(torch.equal(trainer.meta.raw[n], raw0[n]) for n in raw0)
    online, finite = trainer.hypergradient(k)
    assert finite
    ref = metakd.hypergrad.hypergradient(
        trainer.train_loss, trainer.val_loss, w0, trainer.meta.raw,
        [trainer.batch(s) for s in range(k)], trainer.val_batch(k),
        optimizer=optim.adam(cfg.train.lr), method="reverse",
    )  # fmt: skip
    for n in raw0:
        assert float(ref.grads[n].abs()) > 1e-6
        assert online[n] == pytest.approx(float(ref.grads[n]), rel=1e-3, abs=1e-7), n
    with pytest.raises(ValueError, match="train_steps is for look-ahead"):
        trainer.hypergradient(k, train_steps=range(3))


@pytest.mark.parametrize("method", ["hypergrad", "forecast"])
def test_online_run_trains_moves_lambda_and_resumes_identically(task, method):
    """Online forward mode under hypergrad (tangents over the whole run) and forecast (tangents over
    each optimize block): λ moves, and a run resumed from a checkpoint taken inside an optimize block
    ends bit-identical to the uninterrupted one because the checkpoint carries the tangents."""
    splits, logits = task
    over = [f"meta.method={method}", "meta.hypergrad.method=online", "train.batch_size=4",
            "train.epochs=12", "meta.optimizer=adam", "meta.lr=0.1", "meta.every=2"]  # fmt: skip
    cfg = _cfg(*over)
    torch.manual_seed(0)
    full = Trainer(cfg, torch.nn.Linear(3, 2), splits, logits)
    init = full.meta.values()
    saved: dict = {}
    at = 6  # 4 steps per epoch: step 24 lies in the optimize window 20..24 (forecast.window=5)
    summary = full.train(
        on_epoch_end=lambda e: (
            saved.setdefault(e, copy.deepcopy(full.state_dict())) if e == at else None
        )
    )
    meta_steps = [s for s in range(full.total_steps) if s % 2 == 0 and full.phase(s) == "optimize"]
    # an online meta step needs a carried step of its own block: the first of each block is skipped
    firsts = [s for s in meta_steps if s == 0 or full.phase(s - 1) != "optimize"]
    assert summary["hypergradient_steps"] == len(meta_steps) - len(firsts)
    assert summary["unroll"] is None and _in_range(summary["meta"])
    assert all(abs(summary["meta"][n] - init[n]) > 1e-3 for n in init)  # λ moved
    assert saved[at]["hypergrad_method"]["tangents"] is not None
    torch.manual_seed(1)
    resumed = Trainer(cfg, torch.nn.Linear(3, 2), splits, logits)
    resumed.load_state_dict(saved[at])
    b = resumed.train()
    for key in ("meta_raw", "test_accuracy", "best_val_accuracy", "hypergradient_steps"):
        assert summary[key] == b[key], key
    # without the tangents the resumed run differs: the checkpoint's tangents are what carries over
    lost = Trainer(cfg, torch.nn.Linear(3, 2), splits, logits)
    lost.load_state_dict({**saved[at], "hypergrad_method": {"tangents": None}})
    assert lost.train()["meta_raw"] != summary["meta_raw"]


def test_online_forecast_differentiates_only_the_current_optimize_block(task, monkeypatch):
    """meta.method=forecast with meta.hypergrad.method=online: tangents are carried in optimize
    windows only and restart from zero at each optimize block, so the hypergradient inside a block
    is dL_val(w)/dλ through that block's steps alone — the reverse-mode unroll (an independent engine)
    of the same batches from the weights and optimizer state at the block's first step."""
    splits, logits = task
    cfg = _cfg(
        "meta.method=forecast", "meta.hypergrad.method=online", "forecast.window=6",
        "meta.every=3", "train.batch_size=5", "train.optimizer=adam", "meta.val_batch_size=6",
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = Trainer(cfg, torch.nn.Linear(3, 2), splits, logits)
    carried: list[int] = []
    online_method = trainer.hypergrad_method
    real_carry = online_method.carry
    monkeypatch.setattr(
        online_method, "carry", lambda b, **kw: (carried.append(trainer.step), real_carry(b, **kw))
    )
    start = 12  # windows of 6 steps: optimize 0-5, predict 6-11, optimize 12-17
    for s in range(start):
        trainer._one_step(s)
        if s >= 6:
            assert online_method.tangents is None, s  # dropped in the predict window
    named = dict(trainer.model.named_parameters())
    w12 = {n: p.detach().clone() for n, p in named.items()}
    inner, state12 = optim.from_torch(trainer.optimizer, named)
    raw12 = {n: v.detach().clone() for n, v in trainer.meta.raw.items()}
    for s in range(start, start + 3):  # the meta step at 12 has no carried step: skipped
        trainer._one_step(s)
    assert all(torch.equal(trainer.meta.raw[n], raw12[n]) for n in raw12)
    assert carried == [*range(6), *range(start, start + 3)]
    assert trainer.counters["hypergradient_steps"] == 1  # step 3; steps 0 and 12 skipped
    online, finite = trainer.hypergradient(start + 3)
    assert finite
    ref = metakd.hypergrad.hypergradient(
        trainer.train_loss, trainer.val_loss, w12, trainer.meta.raw,
        [trainer.batch(s) for s in range(start, start + 3)], trainer.val_batch(start + 3),
        optimizer=inner, opt_state=state12, method="reverse",
    )  # fmt: skip
    for n in raw12:
        assert float(ref.grads[n].abs()) > 1e-6
        assert online[n] == pytest.approx(float(ref.grads[n]), rel=1e-3, abs=1e-7), n


def test_online_needs_the_real_optimizer():
    # under forecast the online tangents are truncated to each optimize block: allowed
    load_config(None, ["meta.method=forecast", "meta.hypergrad.method=online"])
    with pytest.raises(ConfigError, match="unroll_optimizer=match"):
        load_config(None, ["meta.hypergrad.method=online", "meta.hypergrad.unroll_optimizer=sgd"])


def _implicit_at_a_fixed_point(task, wd_override: str, wd: float):
    """A meta.hypergrad.method=implicit trainer (SGD student, weight decay ``wd`` set by
    ``wd_override``) whose weights were moved to w* minimising L_train + wd/2‖w‖² on the full train
    batch (3,000 SGD steps); returns (trainer, batch, w*, its IFT hypergradient)."""
    splits, logits = task
    cfg = _cfg(
        "meta.method=hypergrad", "meta.hypergrad.method=implicit", "train.optimizer=sgd",
        wd_override, "train.batch_size=15", "meta.unroll=1", "meta.hypergrad.implicit.iterations=50",
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = Trainer(cfg, torch.nn.Linear(3, 2), splits, logits)
    batch = trainer.batch(0)
    fit = optim.sgd(0.5, weight_decay=wd)
    w = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    state = fit.init(w)
    raw = {n: v.detach() for n, v in trainer.meta.raw.items()}
    for _ in range(3000):
        leaves = {n: p.requires_grad_(True) for n, p in ((n, p.detach()) for n, p in w.items())}
        g = torch.autograd.grad(trainer.train_loss(leaves, raw, batch), list(leaves.values()))
        w, state = fit.update(
            dict(zip(leaves, g)), state, {n: p.detach() for n, p in leaves.items()}
        )
    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            p.copy_(w[n])
    grads, finite = trainer.hypergradient(0)
    assert finite
    res = trainer.schedule.method.last
    assert res is not None and res.stationarity < 1e-5 and res.solve_residual < 1e-5
    return trainer, batch, w, grads


def test_implicit_hypergradient_at_a_stationary_point_is_the_limit_of_long_unrolls(task):
    """meta.hypergrad.method=implicit at weights w* that minimise L_train + wd/2‖w‖² on the full train
    batch (SGD student with weight decay: its fixed points) against an independent engine: the reverse
    unroll of 400 steps started at w*, whose dw/dλ tends to the IFT's −A⁻¹∂r/∂λ (the fixed point does
    not depend on the unroll's learning rate, so a larger one converges faster)."""
    trainer, batch, w, grads = _implicit_at_a_fixed_point(task, "train.weight_decay=0.1", 0.1)
    ref = metakd.hypergrad.hypergradient(
        trainer.train_loss, trainer.val_loss, w, trainer.meta.raw, [batch] * 400,
        trainer.val_batch(0), optimizer=optim.sgd(0.5, weight_decay=0.1), method="reverse",
    )  # fmt: skip
    for n in grads:
        assert float(ref.grads[n].abs()) > 1e-4, n
        assert float(grads[n]) == pytest.approx(float(ref.grads[n]), rel=2e-3), n


def test_implicit_hypergradient_of_a_learned_weight_decay_at_its_stationary_point(task):
    """meta.params.weight_decay with meta.hypergrad.method=implicit: at w* minimising L_train +
    wd(λ)/2‖w‖² the IFT hypergradient of the raw weight decay (and of β1, β2, T) equals the reverse
    unroll of 400 SGD steps from w* whose weight decay is written out as σ(raw wd) — an independent
    engine and an independent binding."""
    trainer, batch, w, grads = _implicit_at_a_fixed_point(
        task, "meta.params.weight_decay.init=0.1", 0.1
    )
    # the sigmoid spec on (0, 1) holds 0.1: w* above is its fixed point
    assert float(torch.sigmoid(trainer.meta.raw["weight_decay"].detach())) == pytest.approx(0.1)
    assert set(grads) == {"beta1", "beta2", "temperature", "weight_decay"}
    unroll = optim.sgd(0.5, weight_decay=lambda m: torch.sigmoid(m["weight_decay"]))
    ref = metakd.hypergrad.hypergradient(
        trainer.train_loss, trainer.val_loss, w, trainer.meta.raw, [batch] * 400,
        trainer.val_batch(0), optimizer=unroll, method="reverse",
    )  # fmt: skip
    for n in grads:
        assert float(ref.grads[n].abs()) > 1e-4, n
        assert float(grads[n]) == pytest.approx(float(ref.grads[n]), rel=2e-3), n


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_implicit_run_trains_and_moves_lambda(task, solver):
    trainer, rows, summary = _run(
        task, "meta.method=hypergrad", "meta.hypergrad.method=implicit", "train.optimizer=sgd",
        "train.weight_decay=0.01", "meta.unroll=2", "train.epochs=10",
        f"meta.hypergrad.implicit.solver={solver}", "meta.hypergrad.implicit.iterations=5",
        "meta.hypergrad.implicit.damping=0.1",
    )  # fmt: skip
    assert summary["hypergradient_steps"] == trainer.total_steps
    assert summary["meta"] != rows[0]["meta"] and all(_in_range(r["meta"]) for r in rows)
    assert all(r["hypergrad_norm"] is not None for r in rows if not r.get("_eval"))
    assert summary["test_accuracy"] is not None and summary["skipped_meta_steps"] == 0


def test_implicit_config_errors_name_the_key(task):
    splits, logits = task
    cfg = _cfg("meta.hypergrad.method=implicit", "meta.hypergrad.implicit.solver=neumann")
    with pytest.raises(ConfigError, match=r"meta\.hypergrad\.implicit\.neumann_lr is required"):
        Trainer(cfg, torch.nn.Linear(3, 2), splits, logits)  # the default student uses Adam
    with pytest.raises(ConfigError, match="iterations"):
        _cfg("meta.hypergrad.method=implicit", "meta.hypergrad.implicit.iterations=0")
    with pytest.raises(ConfigError, match="solver"):
        _cfg("meta.hypergrad.implicit.solver=lbfgs")


@pytest.mark.parametrize("clip", ["1.0", "100.0", "null"])
def test_meta_sgd_fast_path_is_torch_sgd_after_clip_grad_norm(task, clip):
    """apply_meta_grad's hand-written SGD step (momentum 0) against torch.optim.SGD after
    torch.nn.utils.clip_grad_norm_: bit-identical raw λ over several steps."""
    splits, logits = task
    cfg = _cfg(f"meta.clip={clip}", "meta.lr=0.7")
    trainer = Trainer(cfg, torch.nn.Linear(3, 2), splits, logits)
    assert trainer._plain_meta_sgd and trainer.meta is not None
    ref = [trainer.meta.raw[n].detach().clone().requires_grad_(True) for n in trainer.meta.names]
    ref_opt = torch.optim.SGD(ref, lr=0.7)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        grads = {n: 3 * torch.randn((), generator=gen) for n in trainer.meta.names}
        trainer.apply_meta_grad(grads)
        for p, n in zip(ref, trainer.meta.names):
            p.grad = grads[n].clone()
        if cfg.meta.clip is not None:
            torch.nn.utils.clip_grad_norm_(ref, cfg.meta.clip)
        ref_opt.step()
        for p, n in zip(ref, trainer.meta.names):
            assert torch.equal(trainer.meta.raw[n].detach(), p.detach())


@pytest.mark.parametrize("model_name", ["cifar_very_tiny", "logreg"])
def test_the_real_optimizer_is_adam_written_out(model_name):
    """metakd's real student optimizer (optimizer_binding.torch_optimizer: multi-tensor for a model
    with many tensors, the per-tensor loop for a small one) against Adam written out in float64
    (Kingma & Ba with torch's L2 weight decay and bias correction) on the same gradients, five
    steps. Per step each weight moves by lr·m̂/(√v̂ + eps), a handful of float32 roundings of an
    O(lr) update plus the rounding of w itself: 16ε·(lr + |w|) per step."""
    from metakd.config import ModelConfig
    from metakd.data.models import build_model
    from metakd.training.optimizer_binding import torch_optimizer as _torch_optimizer

    shape = (3, 32, 32) if model_name == "cifar_very_tiny" else (3,)
    model = build_model(ModelConfig(name=model_name), shape, 10)
    cfg = Config().train
    cfg.lr, cfg.weight_decay = 0.01, 0.05
    opt = _torch_optimizer(cfg, model.parameters())
    assert opt.param_groups[0]["foreach"] is (model_name == "cifar_very_tiny")
    w = [p.detach().double().clone() for p in model.parameters()]
    w0 = [x.clone() for x in w]
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    b1, b2, eps = 0.9, 0.999, 1e-8
    gen = torch.Generator().manual_seed(0)
    eps32 = float(torch.finfo(torch.float32).eps)
    for t in range(1, 6):
        grads = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            g = g.double() + cfg.weight_decay * w[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            w[i] = w[i] - cfg.lr * m_hat / (v_hat.sqrt() + eps)
        for p, ref in zip(model.parameters(), w, strict=True):
            err = (p.detach().double() - ref).abs()
            assert bool((err <= t * 16 * eps32 * (cfg.lr + ref.abs())).all()), float(err.max())
    # the steps moved the weights by far more than that tolerance (the check can fail)
    assert all(float((p.detach().double() - q).abs().max()) > 1e-3 for p, q in
               zip(model.parameters(), w0, strict=True))  # fmt: skip
