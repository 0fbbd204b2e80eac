"""Performance: analytic FLOPs, the `daybreak bench` harness and the `daybreak plan` cost planner."""

from daybreak.bench.flops import forward_flops, parameter_count, train_flops

__all__ = ["forward_flops", "parameter_count", "train_flops"]
