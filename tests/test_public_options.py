"""Public options that had no test of their own, each against an independent reference: the loss
options (train.normalize_weights, train.hinton_scaling) against the loss written out by hand, the
real step (train.nesterov) against torch.optim.SGD, the meta step (meta.momentum) against
torch.optim.SGD on the clipped hypergradient, the hypergradient engines' settings
(meta.hypergrad.backend, checkpoint, fd_eps, unroll_optimizer=sgd) against backend=func or a
hand-rolled float64 unroll, and forecast.history against a least-squares line through the points
it names. All on the tiny in-memory task of tests/test_trainer.py (15 train examples, Linear(3, 2)).

Tolerances: float32 machine epsilon ε = 1.19e-7 times a stated factor (the number of roundings a
quantity goes through), or, against a float64 reference, the float32 engine's relative error."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_trainer import Rows, _cfg, task  # noqa: F401  (the tiny in-memory task)

from metakd.training.trainer import Trainer

EPS32 = float(torch.finfo(torch.float32).eps)
FIXED = "meta.values={beta1: 0.3, beta2: 0.6, temperature: 2.5}"
B1, B2, T = 0.3, 0.6, 2.5


def _trainer(task, *overrides: str, callbacks=()) -> Trainer:  # noqa: F811
    splits, logits = task
    torch.manual_seed(0)
    return Trainer(
        _cfg(*overrides), torch.nn.Linear(3, 2), splits, logits, callbacks=list(callbacks)
    )


def _hand_loss(s, y, t, b1, b2, temp, *, hinton=False, normalize=False):
    """β1·CE(y, softmax(s)) + β2·c·CE(softmax(t/T), softmax(s/T)), c = T² (Hinton) or 1, / (β1 + β2)."""
    ce = -F.log_softmax(s, 1).gather(1, y[:, None]).mean()
    kd = -(F.softmax(t / temp, 1) * F.log_softmax(s / temp, 1)).sum(1).mean()
    loss = b1 * ce + b2 * (temp**2 if hinton else 1.0) * kd
    return loss / (b1 + b2) if normalize else loss


def _constrained(raw):
    """The default parameterisation (metakd/config.py): β = sigmoid(r), T = 0.1 + 9.9·sigmoid(r)."""
    return (
        torch.sigmoid(raw["beta1"]),
        torch.sigmoid(raw["beta2"]),
        0.1 + 9.9 * torch.sigmoid(raw["temperature"]),
    )


# --------------------------------------------------------------------------- the loss options


@pytest.mark.parametrize(("hinton", "normalize"), [(False, False), (True, False), (False, True),
                                                   (True, True)])  # fmt: skip
def test_loss_options_are_the_loss_written_out(task, hinton, normalize):  # noqa: F811
    """The logged loss of the first real step (initial weights, fixed λ) is the float64 loss by hand:
    train.hinton_scaling multiplies the distillation term by T², train.normalize_weights divides the
    whole by β1 + β2. Float32 forward pass of ~10 roundings per term: 32ε relative."""
    rows = Rows()
    tr = _trainer(task, "meta.method=fixed", FIXED, "train.epochs=1",
                  f"train.hinton_scaling={str(hinton).lower()}",
                  f"train.normalize_weights={str(normalize).lower()}", callbacks=[rows])  # fmt: skip
    w0 = copy.deepcopy(tr.model).double()
    tr.train()
    splits, logits = task
    with torch.no_grad():
        s = w0(splits.train.x.double())
        want = _hand_loss(s, splits.train.y, logits["train"].double(), B1, B2, T,
                          hinton=hinton, normalize=normalize)  # fmt: skip
        plain = _hand_loss(s, splits.train.y, logits["train"].double(), B1, B2, T)
    got = rows.rows[0]["train_loss"]
    assert got == pytest.approx(float(want), rel=32 * EPS32)
    # and the options change the loss by more than the tolerance (the check can fail)
    if hinton or normalize:
        assert abs(float(want) - float(plain)) > 1e3 * EPS32 * float(plain)


def test_nesterov_real_step_is_torch_sgd_nesterov(task):  # noqa: F811
    """train.nesterov: five real steps equal torch.optim.SGD(momentum=0.9, nesterov=True) on a copy
    of the initial model, with the loss written out by hand (float32, the same steps): the weights
    agree to the round-off of the loss's gradient, 64ε relative per step."""
    over = ["meta.method=fixed", FIXED, "train.optimizer=sgd", "train.lr=0.3", "train.momentum=0.9"]
    tr = _trainer(task, *over, "train.nesterov=true", "train.epochs=5")
    ref = copy.deepcopy(tr.model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9, nesterov=True)
    tr.train()
    splits, logits = task
    for _ in range(5):
        opt.zero_grad()
        _hand_loss(ref(splits.train.x), splits.train.y, logits["train"], B1, B2, T).backward()
        opt.step()
    heavy_ball = _trainer(task, *over, "train.epochs=5")
    heavy_ball.train()
    for p, q, h in zip(tr.model.parameters(), ref.parameters(), heavy_ball.model.parameters(),
                       strict=True):  # fmt: skip
        scale = float(q.detach().abs().max())
        torch.testing.assert_close(p, q, rtol=0, atol=5 * 64 * EPS32 * scale)
        assert (
            float((h - q).detach().abs().max()) > 1e3 * EPS32 * scale
        )  # nesterov is not heavy ball


