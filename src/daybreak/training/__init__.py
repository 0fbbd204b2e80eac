"""Training: the Trainer (the step and the loop), the run's named checkpoint state and its Checkpointer, EMA, and the
scale-out pieces (process group, FSDP2, activation checkpointing, compile) applied from outside."""
