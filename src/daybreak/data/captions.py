"""Per-example caption choice among caption columns (e.g. long 0.8 / short 0.2).

PRX trains on one (long) caption column; the ablation article advises long captions for
pre-training and mixing in short ones when fine-tuning (the speedrun's stage 2, `speedrun-1024.yaml`).

The draw is a pure function of (seed, epoch, index), so it is the same on every rank and worker
and after a resume, and an example sees different columns in different epochs. Columns an example
lacks (or has empty) are dropped and the remaining weights renormalised; with none left the
example has no usable caption and the loader skips it (counter `no_caption`). No weights at all
means every caption column an example has, with equal weight: the source's caption columns are
already the named ones (`resolve_caption_columns`), so nothing unnamed is ever drawn.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from daybreak.errors import UserError


class CaptionMixer:
    def __init__(self, weights: Mapping[str, float] | None = None, seed: int = 0) -> None:
        weights = dict(weights or {})
        if any(w < 0 for w in weights.values()) or (weights and sum(weights.values()) <= 0):
            raise UserError(f"data.captions weights must be ≥ 0 with a positive sum (got {weights})")
        self.weights = {k: float(w) for k, w in weights.items() if w > 0}
        self.seed = seed

    def column(self, available: Mapping[str, str], epoch: int, index: int) -> str | None:
        """The column to train on for this example, or None when it has no usable caption."""
        weights = self.weights or {c: 1.0 for c in sorted(available)}
        usable = [(c, w) for c, w in weights.items() if (available.get(c) or "").strip()]
        if not usable:
            return None
        u = random.Random(f"{self.seed}:{epoch}:{index}").random() * sum(w for _, w in usable)
        for column, w in usable:
            u -= w
            if u < 0:
                return column
        return usable[-1][0]


def resolve_caption_columns(available: Sequence[str], named: Sequence[str] | None, *, where: str,
                            key: str = "data.captions") -> list[str]:
    """The caption columns a source trains on: the `named` ones (each must be among `available`, the
    source's string columns), else its only string column. Never a guess: several string columns and
    none named, or a named one the data lacks, is one line saying what the data has and which key to set."""
    available = sorted(set(available))
    listing = ", ".join(available) or "none"
    if named:
        missing = [c for c in named if c not in available]
        if missing:
            raise UserError(f"{key} names {', '.join(missing)}, which {where} lacks; its string columns: {listing}")
        return list(named)
    if len(available) == 1:
        return available
    if not available:
        raise UserError(f"{where} has no caption: no string column, no .txt or .json next to its images")
    example = ", ".join(f"{c}: 1.0" for c in available[:1])
    raise UserError(f"{where} has several string columns ({listing}) and no caption column named: "
                    f"set {key} (e.g. {key}={{{example}}})")
