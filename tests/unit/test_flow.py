import math

import pytest
import torch
from helpers import denoiser

from daybreak.errors import UserError
from daybreak.config import load_config
from daybreak.build import build_denoiser
from daybreak.diffusion.objective import Denoiser, caption_keep_mask, sample_timesteps, shift_time, training_shift
from daybreak.recipe.base import StepTensors
from daybreak.recipe.contrastive import ContrastiveConfig, ContrastiveFlow


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shift_time():
    assert shift_time(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)  # 1.5 / 2
    assert shift_time(torch.tensor(0.25), 3.0).item() == pytest.approx(0.5)  # 0.75 / 1.5
    assert shift_time(torch.tensor([0.0, 1.0]), 3.0).tolist() == [0.0, 1.0]
    assert shift_time(torch.tensor(0.3), 1.0).item() == pytest.approx(0.3)


def test_timesteps_range_and_determinism():
    t = sample_timesteps(5000, generator=gen(1))
    assert t.shape == (5000,)
    assert t.min() >= 1e-3 and t.max() <= 1.0
    assert torch.equal(t, sample_timesteps(5000, generator=gen(1)))
    assert not torch.equal(t, sample_timesteps(5000, generator=gen(2)))
    # a narrow window forces the redraw loop: sigmoid(N(0,1)) lands in [0.4, 0.6) only ~32 % of the time
    narrow = sample_timesteps(2000, generator=gen(3), shift=1.0, uniform_prob=0.0, t_min=0.4, t_max=0.6)
    assert narrow.min() >= 0.4 and narrow.max() < 0.6
    with pytest.raises(UserError):
        sample_timesteps(4, generator=gen(), t_min=0.5, t_max=0.5)


def test_timesteps_shifted_median():
    # median of sigmoid(N(0, 1)) is 0.5; shift 3 maps it to 0.75 (monotone map keeps the median)
    t = sample_timesteps(20000, generator=gen(4), uniform_prob=0.0)
    assert t.median().item() == pytest.approx(0.75, abs=0.01)
    # mean/std are configurable: std -> 0 concentrates at shift(sigmoid(mean))
    t = sample_timesteps(100, generator=gen(5), shift=1.0, uniform_prob=0.0, mean=1.0, std=1e-6)
    assert torch.allclose(t, torch.full((100,), 1 / (1 + math.exp(-1.0))), atol=1e-5)


def test_training_shift_anneal_by_hand():
    # 3 -> 1 over 5 steps: 3, 2.5, 2, 1.5, 1 (step / (steps - 1) of the way), then held at 1
    assert [training_shift(3.0, 1.0, s, 5) for s in range(7)] == [3.0, 2.5, 2.0, 1.5, 1.0, 1.0, 1.0]
    assert training_shift(3.0, None, 4, 5) == 3.0  # no anneal: the shift throughout
    assert training_shift(3.0, 1.0, 0, 1) == 1.0  # a one-step run trains at the end shift


def test_annealed_shift_reaches_the_draws():
    # median of the logit-normal part is shift(0.5) = s / (1 + s): 0.75 at shift 3 (the first step),
    # 0.5 at shift 1 (the last); samples are numbered globally, step = number // global_batch
    cfg = load_config("tiny", ["objective.shift=3", "objective.shift_end=1", "objective.uniform_prob=0",
                               "train.steps=3", "train.global_batch=2000", "train.micro_batch=2000"])
    draws = build_denoiser(cfg).draws
    _, first, _ = draws(range(0, 2000), (1,), torch.device("cpu"))
    _, middle, _ = draws(range(2000, 4000), (1,), torch.device("cpu"))
    _, last, _ = draws(range(4000, 6000), (1,), torch.device("cpu"))
    assert first.median().item() == pytest.approx(0.75, abs=0.02)
    assert middle.median().item() == pytest.approx(2 / 3, abs=0.02)  # shift 2
    assert last.median().item() == pytest.approx(0.5, abs=0.02)


def test_timesteps_uniform_fraction():
    # with a near-constant logit-normal part at shift(0.5) = 0.75, everything else came from the
    # uniform draw: P(uniform and |u - 0.75| > 1e-3) = 0.1 * (1 - 0.002 / 0.999) = 0.0998
    t = sample_timesteps(20000, generator=gen(6), std=1e-6)
    frac = ((t - 0.75).abs() > 1e-3).float().mean().item()
    assert frac == pytest.approx(0.0998, abs=0.007)  # 3 binomial standard deviations
    # the uniform draws are unshifted: their mean is (0.001 + 1) / 2, not the shifted ~0.75
    u = sample_timesteps(20000, generator=gen(7), uniform_prob=1.0)
    assert u.mean().item() == pytest.approx(0.5005, abs=0.01)


def test_noisy():
    x0 = torch.tensor([[1.0, 2.0], [4.0, 0.0]])
    noise = torch.tensor([[3.0, -1.0], [0.0, 2.0]])
    x_t = Denoiser.noisy(x0, noise, torch.tensor([0.25, 1.0]))
    assert torch.allclose(x_t, torch.tensor([[1.5, 1.25], [0.0, 2.0]]))  # 0.75·x0 + 0.25·noise; pure noise


def tiny_batch():
    x0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    noise = torch.tensor([[-1.0, 2.0], [1.0, 1.0]])
    t = torch.tensor([0.5, 0.02])  # the second sample is inside the clamp region
    return x0, noise, t, Denoiser.noisy(x0, noise, t)


