"""Environment fixes that keep daybreak importable on CPU-only installs.

PyPI has no CPU build of torchvision: next to a CPU torch, its compiled ops fail to load and
`import torchvision` then dies registering fake kernels for `nms`/`qnms`, ops it never defined.
daybreak uses torchvision only for model definitions (LPIPS' VGG, Inception), never those ops, so
when the extension is missing we declare the two schemas before torchvision is imported.
"""

from __future__ import annotations

import importlib.util

import torch

_patched = False


def ensure_torchvision_importable() -> None:
    global _patched
    if _patched or importlib.util.find_spec("torchvision") is None:
        return
    _patched = True
    try:
        torch.ops.torchvision.nms  # noqa: B018 - present when the compiled ops loaded
        return
    except (AttributeError, RuntimeError):
        pass
    try:
        import torchvision.extension  # noqa: F401  (loads the ops when it can)

        if torchvision.extension._has_ops():
            return
    except Exception:  # noqa: BLE001 - a broken extension is exactly the case handled below
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define(
        "qnms(Tensor dets, Tensor scores, float iou_threshold, float scale, int zero_point) -> Tensor"
    )
    globals()["_library"] = lib  # keep the definitions alive


def quiet_torchao() -> None:
    """transformers imports torchao (for its quantizers) whenever it is installed; on a CPU build of
    torch, torchao then warns that its CUDA kernels did not load and torch warns about its enum
    registrations. daybreak uses only torchao's float8 training (pure Python, emulated on CPU), so
    those lines are noise on every command: keep torchao's logger to errors and drop torch's
    `register_constant` notice."""
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").addFilter(lambda r: "register_constant" not in r.getMessage())
