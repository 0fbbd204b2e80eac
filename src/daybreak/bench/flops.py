"""Analytic FLOPs of a PRX transformer training step: what MFU and the cost planner divide by.

One multiply-add is 2 FLOPs. For batch B, N image tokens (K = N − round(f·N) inside a routed span),
L text tokens, hidden d, MLP width m = int(d·mlp_ratio), patch vector P = in_channels·patch², a
bottleneck b (or none), text width c, and for each block the number n of image tokens it sees:

    patch embed    2·B·N·(P·b + b·d)          (2·B·N·P·d without a bottleneck)
    text embed     2·B·L·c·d
    time MLP       2·B·(256·d + d·d)
    per block      q,k,v       2·B·n·d·3d
                   attention   4·B·n·(L + n)·d      (QKᵀ and A·V over L text + n image keys)
                   out proj    2·B·n·d·d
                   text K/V    2·B·L·d·2d           (every block, whatever the routing)
                   MLP         2·B·n·3·d·m          (gate, up, down)
                   modulation  2·B·d·6d
    final layer    2·B·d·2d + 2·B·N·d·P

Token routing (TREAD, SPRINT) shows up as each block's own n, which the recipe's ingredients report
(`daybreak.recipe.block_tokens`); SPRINT's fusion layer (2·B·N·2d·d, once) is not counted. The backward pass costs twice the
forward for every matmul whose input needs a gradient; the three input layers (patch embed's
first linear, text embed, time MLP's first linear) see data, so only their weight gradient is
computed and their backward costs 1× (the usual "6·params·tokens" rule ignores that). Norms,
RoPE, activations and the optimizer are not counted (they are memory-bound, and MFU
conventionally counts only matmul work); neither are recipe extras (REPA projector, teachers).
"""

from __future__ import annotations


def forward_flops(
    model: dict, batch: int, image_tokens: int, text_tokens: int, block_tokens: list[int] | None = None
) -> dict[str, float]:
    """Forward FLOPs by term (see the module docstring) for diffusers' PRXTransformer2DModel kwargs `model`."""
    b, n, length = batch, image_tokens, text_tokens
    d = model["hidden_size"]
    m = int(d * model["mlp_ratio"])
    p = model["in_channels"] * model["patch_size"] ** 2
    neck = model.get("bottleneck_size")
    c = model["context_in_dim"]
    terms = dict.fromkeys(("embed_data", "embed", "qkv", "attention", "out", "text_kv", "mlp", "modulation", "final"), 0.0)
    # layers whose input is data (backward: weight gradient only)
    terms["embed_data"] = 2.0 * b * n * p * (neck or d) + 2.0 * b * length * c * d + 2.0 * b * 256 * d
    terms["embed"] = (2.0 * b * n * neck * d if neck else 0.0) + 2.0 * b * d * d
    for i in range(model["depth"]):
        k = block_tokens[i] if block_tokens is not None else n
        terms["qkv"] += 2.0 * b * k * d * 3 * d
        terms["attention"] += 4.0 * b * k * (length + k) * d
        terms["out"] += 2.0 * b * k * d * d
        terms["text_kv"] += 2.0 * b * length * d * 2 * d
        terms["mlp"] += 2.0 * b * k * 3 * d * m
        terms["modulation"] += 2.0 * b * d * 6 * d
    terms["final"] = 2.0 * b * d * 2 * d + 2.0 * b * n * d * p
    return terms


def train_flops(
    model: dict, batch: int, image_tokens: int, text_tokens: int, block_tokens: list[int] | None = None
) -> float:
    """FLOPs of one forward + backward on one micro batch: 3× the forward, 2× for the data-fed layers."""
    terms = forward_flops(model, batch, image_tokens, text_tokens, block_tokens)
    data_fed = terms["embed_data"]
    return 3.0 * (sum(terms.values()) - data_fed) + 2.0 * data_fed


def parameter_count(model: dict) -> int:
    """Parameters of the transformer (no REPA projector), from its kwargs: the planner's memory basis."""
    d = model["hidden_size"]
    m = int(d * model["mlp_ratio"])
    p = model["in_channels"] * model["patch_size"] ** 2
    neck = model.get("bottleneck_size")
    head = d // model["num_heads"]
    embed = (p * neck + neck + neck * d + d) if neck else (p * d + d)
    embed += model["context_in_dim"] * d + d + 256 * d + d + d * d + d
    block = 3 * d * d + 2 * d * d + d * d + 3 * head + 3 * d * m + 6 * d * d + 6 * d
    final = d * p + p + d * 2 * d + 2 * d
    resolution = 256 * d + d + d * d + d if model.get("resolution_embeds") else 0
    return embed + model["depth"] * block + final + resolution
