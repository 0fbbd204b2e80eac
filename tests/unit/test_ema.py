import copy

import pytest
import torch
from torch import nn

from daybreak.errors import UserError
from daybreak.config import EMAConfig
from daybreak.training.ema import EMA


class Scalar(nn.Module):
    def __init__(self, value: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(value, dtype=dtype))
        self.register_buffer("count", torch.tensor(0, dtype=torch.long))


def test_updates_every_ten_steps_from_step_zero():
    model = Scalar(100.0)
    ema = EMA(model, EMAConfig(decay=0.5, every=10))
    values, updated = [], []
    for step in range(26):
        model.w.data.fill_(float(step))  # the raw weight at step s is s
        model.count.fill_(step)
        updated.append(ema.update(model, step))
        values.append(ema.shadow["w"].item())
    assert [s for s, u in enumerate(updated) if u] == [0, 10, 20]
    # 0.5*100 + 0.5*0 = 50; 0.5*50 + 0.5*10 = 30; 0.5*30 + 0.5*20 = 25
    assert values == [50.0] * 10 + [30.0] * 10 + [25.0] * 6
    assert ema.shadow["count"].item() == 20  # buffers are copied at updates, not averaged


def test_start_delays_updates():
    model = Scalar(8.0)
    ema = EMA(model, EMAConfig(decay=0.5, every=10, start=15))
    assert [s for s in range(31) if ema.update(model, s)] == [20, 30]


def test_shadow_is_fp32_and_copy_to_casts_back():
    model = Scalar(1.0, dtype=torch.bfloat16)
    ema = EMA(model, EMAConfig(decay=0.75, every=1))
    model.w.data.fill_(3.0)
    model.count.fill_(7)
    ema.update(model, 0)
    assert ema.shadow["w"].dtype == torch.float32 and ema.shadow["w"].item() == 1.5
    model.w.data.fill_(-4.0)
    model.count.fill_(9)
    ema.copy_to(model)
    assert model.w.dtype == torch.bfloat16 and model.w.item() == 1.5
    assert model.count.item() == 7


def test_state_dict_round_trip():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(net, EMAConfig(decay=0.9, every=2))
    for step in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(net, step)
    state = copy.deepcopy(ema.state_dict())
    restored = EMA(copy.deepcopy(net), EMAConfig(decay=0.1, every=7))
    restored.load_state_dict(state)
    assert (restored.decay, restored.every, restored.start) == (0.9, 2, 0)
    for name, tensor in ema.shadow.items():
        assert torch.equal(restored.shadow[name], tensor)
    ema.update(net, 6)
    restored.update(net, 6)
    for name, tensor in ema.shadow.items():
        assert torch.equal(restored.shadow[name], tensor)
    with pytest.raises(UserError):
        EMA(nn.Linear(3, 4)).load_state_dict(state)


def test_disabled_ema_keeps_no_shadow_and_swaps_nothing():
    model = nn.Linear(3, 2)
    ema = EMA(model, EMAConfig(decay=0.5, every=1, enabled=False))
    assert ema.shadow == {} and ema.state_dict()["shadow"] == {}
    assert ema.update(model, 0) is False
    before = model.weight.detach().clone()
    with ema.swapped_in(model) as m:
        assert m is model and torch.equal(model.weight, before)


def test_non_persistent_buffers_are_not_weights():
    model = nn.Linear(2, 2)
    model.register_buffer("position_ids", torch.arange(4), persistent=False)  # as in transformers' encoders
    model.register_buffer("scale", torch.ones(2))
    assert set(EMA(model).shadow) == {"weight", "bias", "scale"}
