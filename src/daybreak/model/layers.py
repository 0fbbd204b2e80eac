"""The pieces of a PRX transformer, numerically identical to diffusers' `transformer_prx.py`.

Module and parameter names follow diffusers' `PRXTransformer2DModel` exactly, so checkpoints load
key for key in both directions. The layout differs where it saves work: image tokens stay
(B, N, heads, head_dim) until attention, and the RoPE table is a (B, N, 2, head_dim) cos/signed-sin
tensor with the token axis at dim 1, so a routing hook can gather it together with the tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float, scale: float) -> Tensor:
    """Sinusoidal (cos, sin) embedding of `scale * t`, in diffusers' operation order. t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = scale * (t[:, None].float() * freqs[None])
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_table(grid_h: int, grid_w: int, axes_dim: list[int], theta: float, device: torch.device) -> Tensor:
    """2-axis RoPE over the row-major patch grid: (1, N, 2, head_dim) fp32, rows (cos, signed sin).

    Each angle is repeated for both members of its interleaved pair and the sine carries the
    rotation's sign (−sin for the first member, +sin for the second), so `apply_rope` is two
    multiplies and an add on whole head vectors instead of strided per-pair arithmetic.
    """
    rows = torch.arange(grid_h, dtype=torch.float64, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float64, device=device).repeat(grid_h)
    angles = []
    for pos, dim in zip((rows, cols), axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
        angles.append(pos[:, None] * omega[None])
    angle = torch.cat(angles, dim=-1).repeat_interleave(2, dim=-1)
    sign = torch.arange(angle.shape[-1], dtype=torch.float64, device=device).remainder(2).mul(2).sub(1)  # -1, +1, ...
    return torch.stack([angle.cos(), angle.sin() * sign], dim=1).float()[None]


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate interleaved pairs of x (B, N, H, D) by rope (B, N, 2, D), in fp32.

    (x0, x1) -> (x0·cos − x1·sin, x1·cos + x0·sin): the same products and sums as diffusers'
    per-pair form, so the result is bit-identical. Eager, it is one complex multiply of the pairs
    by cos + i·sin (one pass forward and one backward instead of a copy, two multiplies and an
    add); compiled, the real form, which inductor fuses (it generates no code for complex ops).
    """
    xf = x.float()
    if torch.compiler.is_compiling():
        swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        return (xf * rope[:, :, None, 0] + swapped * rope[:, :, None, 1]).type_as(x)
    turn = torch.complex(rope[:, :, 0, 0::2], rope[:, :, 1, 1::2])[:, :, None]
    return torch.view_as_real(torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * turn).flatten(-2).type_as(x)


def patchify(img: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, N, C*p*p), row-major patches, channel-major inside a patch."""
    b, c, h, w = img.shape
    patches = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(seq: Tensor, p: int, h: int, w: int) -> Tensor:
    """Inverse of `patchify`: (B, N, C*p*p) -> (B, C, H, W)."""
    b, _, d = seq.shape
    c = d // (p * p)
    return seq.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class FP32RMSNorm(nn.RMSNorm):
    """RMSNorm computed in fp32 whatever the input's and the weight's dtype (bf16 autocast, FSDP's
    bf16 compute weights), returned in the input's dtype; at fp32 it is `nn.RMSNorm` itself."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        return F.rms_norm(x.float(), self.normalized_shape, weight, self.eps).type_as(x)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (as `FP32RMSNorm`), returned in the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class ResolutionEmbedder(nn.Module):
    """PRX-7B's resolution conditioning: sinusoidal (H, W) of the input, projected and added to the time vector."""

    def __init__(self, hidden_size: int, max_period: float):
        super().__init__()
        self.max_period = max_period
        self.mlp = MLPEmbedder(256, hidden_size)

    def forward(self, height: Tensor, width: Tensor, dtype: torch.dtype) -> Tensor:
        emb = [timestep_embedding(s, 128, self.max_period, 1.0) for s in (height, width)]
        return self.mlp(torch.cat(emb, dim=-1).to(dtype))


class Modulation(nn.Module):
    """adaLN: shift, scale, gate for attention and for the MLP, zero-initialised (blocks start as identity)."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.lin.weight)
        nn.init.zeros_(self.lin.bias)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(6, dim=-1)


class Attention(nn.Module):
    """Image queries attend to text keys/values and image keys/values; only image tokens are updated."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.img_qkv_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.norm_q = FP32RMSNorm(self.head_dim, eps=1e-6)
        self.norm_k = FP32RMSNorm(self.head_dim, eps=1e-6)
        self.txt_kv_proj = nn.Linear(hidden_size, 2 * hidden_size, bias=False)
        self.norm_added_k = FP32RMSNorm(self.head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(hidden_size, hidden_size, bias=False)])

    def forward(self, x: Tensor, txt: Tensor, rope: Tensor, txt_mask: Tensor | None) -> Tensor:
        """x (B, N, hidden), txt (B, L, hidden), rope (B, N, 2, head_dim), txt_mask (B, L) bool or None."""
        b, n, _ = x.shape
        q, k, v = self.img_qkv_proj(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)
        q = apply_rope(self.norm_q(q), rope)
        k = apply_rope(self.norm_k(k), rope)
        txt_k, txt_v = self.txt_kv_proj(txt).view(b, txt.shape[1], 2, self.heads, self.head_dim).unbind(2)
        k = torch.cat([self.norm_added_k(txt_k), k], dim=1)
        v = torch.cat([txt_v, v], dim=1)
        mask = None
        if txt_mask is not None:  # keys are [text, image]; image keys are always valid
            mask = torch.cat([txt_mask, txt_mask.new_ones(b, n)], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, -1))


class PRXBlock(nn.Module):
    """Modulated attention then a GeGLU MLP, each gated and residual, on the image-token stream."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.img_pre_norm = FP32LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attention = Attention(hidden_size, num_heads)
        self.post_attention_layernorm = FP32LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.gate_proj = nn.Linear(hidden_size, mlp_hidden, bias=False)
        self.up_proj = nn.Linear(hidden_size, mlp_hidden, bias=False)
        self.down_proj = nn.Linear(mlp_hidden, hidden_size, bias=False)
        self.modulation = Modulation(hidden_size)

    def forward(self, x: Tensor, txt: Tensor, vec: Tensor, rope: Tensor, txt_mask: Tensor | None) -> Tensor:
        attn_shift, attn_scale, attn_gate, mlp_shift, mlp_scale, mlp_gate = self.modulation(vec)
        # a*b + c as one addcmul pass (diffusers: a multiply, then an add)
        h = torch.addcmul(attn_shift, 1 + attn_scale, self.img_pre_norm(x))
        x = torch.addcmul(x, attn_gate, self.attention(h, txt, rope, txt_mask))
        h = torch.addcmul(mlp_shift, 1 + mlp_scale, self.post_attention_layernorm(x))
        return torch.addcmul(x, mlp_gate, self.down_proj(F.gelu(self.gate_proj(h), approximate="tanh") * self.up_proj(h)))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map to patch values, zero-initialised (as in PRX)."""

    def __init__(self, hidden_size: int, out_dim: int):
        super().__init__()
        self.norm_final = FP32LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        for p in (*self.linear.parameters(), *self.adaLN_modulation.parameters()):
            nn.init.zeros_(p)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear(torch.addcmul(shift[:, None, :], 1 + scale[:, None, :], self.norm_final(x)))
