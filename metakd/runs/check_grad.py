"""``metakd check-grad``: the configured hypergradient against float64 finite differences.

:func:`check_grad` compares the configured hypergradient with central finite differences of the bilevel
objective L_val(U^η(w0, λ(r))) computed by an independent float64 unroll (plain loops and a
hand-written torch.optim step, :func:`_plain_step`, not metakd's functional optimizers). With
``train.precision`` bf16/fp16 the configured hypergradient is still the float32 unroll (only the real steps
autocast, :mod:`metakd.training.precision`), so the same float32 tolerances apply; the teacher targets of
the unrolled batches are the run's own (a live teacher's under autocast, cast to float32).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from metakd import hypergrad
from metakd.config import Config, TrainConfig
from metakd.functional import losses
from metakd.runs.build import build, resolve_device
from metakd.status import StatusLine
from metakd.training.per_sample import by_example
from metakd.training.trainer import Callback, Trainer

__all__ = ["check_grad"]

log = logging.getLogger(__name__)


def _plain_step(
    cfg: TrainConfig, w: list[Tensor], g: list[Tensor], state: dict[str, Any],
    lam: Mapping[str, Any] | None = None, schedule: Callable[[int], float] | None = None,
) -> list[Tensor]:  # fmt: skip
    """One torch.optim.SGD/Adam step written out (independent of metakd.functional.optim), out of place; a
    learning rate / weight decay among the metaparameters ``lam`` replaces train.lr / weight_decay;
    ``schedule`` multiplies update t's learning rate by schedule(t) (train.lr_schedule)."""
    lam = lam or {}
    lr, wd = lam.get("lr", cfg.lr), lam.get("weight_decay", cfg.weight_decay)
    t = state["t"] = state.get("t", 0) + 1
    if schedule is not None:
        lr = lr * schedule(t - 1)
    g = [gi + wd * wi for gi, wi in zip(g, w, strict=True)]
    if cfg.optimizer == "sgd":
        if cfg.momentum:
            buf = state.get("buf")
            buf = (
                g if buf is None else [cfg.momentum * b + gi for b, gi in zip(buf, g, strict=True)]
            )
            state["buf"] = buf
            g = (
                [gi + cfg.momentum * b for gi, b in zip(g, buf, strict=True)]
                if cfg.nesterov
                else buf
            )
        return [wi - lr * gi for wi, gi in zip(w, g, strict=True)]
    b1, b2, eps = 0.9, 0.999, 1e-8
    m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(state.get("m", [0.0] * len(g)), g, strict=True)]
    v = [
        b2 * vi + (1 - b2) * gi**2 for vi, gi in zip(state.get("v", [0.0] * len(g)), g, strict=True)
    ]
    state["m"], state["v"] = m, v
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    return [
        wi - lr / bc1 * mi / (vi.sqrt() / bc2**0.5 + eps)
        for wi, mi, vi in zip(w, m, v, strict=True)
    ]