def test_meta_momentum_is_torch_sgd_with_momentum_on_the_clipped_hypergradient(task):  # noqa: F811
    """meta.momentum = 0.8: each meta step is torch.optim.SGD(lr, momentum=0.8) fed the logged
    hypergradient clipped to norm meta.clip (torch.nn.utils.clip_grad_norm_); raw λ agrees to the
    float32 round-off of a few updates (8ε relative per step, ten steps)."""
    rows = Rows()
    tr = _trainer(task, "meta.method=hypergrad", "meta.momentum=0.8", "meta.lr=0.5",
                  "meta.clip=0.003", "train.epochs=10", callbacks=[rows])  # fmt: skip
    assert tr.meta is not None
    names = tr.meta.names
    ref = [tr.meta.raw[n].detach().clone().requires_grad_(True) for n in names]
    opt = torch.optim.SGD(ref, lr=0.5, momentum=0.8)
    tr.train()
    steps = list({r["step"]: r for r in rows.rows}.values())  # the last step's row is its eval row
    assert [r["step"] for r in steps] == list(range(1, 11))
    clipped = 0
    for row in steps:
        grads = [torch.tensor(row["hypergrad"][n], dtype=torch.float32) for n in names]
        for p, g in zip(ref, grads, strict=True):
            p.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(ref, 0.003)
        clipped += float(norm) > 0.003
        opt.step()
        for p, n in zip(ref, names, strict=True):
            assert float(p.detach()) == pytest.approx(
                row["meta_raw"][n], rel=10 * 8 * EPS32, abs=1e-7
            )
    assert 0 < clipped < 10  # the clip was active on some steps, not all
    # momentum matters: plain SGD on the same gradients ends elsewhere
    plain = _trainer(task, "meta.method=hypergrad", "meta.lr=0.5", "meta.clip=0.003",
                     "train.epochs=10")  # fmt: skip
    plain.train()
    assert any(abs(plain.meta.raw_values()[n] - steps[-1]["meta_raw"][n]) > 1e-3 for n in names)


# --------------------------------------------------------------------------- hypergradient settings


def _hg(tr: Trainer) -> torch.Tensor:
    g, finite = tr.hypergradient(0)
    assert finite
    return torch.stack([g[n].double().reshape(()) for n in tr.meta.names])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


OPT = ["meta.method=hypergrad", "train.optimizer=sgd", "train.lr=0.5", "train.momentum=0.5",
       "train.batch_size=5"]  # fmt: skip
ADAM = ["meta.method=hypergrad", "train.optimizer=adam", "train.lr=0.05", "train.batch_size=5"]


