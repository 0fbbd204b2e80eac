"""The denoiser (what the network's output means, the loss, the per-sample draws) and the sampler."""
