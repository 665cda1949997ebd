"""torch's intra-op threads for a run: chosen from the size of its work unless the user chose them.

An intra-op parallel region ends in an OpenMP barrier. On a machine whose cores other jobs share, a
descheduled thread stalls every barrier; for the tiny ops of a small model (the synthetic default: a
logistic regression on 15 points) the step is all per-op overhead and a second thread buys nothing —
with torch's default of one thread per core the default ``metakd train`` took 14.4 min instead of
~2 min beside other CPU jobs (issue 21; docs/benchmarks.md measures it). So:

* the user's choice wins: :func:`set_threads` (the CLI's ``--threads``), ``OMP_NUM_THREADS`` /
  ``MKL_NUM_THREADS`` in the environment, or a ``torch.set_num_threads`` call made after metakd was
  imported (compared with the count at import, or :func:`set_default_threads`);
* otherwise a run whose work per step, :func:`work_size` = (rows per batch) x (input elements per row)
  + parameters, is below :data:`SMALL_WORK` elements runs on 1 thread, and larger ones keep torch's
  count (its default: one per core). The threshold is 8 x torch's ``GRAIN_SIZE`` (32,768 elements, below
  which torch's elementwise kernels never split work over threads anyway): the MLP of
  docs/benchmarks.md (batch 128 x 32 inputs + 2,762 parameters) falls below it, a CIFAR student
  (128 x 3,072) above it.

The choice is logged (``metakd.threads``) and undone when the run ends (:func:`run_threads`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence

import torch

__all__ = [
    "SMALL_WORK",
    "choose_threads",
    "run_threads",
    "set_default_threads",
    "set_threads",
    "user_choice",
    "work_size",
]

log = logging.getLogger(__name__)

#: Work per step (elements, :func:`work_size`) below which a run uses one thread.
SMALL_WORK = 8 * 32_768
_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# user: the count set_threads chose; base: torch's count when nobody chose (at import, or a process
# pool's share per worker); auto: the count run_threads set for the current run.
_state: dict[str, int | None] = {"user": None, "base": torch.get_num_threads(), "auto": None}


def set_threads(n: int) -> None:
    """Set torch's intra-op threads to ``n`` as the user's choice (kept by every later run)."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    _state["user"] = n


def set_default_threads(n: int) -> None:
    """Set torch's threads to ``n`` as the default a run may lower (not a user choice), e.g. the
    share of the cores of one worker in a process pool."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    _state["base"] = n


def user_choice() -> str | None:
    """Who chose the thread count, when a user did: ``--threads`` (:func:`set_threads`), an
    environment variable, or ``torch.set_num_threads``; None when nobody did."""
    if _state["user"] is not None and torch.get_num_threads() == _state["user"]:
        return f"threads={_state['user']} (--threads)"
    for var in _ENV_VARS:
        value = os.environ.get(var, "").strip()
        if value:
            return f"{var}={value}"
    now = torch.get_num_threads()
    if now != _state["base"] and now != _state["auto"]:
        return f"torch.set_num_threads({now})"
    return None


def work_size(rows: int, input_shape: Sequence[int], parameters: int) -> int:
    """Elements one step touches at its widest, roughly: ``rows`` x prod(input_shape) + ``parameters``."""
    return int(rows) * math.prod(int(s) for s in input_shape) + int(parameters)


def choose_threads(work: int) -> tuple[int, str]:
    """(threads, reason) for a run of :func:`work_size` ``work``; does not change anything."""
    user = user_choice()
    now = torch.get_num_threads()
    if user is not None:
        return now, f"set by {user}"
    if work < SMALL_WORK:
        return 1, f"work per step {work:,} < {SMALL_WORK:,} elements"
    return now, f"work per step {work:,} >= {SMALL_WORK:,} elements: torch's default"


@contextlib.contextmanager
def run_threads(work: int) -> Iterator[int]:
    """Use :func:`choose_threads` for the block (log the choice); restore the previous count after."""
    before = torch.get_num_threads()
    n, reason = choose_threads(work)
    log.info("torch threads: %d (%s)", n, reason)
    if n != before:
        torch.set_num_threads(n)
        _state["auto"] = n
    try:
        yield n
    finally:
        if torch.get_num_threads() == n and n != before:
            torch.set_num_threads(before)
            _state["auto"] = None
