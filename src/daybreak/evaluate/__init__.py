"""Measuring models: feature extractors, eval runs of a checkpoint, periodic eval during training,
and the prompt-adherence judge of the demo. The metric formulas themselves are `daybreak.metrics`."""
