import pytest
import torch
from helpers import denoiser

from daybreak.errors import UserError
from daybreak.diffusion.sampling import Guidance, sample, sigma_schedule


class Constant:
    """Returns a fixed x̂0 per branch, whatever the input; records the calls."""

    def __init__(self, **preds: float) -> None:
        self.preds = preds
        self.calls: list[tuple[tuple[str, ...], list[float]]] = []

    def predict(self, x_t, t, branches):
        self.calls.append((branches, t.tolist()))
        return {b: torch.full_like(x_t, self.preds[b]) for b in branches}


class GaussianDenoiser:
    """Exact E[x0 | x_t] for x0 ~ N(mu, s²), x_t = (1 - t)·x0 + t·ε."""

    def __init__(self, mu: float, s: float) -> None:
        self.mu, self.s = mu, s

    def predict(self, x_t, t, branches):
        a = 1 - t[:, None]
        gain = a * self.s**2 / (a**2 * self.s**2 + t[:, None] ** 2)
        return {"cond": self.mu + gain * (x_t - a * self.mu)}


def test_sigma_schedule():
    # linspace(1, 0, 5) = [1, .75, .5, .25, 0]; 3t / (1 + 2t) = [1, 2.25/2.5, 1.5/2, .75/1.5, 0]
    assert torch.allclose(sigma_schedule(4, 3.0), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    assert torch.allclose(sigma_schedule(4, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(UserError):
        sigma_schedule(0)


def test_guidance_arithmetic():
    p = {"cond": torch.full((2,), 2.0), "uncond": torch.full((2,), 1.0), "routed": torch.full((2,), 0.5)}
    assert Guidance("none").combine(p).tolist() == [2.0, 2.0]
    assert Guidance("cfg", 3.5).combine(p).tolist() == [4.5, 4.5]  # 1 + 3.5·(2 - 1)
    assert Guidance("self", 3.5).combine(p).tolist() == [5.75, 5.75]  # 0.5 + 3.5·(2 - 0.5)
    # 2 + 2.5·(2 - 1) + 1·(2 - 0.5)
    assert Guidance("cfg+self", 3.5, self_scale=2.0).combine(p).tolist() == [6.0, 6.0]
    # each rule is cfg+self with the other weight at 1
    assert Guidance("cfg+self", 3.5, self_scale=1.0).combine(p).tolist() == [4.5, 4.5]
    assert Guidance("cfg+self", 1.0, self_scale=3.5).combine(p).tolist() == [5.75, 5.75]
    assert Guidance("cfg+self", 2.0).combine(p).tolist() == [4.5, 4.5]  # self_scale defaults to scale: 2+1+1.5
    assert Guidance("self").branches() == ("cond", "routed")
    assert Guidance("cfg+self").branches() == ("cond", "uncond", "routed")
    with pytest.raises(UserError):
        Guidance("classifier")


def test_euler_oracle_ends_at_x0_and_asks_for_the_branches():
    pred = Constant(cond=2.0, uncond=1.0)
    x = sample(pred, torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)), steps=4,
               guidance=Guidance("cfg", 3.5), denoiser=denoiser())
    # last step: x + (0 - σ)·(x - x̂)/σ = x̂ exactly, as σ_3 = 0.5 >= the clamp
    assert torch.allclose(x, torch.full_like(x, 4.5), atol=1e-6)
    assert [c[0] for c in pred.calls] == [("cond", "uncond")] * 4
    assert [c[1][0] for c in pred.calls] == pytest.approx([1.0, 0.9, 0.75, 0.5])
    assert all(len(c[1]) == 3 for c in pred.calls)


def test_clamp_at_the_last_step():
    # one step from σ = 1 with clamp 2: x + (0 - 1)·(x - x̂)/2 = (x + x̂) / 2
    x = sample(Constant(cond=1.0), torch.full((1, 3), 3.0), steps=1, guidance=Guidance("none"),
               denoiser=denoiser(t_clamp=2.0))
    assert torch.allclose(x, torch.full((1, 3), 2.0))


def test_heun_call_count_and_oracle():
    pred = Constant(cond=-1.0, routed=0.0)
    x = sample(pred, torch.randn(2, 5), steps=3, guidance=Guidance("self", 2.0), denoiser=denoiser(), sampler="heun")
    assert torch.allclose(x, torch.full_like(x, -2.0), atol=1e-6)  # 0 + 2·(-1 - 0)
    assert len(pred.calls) == 2 * 3 - 1  # the last step, to σ = 0, is Euler
    with pytest.raises(UserError):
        sample(pred, torch.randn(2, 5), guidance=Guidance("none"), denoiser=denoiser(), sampler="dpm")


def end_mean_std(sampler: str, steps: int, mu: float = 1.5, s: float = 2.0) -> tuple[float, float]:
    # the Gaussian flow is linear, so a sampler is an affine map: standardised noise gives its moments exactly.
    # t_clamp = 0 integrates the true ODE (the training clamp would bias the last few of 1000 steps)
    noise = torch.randn(1000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = (noise - noise.mean()) / noise.std()
    x = sample(GaussianDenoiser(mu, s), noise, steps=steps, guidance=Guidance("none"), denoiser=denoiser(t_clamp=0.0),
               sampler=sampler)
    return x.mean().item(), x.std().item()


def test_gaussian_data_moments():
    mean, std = end_mean_std("euler", 1000)
    assert mean == pytest.approx(1.5, abs=1e-4) and std == pytest.approx(2.0, abs=5e-3)
    mean, std = end_mean_std("heun", 200)
    assert mean == pytest.approx(1.5, abs=1e-4) and std == pytest.approx(2.0, abs=1e-3)


def test_heun_beats_euler_at_few_steps():
    euler_err = abs(end_mean_std("euler", 8)[1] - 2.0)  # ~0.31
    heun_err = abs(end_mean_std("heun", 8)[1] - 2.0)  # ~0.07
    assert heun_err < 0.5 * euler_err


def test_v_model_lands_on_its_prediction_x_model_keeps_the_clamp():
    # shift 1, 50 steps: the last Euler step goes from σ = 0.02 to 0. Unclamped (a v-model, PRX) it lands on
    # x̂ exactly; with the x-prediction clamp 0.05 it moves only 0.02 / 0.05 = 40 % of the way.
    v_model, x_model = denoiser(prediction="v", t_clamp=0.05), denoiser(prediction="x", t_clamp=0.05)
    assert (v_model.sampling_clamp, x_model.sampling_clamp) == (0.0, 0.05)
    noise = torch.full((1, 4), 3.0)
    v = sample(Constant(cond=1.0), noise, steps=50, shift=1.0, guidance=Guidance("none"), denoiser=v_model)
    assert torch.allclose(v, torch.full((1, 4), 1.0), atol=1e-5)
    x = sample(Constant(cond=1.0), noise, steps=50, shift=1.0, guidance=Guidance("none"), denoiser=x_model)
    # x - x̂ is multiplied by 1 - Δ/max(σ, 0.05) per step: by σ_next/σ (telescoping) while σ >= 0.05, i.e.
    # 2 · 0.04 / 1 = 0.08 at σ = 0.04, then by 1 - 0.02/0.05 = 0.6 twice (σ = 0.04 and 0.02): 0.0288
    assert torch.allclose(x, torch.full((1, 4), 1.0288), atol=1e-4)


def test_cfg_at_most_one_is_the_conditional_branch_alone():
    p = {"cond": torch.full((2,), 2.0)}
    for w in (1.0, 0.5):
        g = Guidance("cfg", w)
        assert g.branches() == ("cond",) and g.combine(p).tolist() == [2.0, 2.0]
    pred = Constant(cond=2.0, uncond=1.0)
    sample(pred, torch.randn(1, 3), steps=2, guidance=Guidance("cfg", 1.0), denoiser=denoiser())
    assert [c[0] for c in pred.calls] == [("cond",)] * 2  # no unconditional pass
    assert Guidance("cfg", 1.5).branches() == ("cond", "uncond")
