"""The engines of the engine bench: one runner per engine (:data:`_RUNNERS`, keyed by :data:`ENGINES`)
that computes the hypergradient of a :class:`metakd.bench.cases._Case` (or, ``plain``, trains on it),
and :func:`_timed`, the wall and CPU time of one call."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from metakd.bench.cases import INNER_LR, _Case, _distill
from metakd.bench.common import _sync
from metakd.functional import optim
from metakd.functional.losses import cross_entropy
from metakd.functional.nn import double_backward_batchnorm
from metakd.hypergrad import hypergradient

__all__ = ["ENGINES", "EXTERNAL_ENGINES", "_RUNNERS", "Runner", "_timed"]


ENGINES = (
    "plain",
    "metakd/reverse",
    "metakd/reverse-fcall",
    "metakd/reverse-stockbn",
    "metakd/reverse-checkpoint",
    "metakd/reverse-torchopt",
    "metakd/reverse-higher",
    "metakd/forward",
    "metakd/finite-difference",
    "higher",
    "torchopt",
)
#: engines built on the external libraries: skipped on CPU above ``external_max_eta`` by default
EXTERNAL_ENGINES = ("metakd/reverse-torchopt", "metakd/reverse-higher", "higher", "torchopt")


Runner = Callable[[_Case], Tensor | None]


def _metakd(**kw: Any) -> Runner:
    def run(case: _Case) -> Tensor:
        res = hypergradient(
            case.train_loss, case.val_loss, case.params, case.meta, case.batches,
            case.val_batch, optim.sgd(INNER_LR), **kw,
        )  # fmt: skip
        return torch.stack([res.grads[k] for k in case.meta])

    return run


def _metakd_fcall(case: _Case) -> Tensor:
    """``metakd/reverse`` with losses written as torchopt users do (a plain ``functional_call`` of the
    module with its own buffers, no FunctionalModel): the engine's BatchNormRouter takes the fast path."""
    from torch.func import functional_call

    def train_loss(p: dict[str, Tensor], m: dict[str, Tensor], batch: Any) -> Tensor:
        return _distill(
            functional_call(case.module, p, (batch[0],)), batch[1], batch[2], case.lam(m)
        )

    def val_loss(p: dict[str, Tensor], batch: Any) -> Tensor:
        return cross_entropy(functional_call(case.module, p, (batch[0],)), batch[1])

    res = hypergradient(
        train_loss, val_loss, case.params, case.meta, case.batches, case.val_batch,
        optim.sgd(INNER_LR),
    )  # fmt: skip
    return torch.stack([res.grads[k] for k in case.meta])


def _stock_bn(run: Runner) -> Runner:
    """``run`` with the stock BatchNorm double backward (metakd.functional.nn.double_backward_batchnorm(False))."""

    def stock(case: _Case) -> Tensor | None:
        with double_backward_batchnorm(False):
            return run(case)

    return stock


def _plain(case: _Case) -> None:
    """η real training steps on a copy of the module (made once per case)."""
    module = case.plain_module
    opt = torch.optim.SGD(module.parameters(), lr=INNER_LR)
    lam = case.lam({k: v.detach() for k, v in case.meta.items()})
    for x, y, t in case.batches:
        opt.zero_grad(set_to_none=True)
        _distill(module(x), y, t, lam).backward()
        opt.step()


def _higher(case: _Case) -> Tensor:
    """What a user writes with higher: innerloop_ctx over the module and a torch SGD optimizer."""
    import higher

    module = case.module  # copy_initial_weights: w0 is not modified
    opt = torch.optim.SGD(module.parameters(), lr=INNER_LR)
    meta = list(case.meta.values())
    with higher.innerloop_ctx(module, opt, copy_initial_weights=True) as (fmod, diffopt):
        for x, y, t in case.batches:
            diffopt.step(_distill(fmod(x), y, t, case.lam(case.meta)))
        vloss = cross_entropy(fmod(case.val_batch[0]), case.val_batch[1])
        return torch.stack(torch.autograd.grad(vloss, meta))


def _torchopt(case: _Case) -> Tensor:
    """What a user writes with torchopt's functional API: ``torchopt.sgd`` + ``functional_call``."""
    import torchopt
    from torch.func import functional_call

    module = case.module
    params = {k: v.detach().requires_grad_(True) for k, v in module.named_parameters()}
    opt = torchopt.sgd(INNER_LR)
    state = opt.init(params)
    for x, y, t in case.batches:
        logits = functional_call(module, params, (x,))
        loss = _distill(logits, y, t, case.lam(case.meta))
        grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=True)
        updates, state = opt.update(dict(zip(params, grads)), state, inplace=False)
        params = torchopt.apply_updates(params, updates, inplace=False)
    vloss = cross_entropy(functional_call(module, params, (case.val_batch[0],)), case.val_batch[1])
    return torch.stack(torch.autograd.grad(vloss, list(case.meta.values())))


_RUNNERS: dict[str, Runner] = {
    "plain": _plain,
    "metakd/reverse": _metakd(method="reverse"),
    "metakd/reverse-fcall": _metakd_fcall,
    "metakd/reverse-stockbn": _stock_bn(_metakd(method="reverse")),
    "metakd/reverse-checkpoint": _metakd(method="reverse", checkpoint=True),
    "metakd/reverse-torchopt": _metakd(method="reverse", backend="torchopt"),
    "metakd/reverse-higher": _metakd(method="reverse", backend="higher"),
    "metakd/forward": _metakd(method="forward"),
    "metakd/finite-difference": _metakd(method="finite-difference"),
    "higher": _higher,
    "torchopt": _torchopt,
}


def _timed(run: Runner, case: _Case, device: torch.device) -> tuple[float, float, Tensor | None]:
    """(wall seconds, process CPU seconds, result) of one call."""
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    out = run(case)
    _sync(device)
    return time.perf_counter() - w0, time.process_time() - c0, out
