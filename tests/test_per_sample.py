"""Issue 32: label noise on the training labels (metakd.data.noise), per-sample metaparameters — free entries
indexed by example id (metakd.training.per_sample) and a meta-weight network (objective=per_sample_kd) — their
hypergradients against float64 finite differences, and per_sample.pt in a run directory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from metakd.config import DataConfig, LabelNoiseConfig
from metakd.data import load_data
from metakd.data.noise import CIFAR10_CLASSES, CIFAR10_MAP, apply_label_noise, class_map, flip
from metakd.data.pool import Pool, pool_splits
from metakd.runs.config import load_config
from metakd.runs.run import check_grad
from metakd.training.trainer import Trainer

SIZES = ["data.n_teacher=200", "data.n_train=100", "data.n_val=30", "data.n_test=50"]


def _data(*overrides: str, seed: int = 0):
    cfg = load_config(None, [*SIZES, *overrides])
    return load_data(cfg.data, seed, "cpu")


# ------------------------------------------------------------------ label noise


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
def test_label_noise_flips_exactly_round_rate_n_training_labels_seeded_never_val_or_test(kind):
    clean = _data()
    noisy = _data("data.label_noise.rate=0.4", f"data.label_noise.kind={kind}")
    for name in ("val", "test"):  # the meta set and the test set keep their labels
        assert torch.equal(getattr(noisy, name).y, getattr(clean, name).y)
    for name in ("teacher", "train"):
        old, new, mask = getattr(clean, name).y, getattr(noisy, name).y, noisy.flipped[name]
        assert torch.equal(mask, new != old)
        if kind == "symmetric":
            assert int(mask.sum()) == round(0.4 * len(old))
        else:  # two classes, the next-class map 0 -> 1 -> 0: round(rate·N_c) per class
            assert int(mask.sum()) == sum(round(0.4 * int((old == c).sum())) for c in (0, 1))
        assert torch.equal(new[mask], 1 - old[mask])
    assert noisy.info["label_noise"]["flipped"]["train"] == int(noisy.flipped["train"].sum())
    assert noisy.info["fingerprint"] != clean.info["fingerprint"]
    assert noisy.info["teacher_fingerprint"] != clean.info["teacher_fingerprint"]
    again = _data("data.label_noise.rate=0.4", f"data.label_noise.kind={kind}")
    other = _data("data.label_noise.rate=0.4", f"data.label_noise.kind={kind}", "data.data_seed=7")
    assert torch.equal(again.flipped["train"], noisy.flipped["train"])  # seeded by the data seed
    base7 = _data("data.data_seed=7")
    assert not torch.equal(other.flipped["train"], noisy.flipped["train"])
    assert torch.equal(other.flipped["train"], other.train.y != base7.train.y)
    assert clean.flipped == {} and "label_noise" not in clean.info


def test_symmetric_flips_go_uniformly_to_the_other_classes_and_asymmetric_follow_the_map():
    k, n = 10, 20_000
    y = torch.arange(n) % k
    gen = torch.Generator().manual_seed(0)
    new, mask = flip(y, 0.4, "symmetric", {}, k, gen)
    assert int(mask.sum()) == 8000 and bool((new[mask] != y[mask]).all())
    counts = torch.bincount((new[mask] - y[mask]) % k, minlength=k)[1:].double()
    assert counts.min() > 0.8 * counts.mean()  # each of the 9 other classes about 1/9 of the flips
    cifar = class_map(LabelNoiseConfig(kind="asymmetric"), k, CIFAR10_CLASSES)
    assert cifar == CIFAR10_MAP == {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}  # truck→automobile ... cat↔dog
    new, mask = flip(y, 0.4, "asymmetric", cifar, k, gen)
    for c in range(k):
        rows = y == c
        assert int(mask[rows].sum()) == (800 if c in cifar else 0)
        if c in cifar:
            assert bool((new[rows & mask] == cifar[c]).all())
    assert class_map(LabelNoiseConfig(kind="asymmetric"), 3) == {0: 1, 1: 2, 2: 0}
    assert class_map(LabelNoiseConfig(kind="asymmetric", map={0: 2}), 3) == {0: 2}


def test_the_teacher_split_holding_the_train_examples_flips_them_alike():
    """Image data: the teacher trains on every non-test example, the train split's among them (its first
    rows): one noisy label per example, and the teacher's count is still round(rate·N_teacher)."""
    gen = torch.Generator().manual_seed(1)
    pool = Pool(torch.randn(400, 3), torch.randint(0, 4, (400,), generator=gen), list("abcd"), "fp")
    cfg = DataConfig(n_train=100, n_val=40, n_test=60, normalize=False)
    clean = pool_splits(cfg, 5, torch.device("cpu"), pool)
    noisy = apply_label_noise(pool_splits(cfg, 5, torch.device("cpu"), pool),
                              LabelNoiseConfig(rate=0.4), seed=5)  # fmt: skip
    mt, mtr = noisy.flipped["teacher"], noisy.flipped["train"]
    assert torch.equal(noisy.teacher.y[:100], noisy.train.y) and torch.equal(mt[:100], mtr)
    assert int(mt.sum()) == round(0.4 * 340) and int(mtr.sum()) == 40
    assert torch.equal(noisy.val.y, clean.val.y) and torch.equal(noisy.test.y, clean.test.y)