def check_grad(
    cfg: Config, *, eps: float = 1e-3, callbacks: Sequence[Callback] = ()
) -> dict[str, dict[str, Any]]:
    """Configured hypergradient vs central finite differences, at initialisation.

    The reference re-runs the η-step unroll of the first η training batches with plain loops in float64
    for r ± eps·e_i (each entry of each raw metaparameter): fd_i = (L(r + eps e_i) - L(r - eps e_i))/(2 eps).
    Returns ``{name: {"hypergrad", "finite_difference", "rel_error", "resolution", "resolved",
    "val_loss"}}`` (lists for non-scalar λ) with rel_error = |hg - fd| / max(|hg|, |fd|) (no floor) and
    resolution = the reference's own error estimate: |fd(eps) - fd(2 eps)| / 3 (Richardson: the
    O(eps²) truncation error) + 16 ε64 max|L(r ± eps e_i)| / eps (float64 round-off of L divided by
    the step). ``resolved`` is False where max(|hg|, |fd|) <= resolution: such an entry cannot be
    checked at this setting and a caller must not count it as a pass. ``callbacks`` get the
    in-process teacher's progress (:meth:`Callback.teacher_progress`).
    """
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    meta_cfg = cfg.meta.model_copy(update={"method": "hypergrad"})
    cfg = cfg.model_copy(update={"meta": meta_cfg})
    device = resolve_device(cfg.device)
    splits, logits, model = build(cfg, device, callbacks)
    trainer = Trainer(cfg, model, splits, logits, device=device)
    assert trainer.meta is not None
    model.train()
    batches = [trainer.batch(i) for i in range(cfg.meta.unroll)]
    vx, vy = trainer.val_batch(0)
    inner, state = trainer.inner_optimizer()  # meta.params.lr / weight_decay bound to raw λ
    hc = cfg.meta.hypergrad
    # Online tangents carried over the first η steps from Z = 0 are forward mode over those steps
    # (with γ = 1: the finite differences below hold λ fixed, so online_decay is not applied).
    method = "forward" if hc.method == "online" else hc.method
    log.info("check-grad: the %s hypergradient over η = %d steps", method, cfg.meta.unroll)
    if cfg.train.precision != "fp32":  # the unroll below runs as in the trainer: float32
        log.info(
            "check-grad: train.precision=%s autocasts the real steps only; the hypergradient's "
            "unroll runs in float32 on the master weights (metakd.training.precision)",
            cfg.train.precision,
        )
    if method in hypergrad.METHODS:
        res_grads = hypergrad.hypergradient(
            trainer.train_loss, trainer.val_loss, trainer.fmodel.params(), trainer.meta.raw,
            batches, (vx, vy), optimizer=inner, opt_state=state, method=method,
            backend=hc.backend, fd_eps=hc.fd_eps, checkpoint=hc.checkpoint,
        ).grads  # fmt: skip
    else:  # a user's method (registered key or import path): its own hypergradient at step 0,
        # over the same η batches and validation batch (a look-ahead's defaults)
        res_grads, _ = trainer.hypergradient(
            0, train_steps=range(cfg.meta.unroll), val_batch=(vx, vy)
        )

    model64 = copy.deepcopy(model).double().train()
    names = [k for k, _ in model64.named_parameters()]
    w0 = [p.detach().clone() for _, p in model64.named_parameters()]
    bufs = {k: b.detach() for k, b in model64.named_buffers()}
    b64 = [b.map(lambda v: v.double() if v.is_floating_point() else v) for b in batches]  # ids kept

    def forward(w: list[Tensor], x: Tensor) -> Tensor:
        params = dict(zip(names, w, strict=True))
        return functional_call(model64, (params, {k: b.clone() for k, b in bufs.items()}), (x,))

    def objective(raw: dict[str, Tensor]) -> float:
        assert trainer.meta is not None
        lam = trainer.meta.constrained(raw)
        w, st = list(w0), {}  # type: ignore[var-annotated]
        for b in b64:
            (x, y, t), w = b, [wi.detach().requires_grad_(True) for wi in w]
            out = forward(w, x)
            loss = trainer.loss(
                out, y, t, by_example(lam, trainer.meta, b)
            )  # per-sample: b's entries
            g = torch.autograd.grad(loss, w)
            with torch.no_grad():
                w = _plain_step(cfg.train, w, list(g), st, lam, trainer.binding.schedule)
        with torch.no_grad():
            return float(losses.cross_entropy(forward(w, vx.double()), vy))

    raw64 = {k: v.detach().double() for k, v in trainer.meta.raw.items()}
    val_loss = objective(raw64)
    round_off = 16 * torch.finfo(torch.float64).eps

    def central(name: str, r: Tensor, i: int, step: float) -> tuple[float, float]:
        """(central difference of L along entry i with this step, max |L| of its two points)."""
        vals = []
        for sign in (1.0, -1.0):
            shifted = r.clone().reshape(-1)
            shifted[i] += sign * step
            vals.append(objective({**raw64, name: shifted.reshape(r.shape)}))
        return (vals[0] - vals[1]) / (2 * step), max(abs(v) for v in vals)

    entries = sum(r.numel() for r in raw64.values())
    log.info(
        "check-grad: finite differences, %d float64 unrolls of η = %d steps (4 per λ entry)",
        4 * entries, cfg.meta.unroll,
    )  # fmt: skip
    status = StatusLine(log, "check-grad: finite differences, λ entries", entries)
    result: dict[str, dict[str, Any]] = {}
    for name, r in raw64.items():
        fd = torch.zeros(r.numel(), dtype=torch.float64)
        res = torch.zeros_like(fd)
        for i in range(r.numel()):
            fd1, size = central(name, r, i, eps)
            fd2, _ = central(name, r, i, 2 * eps)
            status.update()
            fd[i] = fd1
            res[i] = abs(fd1 - fd2) / 3 + round_off * size / eps
        hg = res_grads[name].detach().double().cpu().reshape(-1)
        scale = torch.maximum(hg.abs(), fd.abs())
        rel = torch.where(scale > 0, (hg - fd).abs() / scale, torch.zeros_like(scale))
        resolved = scale > res

        def plain(t: Tensor, shape: torch.Size = r.shape) -> Any:
            return t.reshape(-1)[0].item() if len(shape) == 0 else t.reshape(shape).tolist()

        result[name] = {
            "hypergrad": plain(hg),
            "finite_difference": plain(fd),
            "rel_error": plain(rel),
            "resolution": plain(res),
            "resolved": plain(resolved),
            "val_loss": val_loss,
        }
    return result
