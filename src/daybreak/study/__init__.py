"""Ablation studies: run a baseline and its variants the same way, then report them side by side."""
