"""The H-scaling benchmark: every method timed at every H, exact methods agree, memory and CLI."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from typer.testing import CliRunner

from metakd.bench import scaling as bs
from metakd.bench import scaling_cases
from metakd.config import ConfigError
from metakd_cli.main import app

SMALL = {"eta": 2, "iterations": 3, "depth": 2, "width": 8, "batch_size": 16, "repeats": 1}


def test_every_method_at_every_h_and_the_exact_ones_agree(tmp_path):
    hs = [1, 3, 10, 30, 34]  # 3K + 2·depth = 34 with depth 2
    res = bs.run_scaling_bench(hs, **SMALL, memory=False, out=tmp_path, quiet=True)
    rows = {(r["method"], r["h"]): r for r in res["results"]}
    assert set(rows) == {(m, h) for m in bs.METHODS for h in hs}
    for r in rows.values():
        assert r["error"] is None, r
        assert r["time_s"] > 0 and math.isfinite(r["steps"]) and len(r["times_s"]) == 1
    assert all(rows[("plain", h)]["steps"] == pytest.approx(SMALL["eta"]) for h in hs)
    for m, tol in (("forward", 1e-4), ("reverse-checkpoint", 1e-5), ("implicit-cg-func", 1e-4)):
        assert max(rows[(m, h)]["rel_diff"] for h in hs) < tol, m
    assert res["config"]["meta"][34]["weight_decay"] == [4]
    md = (tmp_path / "scaling.md").read_text()
    assert "| forward |" in md and "H=34" in md and (tmp_path / "scaling.json").exists()


def test_the_metaparameter_sets_have_h_entries():
    for h in (1, 3, 10, 30, 100):
        shapes = bs.meta_names(h, 70)
        assert sum(math.prod(s) for s in shapes.values()) == h
    with pytest.raises(
        ConfigError, match=r"H = 7 is not one of the supported .* \[1, 3, 10, 30, 100\]"
    ):
        bs.meta_names(7, 70)
    with pytest.raises(ConfigError, match="unknown scaling methods"):
        bs.run_scaling_bench([1], methods=["sideways"], memory=False, quiet=True)


@pytest.mark.slow
def test_memory_is_measured_in_a_forked_process():
    res = bs.run_scaling_bench(
        [1, 3], methods=["reverse", "implicit-cg"], **SMALL, memory=True, quiet=True
    )
    for r in res["results"]:
        assert r["error"] is None and r["peak_mem_mib"] is not None and r["peak_mem_mib"] >= 0


def test_per_class_loss_is_eq4_with_per_sample_metaparameters():
    case = scaling_cases._make_case(30, 2, 8, 16, 1, 1, torch.device("cpu"))
    x, y, t = case.batches[0]
    raw = {k: torch.linspace(-1.0, 1.0, 10) for k in ("beta1", "beta2", "temperature")}
    loss = case.train_loss(case.params, raw, case.batches[0]).detach()
    b1, b2 = torch.sigmoid(raw["beta1"])[y], torch.sigmoid(raw["beta2"])[y]  # (B,) by label
    temp = (0.1 + 9.9 * torch.sigmoid(raw["temperature"]))[y].unsqueeze(1)
    s = case.fmodel(case.params, x).detach()
    soft = -(torch.softmax(t / temp, -1) * torch.log_softmax(s / temp, -1)).sum(-1)
    hard = torch.nn.functional.cross_entropy(s, y, reduction="none")
    l2 = 0.5e-3 * sum((p**2).sum() for p in case.params.values())
    ref = (b1 * hard + b2 * soft).mean() + l2
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)


def test_cli_flag_runs_the_scaling_bench(monkeypatch, tmp_path):
    seen = {}

    def run_scaling_bench(**kw):
        seen.update(kw)
        return {}

    fake = types.ModuleType("metakd.bench.scaling")
    fake.run_scaling_bench = run_scaling_bench
    monkeypatch.setitem(sys.modules, "metakd.bench.scaling", fake)
    result = CliRunner().invoke(
        app, ["bench", "--scaling", "--device", "cpu", "--repeats", "2", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert seen == {"repeats": 2, "device": "cpu", "threads": 1, "out": tmp_path}
