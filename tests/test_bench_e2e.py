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
    assert row["a_s"] > 0 and row["b_s"] > 0 and row["ratio"] > 0
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
    # the same λ, hypergradient and (globally normalised) tangents after the same 4 carried steps, to the
    # roundoff of summing the H products in another order (bench_e2e.hvp_order_tolerances derives them)
    assert batched["check_steps"] == 4
    tol = bench_e2e.hvp_order_tolerances(4, 1e-3)
    assert batched["tolerances"] == tol
    assert batched["lambda_rel_diff"] <= tol["lambda"]
    assert batched["hypergrad_rel_diff"] <= tol["hypergrad"]
    assert batched["tangent_rel_diff"] <= tol["tangents"]
    md = bench_e2e.step_markdown(result)
    assert "| hypergradient rel. diff | tangents ‖ΔZ‖/‖Z‖ |" in md


def test_hvp_order_tolerances_are_float32_roundoff():
    tol = bench_e2e.hvp_order_tolerances(4, 1e-3)
    eps = 2.0**-23
    assert tol["lambda"] == tol["hypergrad"] == pytest.approx(4 * eps * (128 * 32 * 32) ** 0.5)
    assert tol["lambda"] < 2e-4  # a wrong product (an O(1) difference) cannot pass
    assert tol["tangents"] == pytest.approx(4 * eps * 1e-3 / 1e-8)  # Adam's slope lr/eps at g = 0


@pytest.mark.slow
def test_batched_hvps_summed_in_another_order_stay_within_the_tolerances(monkeypatch):
    """The batched path's vmapped backward on 2 threads, the loop's on 1: another summation order of the
    same products, as on another CPU. λ, hypergradient and global tangents stay within the bounds, though
    single conv-bias tangents (zero gradient before BatchNorm, amplified by Adam's lr/eps) may not."""
    import torch

    threads = torch.get_num_threads()
    grad = torch.autograd.grad

    def other_order(*args, **kw):
        if not kw.get("is_grads_batched"):
            return grad(*args, **kw)
        torch.set_num_threads(2)
        try:
            return grad(*args, **kw)
        finally:
            torch.set_num_threads(1)

    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(torch.autograd, "grad", other_order)
        looped = bench_e2e._trainer(*bench_e2e._case("cifar", online=True))
        batched = bench_e2e._trainer(*bench_e2e._case("cifar", online=True))
        batched.hypergrad_method.hvp = "batched"
        for s in range(4):
            looped._one_step(s)
            batched._one_step(s)
        diffs = bench_e2e._online_diffs(looped, batched, 4)
    finally:
        torch.set_num_threads(threads)
    tol = bench_e2e.hvp_order_tolerances(4, 1e-3)
    assert diffs["lambda_rel_diff"] <= tol["lambda"]
    assert diffs["hypergrad_rel_diff"] <= tol["hypergrad"]
    assert diffs["tangent_rel_diff"] <= tol["tangents"]
