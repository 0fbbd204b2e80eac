"""Feature extractors behind the metrics, and a cache of reference-set statistics.

Each extractor maps images (uint8 B×3×H×W, or float in [0, 1]) to an N×D float32 CPU tensor, in
batches, in eval mode, without gradients, with the preprocessing its metric's reference
implementation uses:

- `InceptionFeatures`: FID's Inception-v3 pool3 (2048-d) through torch-fidelity, fed uint8 as
  the standard FID expects (PRX's own FID fed uint8 to a float metric; daybreak does not).
- `ClipFeatures`: CMMD's CLIP ViT-L/14-336 projected image embeddings, L2-normalised (bicubic
  resize without antialiasing, as google-research/cmmd); `encode_text` gives the matching text
  embeddings for the CLIP score.
- `DinoFeatures`: DINO-MMD's DINOv2 ViT-L/14-reg CLS token at 518² (bicubic), L2-normalised.
- `TinyFeatures`: a fixed random conv net built from a seed, for the demo's "FD on a small
  extractor" with no download. Its values are only comparable with other values from the same
  seed and width, never with FID.

Pretrained weights come from local paths (or hub ids already in the local cache); a missing one
is a `UserError` that names the config key and what to download.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from daybreak.config import EvalConfig
from daybreak.errors import UserError
from daybreak.images import IMAGENET_MEAN, IMAGENET_STD
from daybreak.io.store import atomic_write
from daybreak.metrics import feature_stats
from daybreak.schema import Registry

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

INCEPTION_DOWNLOAD = (
    "pt_inception-2015-12-05-6726825d.pth (https://github.com/mseitzer/pytorch-fid/releases/"
    "download/fid_weights/pt_inception-2015-12-05-6726825d.pth)"
)
CLIP_DOWNLOAD = (
    "the folder openai/clip-vit-large-patch14-336 (`hf download openai/clip-vit-large-patch14-336`)"
)
DINO_DOWNLOAD = (
    "the folder facebook/dinov2-with-registers-large (`hf download facebook/dinov2-with-registers-large`)"
)
Device = str | torch.device

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def weights_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity for a weights file or folder: names, sizes, and first/last MiB of each file.

    Hashing whole multi-GB checkpoints would cost more than the cache saves. Hidden files (download
    metadata) are skipped; a hub id that is not a local path is identified by its name.
    """
    p = Path(path).expanduser()
    if not p.exists():
        return hashlib.sha256(str(path).encode()).hexdigest()
    h = hashlib.sha256()
    root = p if p.is_dir() else p.parent
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        name = f.relative_to(root)
        if any(part.startswith(".") for part in name.parts):
            continue
        size = f.stat().st_size
        h.update(f"{name.as_posix()}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(size - (1 << 20), 0))
            h.update(fh.read(1 << 20))
    return h.hexdigest()


class FeatureExtractor(ABC):
    """Shared batching and input handling; subclasses implement `_embed` on float [0,1] batches."""

    name: str
    fingerprint: str

    def __init__(self, device: Device = "cpu", batch_size: int = 32) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size

    @abstractmethod
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features of one float batch in [0, 1], already on `self.device`."""

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images shaped B×3×H×W, got {tuple(images.shape)}")
        out = []
        for chunk in images.split(self.batch_size):
            chunk = chunk.to(self.device)
            x = chunk.float() / 255.0 if chunk.dtype == torch.uint8 else chunk.float()
            out.append(self._embed(x).float().cpu())
        return torch.cat(out)


class InceptionFeatures(FeatureExtractor):
    """FID Inception-v3 pool3 features (2048-d), from the converted TF 2015-12-05 weights."""

    name = "inception"

    def __init__(self, weights_path: str | os.PathLike, device: Device = "cpu", batch_size: int = 32):
        super().__init__(device, batch_size)
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise UserError(f"eval.inception_path: no file at {path}; download {INCEPTION_DOWNLOAD}")
        try:
            net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
            )
        except (RuntimeError, pickle.UnpicklingError) as e:
            raise UserError(f"eval.inception_path: {path} is not the FID Inception weights ({e})") from None
        self.net = net.to(self.device)
        self.fingerprint = weights_fingerprint(path)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        (features,) = self.net((x * 255).round().clamp(0, 255).to(torch.uint8))
        return features


class ClipFeatures(FeatureExtractor):
    """CLIP projected image embeddings, L2-normalised (CMMD), and text embeddings (CLIP score)."""

    name = "clip"

    def __init__(self, path: str | os.PathLike, device: Device = "cpu", batch_size: int = 32):
        super().__init__(device, batch_size)
        from transformers import CLIPModel

        self.path = str(Path(path).expanduser())
        try:
            self.model = CLIPModel.from_pretrained(self.path).to(self.device).eval()
        except OSError:
            msg = f"eval.clip_path: cannot load a CLIP model from {path}; download {CLIP_DOWNLOAD}"
            raise UserError(msg) from None
        self.resolution = self.model.config.vision_config.image_size
        self.fingerprint = weights_fingerprint(self.path)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False)
        pooled = self.model.vision_model(pixel_values=_normalize(x, CLIP_MEAN, CLIP_STD)).pooler_output
        return F.normalize(self.model.visual_projection(pooled), dim=-1)

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path)
        except OSError:
            msg = f"eval.clip_path: no CLIP tokenizer in {self.path}; download {CLIP_DOWNLOAD}"
            raise UserError(msg) from None

    @torch.inference_mode()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Projected, L2-normalised text embeddings (N×D float32 CPU), truncated to CLIP's context."""
        out = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(
                prompts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.model.config.text_config.max_position_embeddings,
                return_tensors="pt",
            ).to(self.device)
            pooled = self.model.text_model(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            ).pooler_output
            out.append(F.normalize(self.model.text_projection(pooled), dim=-1).float().cpu())
        return torch.cat(out)


class DinoFeatures(FeatureExtractor):
    """DINOv2 (with registers) CLS token after the final norm, at `resolution`², L2-normalised."""

    name = "dino"

    def __init__(
        self,
        path: str | os.PathLike,
        resolution: int = 518,
        device: Device = "cpu",
        batch_size: int = 32,
    ):
        super().__init__(device, batch_size)
        from transformers import AutoModel

        try:
            self.model = AutoModel.from_pretrained(str(Path(path).expanduser())).to(self.device).eval()
        except OSError:
            msg = f"eval.dino_path: cannot load a DINOv2 model from {path}; download {DINO_DOWNLOAD}"
            raise UserError(msg) from None
        self.resolution = resolution
        self.fingerprint = f"{weights_fingerprint(path)}-{resolution}"

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", antialias=True)
        cls = self.model(pixel_values=_normalize(x, IMAGENET_MEAN, IMAGENET_STD)).pooler_output
        return F.normalize(cls, dim=-1)


class TinyFeatures(FeatureExtractor):
    """A fixed random conv net (64×64 input, `dim`-d output) built from `seed` alone.

    No download and deterministic across machines, so the demo can report an FD; absolute values
    are only comparable with other values from the same seed and dim.
    """

    name = "tiny"

    def __init__(self, seed: int = 0, dim: int = 64, device: Device = "cpu", batch_size: int = 256):
        super().__init__(device, batch_size)
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(64, dim, 4, stride=2, padding=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        gen = torch.Generator().manual_seed(seed)
        for conv in self.net:
            if isinstance(conv, nn.Conv2d):
                fan_in = conv.weight[0].numel()
                conv.weight.data = torch.randn(conv.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5
                conv.bias.data.zero_()
        self.net = self.net.to(self.device).eval().requires_grad_(False)
        self.fingerprint = f"seed{seed}-dim{dim}"

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        return self.net(x * 2 - 1)


@dataclass(frozen=True)
class Extractor:
    """How to build one feature extractor: from its weights at `eval.<path_key>` (None: it needs none)."""

    build: Callable[..., FeatureExtractor]  # (weights path, eval section, device) -> extractor
    path_key: str | None = None
    download: str = ""


EXTRACTORS = Registry(None, {
    "inception": Extractor(lambda path, c, device: InceptionFeatures(path, device=device, batch_size=c.batch_size),
                           "inception_path", INCEPTION_DOWNLOAD),
    "clip": Extractor(lambda path, c, device: ClipFeatures(path, device=device, batch_size=c.batch_size),
                      "clip_path", CLIP_DOWNLOAD),
    "dino": Extractor(lambda path, c, device: DinoFeatures(path, resolution=c.dino_resolution, device=device,
                                                           batch_size=c.batch_size), "dino_path", DINO_DOWNLOAD),
    "tiny": Extractor(lambda path, c, device: TinyFeatures(device=device, batch_size=c.batch_size)),
}, what="feature extractor")


def build_extractor(name: str, c: EvalConfig, device: Device = "cpu") -> FeatureExtractor:
    """The extractor called `name` (an `EXTRACTORS` key), its weights from the `eval` section `c`."""
    e = EXTRACTORS[name]
    path = getattr(c, e.path_key) if e.path_key is not None else None
    if e.path_key is not None and path is None:
        raise UserError(f"eval.{e.path_key} is not set; download {e.download} and set eval.{e.path_key}")
    return e.build(path, c, device)


@dataclass(frozen=True)
class ReferenceStats:
    """Features of an image set with their mean and covariance: all FD and MMD need of it."""

    features: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def from_features(cls, features: np.ndarray | torch.Tensor) -> ReferenceStats:
        feats = np.asarray(torch.as_tensor(features).float().cpu())
        return cls(feats, *feature_stats(feats))

    @classmethod
    def from_batches(cls, extractor: FeatureExtractor, batches: Iterable[torch.Tensor]) -> ReferenceStats:
        return cls.from_features(torch.cat([extractor(b) for b in batches]))

    @classmethod
    def load_or_compute(
        cls,
        extractor: FeatureExtractor,
        batches: Iterable[torch.Tensor],
        dataset_key: str,
        cache_dir: str | os.PathLike,
    ) -> ReferenceStats:
        """Cached statistics of a reference set; `batches` is consumed only on a cache miss.

        The cache file is keyed by extractor name, weights fingerprint and `dataset_key`, a string
        that identifies the reference images (source, split, count, resolution, seed).
        """
        key = hashlib.sha256(f"{extractor.name}\n{extractor.fingerprint}\n{dataset_key}".encode()).hexdigest()
        path = Path(cache_dir).expanduser() / f"{extractor.name}-{key[:20]}.npz"
        if path.is_file():
            with np.load(path) as f:
                return cls(f["features"], f["mu"], f["sigma"])
        stats = cls.from_batches(extractor, batches)
        def save(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, features=stats.features, mu=stats.mu, sigma=stats.sigma)

        atomic_write(path, save)
        return stats