@pytest.mark.parametrize("backend", ["torchopt", "higher"])
@pytest.mark.parametrize("opt", ["sgd-momentum", "adam"])
def test_backends_through_the_trainer_equal_backend_func(task, backend, opt):  # noqa: F811
    """meta.hypergrad.backend=torchopt|higher: after 3 real steps (the optimizer holds momentum /
    Adam's moments, carried into the unroll), the η = 3 hypergradient equals backend=func's: the
    same float32 math in another order, so relative agreement to the unroll's round-off (1e-5,
    ~100ε: η steps of a few dozen roundings). (torchopt's SGD once took the carried momentum
    buffer unscaled at its first step: 10 % off.)"""
    trainers = {}
    for b in ("func", backend):
        over = OPT if opt == "sgd-momentum" else ADAM
        tr = _trainer(task, *over, "meta.unroll=3", f"meta.hypergrad.backend={b}", "train.epochs=1")
        for s in range(3):
            tr.plain_real_step(tr.batch(s))
        trainers[b] = tr
    ref, got = _hg(trainers["func"]), _hg(trainers[backend])
    assert float(ref.norm()) > 1e-4
    assert _rel(got, ref) <= 1e-5


def test_checkpointed_unroll_equals_the_plain_unroll(task):  # noqa: F811
    """meta.hypergrad.checkpoint=true recomputes the unrolled steps in the backward pass: the very
    same float32 operations, so the hypergradient equals the one without checkpointing to 4ε."""
    a = _hg(_trainer(task, *OPT, "meta.unroll=4"))
    b = _hg(_trainer(task, *OPT, "meta.unroll=4", "meta.hypergrad.checkpoint=true"))
    torch.testing.assert_close(b, a, rtol=4 * EPS32, atol=0)


def test_fd_eps_sets_the_finite_difference_error_as_eps_squared(task):  # noqa: F811
    """meta.hypergrad.method=finite-difference (η = 1, SGD): the error against the exact reverse
    hypergradient shrinks as fd_eps² — halving fd_eps divides it by 4. 3.5 to 4.5 leaves room for the
    O(ε⁴) term (1 % here: 3.83 from 0.8 to 0.4, 3.95 from 0.4 to 0.2) and the float32 round-off of
    the difference quotient (~ε·|∇_λ L_train|·‖v‖/fd_eps, ~1e-9, vs an error of 1e-5)."""
    sgd = ["meta.method=hypergrad", "train.optimizer=sgd", "train.lr=0.5"]
    exact = _hg(_trainer(task, *sgd))
    errs = []
    for eps in (0.4, 0.2):
        fd = _hg(_trainer(task, *sgd, "meta.hypergrad.method=finite-difference",
                          f"meta.hypergrad.fd_eps={eps}"))  # fmt: skip
        errs.append(float((fd - exact).norm()))
    assert errs[0] > 1e3 * EPS32 * float(exact.norm())  # well above round-off
    assert 3.5 < errs[0] / errs[1] < 4.5, errs


def test_unroll_optimizer_sgd_is_a_hand_rolled_sgd_unroll(task):  # noqa: F811
    """meta.hypergrad.unroll_optimizer=sgd with unroll_lr: whatever the real optimizer (Adam here),
    the η = 2 look-ahead is plain SGD at unroll_lr. Reference: that unroll written out in float64 with
    the loss by hand and the default constraints, differentiated by autograd; agreement to the
    float32 engine's relative error (1e-5)."""
    tr = _trainer(task, "meta.method=hypergrad", "train.optimizer=adam", "train.lr=0.05",
                  "meta.unroll=2", "meta.hypergrad.unroll_optimizer=sgd",
                  "meta.hypergrad.unroll_lr=0.7", "train.batch_size=5")  # fmt: skip
    got = _hg(tr)
    raw = {n: tr.meta.raw[n].detach().double().requires_grad_(True) for n in tr.meta.names}
    b1, b2, temp = _constrained(raw)
    w = [p.detach().double().requires_grad_(True) for p in tr.model.parameters()]  # (2, 3), (2,)
    for s in range(2):
        x, y, t = tr.batch(s)
        loss = _hand_loss(x.double() @ w[0].T + w[1], y, t.double(), b1, b2, temp)
        g = torch.autograd.grad(loss, w, create_graph=True)
        w = [wi - 0.7 * gi for wi, gi in zip(w, g, strict=True)]
    vx, vy = tr.val_batch(0)
    val = F.cross_entropy(vx.double() @ w[0].T + w[1], vy)
    want = torch.stack(torch.autograd.grad(val, [raw[n] for n in tr.meta.names]))
    assert float(want.norm()) > 1e-4
    assert _rel(got, want) <= 1e-5
    # the real optimizer's twin (Adam) gives another hypergradient: the setting is in effect
    match = _hg(_trainer(task, "meta.method=hypergrad", "train.optimizer=adam", "train.lr=0.05",
                         "meta.unroll=2", "train.batch_size=5"))  # fmt: skip
    assert _rel(match, want) > 0.1