# ------------------------------------------------------------------ hypergradients vs finite differences

GRAD = ["device=cpu", "teacher.epochs=200", "train.epochs=40", "wandb.mode=disabled",
        "train.batch_size=5"]  # fmt: skip
FREE = ["meta.params.beta1.per_sample=true"]
NET = ["objective=per_sample_kd", "objective_kwargs.detach=false"]
SGD1 = ["train.optimizer=sgd", "train.lr=0.5", "meta.unroll=1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def _check(cache: str, *overrides: str) -> dict:
    return check_grad(load_config(None, [*GRAD, f"data.cache_dir={cache}", *overrides]), eps=1e-4)


def _rel(entry: dict) -> float:
    hg, fd = (np.atleast_1d(entry[k]).ravel() for k in ("hypergrad", "finite_difference"))
    assert np.abs(hg).max() > 1e-9  # a real signal, not two zeros
    return float(np.abs(hg - fd).max() / np.abs(fd).max())


@pytest.mark.parametrize(
    "overrides",
    [
        [*FREE, "train.optimizer=adam", "train.lr=0.05", "meta.unroll=3"],
        [*FREE, "meta.hypergrad.method=forward", "meta.unroll=3"],
        [*FREE, "meta.hypergrad.method=online", "meta.unroll=3"],
        [*NET, "train.optimizer=adam", "meta.unroll=3"],
        [*NET, "meta.hypergrad.method=forward", "train.optimizer=sgd", "meta.unroll=3"],
        [*NET, "meta.hypergrad.method=online", "meta.unroll=3"],
        [*NET, "objective_kwargs.per_sample_temperature=true", "meta.unroll=2"],
        [*NET, "train.normalize_weights=true", "train.hinton_scaling=true", "meta.unroll=2"],
        [*NET, "objective_kwargs.example_weight=true", "train.normalize_weights=true", "meta.unroll=2",
         "objective_kwargs.init_scale=1.0"],  # larger weights: the example weights differ from the start
        ["objective=per_sample_kd", *SGD1],  # detached loss signal (the published choice): exact at η = 1
    ],
    ids=["free-reverse-adam", "free-forward", "free-online", "net-reverse-adam", "net-forward-sgd",
         "net-online", "net-temperature", "net-normalized", "net-example-weight", "net-detached-eta1"],
)  # fmt: skip
def test_per_sample_hypergradients_match_float64_finite_differences(cache, overrides):
    result = _check(cache, *overrides)
    for name, entry in result.items():
        assert _rel(entry) < 1e-4, (name, entry)
    if "objective=per_sample_kd" in overrides:
        assert {"mwn_w1", "mwn_b1", "mwn_w2", "mwn_b2"} <= set(result)
        assert np.shape(result["mwn_w1"]["hypergrad"]) == (3, 16)
    else:
        assert np.shape(result["beta1"]["hypergrad"]) == (15,)  # N = data.n_train


def test_a_detached_loss_signal_is_a_stop_gradient_beyond_one_step(cache):
    """The docstring's claim: with detach (Meta-Weight-Net's) the η = 3 hypergradient omits the path
    through later steps' signals (visible with larger network weights); detach=false is exact."""
    common = ["objective=per_sample_kd", "objective_kwargs.init_scale=2.0", "train.optimizer=sgd",
              "train.lr=0.5", "meta.unroll=3"]  # fmt: skip
    detached = _check(cache, *common)
    exact = _check(cache, *common, "objective_kwargs.detach=false")
    assert max(_rel(e) for e in detached.values()) > 1e-3
    assert max(_rel(e) for e in exact.values()) < 1e-5


def test_only_the_unrolled_batchs_entries_get_a_hypergradient(cache):
    cfg = load_config(None, [*GRAD, f"data.cache_dir={cache}", *FREE, *SGD1])
    result = check_grad(cfg, eps=1e-4)
    hg = np.asarray(result["beta1"]["hypergrad"])
    fd = np.asarray(result["beta1"]["finite_difference"])
    from metakd.runs.build import build

    splits, logits, model = build(cfg, torch.device("cpu"))
    ids = Trainer(cfg, model, splits, logits).batch(0).ids
    assert ids is not None and len(ids) == 5
    inside = np.zeros(hg.size, dtype=bool)
    inside[ids.numpy()] = True
    assert np.all(hg[~inside] == 0) and np.all(fd[~inside] == 0)
    assert np.all(hg[inside] != 0)
    assert np.abs(hg - fd).max() / np.abs(fd).max() < 1e-4


def _network_inputs(obj, n: int, temperature: float) -> tuple:
    """Seeded float64 (student logits (n, 4), labels (n,), teacher logits (n, 4), λ of obj's specs)."""
    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(n, 4, generator=g, dtype=torch.float64) for _ in range(2))
    y = torch.randint(0, 4, (n,), generator=g)
    lam = {
        k: torch.randn(v.shape or [], generator=g, dtype=torch.float64)
        for k, v in obj.specs().items()
    }
    lam["temperature"] = torch.tensor(temperature, dtype=torch.float64)
    return s, y, t, lam


