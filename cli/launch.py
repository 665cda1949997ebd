"""``--nproc N``: start this very command on N ranks of one node with torchrun's own launcher.

``metakd train ... --nproc 2`` is ``torchrun --standalone --nproc-per-node 2 -m metakd_cli.main train ...``
(``torch.distributed.run``, the code behind the ``torchrun`` script: its rendezvous, worker
monitoring and teardown), so nothing about starting processes is metakd's own. When a worker dies,
torchrun stops the others; this module turns its report into one line naming the rank, and the
run directory (written by rank 0 only, checkpoints atomic) stays resumable with ``--resume``.
Several nodes: run ``torchrun --nnodes ... --rdzv-endpoint HOST:PORT -m metakd_cli.main train ...``
on each (docs/distributed.md).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

__all__ = ["launch", "peer_loss_exits", "rank", "without_nproc"]


def rank() -> int:
    """This process's rank under torchrun (0 outside it)."""
    return int(os.environ.get("RANK", "0"))


@contextmanager
def peer_loss_exits() -> Iterator[None]:
    """Under torchrun: a collective that fails because another rank died ends this rank with exit
    code 1 and no traceback (torchrun stops the group; the launcher's one line names the rank that
    died first). Outside torchrun, or for any other error: nothing changes."""
    try:
        yield
    except Exception as exc:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not _peer_lost(exc):
            raise
        logging.getLogger("metakd").debug("rank %d: lost a peer (%s)", rank(), exc)
        raise SystemExit(1) from None


def _peer_lost(exc: BaseException) -> bool:
    """A torch.distributed failure (a closed connection, a timeout) rather than a user error."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("gloo", "nccl", "connection closed", "connection reset", "broken pipe")
    )


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (what each rank runs)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _how(failure: object) -> str:
    code = int(getattr(failure, "exitcode", 1))
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _knock_on(failure: object) -> bool:
    """A failure a peer's death causes: exit code 1 (:func:`peer_loss_exits`) or SIGABRT (gloo's C++
    threads call std::terminate when a connection drops before the rank's Python sees it)."""
    code = int(getattr(failure, "exitcode", 1))
    return code == 1 or code == -signal.SIGABRT


def first_failure(failures: Mapping[int, object]) -> str:
    """One line for torchrun's failed ranks ({rank: ProcessFailure}): the rank whose failure is not a
    knock-on of another's (:func:`_knock_on`) and, among those, the earliest (timestamps are whole
    seconds, so a survivor's abort often ties with the rank that died; rank order breaks no tie)."""
    ordered = sorted(
        failures.items(),
        key=lambda kv: (_knock_on(kv[1]), getattr(kv[1], "timestamp", 0)),
    )
    first, failure = ordered[0]
    others = f" ({len(ordered) - 1} more rank(s) stopped)" if len(ordered) > 1 else ""
    return f"rank {first} (pid {getattr(failure, 'pid', '?')}) {_how(failure)}{others}"


def launch(nproc: int, argv: Sequence[str]) -> str | None:
    """Run ``python -m metakd_cli.main *argv`` on ``nproc`` local ranks and wait; None when every rank
    finished, else one line saying which rank failed first and how (:func:`first_failure`)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's agent logs each worker's start and teardown; the one line below says what matters
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = parse_args(
        [
            "--standalone", "--nproc-per-node", str(nproc), "--max-restarts", "0",
            "--monitor-interval", "0.5", "--rdzv-id", uuid.uuid4().hex,
            "-m", "metakd_cli.main", *argv,
        ]
    )  # fmt: skip
    try:
        run(args)
    except ChildFailedError as exc:
        return first_failure(exc.failures)
    finally:
        sys.stdout.flush()
    return None