# --------------------------------------------------------------------------- forecast.history


@pytest.mark.parametrize("history", ["window", "all", 3])
def test_forecast_history_fits_the_points_it_names(task, history):  # noqa: F811
    """forecast.history: the predict window's λ lies on the least-squares line (numpy polyfit)
    through the optimize steps' raw λ that the setting names — the last optimize window ("window"),
    every optimize step so far ("all") or the last N ("3") — to float32 round-off of λ (1e-5 abs);
    the other settings' lines miss it."""
    rows = Rows()
    tr = _trainer(task, "meta.method=forecast", "forecast.window=4", "train.epochs=16",
                  f"forecast.history={history}", callbacks=[rows])  # fmt: skip
    tr.train()
    by_step = {r["step"]: r for r in rows.rows}
    start = 13  # the second predict window: steps 13-16 (optimize: 1-4, 9-12)
    optimize = [s for s in range(1, start) if (s - 1) // 4 % 2 == 0]
    fits = {"window": optimize[-4:], "all": optimize, 3: optimize[-3:]}
    for name in tr.meta.names:

        def line(steps, name=name):
            return np.polyfit(steps, [by_step[s]["meta_raw"][name] for s in steps], 1)

        for s in range(start, start + 4):
            assert by_step[s]["phase"] == "predict"
            assert by_step[s]["meta_raw"][name] == pytest.approx(
                np.polyval(line(fits[history]), s), abs=1e-5
            )
    misses = [
        max(abs(by_step[s]["meta_raw"][n] - np.polyval(line_, s)) for s in range(start, start + 4)
            for n in tr.meta.names
            for line_ in [np.polyfit(fits[other], [by_step[p]["meta_raw"][n] for p in fits[other]], 1)])
        for other in fits if other != history
    ]  # fmt: skip
    assert min(misses) > 1e-4


# --------------------------------------------------------------------------- command-line options

TINY_CLI = ["device=cpu", "teacher.epochs=100", "train.epochs=10", "train.eval_every=5",
            "wandb.mode=disabled", "data.cache_dir=cache"]  # fmt: skip


def _invoke(*args):
    from typer.testing import CliRunner

    from metakd_cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _summary(path) -> dict:
    return json.loads((path / "summary.json").read_text())


def test_teacher_force_overwrites_with_the_new_training(tmp_path, monkeypatch):
    """metakd teacher --force: an existing checkpoint is refused without it (exit 2) and replaced
    with it — by the teacher of the new settings (seed 1), whose weights equal train_teacher's."""
    from metakd.data import load_data
    from metakd.data.teacher import load_teacher, train_teacher
    from metakd.runs.config import load_config

    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "t.pt"
    args = ["teacher", "teacher.epochs=30", "--out", ckpt, "--device", "cpu", "-q"]
    assert _invoke(*args).exit_code == 0
    first = load_teacher(ckpt, "cpu")[0].state_dict()
    refused = _invoke(*args, "--seed", "1")
    assert refused.exit_code == 2 and "pass --force to overwrite it" in refused.stderr
    assert all(
        torch.equal(v, load_teacher(ckpt, "cpu")[0].state_dict()[k]) for k, v in first.items()
    )
    forced = _invoke(*args, "--seed", "1", "--force")
    assert forced.exit_code == 0, forced.output
    cfg = load_config(None, ["teacher.epochs=30", "seed=1", "device=cpu"])
    ref, _ = train_teacher(cfg, load_data(cfg.data, 1, "cpu"), "cpu")
    now = load_teacher(ckpt, "cpu")[0].state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(now[k], v) and not torch.equal(now[k], first[k]), k


def test_experiment_workers_2_equals_the_sequential_grid(tmp_path, monkeypatch):
    """metakd experiment --workers 2 (spawned processes) ends every run of the grid exactly as
    --workers 1 does: the runs are pure functions of config and seed."""
    monkeypatch.chdir(tmp_path)
    out = {}
    for w in (1, 2):
        out[w] = tmp_path / f"w{w}"
        res = _invoke("experiment", *TINY_CLI, "--methods", "baseline,hypergrad", "--seeds", "0,1",
                      "--workers", w, "--out", out[w], "-q")  # fmt: skip
        assert res.exit_code == 0, res.output
    for method in ("baseline", "hypergrad"):
        for seed in (0, 1):
            a, b = (_summary(out[w] / method / f"seed-{seed}") for w in (1, 2))
            assert a["steps"] == b["steps"] == 10
            for key in ("test_accuracy", "val_accuracy", "train_loss", "meta_raw"):
                assert a[key] == b[key], (method, seed, key)
    table = json.loads((out[2] / "results.json").read_text())
    assert sorted((r["method"], r["seed"]) for r in table["runs"]) == [
        ("baseline", 0), ("baseline", 1), ("hypergrad", 0), ("hypergrad", 1),
    ]  # fmt: skip


def test_search_study_options_through_the_cli(tmp_path, monkeypatch):
    """metakd search --storage journal:PATH --study-name --sampler-seed --worker --space raw
    --pruner median: the study is where and what the options say (optuna.load_study of that
    journal and name; raw dimensions), the same seed and worker draw the same λ in a fresh study,
    another --worker or --sampler-seed draws other λ; a rerun with another --pruner is refused;
    --import-results continues the study from its results.json alone (run directories gone)."""
    import shutil

    import optuna

    monkeypatch.chdir(tmp_path)

    def search(out, *opts):
        res = _invoke("search", *TINY_CLI, "--sampler", "random", "--trials", "2", "--space", "raw",
                      "--out", out, "-q", "--json", *opts)  # fmt: skip
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    journal = tmp_path / "studies.journal"
    opts = ["--storage", f"journal:{journal}", "--study-name", "mine", "--sampler-seed", "5",
            "--worker", "1", "--pruner", "median"]  # fmt: skip
    first = search(tmp_path / "a", *opts)
    from metakd.runs.search import storage_for

    study = optuna.load_study(study_name="mine", storage=storage_for(f"journal:{journal}", None))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert all(set(t.params) == {"beta1", "beta2", "temperature"} for t in study.trials)
    assert not (tmp_path / "a" / "study.db").exists()  # the default storage was not used
    params = [t["params"] for t in first["trials"]]
    assert params == [t.params for t in study.trials]
    same = search(tmp_path / "b", "--sampler-seed", "5", "--worker", "1", "--pruner", "median")
    assert [t["params"] for t in same["trials"]] == params
    for other in (
        ["--sampler-seed", "6", "--worker", "1"],
        ["--sampler-seed", "5", "--worker", "2"],
    ):
        drawn = search(tmp_path / f"c{other[1]}{other[3]}", *other, "--pruner", "median")
        assert all(t["params"] != p for t, p in zip(drawn["trials"], params, strict=True))
    refused = _invoke("search", *TINY_CLI, "--sampler", "random", "--trials", "2", "--space", "raw",
                      "--out", tmp_path / "b", "--sampler-seed", "5", "--worker", "1", "-q")  # fmt: skip
    assert refused.exit_code == 2 and "pruner" in refused.output
    # --import-results: keep b's report, delete its runs, continue to 3 trials elsewhere
    kept = tmp_path / "kept"
    kept.mkdir()
    for name in ("results.json", "search.json"):
        shutil.copyfile(tmp_path / "b" / name, kept / name)
    shutil.rmtree(tmp_path / "b")
    cont = _invoke("search", *TINY_CLI, "--sampler", "random", "--trials", "3", "--space", "raw",
                   "--out", tmp_path / "d", "--sampler-seed", "5", "--worker", "1", "--pruner",
                   "median", "--import-results", kept, "-q", "--json")  # fmt: skip
    assert cont.exit_code == 0, cont.output
    trials = json.loads(cont.stdout)["trials"]
    assert len(trials) == 3 and [t["params"] for t in trials[:2]] == params
    # the imported trials keep their scores and are not trained again (their costs are re-priced
    # against the study's plain runs, now three); one new trial is
    keys = ("val_accuracy", "test_accuracy")
    assert [[t[k] for k in keys] for t in trials[:2]] == [
        [t[k] for k in keys] for t in same["trials"]
    ]
    assert trials[2]["cost"] > 0 and trials[2]["params"] not in params
    assert sorted(p.name for p in (tmp_path / "d" / "trials").iterdir()) == ["trial-0002"]
