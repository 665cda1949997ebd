"""Where an unrolled CPU step spends its time in BatchNorm's double backward (docs/benchmarks.md).

    python benchmarks/profile_batchnorm.py [ETA]

Profiles one η-step hypergradient of the bench case (``cifar_very_tiny``, batch 128, 1 thread) with
PyTorch's BatchNorm double backward (``double_backward_batchnorm(False)``) and with metakd's closed form,
and prints for each: total self CPU time, the time inside the BatchNorm double-backward node, and the
number of elementwise ops on full-size (N, C, H, W) activations per BatchNorm layer and unrolled step.
The profiler's per-op overhead inflates the share of regions made of many small ops (the generic double
backward above all), so the docs quote the op counts from here and the time saving from `metakd bench`
(``reverse/stockbn``), which runs without a profiler.
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from metakd.bench import cases, runners
from metakd.functional.nn import double_backward_batchnorm

_DOUBLE_BACKWARD_NODES = ("NativeBatchNormBackwardBackward0", "_BatchNormTrainBackwardBackward")


def _profile(eta: int, closed_form: bool) -> None:
    case = cases._make_case("cifar_very_tiny", 128, eta, torch.device("cpu"))
    run = runners._RUNNERS["metakd/reverse"]
    with double_backward_batchnorm(closed_form):
        run(case)  # warm-up
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            run(case)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    node = sum(e.cpu_time_total for e in events if e.key in _DOUBLE_BACKWARD_NODES) / 1e3
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in case.module.modules())
    big = 0  # elementwise ops on full-size (128, C, H, W) activations
    for e in events:
        shapes = [s for s in e.input_shapes if len(s) == 4 and s[0] == 128]
        if (
            e.key in ("aten::mul", "aten::add", "aten::sub", "aten::addcmul", "aten::div")
            and shapes
        ):
            big += e.count
    label = "closed form" if closed_form else "PyTorch   "
    print(
        f"{label}: total self CPU {total:7.1f} ms, BatchNorm double backward {node:6.1f} ms "
        f"({100 * node / total:4.1f} %), full-size elementwise ops per BatchNorm layer and step: "
        f"{big / (n_bn * eta):.0f}"
    )


def main(eta: int) -> None:
    torch.set_num_threads(1)
    for closed_form in (False, True):
        _profile(eta, closed_form)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
