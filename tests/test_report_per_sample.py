"""metakd report's per-sample section (issue 32): per_sample.png and the AUROC table, from hand-written
per_sample.pt files next to fake runs (tests/test_report.py's write_run) and one real tiny run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from metakd.reporting.loading import load_run
from metakd.reporting.per_sample import auroc, load_per_sample, per_sample_figure
from metakd.reporting.report import build_report
from tests.test_report import write_run

N, N_FLIPPED = 60, 20


def _state(seed: int = 0, **values: np.ndarray) -> dict[str, torch.Tensor]:
    flipped = torch.zeros(N, dtype=torch.bool)
    flipped[torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:N_FLIPPED]] = True
    return {
        "flipped": flipped,
        "labels": torch.arange(N) % 3,
        **{k: torch.as_tensor(v, dtype=torch.float32) for k, v in values.items()},
    }


def _noisy_run(root: Path, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    run = root / f"hypergrad/seed-{seed}"
    write_run(run, method="hypergrad", seed=seed, steps=40)
    rng = np.random.default_rng(seed)
    state = _state(seed, beta1=rng.uniform(size=N), beta2=rng.uniform(size=N))
    f = state["flipped"].numpy()
    state["beta1"][f] -= 0.3  # flipped: lower β1, higher β2, partly separated
    state["beta2"][f] += 0.2
    torch.save(state, run / "per_sample.pt")
    return run, state


def test_auroc_is_sklearns_with_flipped_positive_and_minus_beta1() -> None:
    rng = np.random.default_rng(1)
    flipped = rng.uniform(size=200) < 0.3
    v = rng.normal(size=200) + flipped
    assert auroc(v, flipped, "beta2") == pytest.approx(roc_auc_score(flipped, v))
    assert auroc(v, flipped, "beta1") == pytest.approx(roc_auc_score(flipped, -v))
    separated = np.where(flipped, 0.1, 0.9)  # flipped examples get a low β1
    assert auroc(separated, flipped, "beta1") == 1.0
    assert auroc(separated, flipped, "beta2") == 0.0
    assert auroc(np.full(200, 0.5), flipped, "beta1") == 0.5


def test_report_draws_clean_vs_flipped_and_tabulates_the_auroc(tmp_path: Path) -> None:
    run, state = _noisy_run(tmp_path / "exp")
    write_run(
        tmp_path / "exp/baseline/seed-0", method="baseline", seed=0, steps=40
    )  # no per_sample.pt
    out = tmp_path / "report"
    text = build_report([tmp_path / "exp"], out).read_text()
    with Image.open(out / "per_sample.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert "## Per-sample metaparameters: how well they find the noise" in text
    assert "score −beta1: low ⇒ flipped" in text and "score +beta2: high ⇒ flipped" in text
    row = next(line for line in text.splitlines() if line.startswith("| ../exp/hypergrad"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    f = state["flipped"].numpy()
    expect = [roc_auc_score(f, -state["beta1"].numpy()), roc_auc_score(f, state["beta2"].numpy())]
    assert cells[2:4] == [str(N - N_FLIPPED), str(N_FLIPPED)]
    assert [float(c) for c in cells[4:]] == pytest.approx(expect, abs=5e-4)
    assert "baseline/seed-0 |" not in text.split("## Per-sample")[1].split("##")[0]

    entry = load_per_sample(load_run(run))
    assert entry is not None
    fig = per_sample_figure([entry], ["run"])
    assert fig is not None
    axes = [ax for ax in fig.axes if ax.axison]
    assert len(axes) == 2  # one panel per name
    for ax, name in zip(axes, ("beta1", "beta2"), strict=True):
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend == [f"clean (n={N - N_FLIPPED})", f"flipped (n={N_FLIPPED})"]
        assert name in ax.get_title()


def test_nothing_without_per_sample_pt_or_without_both_clean_and_flipped(tmp_path: Path) -> None:
    write_run(tmp_path / "exp/hypergrad/seed-0", method="hypergrad", seed=0, steps=40)
    no_noise = tmp_path / "exp/hypergrad/seed-1"
    write_run(no_noise, method="hypergrad", seed=1, steps=40)
    state = _state(beta1=np.linspace(0, 1, N))
    state["flipped"][:] = False  # per-sample λ without noise: nothing to separate
    torch.save(state, no_noise / "per_sample.pt")
    only_flags = tmp_path / "exp/hypergrad/seed-2"
    write_run(only_flags, method="hypergrad", seed=2, steps=40)
    torch.save(_state(), only_flags / "per_sample.pt")  # noise but no per-sample metaparameter
    damaged = tmp_path / "exp/hypergrad/seed-3"
    write_run(damaged, method="hypergrad", seed=3, steps=40)
    (damaged / "per_sample.pt").write_bytes(b"not a torch file")
    out = tmp_path / "report"
    text = build_report([tmp_path / "exp"], out).read_text()
    assert not (out / "per_sample.png").exists()
    assert "Per-sample metaparameters" not in text and "per_sample.png" not in text


def test_a_real_tiny_noisy_run_is_reported(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "metakd_cli.main", "train", "--quiet", "--wandb", "disabled",
           "--device", "cpu", "--out", str(run), "teacher.epochs=20", "train.epochs=2",
           "train.batch_size=20", f"data.cache_dir={tmp_path}", "data.n_teacher=200",
           "data.n_train=100", "data.n_val=30", "data.n_test=50", "data.label_noise.rate=0.4",
           "meta.params.beta1.per_sample=true"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = build_report([run], tmp_path / "report").read_text()
    state = torch.load(run / "per_sample.pt", weights_only=True)
    expect = roc_auc_score(state["flipped"].numpy(), -state["beta1"].numpy())
    row = next(line for line in text.splitlines() if line.startswith("| ../run |"))
    assert float(row.strip("|").split("|")[-1]) == pytest.approx(expect, abs=5e-4)
    assert (tmp_path / "report/per_sample.png").is_file()
