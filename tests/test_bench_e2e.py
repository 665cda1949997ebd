"""The step bench: its minimal eager loop walks the Trainer's λ trajectory, and the table is complete."""

from __future__ import annotations

import json

import pytest

from metakd.bench import e2e as bench_e2e


@pytest.mark.parametrize("case", ["synthetic", "cifar"])
def test_the_floor_loop_is_the_trainers_math(case):
    cfg, splits, logits = bench_e2e._case(case)
    trainer = bench_e2e._trainer(cfg, splits, logits)
    floor = bench_e2e._floor_for(trainer)
    # the same λ after 4 steps (hypergradient, meta step, real step), to float roundoff
    assert bench_e2e._trajectory_diff(trainer, floor, 4) < 1e-5
    for (name, p), q in zip(trainer.model.named_parameters(), floor.params, strict=True):
        assert float((p - q).abs().max()) <= 1e-5 * max(1.0, float(p.abs().max())), name


def test_step_bench_rows_and_files(tmp_path):
    result = bench_e2e.run_step_bench(
        ["synthetic"], block=2, repeats=1, online=False, check_steps=3, out=tmp_path, quiet=True
    )
    row, comp = result["rows"]
    assert comp["what"] == "trainer hypergrad, compiled / floor" and comp["lambda_rel_diff"] < 1e-5
    assert comp["a_s"] > 0 and comp["b_s"] > 0
    assert row["case"] == "synthetic" and row["params"] == 8
    assert row["a_s"] > 0 and row["b_s"] > 0 and row["ratio"] == row["a_s"] / row["b_s"]
    assert row["lambda_rel_diff"] < 1e-5
    assert json.loads((tmp_path / "step.json").read_text())["rows"][0]["case"] == "synthetic"
    assert "| synthetic | 8 | trainer hypergrad / floor |" in (tmp_path / "step.md").read_text()


def test_step_bench_online_rows_batched_hvps_equal_the_loop(tmp_path):
    result = bench_e2e.run_step_bench(["cifar"], block=1, repeats=1, check_steps=2, quiet=True)
    rows = {r["what"]: r for r in result["rows"]}
    assert set(rows) == {
        "trainer hypergrad / floor",
        "trainer online / trainer plain (fixed λ)",
        "trainer online, batched HVPs / looped HVPs",
    }
    batched = rows["trainer online, batched HVPs / looped HVPs"]
    assert batched["a_s"] > 0 and batched["b_s"] > 0
    # the same tangents after the same 4 steps: one vmapped backward computes the loop's products
    assert batched["lambda_rel_diff"] < 1e-5
