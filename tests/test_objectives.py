"""Pluggable objectives (metakd.training.objectives) and metaparameters from the config: each built-in loss
against a direct numpy computation, per-class and optimizer metaparameters against float64 finite
differences of the trainer's unroll, the registry, and a user's objective from the command line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from test_trainer import _cfg, task  # noqa: F401  (the tiny in-memory task)

from metakd.config import ConfigError
from metakd.functional import losses
from metakd.runs.config import load_config
from metakd.runs.run import check_grad
from metakd.training import objectives
from metakd.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * (np.log(p) - np.log(q))))


def _logits(b: int = 6, k: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(b, k, generator=gen, dtype=torch.float64) * 2
    t = torch.randn(b, k, generator=gen, dtype=torch.float64) * 2
    y = torch.randint(0, k, (b,), generator=gen)
    return s, t, y


@pytest.mark.parametrize("per_class", [False, True])
def test_dkd_matches_the_papers_formulas_computed_sample_by_sample(per_class):
    """TCKD = KL(b^t ‖ b^s) over [p_y, 1 − p_y], NCKD = KL(p̂^t ‖ p̂^s) over the non-target classes
    renormalised, loss = CE + T²(α·TCKD + β·NCKD) (Zhao et al. 2022), written out in numpy."""
    s, t, y = _logits()
    k = s.shape[1]
    if per_class:
        alpha = torch.linspace(0.5, 2.0, k, dtype=torch.float64)
        beta = torch.linspace(8.0, 1.0, k, dtype=torch.float64)
        temp = torch.linspace(1.0, 5.0, k, dtype=torch.float64)
    else:
        alpha, beta, temp = (torch.tensor(v, dtype=torch.float64) for v in (1.5, 6.0, 3.0))
    lam = {"alpha": alpha, "beta": beta, "temperature": temp}
    got = objectives.get("dkd", ce_weight=0.7).loss(s, y, t, lam)
    total = 0.0
    for i in range(s.shape[0]):
        yi = int(y[i])
        a, b, tt = (float(v[yi]) if per_class else float(v) for v in (alpha, beta, temp))
        ps, pt = _np_softmax(s[i].numpy() / tt), _np_softmax(t[i].numpy() / tt)
        bs, bt = np.array([ps[yi], 1 - ps[yi]]), np.array([pt[yi], 1 - pt[yi]])
        rest = [c for c in range(k) if c != yi]
        ns, nt = ps[rest] / ps[rest].sum(), pt[rest] / pt[rest].sum()
        ce = -math.log(_np_softmax(s[i].numpy())[yi])
        total += 0.7 * ce + tt**2 * (a * _kl(bt, bs) + b * _kl(nt, ns))
    assert float(got) == pytest.approx(total / s.shape[0], rel=1e-10)
    # finite gradients in every input, through the masked softmaxes
    leaves = {n: v.clone().requires_grad_(True) for n, v in lam.items()}
    sl = s.clone().requires_grad_(True)
    objectives.get("dkd").loss(sl, y, t, leaves).backward()
    assert all(bool(v.grad.isfinite().all()) for v in [sl, *leaves.values()])


def test_distillation_per_class_weights_and_temperatures_match_a_direct_formula():
    """A [K] metaparameter gives sample i the entry of its class: mean_i β1[y_i]·CE_i +
    β2[y_i]·T[y_i]²·CE(softmax(t_i/T[y_i]), softmax(s_i/T[y_i])) (hinton scaling on)."""
    s, t, y = _logits(seed=1)
    k = s.shape[1]
    b1 = torch.linspace(0.2, 0.9, k, dtype=torch.float64)
    b2 = torch.linspace(0.7, 0.1, k, dtype=torch.float64)
    temp = torch.linspace(0.5, 6.0, k, dtype=torch.float64)
    obj = objectives.get("distillation", hinton_scaling=True)
    got = obj.loss(s, y, t, {"beta1": b1, "beta2": b2, "temperature": temp})
    total = 0.0
    for i in range(s.shape[0]):
        yi = int(y[i])
        tt = float(temp[yi])
        ce = -math.log(_np_softmax(s[i].numpy())[yi])
        soft = -np.sum(_np_softmax(t[i].numpy() / tt) * np.log(_np_softmax(s[i].numpy() / tt)))
        total += float(b1[yi]) * ce + float(b2[yi]) * tt**2 * soft
    assert float(got) == pytest.approx(total / s.shape[0], rel=1e-10)
    # scalars take the unchanged eq. 4 path
    scal = {"beta1": b1[0], "beta2": b2[0], "temperature": temp[0]}
    ref = losses.distillation_loss(s, y, t, beta1=b1[0], beta2=b2[0], temperature=temp[0],
                                   hinton_scaling=True)  # fmt: skip
    assert torch.equal(obj.loss(s, y, t, scal), ref)


def test_cross_entropy_objective_and_the_registry():
    s, _, y = _logits()
    ce = objectives.get("cross_entropy")
    assert ce.specs() == {} and not ce.needs_teacher
    assert torch.equal(ce.loss(s, y, None, {}), torch.nn.functional.cross_entropy(s, y))
    assert list(objectives.available()) == ["cross_entropy", "distillation", "dkd", "per_sample_kd"]
    with pytest.raises(ValueError, match="'dkd' is already registered"):
        objectives.register("dkd")(objectives.DecoupledKD)
    with pytest.raises(ConfigError, match=r"did you mean 'dkd'.*\['cross_entropy', 'distillation'"):
        objectives.get("dk")
    with pytest.raises(ConfigError, match="rejects objective_kwargs"):
        objectives.get("dkd", gamma=2)


def test_meta_params_default_to_the_objectives_and_overrides_edit_them():
    default = load_config(None)
    assert default.meta.params == objectives.get("distillation").specs()
    dkd = load_config(None, ["meta.params.temperature.shape=[2]", "objective=dkd"])
    assert list(dkd.meta.params) == ["alpha", "beta", "temperature"]
    assert dkd.meta.params["temperature"].shape == [2] and dkd.meta.params["beta"].init == 8.0
    assert load_config(None, ["objective=cross_entropy"]).meta.params == {}
    lr = load_config(None, ["meta.params.lr.constraint=exp", "meta.params.lr.init=0.01"])
    assert list(lr.meta.params) == ["beta1", "beta2", "temperature", "lr"]
    with pytest.raises(ConfigError, match="unknown metaparameter 'alpha'"):
        load_config(None, ["meta.params.alpha.init=1.0"])  # not the distillation objective's


def test_trainer_refuses_metaparameters_nobody_reads(task):  # noqa: F811
    splits, logits = task
    model = torch.nn.Linear(3, 2)
    cases = [
        (["objective=cross_entropy"], r"meta.method=hypergrad has no metaparameters to tune"),
        (["meta.params.temperature.shape=[3]"], r"temperature.shape=\[3\].*per class \(\[2\]\)"),
        (["meta.params.lr.init=0.1", "meta.params.lr.shape=[2]"], r"lr.shape=\[2\].*one scalar"),
        (["meta.params.lr.init=0.1", "meta.hypergrad.unroll_optimizer=sgd"],
         r"meta.params.lr: .*unroll_optimizer=sgd.*do: finite-difference, forward, online, reverse"),
        (["meta.params.lr.init=0.1", "meta.hypergrad.backend=torchopt"],
         r"meta.params.lr: .*backend=torchopt"),
        (["meta.params.lr.init=0.1", "meta.hypergrad.method=implicit"],
         r"meta.params.lr: meta.hypergrad.method=implicit does not differentiate"),
    ]  # fmt: skip
    for over, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            Trainer(_cfg("meta.method=hypergrad", *over), model, splits, logits)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def _grad_cfg(cache: str, *overrides: str):
    base = ["device=cpu", "teacher.epochs=200", "train.epochs=40", f"data.cache_dir={cache}",
            "wandb.mode=disabled", "meta.unroll=3"]  # fmt: skip
    return load_config(None, [*base, *overrides])


PER_CLASS_T = ["meta.params.temperature.shape=[2]", "meta.params.beta2.shape=[2]"]
DKD_PER_CLASS = ["meta.params.temperature.shape=[2]", "meta.params.alpha.shape=[2]"]
LR = ["meta.params.lr.constraint=exp", "meta.params.lr.init=0.05"]
WD = ["meta.params.weight_decay.constraint=exp", "meta.params.weight_decay.init=0.01"]


@pytest.mark.parametrize(
    ("overrides", "tol"),
    [
        ([*PER_CLASS_T, "train.optimizer=adam", "train.lr=0.05"], 1e-4),
        ([*DKD_PER_CLASS, "objective=dkd", "train.optimizer=sgd", "train.lr=0.1"], 1e-4),
        ([*LR, *WD, "train.optimizer=adam"], 1e-4),
        ([*LR, "objective=cross_entropy", "train.optimizer=adam"], 1e-4),
        ([*LR, *WD, "train.optimizer=sgd", "train.momentum=0.9"], 1e-4),
        ([*LR, *PER_CLASS_T, "train.optimizer=adam", "meta.hypergrad.method=forward"], 1e-4),
        ([*LR, *WD, "train.optimizer=adam", "meta.hypergrad.method=online"], 1e-4),
        ([*LR, "train.optimizer=sgd", "meta.hypergrad.method=finite-difference", "meta.unroll=1"],
         1e-2),
    ],
    ids=["per-class-adam", "dkd-per-class-sgd", "lr-wd-adam", "ce-lr-adam", "lr-wd-sgd-momentum",
         "forward-lr-per-class", "online-lr-wd", "fd-lr"],
)  # fmt: skip
def test_hypergradients_of_per_class_and_optimizer_metaparameters_match_finite_differences(
    cache, overrides, tol
):
    """The trainer's hypergradient (check_grad: the configured method at initialisation) against
    central differences of a float64 re-run of the η-step unroll with plain loops, per entry."""
    result = check_grad(_grad_cfg(cache, *overrides), eps=1e-4)
    names = {n for o in overrides if o.startswith("meta.params.") for n in [o.split(".")[2]]}
    assert names <= set(result)
    for name, entry in result.items():
        hg = np.atleast_1d(entry["hypergrad"])
        if name == "beta":  # DKD on two classes: one non-target class, NCKD ≡ 0
            assert np.all(hg == 0) and np.all(np.atleast_1d(entry["finite_difference"]) == 0)
            continue
        fd = np.atleast_1d(entry["finite_difference"])
        assert np.abs(hg).max() > 1e-7, name  # a real signal, not two zeros
        # relative to the largest entry: a per-class vector may hold entries near float32 round-off
        assert np.abs(hg - fd).max() / np.abs(fd).max() < tol, (name, entry)


def test_the_real_optimizer_runs_with_the_learned_learning_rate(task):  # noqa: F811
    """With meta.params.lr the real torch optimizer steps with the current λ: a fixed lr trains
    like train.lr set to that value, and a tuned lr is what the optimizer holds at the end."""
    splits, logits = task

    def run(*over: str) -> Trainer:
        torch.manual_seed(0)
        tr = Trainer(_cfg("train.epochs=10", *over), torch.nn.Linear(3, 2), splits, logits)
        tr.train()
        return tr

    fixed = run("meta.method=fixed", "meta.values={beta1: 0.5, beta2: 0.5, temperature: 2.0, lr: 0.02}",
                "meta.params.lr.constraint=exp", "train.lr=0.3")  # fmt: skip
    plain = run("meta.method=fixed", "meta.values={beta1: 0.5, beta2: 0.5, temperature: 2.0}",
                "train.lr=0.02")  # fmt: skip
    for a, b in zip(fixed.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    tuned = run(
        "meta.method=hypergrad", "meta.params.lr.constraint=exp", "meta.params.lr.init=0.05"
    )
    lr = tuned.meta.values()["lr"]
    assert abs(lr - 0.05) > 1e-4  # it moved
    assert tuned.optimizer.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-6)


USER_OBJECTIVE = '''
    import torch
    from metakd.config import MetaParamSpec
    from metakd.training.objectives import Objective


    class SmoothedKD(Objective):
        """(1 - ε)·CE + ε·uniform-CE + γ·CE(softmax(t), softmax(s))."""

        neutral = {"smoothing": 0.0, "gamma": 0.0}

        def specs(self):
            return {"smoothing": MetaParamSpec(lo=0.0, hi=0.5, init=0.1),
                    "gamma": MetaParamSpec(constraint="softplus", init=1.0)}

        def loss(self, logits, targets, teacher_logits, lam):
            logp = logits.log_softmax(-1)
            nll = -logp.gather(1, targets[:, None]).squeeze(1)
            ce = ((1 - lam["smoothing"]) * nll - lam["smoothing"] * logp.mean(-1)).mean()
            soft = -(teacher_logits.softmax(-1) * logp).sum(-1).mean()
            return ce + lam["gamma"] * soft
'''


def _metakd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-m", "metakd_cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)  # fmt: skip


def test_a_users_objective_from_the_working_directory_on_the_command_line(tmp_path):
    (tmp_path / "mylosses.py").write_text(textwrap.dedent(USER_OBJECTIVE))
    common = ["--quiet", "--wandb", "disabled", "--device", "cpu", "teacher.epochs=100",
              "train.epochs=30", f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    out = tmp_path / "run"
    proc = _metakd("train", "objective=mylosses:SmoothedKD", "--out", str(out), *common,
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["meta"]) == {"smoothing", "gamma"}
    assert summary["meta"]["smoothing"] != pytest.approx(0.1, abs=1e-6)  # tuned
    bad = _metakd("train", "objective=mylosses:Nope", "--out", str(tmp_path / "bad"), *common,
                  cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "objective 'mylosses:Nope'" in bad.stderr and "has no attribute 'Nope'" in bad.stderr
