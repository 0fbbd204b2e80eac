"""FP8 matmuls for the transformer blocks' linear layers (`train.fp8`), with torchao's float8 training.

Each `nn.Linear` inside a block (attention q/k/v, text k/v, output projection, the MLP's gate, up and
down) becomes torchao's `Float8Linear`: inputs, weights and output gradients are scaled and cast to
float8 (e4m3; e5m2 for gradients under tensorwise scaling) for the three matmuls of forward and
backward, while the weights, their gradients and the optimizer state stay as they were (fp32
masters). `tensorwise` keeps one scale per tensor (fastest; under FSDP2 the weights are then
all-gathered in float8, half the bf16 bytes); `rowwise` one per row (more accurate, slower scaling).

What stays in bf16, and why: the patch and text embeddings and the final layer see raw pixels or
produce the prediction itself, so their rounding reaches the loss undamped (and their matmuls are a
few per cent of the FLOPs); the modulation turns the timestep vector into every block's scales,
shifts and gates, where an error multiplies every token of the block, and its matmul has only one
row per sample, too small to gain from FP8.

FP8 matmuls need a GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell); anywhere else
`train.fp8` is refused unless `train.fp8_emulate` asks for torchao's emulation (the same rounding
in high-precision matmuls: no speed-up, for tests and checks on CPUs).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from daybreak.errors import UserError

RECIPES = ("tensorwise", "rowwise")


def _kept_high_precision(fqn: str) -> bool:
    """Linear layers that stay in bf16 (module docstring): everything outside the blocks, and the modulation."""
    return not fqn.startswith("blocks.") or ".modulation" in fqn


def check_fp8(recipe: str, device: torch.device, emulate: bool) -> None:
    """One line and a UserError when `recipe` cannot run on `device`."""
    if recipe not in RECIPES:
        raise UserError(f"train.fp8 must be false, {' or '.join(RECIPES)}; got {recipe!r}")
    if emulate:
        return
    if device.type != "cuda":
        raise UserError(f"train.fp8={recipe} needs a CUDA GPU with FP8 matmuls (compute capability >= 8.9); "
                        f"on {device.type} only torchao's emulation runs (train.fp8_emulate=true, no speed-up)")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise UserError(f"train.fp8={recipe} needs FP8 matmuls (compute capability >= 8.9: Ada, Hopper, Blackwell); "
                        f"{torch.cuda.get_device_name(device)} is {major}.{minor}")


def convert_to_fp8(model: nn.Module, recipe: str, emulate: bool = False, sharded: bool = False) -> list[str]:
    """Swap the blocks' linear layers (not the modulation) for `Float8Linear` in place; returns their names.

    Parameter names and shapes are unchanged, so checkpoints, EMA and the optimizer split see the
    same model. `sharded` (FSDP2 follows): with tensorwise scaling the weights are all-gathered in
    float8 (`precompute_scales` then runs after each optimizer step). Call before compile,
    activation checkpointing and `fully_shard`.
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    gather = sharded and recipe == "tensorwise"
    config = dataclasses.replace(config, emulate=emulate, enable_fsdp_float8_all_gather=gather)
    converted = []

    def keep(module: nn.Module, fqn: str) -> bool:
        if isinstance(module, nn.Linear) and not _kept_high_precision(fqn):
            converted.append(fqn)
            return True
        return False

    convert_to_float8_training(model, config=config, module_filter_fn=keep)
    return converted


def all_gathers_fp8(model: nn.Module) -> bool:
    """Whether `model`'s FP8 weights are all-gathered in float8 (tensorwise under FSDP2)."""
    return any(getattr(getattr(m, "config", None), "enable_fsdp_float8_all_gather", False) for m in model.modules())


def precompute_scales(model: nn.Module) -> None:
    """The float8 scales of every sharded weight in one all-reduce (after the optimizer step), instead
    of one per weight inside the all-gathers of the next forward."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)
