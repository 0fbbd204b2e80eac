"""The one seam between the transformer's block loop and training-time recipe pieces.

The block loop carries the image-token stream as a `TokenState`. Routing (TREAD, SPRINT) and
feature reading (REPA) are `BlockHook`s called before and after every block, so the block code
never changes when an ingredient is added. A hook may also have `condition`, called once before
the loop, to change what every block is conditioned on (resolution-aware conditioning: extra text
tokens, or a term added to the timestep vector). `index` tracks where each token in the stream sits in
the full patch grid, so a hook can tell which tokens a routed span kept.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, Sequence

from torch import Tensor


@dataclass
class TokenState:
    x: Tensor  # (B, N, hidden) image tokens currently in the stream
    rope: Tensor  # rotary encoding per token, token axis 1: (B, N, ...)
    index: Tensor  # (B, N) long: position of each token in the full (row-major) patch grid

    def take(self, idx: Tensor) -> "TokenState":
        """Keep the tokens at stream positions `idx` (B, K), in that order."""
        return TokenState(x=gather_tokens(self.x, idx), rope=gather_tokens(self.rope, idx), index=self.index.gather(1, idx))

    def with_x(self, x: Tensor) -> "TokenState":
        return replace(self, x=x)


def gather_tokens(t: Tensor, idx: Tensor) -> Tensor:
    """t: (B, N, ...), idx: (B, K) -> (B, K, ...)."""
    expanded = idx.reshape(*idx.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
    return t.gather(1, expanded)


class BlockHook(Protocol):
    def before_block(self, i: int, state: TokenState) -> TokenState: ...

    def after_block(self, i: int, state: TokenState) -> TokenState: ...


def run_before(hooks: Sequence[BlockHook], i: int, state: TokenState) -> TokenState:
    for h in hooks:
        state = h.before_block(i, state)
    return state


def run_after(hooks: Sequence[BlockHook], i: int, state: TokenState) -> TokenState:
    for h in hooks:
        state = h.after_block(i, state)
    return state


def run_condition(hooks: Sequence, txt: Tensor, mask: Tensor | None, vec: Tensor, size: tuple[int, int]
                  ) -> tuple[Tensor, Tensor | None, Tensor]:
    """The hooks' `condition(txt, mask, vec, size)`, in order: projected text tokens (B, L, hidden), their
    mask (B, L) or None, the time vector (B, hidden), and the input's (H, W) in model space."""
    for h in hooks:
        if hasattr(h, "condition"):
            txt, mask, vec = h.condition(txt, mask, vec, size)
    return txt, mask, vec
