"""Batched against looped Hessian-vector products of the online tangent step: where they differ, and why.

The step bench's row "trainer online, batched HVPs / looped HVPs" (metakd/bench/e2e.py) runs two online
trainers on the CIFAR student that differ only in how tangent_step sums the H double backwards (a loop
of H backwards, or one vmapped backward): the same math, summed in a different order. This prints, after
each of ``--steps`` steps, per tensor: the relative difference of the carried tangents (max |ΔZ| / max |Z|),
|∇_w L_train| (its max), and for Adam tangents ‖ΔZ‖/‖Z‖ over all tensors; and the differences of raw λ
and of the hypergradient ⟨∇L_val, Z⟩ — what a user gets. Run with 1 and 2 torch threads:

    python benchmarks/online_hvp_roundoff.py --threads 1
    python benchmarks/online_hvp_roundoff.py --threads 2
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from metakd.bench import e2e


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--hvp-threads", type=int, default=None,
                    help="run only the batched path's vmapped HVP backward on this many threads: another "
                    "summation order of the same products, as on another machine")  # fmt: skip
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.hvp_threads is not None:
        grad = torch.autograd.grad

        def other_order(*args: Any, **kw: Any) -> Any:
            if not kw.get("is_grads_batched"):
                return grad(*args, **kw)
            torch.set_num_threads(a.hvp_threads)
            try:
                return grad(*args, **kw)
            finally:
                torch.set_num_threads(a.threads)

        torch.autograd.grad = other_order  # type: ignore[assignment]
    looped = e2e._trainer(*e2e._case("cifar", online=True))
    batched = e2e._trainer(*e2e._case("cifar", online=True))
    batched.hypergrad_method.hvp = "batched"  # type: ignore[union-attr]
    grads: dict[str, torch.Tensor] = {}
    orig = looped.hypergrad_method.real_step  # type: ignore[union-attr]

    def spy(step: int, batch: object) -> object:  # the gradient the fused step applies
        pending = looped.hypergrad_method._pending  # type: ignore[union-attr]
        if pending is not None:
            grads.update(pending[1])
        return orig(step, batch)  # type: ignore[arg-type]

    looped.hypergrad_method.real_step = spy  # type: ignore[union-attr,method-assign]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batched HVPs on {a.hvp_threads or a.threads}"
    )
    for s in range(a.steps):
        looped._one_step(s)
        batched._one_step(s)
        ta, tb = looped.hypergrad_method.tangents, batched.hypergrad_method.tangents  # type: ignore[union-attr]
        assert ta is not None and tb is not None and looped.meta and batched.meta
        print(f"\nafter step {s + 1}:")
        print(f"  {'tensor':24s} {'max|ΔZ|/max|Z|':>15s} {'max|Z|':>10s} {'max|g|':>10s}")
        for k in ta.params:
            g = grads.get(k)
            gmax = float(g.abs().max()) if g is not None else float("nan")
            print(f"  {k:24s} {_rel(ta.params[k], tb.params[k]):15.2e} "
                  f"{float(ta.params[k].abs().max()):10.2e} {gmax:10.2e}")  # fmt: skip
        za = torch.cat([z.reshape(-1).double() for z in ta.to_list()])
        zb = torch.cat([z.reshape(-1).double() for z in tb.to_list()])
        print(
            f"  all tangents (w and Adam state): ‖ΔZ‖/‖Z‖ = {float((za - zb).norm() / za.norm()):.2e}"
        )
        ra = torch.stack([looped.meta.raw[n].detach().reshape(()) for n in looped.meta.names])
        rb = torch.stack([batched.meta.raw[n].detach().reshape(()) for n in batched.meta.names])
        print(f"  raw λ: {ra.tolist()}  max |Δ| = {float((ra - rb).abs().max()):.2e}")
        ha, _ = looped.hypergrad_method.hypergradient(s + 1)  # type: ignore[union-attr]
        hb, _ = batched.hypergrad_method.hypergradient(s + 1)  # type: ignore[union-attr]
        va = torch.cat([ha[n].reshape(-1) for n in looped.meta.names])
        vb = torch.cat([hb[n].reshape(-1) for n in batched.meta.names])
        print(f"  hypergradient: {va.tolist()}  ‖Δ‖/‖h‖ = "
              f"{float((va - vb).norm() / va.norm().clamp_min(1e-30)):.2e}")  # fmt: skip
        wa = dict(looped.model.named_parameters())
        wd = max(float((p - wa[k]).abs().max()) for k, p in batched.model.named_parameters())
        print(f"  weights: max |Δw| = {wd:.2e}")


if __name__ == "__main__":
    main()
