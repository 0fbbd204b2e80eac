"""daybreak: train a text-to-image diffusion transformer from scratch in a day.

Public API: `load_model`, `build_transformer`, `generate`, `save_samples`, `load_pipeline`, `preset`,
`load_config`, `train` and the `metrics` module. They are imported on first use, so `import
daybreak` stays cheap for the command line.
"""

from daybreak.compat import ensure_torchvision_importable, quiet_torchao

ensure_torchvision_importable()
quiet_torchao()

_LAZY = {
    "load_model": "daybreak.pipeline",
    "load_pipeline": "daybreak.pipeline",
    "generate": "daybreak.pipeline",
    "save_samples": "daybreak.pipeline",
    "build_transformer": "daybreak.model",
    "preset": "daybreak.model",
    "load_config": "daybreak.config",
    "train": "daybreak.run",
}


def __getattr__(name: str):
    import importlib

    if name == "metrics":
        return importlib.import_module("daybreak.metrics")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'daybreak' has no attribute {name!r}")


__all__ = [*_LAZY, "metrics"]
