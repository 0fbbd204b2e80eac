"""Exponential moving average of the weights, which eval and sampling use instead of the raw ones.

PRX updates it every 10 batches from step 0 with decay 0.999. The shadow is fp32 whatever
the training dtype, and is updated with foreach ops so an update costs a few kernels and no host
sync. Persistent buffers are copied, not averaged. PRX's ablation baselines run without EMA (it is its own
row, configs/yamls/flux1-vae-benchmark/EMA.yaml): `enabled=False` keeps no shadow, and everything
that would read the shadow (sampling, eval, export) reads the raw weights instead.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from daybreak.config import EMAConfig
from daybreak.errors import UserError
from daybreak.training.parallel import local, reshard


class EMA:
    """fp32 shadow copy of a module's parameters (averaged) and buffers (copied)."""

    def __init__(self, model: nn.Module, c: EMAConfig | None = None) -> None:
        c = c if c is not None else EMAConfig()
        self.decay, self.every, self.start, self.enabled = c.decay, c.every, c.start, c.enabled
        self._param_names = [n for n, _ in model.named_parameters()] if self.enabled else []
        persistent = model.state_dict(keep_vars=True)  # non-persistent buffers (e.g. position ids) are not weights
        self._buffer_names = [n for n, _ in model.named_buffers() if n in persistent] if self.enabled else []
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        self.shadow: dict[str, Tensor] = {n: params[n].detach().float().clone() for n in self._param_names}
        self.shadow.update({n: buffers[n].detach().clone() for n in self._buffer_names})

    def _sources(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        return [params[n].detach() for n in self._param_names], [buffers[n] for n in self._buffer_names]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> bool:
        """ema <- decay*ema + (1 - decay)*param when step >= start and step % every == 0; says if it did."""
        if not self.enabled or step < self.start or step % self.every:
            return False
        params, buffers = self._sources(model)
        # on local shards: under FSDP the transformer's tensors are DTensors and the replicated recipe
        # parts (SPRINT's fusion, the resolution embedder) plain ones, which one foreach call cannot mix
        shadow_params = [local(self.shadow[n]) for n in self._param_names]
        torch._foreach_lerp_(shadow_params, [local(p).float() for p in params], 1.0 - self.decay)
        if buffers:
            torch._foreach_copy_([local(self.shadow[n]) for n in self._buffer_names], [local(b) for b in buffers])
        return True

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model` (cast to its dtypes)."""
        params, buffers = self._sources(model)
        for target, name in zip(params + buffers, self._param_names + self._buffer_names):
            target.copy_(self.shadow[name])

    def settings(self) -> dict:
        return {"decay": self.decay, "every": self.every, "start": self.start}

    def load_settings(self, settings: dict) -> None:
        self.decay, self.every, self.start = settings["decay"], settings["every"], settings["start"]

    def state_dict(self) -> dict:
        return {**self.settings(), "shadow": dict(self.shadow)}

    @torch.no_grad()
    def load_shadow(self, shadow: dict[str, Tensor]) -> None:
        if set(shadow) != set(self.shadow):
            missing = sorted(set(self.shadow) ^ set(shadow))[:3]
            raise UserError(f"EMA checkpoint does not match the model (differing tensors: {', '.join(missing)} ...)")
        for name, tensor in self.shadow.items():
            tensor.copy_(shadow[name])

    def load_state_dict(self, state: dict) -> None:
        self.load_shadow(state["shadow"])
        self.load_settings(state)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        """`model` with the EMA weights in place (under FSDP every rank must enter), restored after;
        `model` itself when EMA is off."""
        if not self.enabled:
            yield model
            return
        tensors = [*model.parameters(), *model.buffers()]
        live = [local(t).detach().clone() for t in tensors]
        self.copy_to(model)
        try:
            yield model
        finally:
            reshard(model)
            with torch.no_grad():
                for t, saved in zip(tensors, live):
                    local(t).copy_(saved)