@pytest.mark.parametrize("normalize", [False, True])
def test_the_network_objective_reads_train_normalize_weights_and_hinton_scaling(normalize):
    """train.normalize_weights / train.hinton_scaling reach objective=per_sample_kd as they reach
    distillation: each example's terms over β1ᵢ + β2ᵢ, its KD term times T² (against the formula)."""
    from metakd.training import objectives

    cfg = load_config(None, ["objective=per_sample_kd", f"train.normalize_weights={normalize}",
                             "train.hinton_scaling=true"])  # fmt: skip
    obj = objectives.build(cfg)
    assert (obj.normalize_weights, obj.hinton_scaling) == (normalize, True)
    s, y, t, lam = _network_inputs(obj, 6, temperature=2.5)
    w = obj.weights(s, y, t, lam)
    hard = torch.nn.functional.cross_entropy(s, y, reduction="none")
    soft = -(torch.softmax(t / 2.5, -1) * torch.log_softmax(s / 2.5, -1)).sum(-1) * 2.5**2
    per = w["beta1"] * hard + w["beta2"] * soft
    want = (per / (w["beta1"] + w["beta2"]) if normalize else per).mean()
    torch.testing.assert_close(obj.loss(s, y, t, lam), want)
    # an explicit objective_kwargs value still wins over the train key
    explicit = load_config(None, ["objective=per_sample_kd", "train.normalize_weights=true",
                                  "objective_kwargs.normalize_weights=false"])  # fmt: skip
    assert objectives.build(explicit).normalize_weights is False


