"""Performance: analytic FLOPs, the `daybreak bench` harness and the `daybreak plan` cost planner."""

from daybreak.bench.flops import Routing, forward_flops, parameter_count, train_flops

__all__ = ["Routing", "forward_flops", "parameter_count", "train_flops"]
