"""Data parallelism over torch.distributed: the hypergradient of the *global* batch on every rank.

metakd runs under ``torchrun`` (one node or several; NCCL on CUDA, gloo on CPU): each of R ranks
holds the whole model and λ, and takes a shard of every global batch — rows [o_r, o_r + n_r) of the
batch a single process would take at that step (:meth:`World.shard`; batches stay a pure function of
(seed, step)). With w_B the batch's rows and L_b the per-shard mean losses,

    ∇_w L_B(w) = Σ_r (n_r / B) ∇_w L_{b_r}(w)                                   (1)

so a real step averages the shards' gradients with an all-reduce (:meth:`World.average_`) and
equals one process's step on the global batch. Shards are equal (n_r = B/R: every batch size —
the last of an epoch and the validation batch too — must be divisible by R; :meth:`World.check`
says which setting to change), so the weights n_r/B are all 1/R. Inside an η-step look-ahead the same weighted
all-reduce is applied to every inner gradient as a *differentiable* collective
(:meth:`World.averaged`: the inner optimizer sees (1), whose backward is again an all-reduce), so
the unrolled trajectory w_1..w_η is the single-process one on every rank. The validation loss is
sharded the same way, and by the chain rule over the ranks' copies of λ,

    dL_val(w_η)/dλ = Σ_r (m_r / M) · [dL_{val,r}/dλ computed on rank r]            (2)

(m_r of the M validation rows on rank r): :meth:`World.sum_` of the weighted local hypergradients
after the backward. (2) is exact — the reverse engine differentiates through the collectives — and
λ is identical on all ranks by construction (same initial draw, same reduced hypergradient, same
meta update); no parameter broadcast is needed. Methods that differentiate in forward mode
(``forward``, ``online``: ``torch.func`` transforms of the step) or around it (``finite-difference``,
``implicit``) are refused under several ranks (:data:`EXACT_METHODS` lists those that can).
BatchNorm students keep per-rank batch statistics (each rank normalises its shard), as DDP does
without SyncBatchNorm: their runs differ from one process's.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metakd.config import ConfigError
from metakd.functional import optim

__all__ = ["EXACT_METHODS", "World", "from_env"]

#: hypergradient methods with the exact global-batch hypergradient under several ranks
EXACT_METHODS = ("reverse",)


@dataclass(frozen=True)
class World:
    """This process's place among ``size`` ranks (``size`` 1: no torch.distributed at all)."""

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one writer of the run directory, metrics, checkpoints and W&B."""
        return self.rank == 0

    # ------------------------------------------------------------------ sharding
    def check(self, sizes: Mapping[str, int]) -> None:
        """ConfigError naming the setting when a batch size (``{what: rows}``) is not divisible by
        the number of ranks: equal shards make eq. (1)'s weights 1/R."""
        for what, n in sizes.items():
            if n % self.size:
                raise ConfigError(
                    f"{what} is {n} rows, not divisible by the {self.size} ranks: each rank takes an "
                    f"equal shard of every batch; choose a size that is a multiple of {self.size} "
                    "(or another number of processes)"
                )

    def check_batches(self, n_train: int, batch_size: int, val_rows: int | None) -> None:
        """:meth:`check` of a run's train batches (``batch_size`` rows, the last of an epoch the
        rest of ``n_train``) and, with meta steps, its ``val_rows``-row validation batch."""
        if not self.distributed:
            return
        last = n_train - (math.ceil(n_train / batch_size) - 1) * batch_size
        sizes = {"train.batch_size": batch_size}
        sizes["the last batch of an epoch (train rows mod train.batch_size)"] = last
        if val_rows is not None:
            sizes["the validation batch (meta.val_batch_size, else the validation split)"] = (
                val_rows
            )
        self.check(sizes)

    def shard(self, t: Tensor | None) -> Tensor | None:
        """This rank's rows [r·n/R, (r+1)·n/R) of an n-row global batch tensor (None stays None)."""
        if t is None or not self.distributed:
            return t
        n = int(t.shape[0]) // self.size
        return t[self.rank * n : (self.rank + 1) * n]

    # ------------------------------------------------------------------ collectives
    def average_(self, tensors: Sequence[Tensor]) -> None:
        """In place: t ← (1/R) Σ_r t_r over the ranks (eq. 1)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for t in tensors:
            t.div_(self.size)
        flat = torch.cat([t.reshape(-1) for t in tensors])  # one collective, not one per tensor
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def sum_(self, value: Tensor) -> Tensor:
        """Σ_r value_r (a new tensor; not differentiable)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        out = value.detach().clone()
        dist.all_reduce(out)
        return out

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` holds on every rank (a non-finite hypergradient anywhere skips the step
        everywhere, so λ stays identical)."""
        if not self.distributed:
            return flag
        return bool(self.sum_(torch.tensor(0.0 if flag else 1.0)) == 0)

    def averaged(self, inner: optim.InnerOptimizer) -> optim.InnerOptimizer:
        """``inner`` whose update first replaces each gradient by (1/R) Σ_r g_r through a
        differentiable all-reduce (eq. 1 inside the unroll)."""
        if not self.distributed:
            return inner
        # torch.distributed._functional_collectives is where torch moved its differentiable
        # collectives (torch.distributed.nn.functional.all_reduce is deprecated in its favour)
        import torch.distributed as dist
        import torch.distributed._functional_collectives as fc

        def update(
            grads: Sequence[Tensor],
            state: Any,
            params: Sequence[Tensor],
            meta: Mapping[str, Tensor] | None = None,
        ) -> tuple[tuple[Tensor, ...], Any]:
            flat = torch.cat([g.reshape(-1) for g in grads]) / self.size
            group = dist.group.WORLD
            assert group is not None  # from_env (or the caller) started the process group
            total = fc.wait_tensor(fc.all_reduce(flat, "sum", group))
            parts, offset = [], 0
            for g in grads:
                parts.append(total[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            return inner.update_tuple(parts, state, params, meta)

        return inner._replace(update_tuple=update)


def from_env(device: torch.device) -> World:
    """The world torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...), its process group
    started (NCCL on CUDA, gloo on CPU); a plain process is ``World()``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # started by the caller
        return World(dist.get_rank(), dist.get_world_size())
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank = int(os.environ["RANK"])
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(seconds=float(os.environ.get("METAKD_DIST_TIMEOUT", "300")))
        dist.init_process_group(backend, timeout=timeout)
    return World(rank, size)
