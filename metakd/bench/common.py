"""What every bench shares: the run's device and environment record, CUDA synchronisation around a
timed call, the CPU peak-RSS probes, and the statistics and number formatting of the result tables."""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from metakd import __version__
from metakd.config import ConfigError

__all__ = [
    "_fmt", "_median", "_progress", "_ratio", "_rel_diff", "_reset_peak_rss", "_resolve_device",
    "_status_kib", "_sync", "_versions",
]  # fmt: skip


# --------------------------------------------------------------------------- environment


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _versions(device: torch.device) -> dict[str, Any]:
    import higher
    import torchopt

    env: dict[str, Any] = {
        "metakd": __version__,
        "torch": torch.__version__,
        "higher": getattr(higher, "__version__", None) or _dist_version("higher"),
        "torchopt": torchopt.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(OSError):
        env["load_average"] = list(os.getloadavg())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={device!r} but CUDA is not available; use device='cpu' or 'auto'"
        )
    return dev


# --------------------------------------------------------------------------- timing and CPU peak memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- statistics and formatting


def _progress(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def _rel_diff(a: Tensor | None, ref: Tensor | None) -> float | None:
    if a is None or ref is None:
        return None
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)
