"""Reading a diffusers `PRXTransformer2DModel` folder (or a pipeline folder holding one).

daybreak's transformer has diffusers' constructor arguments and parameter names, so a released
PRX model is its `config.json` as keyword arguments plus its safetensors state dict, unchanged.
Used to start a run from a diffusers model (`init_from`) and by `daybreak import`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from daybreak.errors import UserError
from daybreak.model.transformer import PRXTransformer

TRANSFORMER_CLASS = "PRXTransformer2DModel"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _transformer_folder(path: Path) -> Path:
    return path / "transformer" if (path / "transformer" / "config.json").is_file() else path


def is_diffusers_dir(path: str | Path) -> bool:
    """True for a diffusers transformer folder or a pipeline folder (daybreak checkpoints hold config.yaml)."""
    p = Path(path)
    if (p / "model_index.json").is_file():
        return True
    cfg = _transformer_folder(p) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "_class_name" in json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    single, index = folder / WEIGHTS, folder / f"{WEIGHTS}.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(str(folder / f)).items()}
    raise UserError(f"'{folder}' has no {WEIGHTS} (safetensors weights are needed; re-save with safe_serialization)")


def load_diffusers_transformer(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(PRXTransformer2DModel kwargs, fp32 state dict) of a diffusers transformer or pipeline folder."""
    folder = _transformer_folder(Path(path))
    if not (folder / "config.json").is_file():
        raise UserError(f"'{path}' is not a diffusers folder (no config.json or transformer/config.json)")
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("_class_name") != TRANSFORMER_CLASS:
        raise UserError(f"'{folder}' holds a {raw.get('_class_name')!r}, not a {TRANSFORMER_CLASS}")
    kwargs = {k: v for k, v in raw.items() if not k.startswith("_")}
    known = set(inspect.signature(PRXTransformer.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise UserError(f"'{folder}': unsupported {TRANSFORMER_CLASS} config keys {', '.join(unknown)}")
    with torch.device("meta"):
        expected = PRXTransformer(**kwargs).state_dict()
    state = {k: v.float() for k, v in _read_weights(folder).items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape]
    if missing or extra or wrong:
        detail = "; ".join(f"{name}: {', '.join(keys[:3])}" for name, keys in
                           (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)) if keys)
        raise UserError(f"'{folder}': weights do not match its config ({detail})")
    return kwargs, state
