"""The Trainer's step against the floor of eager PyTorch: a minimal hand-written loop of the same math.

One default meta step plus its real step (η = 1, the DARTS order of :mod:`metakd.training.trainer`), written
with nothing but torch ops in :class:`FloorLoop`:

1. w' = Adam(w, s, ∇_w L_train(w, λ(r); B))  (graph kept; eq. 4 loss, λ = (σ(r1), σ(r2), 0.1 + 9.9σ(r3)))
2. g = ∇_r L_val(w'; B_val)                     (the hypergradient, eq. 11)
3. r ← clamp(r − lr_meta · g · min(1, clip / ‖g‖))  (meta SGD with norm clipping)
4. the real step at the new λ: forward, backward, Adam in place (``torch.optim.Adam``'s arithmetic)

:func:`run_step_bench` times it against :meth:`metakd.training.trainer.Trainer` steps of the same config in the
same process, in alternating blocks (so machine load hits both alike), for the synthetic default
(logistic regression, 15 points, full batch) and the CIFAR student (``cifar_very_tiny``, batch 128 of
random 3x32x32 inputs), checks that both walk the same λ trajectory, and times the online
forward-mode step against a plain (fixed-λ) Trainer step (issue 21's "online ≤ 2x a plain run").
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metakd.bench.cases import _synthetic_splits
from metakd.bench.common import _versions
from metakd.config import Config, MetaConfig, ModelConfig, TrainConfig
from metakd.data import load_data
from metakd.data.models import build_model
from metakd.functional.metaparams import RAW_LIMIT
from metakd.training.trainer import Trainer

__all__ = [
    "CASES",
    "F32_EPS",
    "FloorLoop",
    "hvp_order_tolerances",
    "run_step_bench",
    "step_markdown",
]

CASES = ("synthetic", "cifar")
_BETAS, _EPS = (0.9, 0.999), 1e-8


class FloorLoop:
    """The minimal eager loop (module docstring): ``step(batch, val_batch)`` does steps 1-4 on
    ``module``'s own parameters (updated in place) and a (3,) raw λ vector ``raw``."""

    def __init__(
        self, module: nn.Module, raw: Tensor, *, lr: float, meta_lr: float, clip: float
    ) -> None:
        self.module = module
        self.names = [k for k, _ in module.named_parameters()]
        self.params = [p for _, p in module.named_parameters()]
        # unrolled calls normalise with batch statistics and leave the running ones alone
        self.no_stats: dict[str, Any] = {
            k: None
            for k, _ in module.named_buffers()
            if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
        }
        self.raw = raw.detach().clone().requires_grad_(True)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0
        self.lr, self.meta_lr, self.clip = lr, meta_lr, clip

    @staticmethod
    def lam(raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = torch.sigmoid(raw)
        return s[0], s[1], 0.1 + 9.9 * s[2]

    @staticmethod
    def loss(logits: Tensor, y: Tensor, t: Tensor, lam: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        b1, b2, temp = lam
        soft = -(torch.softmax(t / temp, -1) * torch.log_softmax(logits / temp, -1)).sum(-1).mean()
        return b1 * F.cross_entropy(logits, y) + b2 * soft

    def step(self, batch: Sequence[Any], val_batch: Sequence[Tensor]) -> None:
        """Steps 1-4 on ``batch = (x, y, teacher logits)``; L_val on ``val_batch = (x, y)``."""
        x, y, t = batch
        xv, yv = val_batch
        b1, b2 = _BETAS
        k = self.t + 1
        bc1, bc2 = 1 - b1**k, math.sqrt(1 - b2**k)
        # 1. the unrolled Adam step, graph kept
        w = [p.detach().requires_grad_(True) for p in self.params]
        logits = functional_call(self.module, {**dict(zip(self.names, w)), **self.no_stats}, (x,))
        g = torch.autograd.grad(self.loss(logits, y, t, self.lam(self.raw)), w, create_graph=True)
        w1 = {}
        for name, wi, gi, mi, vi in zip(self.names, w, g, self.m, self.v):
            m1 = b1 * mi + (1 - b1) * gi
            v1 = b2 * vi + (1 - b2) * gi * gi
            w1[name] = wi - (self.lr / bc1) * m1 / (v1.clamp_min(1e-30).sqrt() / bc2 + _EPS)
        # 2. the hypergradient
        vloss = F.cross_entropy(functional_call(self.module, {**w1, **self.no_stats}, (xv,)), yv)
        (hg,) = torch.autograd.grad(vloss, self.raw)
        with torch.no_grad():
            # 3. meta SGD, clipped
            scale = torch.clamp(self.clip / (torch.linalg.vector_norm(hg) + 1e-6), max=1.0)
            self.raw.sub_(self.meta_lr * hg * scale).clamp_(-RAW_LIMIT, RAW_LIMIT)
            lam = self.lam(self.raw)
        # 4. the real step
        g = torch.autograd.grad(self.loss(self.module(x), y, t, lam), self.params)
        self.t = k
        with torch.no_grad():
            for p, gi, mi, vi in zip(self.params, g, self.m, self.v):
                mi.lerp_(gi, 1 - b1)
                vi.mul_(b2).addcmul_(gi, gi, value=1 - b2)
                p.addcdiv_(mi, (vi.sqrt() / bc2).add_(_EPS), value=-self.lr / bc1)


def _case(
    name: str, method: str = "hypergrad", online: bool = False, device: str = "cpu"
) -> tuple[Config, Any, Any]:
    """(config, splits, teacher logits) of a case on ``device``; random data and teacher logits of its shape."""
    hyper = {"method": "online" if online else "reverse"}
    if name == "synthetic":
        cfg = Config()  # the embedded default: logistic regression on 15 points, full batch
        cfg.meta = MetaConfig.model_validate({"method": method, "hypergrad": hyper})
        cfg.train.eval_every = 10**9  # no evaluation inside the timed steps
        cfg.train.compile = "off"  # the eager Trainer; run_step_bench adds the compiled row
        splits = load_data(cfg.data, cfg.seed, device)
        g = torch.Generator().manual_seed(1)
        logits = {
            k: (2 * torch.randn(len(getattr(splits, k)), splits.num_classes, generator=g)).to(
                device
            )
            for k in ("train", "val", "test")
        }
        return cfg, splits, logits
    if name != "cifar":
        raise ValueError(f"unknown case {name!r}; choose from {list(CASES)}")
    meta = MetaConfig.model_validate(
        {"method": method, "unroll": 1, "optimizer": "sgd", "lr": 1.0, "clip": 1.0,
         "val_batch_size": 128, "hypergrad": hyper,
         "values": {"beta1": 0.5, "beta2": 0.5, "temperature": 4.0} if method == "fixed" else {}}
    )  # fmt: skip
    cfg = Config(
        name="step-bench",
        student=ModelConfig(name="cifar_very_tiny"),
        train=TrainConfig(optimizer="adam", lr=1e-3, epochs=100, batch_size=128, eval_every=10**9),
        meta=meta,
    )
    splits, logits = _synthetic_splits("cifar_very_tiny", 20, 128, 128, torch.device(device))
    return cfg, splits, logits


def _trainer(cfg: Config, splits: Any, logits: Any) -> Trainer:
    torch.manual_seed(0)
    shape = tuple(int(s) for s in splits.train.x.shape[1:])
    device = splits.train.x.device
    model = build_model(cfg.student, shape, splits.num_classes).to(device)
    trainer = Trainer(cfg, model, splits, logits, device=device)
    trainer.model.train()
    return trainer


def _floor_for(trainer: Trainer) -> FloorLoop:
    assert trainer.meta is not None
    raw = torch.stack([trainer.meta.raw[n].detach().reshape(()) for n in trainer.meta.names])
    mc = trainer.cfg.meta
    return FloorLoop(
        copy.deepcopy(trainer.model), raw, lr=trainer.cfg.train.lr, meta_lr=mc.lr,
        clip=mc.clip if mc.clip is not None else math.inf,
    )  # fmt: skip


def _sync() -> None:
    """Wait for queued CUDA kernels (a no-op without CUDA), so a block's wall time is its own."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed_block(fn: Callable[[int], None], start: int, n: int) -> tuple[float, float]:
    _sync()
    w0, c0 = time.perf_counter(), time.process_time()
    for s in range(start, start + n):
        fn(s)
    _sync()
    return (time.perf_counter() - w0) / n, (time.process_time() - c0) / n


def _compare(names: Sequence[str], runners: dict[str, Callable[[int], None]], block: int,
             repeats: int, warmup: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """Median per-step wall and CPU seconds of each runner, blocks interleaved round-robin."""
    for r in runners.values():
        _timed_block(r, 0, warmup)
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    step = warmup
    for _ in range(repeats):
        for n in names:
            times[n].append(_timed_block(runners[n], step, block))
        step += block
    return {
        n: {
            "step_s": statistics.median(w for w, _ in ts),
            "cpu_s": statistics.median(c for _, c in ts),
        }
        for n, ts in times.items()
    }


def _trajectory_diff(trainer: Trainer, floor: FloorLoop, steps: int) -> float:
    """Max relative difference of raw λ after ``steps`` steps of each (same batches)."""
    assert trainer.meta is not None
    for s in range(steps):
        floor.step(trainer.batch(s), trainer.val_batch(s))
        trainer._one_step(s)
    ours = torch.stack([trainer.meta.raw[n].detach().reshape(()) for n in trainer.meta.names])
    return float(((ours - floor.raw.detach()).abs() / ours.abs().clamp_min(1e-12)).max())


# Tolerances of the batched-vs-looped row, from float32 roundoff (not from one CPU). The two online
# trainers run the same forward and first backward; only the H Hessian-vector products are summed in
# another order (one vmapped backward against H backwards), and CPUs, thread counts and kernels pick
# the order. A reduction of n float32 terms reordered differs by about sqrt(n)·ε·Σ|terms| (random-walk
# roundoff of blocked/pairwise sums; n·ε is the never-reached worst case). The largest reductions of the
# CIFAR student's products run over the batch and a 32x32 feature map: n = 128·1024, sqrt(n) ≈ 362.
F32_EPS = float(torch.finfo(torch.float32).eps)
_HVP_SUM_TERMS = 128 * 32 * 32


def hvp_order_tolerances(steps: int, lr: float, adam_eps: float = _EPS) -> dict[str, float]:
    """Bounds on the batched-vs-looped differences after ``steps`` carried steps (see the comment above).

    ``lambda`` and ``hypergrad`` (relative): the products' relative error sqrt(n)·ε, carried ``steps``
    times (each step adds its own; the tangent map of a stable training step does not grow them).
    ``tangents`` (‖ΔZ‖/‖Z‖ over all tensors): Adam's update lr·m̂/(√v̂ + eps) has slope up to lr/eps in
    an entry whose gradient is 0 up to roundoff (a conv bias before train-mode BatchNorm: |g| ~ 1e-8,
    √v̂ below eps), so there a product's roundoff is multiplied by up to lr/eps (1e5 at lr 1e-3) — those
    tangents are amplified roundoff, different for every summation order, and change neither λ, the
    hypergradient nor the weights (their L_val gradient is 0 too). Bound: steps·ε·lr/eps."""
    grow = math.sqrt(_HVP_SUM_TERMS) * F32_EPS * steps
    return {"lambda": grow, "hypergrad": grow, "tangents": steps * F32_EPS * lr / adam_eps}


def _raw(trainer: Trainer) -> Tensor:
    assert trainer.meta is not None
    return torch.cat([trainer.meta.raw[n].detach().reshape(-1) for n in trainer.meta.names])


def _online_diffs(a: Trainer, b: Trainer, step: int) -> dict[str, float]:
    """Two online trainers after the same steps: the relative difference of raw λ (max |Δ| / max |λ|),
    of the hypergradient each returns now on the validation batch of ``step`` (‖Δh‖ / ‖h‖), and of their
    carried tangents normalised by their global scale (‖ΔZ‖ / ‖Z‖ over all parameter and optimizer-state
    tangents; per-tensor ratios would divide by tangents that are pure roundoff, see
    :func:`hvp_order_tolerances`)."""
    ma, mb = a.hypergrad_method, b.hypergrad_method
    ta, tb = getattr(ma, "tangents", None), getattr(mb, "tangents", None)
    if ma is None or mb is None or ta is None or tb is None:
        nan = float("nan")
        return {"lambda_rel_diff": nan, "hypergrad_rel_diff": nan, "tangent_rel_diff": nan}

    def rel(x: Tensor, y: Tensor, norm: Callable[[Tensor], Tensor]) -> float:
        x, y = x.double(), y.double()
        return float(norm(x - y) / norm(x).clamp_min(1e-300))

    ha, hb = ma.hypergradient(step)[0], mb.hypergradient(step)[0]
    names = list(ha)
    za = torch.cat([z.reshape(-1) for z in ta.to_list()])
    zb = torch.cat([z.reshape(-1) for z in tb.to_list()])
    return {
        "lambda_rel_diff": rel(_raw(a), _raw(b), lambda t: t.abs().max()),
        "hypergrad_rel_diff": rel(
            torch.cat([ha[n].reshape(-1) for n in names]),
            torch.cat([hb[n].reshape(-1) for n in names]),
            torch.linalg.vector_norm,
        ),
        "tangent_rel_diff": rel(za, zb, torch.linalg.vector_norm),
    }


def run_step_bench(
    cases: Sequence[str] = CASES,
    *,
    block: int = 20,
    repeats: int = 7,
    online: bool = True,
    check_steps: int = 30,
    compiled: bool = True,
    device: str = "cpu",
    out: Path | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Per-step time of the Trainer (``hypergrad``, η = 1 reverse) against :class:`FloorLoop`, per case,
    CPU, in the current torch thread setting; ``online``: also the CIFAR student's online step against
    its plain (``fixed``) step; ``compiled``: also the synthetic default's compiled Trainer step
    (``train.compile=on``, :mod:`metakd.training.methods.compiled`; its compilation is not timed). ``device``:
    where every case runs (``cuda`` for benchmarks/gpu.sh; CUDA kernels are synchronized around each
    timed block, and the "CPU" columns are then the host's time). Returns ``{"config", "rows", "env"}``; with ``out``, writes
    ``step.json``/``step.md``."""
    rows: list[dict[str, Any]] = []

    def pair(case: str, what: str, trainer: Trainer, a: tuple[str, Callable[[int], None]],
             b: tuple[str, Callable[[int], None]], **extra: Any) -> None:  # fmt: skip
        """Time runner a against runner b (interleaved blocks) and append the row a / b."""
        if not quiet:
            print(f"step bench: {case}, {what}", flush=True)
        t = _compare([b[0], a[0]], {b[0]: b[1], a[0]: a[1]}, block, repeats, warmup=3)
        ta, tb = t[a[0]], t[b[0]]
        rows.append({
            "case": case, "what": what, "params": sum(p.numel() for p in trainer.model.parameters()),
            "a_s": ta["step_s"], "b_s": tb["step_s"], "a_cpu_s": ta["cpu_s"], "b_cpu_s": tb["cpu_s"],
            "ratio": ta["step_s"] / tb["step_s"], "lambda_rel_diff": None, "hypergrad_rel_diff": None,
            "tangent_rel_diff": None, "check_steps": None, **extra,
        })  # fmt: skip

    for case in cases:
        cfg, splits, logits = _case(case, device=device)
        trainer = _trainer(cfg, splits, logits)
        floor = _floor_for(trainer)
        check = _trainer(cfg, splits, logits)
        diff = _trajectory_diff(check, _floor_for(check), check_steps)

        def floor_step(s: int, floor: FloorLoop = floor, trainer: Trainer = trainer) -> None:
            floor.step(trainer.batch(s), trainer.val_batch(s))

        pair(case, "trainer hypergrad / floor", trainer, ("trainer", trainer._one_step),
             ("floor", floor_step), lambda_rel_diff=diff, check_steps=check_steps)  # fmt: skip
        if (
            compiled and case == "synthetic"
        ):  # torch.compile'd steps (metakd.training.methods.compiled)
            cfg_c = cfg.model_copy(deep=True)
            cfg_c.train.compile = "on"
            fast, check = _trainer(cfg_c, splits, logits), _trainer(cfg_c, splits, logits)
            diff = _trajectory_diff(check, _floor_for(check), check_steps)
            pair(case, "trainer hypergrad, compiled / floor", fast, ("compiled", fast._one_step),
                 ("floor", floor_step), lambda_rel_diff=diff, check_steps=check_steps)  # fmt: skip
    if online and "cifar" in cases:
        plain = _trainer(*_case("cifar", method="fixed", device=device))
        onl = _trainer(*_case("cifar", online=True, device=device))
        pair("cifar", "trainer online / trainer plain (fixed λ)", plain, ("online", onl._one_step),
             ("plain", plain._one_step))  # fmt: skip
        # the H Hessian-vector products as one vmapped backward (is_grads_batched) against the loop:
        # λ, the hypergradient and the tangents (globally normalised) of the two after the same steps
        looped = _trainer(*_case("cifar", online=True, device=device))
        batched = _trainer(*_case("cifar", online=True, device=device))
        batched.hypergrad_method.hvp = "batched"  # type: ignore[union-attr]
        pair("cifar", "trainer online, batched HVPs / looped HVPs", plain,
             ("batched", batched._one_step), ("loop", looped._one_step))  # fmt: skip
        carried = 3 + block * repeats  # _compare's warm-up steps, then the timed blocks
        rows[-1].update(_online_diffs(looped, batched, carried), check_steps=carried,
                        tolerances=hvp_order_tolerances(carried, looped.cfg.train.lr))  # fmt: skip
    result = {
        "config": {
            "block": block,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "device": device,
        },
        "rows": rows,
        "env": _versions(torch.device(device)),
    }
    if not quiet:
        print(step_markdown(result), flush=True)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "step.json").write_text(json.dumps(result, indent=2) + "\n")
        (Path(out) / "step.md").write_text(step_markdown(result))
    return result


def step_markdown(result: dict[str, Any]) -> str:
    """The step bench as a Markdown table (ms per step, wall; CPU in parentheses)."""
    lines = [
        "| case | parameters | comparison (a / b) | a ms/step | b ms/step | a / b | λ rel. diff "
        "| hypergradient rel. diff | tangents ‖ΔZ‖/‖Z‖ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(r: dict[str, Any], key: str) -> str:
        return "—" if r.get(key) is None else f"{r[key]:.1e}"

    for r in result["rows"]:
        diffs = " | ".join(
            fmt(r, k) for k in ("lambda_rel_diff", "hypergrad_rel_diff", "tangent_rel_diff")
        )
        lines.append(
            f"| {r['case']} | {r['params']:,} | {r['what']} | {1e3 * r['a_s']:.2f} "
            f"({1e3 * r['a_cpu_s']:.2f}) | {1e3 * r['b_s']:.2f} ({1e3 * r['b_cpu_s']:.2f}) | "
            f"{r['ratio']:.2f} | {diffs} |"
        )
    cfg = result["config"]
    lines.append(
        f"\nMedian of {cfg['repeats']} blocks of {cfg['block']} steps, interleaved; "
        f"{cfg['threads']} torch thread(s), device {cfg.get('device', 'cpu')}."
    )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m metakd.bench.e2e [--cases synthetic,cifar] [--out DIR] [--threads N]``."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--block", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-online", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    run_step_bench(
        [c for c in a.cases.split(",") if c], block=a.block, repeats=a.repeats,
        online=not a.no_online, device=a.device, out=a.out,
    )  # fmt: skip


if __name__ == "__main__":
    main()