def test_example_weights_make_the_loss_a_normalized_weighted_mean_of_the_examples_terms():
    """objective_kwargs.example_weight: L = Σᵢ vᵢ Lᵢ / Σᵢ vᵢ with vᵢ = σ(last output) and Lᵢ the example's
    normalized eq. 4 term (against the formula); with mwn_w2 = 0 every vᵢ is σ(0) = 0.5 and L is the plain
    mean, the loss without example weights."""
    from metakd.training import objectives

    cfg = load_config(None, ["objective=per_sample_kd", "objective_kwargs.example_weight=true",
                             "train.normalize_weights=true"])  # fmt: skip
    obj = objectives.build(cfg)
    assert obj.specs()["mwn_b2"].shape == [3] and obj.specs()["mwn_w2"].shape == [16, 3]
    s, y, t, lam = _network_inputs(obj, 7, temperature=3.0)
    w = obj.weights(s, y, t, lam)
    assert w["weight"].shape == (7,) and float(w["weight"].std()) > 0
    hard = torch.nn.functional.cross_entropy(s, y, reduction="none")
    soft = -(torch.softmax(t / 3.0, -1) * torch.log_softmax(s / 3.0, -1)).sum(-1)
    per = (w["beta1"] * hard + w["beta2"] * soft) / (w["beta1"] + w["beta2"])
    torch.testing.assert_close(
        obj.loss(s, y, t, lam), (w["weight"] * per).sum() / w["weight"].sum()
    )
    assert set(obj.per_example(s, y, t, lam)) == {"beta1", "beta2", "weight"}
    # equal weights (the output's column of W2 and its bias at 0): the plain mean
    lam["mwn_w2"] = lam["mwn_w2"].clone()
    lam["mwn_w2"][:, 2] = 0.0
    lam["mwn_b2"] = torch.tensor([lam["mwn_b2"][0], lam["mwn_b2"][1], 0.0], dtype=torch.float64)
    w = obj.weights(s, y, t, lam)
    torch.testing.assert_close(w["weight"], torch.full((7,), 0.5, dtype=torch.float64))
    per = (w["beta1"] * hard + w["beta2"] * soft) / (w["beta1"] + w["beta2"])
    torch.testing.assert_close(obj.loss(s, y, t, lam), per.mean())


def test_the_network_starts_at_a_chosen_mix_through_a_list_init_of_its_output_bias():
    """meta.params.mwn_b2.init=[logit β1, logit β2] with mwn_w2 = 0 starts every example at (β1, β2): the
    network's output is then σ(b2) whatever the signals (the noise study's warm start, row mwn10w)."""
    from metakd.functional.metaparams import MetaParams
    from metakd.training import objectives

    logit = [math.log(0.01 / 0.99), math.log(0.99 / 0.01)]
    cfg = load_config(None, ["objective=per_sample_kd", f"meta.params.mwn_b2.init={logit}",
                             "meta.params.mwn_w2.init_range=[0,0]", "meta.params.temperature.init=6.5"])  # fmt: skip
    lam = MetaParams(cfg.meta.params, generator=torch.Generator().manual_seed(0)).constrained()
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    w = objectives.build(cfg).weights(s, torch.randint(0, 4, (8,), generator=g), t, lam)
    # float32 storage of b2 = ±4.595: σ of it is 0.01 / 0.99 within a few float32 ulps of 1
    eps = 4 * 2**-24
    torch.testing.assert_close(w["beta1"], torch.full((8,), 0.01), rtol=0, atol=eps)
    torch.testing.assert_close(w["beta2"], torch.full((8,), 0.99), rtol=0, atol=eps)
    # T = 0.1 + 9.9 σ(r) in float32: a few roundings of values near 6.5, each under 2^-24 relative
    torch.testing.assert_close(w["temperature"], torch.tensor(6.5), rtol=16 * 2**-24, atol=0)


