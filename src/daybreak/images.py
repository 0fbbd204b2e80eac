"""Tensors to pictures: PIL conversion, grids with captions, PNGs that carry their settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, PngImagePlugin

# the channel statistics every ImageNet-trained network (DINO, CLIP-style towers) normalises with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → PIL images."""
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def image_grid(images: list[Image.Image], cols: int | None = None, captions: list[str] | None = None) -> Image.Image:
    """Tile images into one picture; with captions, a line of text under each."""
    cols = cols or int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    w, h = images[0].size
    text_h = 12 if captions else 0
    scale = max(1, 128 // max(w, h)) if captions else 1
    cw, ch = w * scale, h * scale
    grid = Image.new("RGB", (cols * cw, rows * (ch + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = (i % cols) * cw, (i // cols) * (ch + text_h)
        grid.paste(img.resize((cw, ch), Image.NEAREST), (x, y))
        if captions:
            draw.text((x + 2, y + ch), captions[i][: max(4, cw // 6)], fill="black")
    return grid


def save_png(image: Image.Image, path: Path, settings: dict) -> None:
    """PNG with the prompt, seed and sampler settings in its text metadata ("daybreak" key, JSON)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("daybreak", json.dumps(settings))
    if "prompt" in settings:
        info.add_text("prompt", str(settings["prompt"]))
    image.save(path, pnginfo=info)