def test_x_prediction_loss_by_hand():
    x0, noise, t, x_t = tiny_batch()
    out = torch.tensor([[0.5, 0.0], [0.1, 2.0]])
    loss, x0_hat = denoiser().loss(out, x0, x_t, noise, t)
    # velocity difference = (x0 - x̂0) / max(t, 0.05):
    #   sample 0: [0.5, 0] / 0.5 = [1, 0]      -> mse 0.5
    #   sample 1: [-0.1, 0] / 0.05 = [-2, 0]   -> mse 2   (unclamped, /0.02, would give 12.5)
    assert torch.allclose(loss, torch.tensor([0.5, 2.0]))
    assert torch.equal(x0_hat, out)
    no_clamp = denoiser(t_clamp=0.0).loss(out, x0, x_t, noise, t)[0]
    assert torch.allclose(no_clamp, torch.tensor([0.5, 12.5]))


def test_v_prediction_loss_and_round_trip():
    x0, noise, t, x_t = tiny_batch()
    obj = denoiser(prediction="v")
    v_true = noise - x0
    assert torch.allclose(obj.x0_from_output(v_true, x_t, t), x0, atol=1e-6)
    out = torch.tensor([[-2.0, 1.0], [1.0, -1.0]])  # targets: [-2, 2] and [1, -1]
    loss, x0_hat = obj.loss(out, x0, x_t, noise, t)
    assert torch.allclose(loss, torch.tensor([0.5, 0.0]))
    assert torch.allclose(x0_hat, x_t - t[:, None] * out)
    with pytest.raises(UserError, match="objective.prediction"):  # checked where the config loads
        load_config("tiny", ["objective.prediction=eps"])


def test_velocity_broadcasts_over_images():
    x_t = torch.ones(2, 3, 4, 4)
    v = denoiser().velocity(torch.zeros_like(x_t), x_t, torch.tensor([0.5, 0.01]))
    assert torch.allclose(v[0], torch.full((3, 4, 4), 2.0)) and torch.allclose(v[1], torch.full((3, 4, 4), 20.0))


def test_caption_keep_mask():
    keep = caption_keep_mask(20000, 0.1, gen(8))
    assert keep.dtype == torch.bool and keep.shape == (20000,)
    assert keep.float().mean().item() == pytest.approx(0.9, abs=0.007)
    assert caption_keep_mask(50, 0.0, gen()).all() and not caption_keep_mask(50, 1.0, gen()).any()
    assert torch.equal(caption_keep_mask(64, 0.5, gen(9)), caption_keep_mask(64, 0.5, gen(9)))
    with pytest.raises(UserError):
        caption_keep_mask(4, 1.5, gen())


def step_tensors(x0: torch.Tensor, x0_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> StepTensors:
    return StepTensors(x0=x0, pixels=x0, x_t=x_t, t=t, noise=torch.zeros_like(x0), x0_hat=x0_hat,
                       grid=(1, 1), step=0)


def test_contrastive_by_hand():
    x0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    x0_hat = torch.tensor([[1.0, 1.0], [0.0, 0.0]], requires_grad=True)
    t = torch.tensor([0.5, 0.01])  # divisors 0.5 and 0.05 (clamped)
    # with x_t = 0: v̂ = -x̂0 / max(t, .05) = [[-2, -2], [0, 0]]; v = -x0 / max(t, .05) = [[-2, 0], [0, -40]]
    # rolled by one: [[0, -40], [-2, 0]]; differences [[-2, 38], [2, 0]]: mean square (4+1444+4+0)/4 = 363
    ing = ContrastiveFlow(ContrastiveConfig(weight=0.05), denoiser())
    assert ing.name == "contrastive"
    loss = ing.losses(step_tensors(x0, x0_hat, torch.zeros_like(x0), t))["contrastive"]
    assert loss.item() == pytest.approx(-0.05 * 363)
    loss.backward()
    assert x0_hat.grad is not None and x0_hat.grad.abs().sum() > 0


def test_contrastive_single_sample_is_zero():
    x0 = torch.ones(1, 3, 2, 2)
    loss = ContrastiveFlow(ContrastiveConfig(), denoiser()).losses(step_tensors(x0, x0 * 0, x0, torch.tensor([0.3])))["contrastive"]
    assert loss.shape == () and loss.item() == 0.0


def test_contrastive_uses_the_runs_clamp():
    """Built from a config, contrastive FM takes the run's denoiser: objective.t_clamp=0.5 changes its
    velocities exactly as it changes the flow loss's."""
    from daybreak.build import build_parts, build_recipe
    from daybreak.config import load_config

    cfg = load_config("tiny", ["contrastive.enabled=true", "objective.t_clamp=0.5"])
    parts = build_parts(cfg)
    ing = build_recipe(cfg, parts)["contrastive"]
    assert ing.denoiser is parts.denoiser and ing.denoiser.t_clamp == 0.5
    x0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    x0_hat = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    t = torch.tensor([0.5, 0.01])  # t_clamp=0.5 makes both divisors 0.5
    # v̂ = -x̂0 / 0.5 = [[-2, -2], [0, 0]]; v = -x0 / 0.5 = [[-2, 0], [0, -4]], rolled: [[0, -4], [-2, 0]]
    # differences [[-2, 2], [2, 0]]: mean square 12/4 = 3
    loss = ing.losses(step_tensors(x0, x0_hat, torch.zeros_like(x0), t))["contrastive"]
    assert loss.item() == pytest.approx(-0.05 * 3)
