"""Stages: start a run from another run's weights (the speedrun's 512 px → 1024 px hand-over)."""

from __future__ import annotations

from pathlib import Path

from daybreak.train import checkpoint as ck


def init_weights(trainer, source: str) -> None:
    """Load the transformer (and its EMA, and a trained text tower) of checkpoint `source`; fresh optimizer."""
    src = ck.check_checkpoint(source)
    tracked = {f"transformer.{k}": v for k, v in ck.load_tensors(src, "transformer.safetensors").items()}
    ema = {f"transformer.{k}": v for k, v in ck.load_tensors(src, "transformer_ema.safetensors").items()}
    if "text_encoder" in trainer.tracked and (Path(src) / "text_encoder.safetensors").is_file():
        tracked.update({f"text_encoder.{k}": v for k, v in ck.load_tensors(src, "text_encoder.safetensors").items()})
        ema.update({f"text_encoder.{k}": v for k, v in ck.load_tensors(src, "text_encoder_ema.safetensors").items()})
    trainer.tracked.load_state_dict(tracked)
    state = trainer.ema.state_dict()
    state["shadow"] = {k: ema[k].to(v.dtype) for k, v in state["shadow"].items()}
    trainer.ema.load_state_dict(state)
    trainer._print(f"initialised weights and EMA from {src}")
