"""Smoke tests of the benchmark: structure of the results, every engine timed, engines agree."""

from __future__ import annotations

import json
import math

import pytest

from metakd.bench import engines as bench
from metakd.bench import memory as bench_memory
from metakd.config import ConfigError


def test_run_bench_structure_and_agreement(tmp_path):
    res = bench.run_bench(
        "mlp", batch_size=8, device="cpu", etas=[1, 2], repeats=1, out=tmp_path, quiet=True,
        memory=False,
    )  # fmt: skip
    assert res["config"]["etas"] == [1, 2] and res["config"]["threads"] >= 1
    assert set(res["env"]) >= {"torch", "higher", "torchopt", "cpu"}
    rows = {(r["engine"], r["eta"]): r for r in res["results"]}
    assert set(rows) == {(e, k) for e in bench.ENGINES for k in (1, 2)}
    for (engine, eta), r in rows.items():
        if engine == "metakd/finite-difference" and eta == 2:
            assert r["skipped"] and r["time_s"] is None
            continue
        assert r["error"] is None, r
        assert r["time_s"] is not None and math.isfinite(r["time_s"]) and r["time_s"] > 0
        assert len(r["times_s"]) == 1
        if engine not in ("plain", "metakd/finite-difference"):
            # every exact engine computes the same hypergradient (float32)
            assert r["rel_diff_vs_reverse"] <= 1e-3, (engine, eta, r["rel_diff_vs_reverse"])
    fd = rows[("metakd/finite-difference", 1)]["rel_diff_vs_reverse"]
    assert fd is not None and fd < 0.1
    assert [e["eta"] for e in res["ratios"]] == [1, 2]
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["results"] == json.loads(json.dumps(res["results"]))
    assert "| metakd/reverse |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_memory_case_measures_peak_rss():
    spec = {"model": "mlp", "batch_size": 4096, "eta": 4, "engine": "metakd/reverse", "threads": 1}
    out = bench_memory._memory_case(spec)
    assert "error" not in out, out
    # at least the four (4096, 64) hidden activations kept for the backward sweep
    assert out["peak_mem_mib"] >= 4 * 4096 * 64 * 4 / 2**20
    assert "error" in bench_memory._memory_case({**spec, "engine": "nope"})


@pytest.mark.slow
def test_cpu_peak_memory_grows_with_eta_for_reverse():
    res = bench.run_bench(
        "mlp", batch_size=512, device="cpu", etas=[1, 8], repeats=1, quiet=True,
        engines=["metakd/reverse", "metakd/forward"],
    )  # fmt: skip
    assert "forked" in res["method"]["memory"]
    mem = {(r["engine"], r["eta"]): r["peak_mem_mib"] for r in res["results"]}
    assert all(v is not None and v >= 0 for v in mem.values()), mem
    # reverse mode keeps every step's activations; forward mode does not
    assert mem[("metakd/reverse", 8)] > mem[("metakd/reverse", 1)]


def test_external_engines_skipped_above_limit_on_cpu():
    res = bench.run_bench(
        "logreg", batch_size=4, device="cpu", etas=[1, 2], repeats=1, quiet=True, memory=False,
        engines=["metakd/reverse", "higher"], external_max_eta=1,
    )  # fmt: skip
    rows = {(r["engine"], r["eta"]): r for r in res["results"]}
    assert rows[("higher", 2)]["skipped"] and rows[("higher", 2)]["time_s"] is None
    assert rows[("metakd/reverse", 2)]["time_s"] is not None
    assert any("higher at η = 2" in n for n in res["notes"])


def test_bad_arguments_raise():
    with pytest.raises(ConfigError, match="unknown bench engines"):
        bench.run_bench("mlp", engines=["nope"], quiet=True)
    with pytest.raises(ConfigError, match="etas"):
        bench.run_bench("mlp", etas=[0], quiet=True)
    with pytest.raises(ConfigError, match="unknown model"):
        bench.run_bench("no_such_model", etas=[1], quiet=True)


@pytest.mark.slow
def test_epoch_bench_split_adds_up(tmp_path):
    res = bench.run_epoch_bench("mlp", "cpu", steps=20, batch_size=16, n_eval=64, out=tmp_path,
                                quiet=True)  # fmt: skip
    rows = {r["method"]: r for r in res["epochs"]}
    assert set(rows) == {"baseline", "hypergrad", "forecast"}
    assert rows["hypergrad"]["hypergradient_steps"] == 20
    assert rows["forecast"]["predicted_steps"] == 10
    for r in rows.values():
        assert sum(r["split_s"].values()) == pytest.approx(r["wall_s"])
    assert (tmp_path / "epoch.json").is_file()
