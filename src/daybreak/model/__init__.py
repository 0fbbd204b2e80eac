"""The PRX transformer (diffusers-compatible weights), its named sizes and its fresh-init builder."""

from daybreak.model.presets import PRESETS, preset
from daybreak.model.transformer import PRXTransformer


def build_transformer(**kwargs) -> PRXTransformer:
    """A freshly initialised transformer from diffusers' `PRXTransformer2DModel` keyword arguments.

    Linear layers get PyTorch's default init and RMSNorm weights ones (as diffusers); the per-block
    modulation and the final layer (adaLN and output linear) start at zero, as in PRX, so a fresh
    model predicts exactly zero and every block starts as the identity.
    """
    return PRXTransformer(**kwargs)


__all__ = ["PRESETS", "PRXTransformer", "build_transformer", "preset"]