def test_fixed_per_sample_values_take_one_number_per_training_example(cache):
    """meta.values of a per-sample metaparameter: N numbers set entry i of example i (the noise study's
    oracle, benchmarks/noise_oracle.py); another count is one config error naming N."""
    from metakd.config import ConfigError
    from metakd.runs.build import build

    base = [*GRAD, f"data.cache_dir={cache}", *FREE, "meta.method=fixed", "meta.values.beta2=0.5",
            "meta.values.temperature=2"]  # fmt: skip
    values = [0.1 + 0.8 * i / 14 for i in range(15)]  # N = 15 (data.n_train)
    cfg = load_config(None, [*base, f"meta.values.beta1={values}"])
    splits, logits, model = build(cfg, torch.device("cpu"))
    meta = Trainer(cfg, model, splits, logits).meta
    assert meta is not None
    # raw entries are float32 (MetaParams' dtype): σ(logit(v)) returns v to float32 precision, not float64's
    got = meta.constrained()["beta1"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(values, dtype=torch.float32))
    bad = load_config(None, [*base, f"meta.values.beta1={values[:4]}"])
    with pytest.raises(
        ConfigError, match=r"meta\.values\.beta1 has 4 entries.*needs one number or 15"
    ):
        Trainer(bad, model, splits, logits)


# ------------------------------------------------------------------ runs: per_sample.pt


def _metakd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "metakd_cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)  # fmt: skip


@pytest.mark.parametrize(
    ("form", "keys"),
    [
        (["meta.params.beta1.per_sample=true"], {"beta1"}),
        (["objective=per_sample_kd"], {"beta1", "beta2"}),
        (["objective=per_sample_kd", "objective_kwargs.per_sample_temperature=true"],
         {"beta1", "beta2", "temperature"}),
        (["objective=per_sample_kd", "objective_kwargs.example_weight=true"],
         {"beta1", "beta2", "weight"}),
    ],
    ids=["free", "network", "network-temperature", "network-example-weight"],
)  # fmt: skip
def test_a_run_from_the_command_line_writes_per_sample_pt(tmp_path, form, keys):
    out = tmp_path / "run"
    proc = _metakd(
        "train", "--quiet", "--wandb", "disabled", "--device", "cpu", "--out", str(out),
        "teacher.epochs=100", "train.epochs=5", "train.batch_size=20", f"data.cache_dir={tmp_path}",
        *SIZES, "data.label_noise.rate=0.4", *form, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "per_sample.pt" in proc.stdout  # the summary's files line names it
    state = torch.load(out / "per_sample.pt", weights_only=True)
    assert set(state) == {"flipped", "labels", *keys}
    assert state["flipped"].dtype == torch.bool and state["flipped"].shape == (100,)
    assert int(state["flipped"].sum()) == 40 and state["labels"].shape == (100,)
    for k in keys:
        v = state[k]
        assert v.dtype == torch.float32 and v.shape == (100,) and bool(v.isfinite().all())
        assert float(v.std()) > 0  # per example, not one value
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if "beta1" in summary["meta"]:  # a per-sample λ is logged as its mean over the examples
        assert isinstance(summary["meta"]["beta1"], float)
        assert all(isinstance(r["meta"]["beta1"], float) for r in rows)
        assert float(state["beta1"].double().mean()) == pytest.approx(summary["meta"]["beta1"])


def test_no_per_sample_pt_without_noise_or_per_sample_metaparameters(tmp_path):
    cfg = load_config(None, [*SIZES, "train.epochs=1", "train.batch_size=50", "teacher.epochs=20",
                             f"data.cache_dir={tmp_path}", "wandb.mode=disabled", "device=cpu"])  # fmt: skip
    from metakd.runs.run import train_run

    train_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "per_sample.pt").exists()
