"""The PRX text-to-image transformer: diffusers' `PRXTransformer2DModel`, with a hookable block loop.

Same constructor arguments, parameter names and fp32 numerics as diffusers, so weights move between
the two with a strict `load_state_dict` and export is a config dump plus a state dict. The block loop
carries a `TokenState` and calls the recipe's hooks around every block (TREAD/SPRINT routing, REPA
feature capture); blocks accept any number of image tokens. Checkpointing, compile and FSDP are
applied from outside, per block, through `model.blocks`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from daybreak.errors import UserError
from daybreak.model.hooks import BlockHook, TokenState, run_after, run_before, run_condition
from daybreak.model.layers import (
    FinalLayer,
    MLPEmbedder,
    PRXBlock,
    ResolutionEmbedder,
    patchify,
    rope_table,
    timestep_embedding,
    unpatchify,
)


class PRXTransformer(nn.Module):
    def __init__(
        self,
        in_channels: int = 16,
        patch_size: int = 2,
        context_in_dim: int = 2304,
        hidden_size: int = 1792,
        mlp_ratio: float = 3.5,
        num_heads: int = 28,
        depth: int = 16,
        axes_dim: Sequence[int] | None = None,
        theta: int = 10000,
        time_factor: float = 1000.0,
        time_max_period: int = 10000,
        bottleneck_size: int | None = None,
        resolution_embeds: bool = False,
    ):
        super().__init__()
        axes_dim = [32, 32] if axes_dim is None else list(axes_dim)
        if hidden_size % num_heads:
            raise UserError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        if sum(axes_dim) != hidden_size // num_heads or any(d % 2 for d in axes_dim):
            raise UserError(f"axes_dim {axes_dim} must be even and sum to the head dim {hidden_size // num_heads}")
        self.config = dict(
            in_channels=in_channels, patch_size=patch_size, context_in_dim=context_in_dim, hidden_size=hidden_size,
            mlp_ratio=mlp_ratio, num_heads=num_heads, depth=depth, axes_dim=axes_dim, theta=theta,
            time_factor=time_factor, time_max_period=time_max_period, bottleneck_size=bottleneck_size,
            resolution_embeds=resolution_embeds,
        )  # fmt: skip
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self._rope_cache: dict[tuple[int, int, torch.device], Tensor] = {}

        patch_dim = in_channels * patch_size**2
        if bottleneck_size is None:
            self.img_in = nn.Linear(patch_dim, hidden_size)
        else:
            self.img_in = nn.Sequential(nn.Linear(patch_dim, bottleneck_size), nn.Linear(bottleneck_size, hidden_size))
        self.time_in = MLPEmbedder(256, hidden_size)
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        self.resolution_embedder = ResolutionEmbedder(hidden_size, time_max_period) if resolution_embeds else None
        self.blocks = nn.ModuleList(PRXBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_dim)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (rows, cols) of a `height`×`width` input in model space (pixels or latents)."""
        p = self.patch_size
        if height % p or width % p:
            raise UserError(f"input size {height}x{width} is not a multiple of the patch size {p}")
        return height // p, width // p

    def num_tokens(self, height: int, width: int) -> int:
        gh, gw = self.grid(height, width)
        return gh * gw

    def rope(self, grid_h: int, grid_w: int, device: torch.device) -> Tensor:
        """Cached (1, N, 2, head_dim) fp32 RoPE table (see `rope_table`); fp32 whatever the model dtype, as in diffusers."""
        key = (grid_h, grid_w, device)
        if key not in self._rope_cache:
            with torch.inference_mode(False):  # a table built while sampling must stay usable for training
                cfg = self.config
                self._rope_cache[key] = rope_table(grid_h, grid_w, cfg["axes_dim"], cfg["theta"], device)
        return self._rope_cache[key]

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        hooks: Sequence[BlockHook] = (),
    ) -> Tensor:
        """hidden_states (B, C, H, W); timestep (B,) in [0, 1], 1 = noise; text (B, L, D); mask (B, L), True = valid.

        Hooks may drop or reorder tokens inside the loop but must hand back all N tokens in grid order.
        """
        b, _, h, w = hidden_states.shape
        gh, gw = self.grid(h, w)
        n = gh * gw
        x = self.img_in(patchify(hidden_states, self.patch_size))
        txt = self.txt_in(encoder_hidden_states)
        cfg = self.config
        t_emb = timestep_embedding(timestep.reshape(-1), 256, cfg["time_max_period"], cfg["time_factor"])
        vec = self.time_in(t_emb.to(x.dtype))
        if self.resolution_embedder is not None:
            hw = [torch.full((b,), s, dtype=torch.float32, device=x.device) for s in (h, w)]
            vec = vec + self.resolution_embedder(*hw, x.dtype)
        txt, attention_mask, vec = run_condition(hooks, txt, attention_mask, vec, (h, w))
        txt_mask = self._text_mask(attention_mask, txt)

        rope = self.rope(gh, gw, x.device).expand(b, -1, -1, -1)
        index = torch.arange(n, device=x.device).expand(b, n)
        state = TokenState(x=x, rope=rope, index=index)
        for i, block in enumerate(self.blocks):
            state = run_before(hooks, i, state)
            state = state.with_x(block(state.x, txt, vec, state.rope, txt_mask))
            state = run_after(hooks, i, state)
        if state.x.shape[1] != n:
            raise ValueError(f"block hooks left {state.x.shape[1]} of {n} image tokens; they must restore all")
        return unpatchify(self.final_layer(state.x, vec), self.patch_size, h, w)

    @staticmethod
    def _text_mask(mask: Tensor | None, txt: Tensor) -> Tensor | None:
        """Boolean (B, L) key mask, or None for SDPA's maskless path.

        An all-valid mask is dropped only when it lives on the CPU, where checking it is free. On
        an accelerator the check would stall the host every forward, so the mask is kept as given:
        masking keys that are all valid changes nothing but the attention kernel.
        """
        if mask is None:
            return None
        if mask.shape != txt.shape[:2]:
            raise UserError(f"attention mask shape {tuple(mask.shape)} does not match the text {tuple(txt.shape[:2])}")
        if mask.device.type == "cpu" and mask.numpy().all():
            return None
        return mask.to(device=txt.device, dtype=torch.bool)
