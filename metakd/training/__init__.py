"""metakd.training."""

from metakd.training import per_sample_kd as _per_sample_kd  # noqa: F401  (registers objective=per_sample_kd)

__all__: list[str] = []
