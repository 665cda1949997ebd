"""The methods of the H-scaling bench: one runner per method (:data:`_RUNNERS`, keyed by
:data:`METHODS`) on a :class:`metakd.bench.scaling_cases._Case`, and :func:`_timed`, the wall time of
one call."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from metakd.bench.scaling_cases import INNER_LR, _Case
from metakd.functional import optim
from metakd.hypergrad import hypergradient, tangent_step
from metakd.hypergrad.implicit import ImplicitSolver

__all__ = ["METHODS", "_RUNNERS", "Runner", "_timed"]


METHODS = (
    "plain",
    "reverse",
    "reverse-checkpoint",
    "forward",
    "online-step",
    "implicit-cg",
    "implicit-cg-func",
    "implicit-neumann",
)


Runner = Callable[[_Case], Tensor | None]


def _flat(grads: dict[str, Tensor], case: _Case) -> Tensor:
    return torch.cat([grads[k].reshape(-1) for k in case.meta])


def _hypergrad(**kw: Any) -> Runner:
    def run(case: _Case) -> Tensor:
        res = hypergradient(
            case.train_loss, case.val_loss, case.params, case.meta, case.batches,
            case.val_batch, optim.sgd(INNER_LR), **kw,
        )  # fmt: skip
        return _flat(res.grads, case)

    return run


def _implicit(solver: str, hvp: str = "autograd") -> Runner:
    def run(case: _Case) -> Tensor:
        cfg = ImplicitSolver(
            solver=solver, iterations=case.iterations, damping=case.damping, tol=0.0, hvp=hvp,
            neumann_lr=INNER_LR,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # checked below instead
            res = hypergradient(
            case.train_loss, case.val_loss, case.params, case.meta, case.batches[:1],
                case.val_batch, optim.sgd(INNER_LR), method="implicit", implicit=cfg,
            )  # fmt: skip
        done = getattr(res, "iterations", 0)
        if done != case.iterations or not res.finite:
            raise RuntimeError(
                f"{solver} stopped after {done} of {case.iterations} iterations (finite: "
                f"{res.finite}): the damped Hessian is not positive definite; raise --damping"
            )
        return _flat(res.grads, case)

    return run


def _plain(case: _Case) -> None:
    """η real steps of the same L_train (at λ's values) on the module, ``torch.optim.SGD``."""
    module = case.module
    opt = torch.optim.SGD(module.parameters(), lr=INNER_LR)
    meta = {k: v.detach() for k, v in case.meta.items()}
    for batch in case.batches:
        opt.zero_grad()
        case.train_loss(dict(module.named_parameters()), meta, batch).backward()
        opt.step()


def _online_step(case: _Case) -> None:
    opt = optim.sgd(INNER_LR)
    state = opt.init_tuple(tuple(case.params.values()))
    tangent_step(case.train_loss, case.params, case.meta, case.batches[0], opt, state, None)


_RUNNERS: dict[str, Runner] = {
    "plain": _plain,
    "reverse": _hypergrad(method="reverse"),
    "reverse-checkpoint": _hypergrad(method="reverse", checkpoint=True),
    "forward": _hypergrad(method="forward"),
    "online-step": _online_step,
    "implicit-cg": _implicit("cg"),
    "implicit-cg-func": _implicit("cg", hvp="func"),
    "implicit-neumann": _implicit("neumann"),
}


def _timed(run: Runner, case: _Case, dev: torch.device) -> tuple[float, Tensor | None]:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = run(case)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0, out
