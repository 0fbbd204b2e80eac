"""TREAD token routing (Krause et al. 2025): half the image tokens skip the middle of the network.

At the entry of block `start` a random subset of each sample's tokens is set aside; blocks
`start..end` (inclusive) run on the kept tokens only, which carry their own RoPE positions and grid
index. After block `end` the processed kept tokens are scattered back into the stream saved at the
entry, so the routed tokens re-enter exactly as they left (not detached: their gradient reaches the
blocks before `start`). Nothing is dropped from the loss, and the span costs about `1 − fraction`
of its dense FLOPs. PRX routes 50 % of the tokens over blocks 2..12 of 16.

At sampling, the same routed forward is the weak branch of self-guidance ("Guiding Token-Sparse
Diffusion Models"): `x̂ = x̂_routed + w·(x̂_dense − x̂_routed)`, both passes conditional. The sampler
owns that rule; this module only provides the routed forward's hooks (`Tread.routed_hooks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from daybreak.devices import to_device
from daybreak.model.hooks import BlockHook, TokenState
from daybreak.recipe.base import BuildContext, Ingredient, IngredientConfig, check_span
from daybreak.schema import ranged


def routed_count(fraction: float, n: int) -> int:
    """How many of `n` tokens leave the stream: round(fraction·n) clipped to [1, n − 1].

    Python's round, as PRX: halves go to the even neighbour (n = 5 routes 2, n = 7 routes 4).
    Zero when `fraction` is 0 or there are fewer than two tokens (a lone token cannot be split
    into a kept and a routed part, so routing is then a no-op).
    """
    if fraction == 0 or n < 2:
        return 0
    return min(max(round(fraction * n), 1), n - 1)


def choose_kept(batch: int, n: int, n_routed: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(batch, n − n_routed) stream positions to keep, a uniform random subset per sample, sorted."""
    scores = torch.rand(batch, n, generator=generator, device=device if generator is None else generator.device)
    kept = scores.argsort(dim=1)[:, n_routed:]
    return to_device(kept.sort(dim=1).values, device)  # drawn on the host: pinned, non-blocking


class TreadRouter:
    """Routes tokens around blocks `start..end` for one forward pass (reusable: each pass redraws).

    `kept_index` (B, K) is the grid index of the tokens that ran through the span, set at the
    span's entry; with nothing routed it is the whole stream's index.
    """

    def __init__(
        self, fraction: float = 0.5, start: int = 2, end: int = 12, generator: torch.Generator | None = None
    ) -> None:
        self.fraction, self.start, self.end, self.generator = fraction, start, end, generator
        self.kept_index: Tensor | None = None
        self._full: TokenState | None = None  # the stream at the span's entry
        self._kept: Tensor | None = None  # stream positions of the kept tokens; None = nothing routed

    def before_block(self, i: int, state: TokenState) -> TokenState:
        if i != self.start:
            return state
        self._full = state
        batch, n = state.x.shape[:2]
        n_routed = routed_count(self.fraction, n)
        if n_routed == 0:
            self._kept, self.kept_index = None, state.index
            return state
        self._kept = choose_kept(batch, n, n_routed, self.generator, state.x.device)
        kept = state.take(self._kept)
        self.kept_index = kept.index
        return kept

    def after_block(self, i: int, state: TokenState) -> TokenState:
        if i != self.end or self._full is None:
            return state
        full, self._full = self._full, None
        return TokenState(x=self._merge(full, state.x), rope=full.rope, index=full.index)

    def _merge(self, full: TokenState, processed: Tensor) -> Tensor:
        """The full-length stream after the span, from the entry stream and the span's output."""
        if self._kept is None:
            return processed
        idx = self._kept.unsqueeze(-1).expand(-1, -1, processed.shape[-1])
        return full.x.to(processed.dtype).scatter(1, idx, processed)


class StepGenerators:
    """Routing generators fixed by (seed, step, rank, call within the step).

    A resumed run routes exactly as the uninterrupted one, ranks and micro-batches draw different
    subsets; with `seed=None` routing draws from torch's global generator instead.
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self._step, self._calls = -1, 0

    def __call__(self, step: int) -> torch.Generator | None:
        if step != self._step:
            self._step, self._calls = step, 0
        call, self._calls = self._calls, self._calls + 1
        if self.seed is None:
            return None
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        mixed = (((self.seed * 1_000_003 + step) * 65_537 + rank) * 4_099 + call) % (2**63 - 1)
        return torch.Generator().manual_seed(mixed)


def span_tokens(n: int, depth: int, fraction: float, start: int, end: int) -> list[int]:
    """Image tokens per block when `fraction` of `n` skip blocks start..end."""
    kept = n - routed_count(fraction, n)
    return [kept if start <= i <= end else n for i in range(depth)]


@dataclass
class TreadConfig(IngredientConfig):
    """Config section `tread` (PRX: 50 % of the tokens over blocks 2..12 of 16)."""

    fraction: float = ranged(0.5, ge=0, lt=1)
    start: int = 2
    end: int = 12

    def check(self, depth: int | None = None) -> None:
        check_span("tread", self.start, self.end, depth)


class Tread(Ingredient):
    """TREAD as a recipe ingredient: a fresh router per training forward, none for a dense forward."""

    name = "tread"
    Config = TreadConfig
    at_inference = True  # self-guidance's routed branch
    conflicts = ("sprint",)

    def __init__(self, c: TreadConfig, seed: int | None = None) -> None:
        super().__init__()
        self.fraction, self.start, self.end = c.fraction, c.start, c.end
        self.generators = StepGenerators(seed)

    @classmethod
    def from_config(cls, c: TreadConfig, ctx: BuildContext) -> "Tread":
        return cls(c, seed=ctx.seed)

    @staticmethod
    def block_tokens(c: TreadConfig, n: int, depth: int) -> list[int]:
        return span_tokens(n, depth, c.fraction, c.start, c.end)

    def block_hooks(self, step: int) -> list[BlockHook]:
        return [TreadRouter(self.fraction, self.start, self.end, self.generators(step))]

    def dense_hooks(self) -> list[BlockHook]:
        """Hooks for the dense (inference) forward: none, TREAD leaves the architecture unchanged."""
        return []

    def routed_hooks(self, generator: torch.Generator | None = None) -> list[BlockHook]:
        """Hooks for the routed branch of self-guidance: the training routing, drawn from `generator`."""
        return [TreadRouter(self.fraction, self.start, self.end, generator)]
