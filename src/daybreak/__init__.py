"""daybreak: train a text-to-image diffusion transformer from scratch in a day."""

from daybreak.compat import ensure_torchvision_importable

ensure_torchvision_importable()
