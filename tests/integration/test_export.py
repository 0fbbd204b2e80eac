"""diffusers export/import: the exported folder loads in diffusers and reproduces daybreak (tiny random models)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import daybreak  # noqa: F401  (torchvision fix before transformers / diffusers)
import diffusers
import transformers
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, PRXTransformer2DModel
from daybreak.config import load_config
from daybreak.errors import UserError
from daybreak.model import PRESETS
from daybreak.export import export, import_diffusers, is_diffusers_dir, load_diffusers_transformer
from daybreak.build import build_parts
from daybreak.pipeline import generate, load_model, load_pipeline
from daybreak.diffusion.sampling import Guidance, sample, sigma_schedule
from daybreak.io.checkpoint import write_checkpoint

WORDS = ["<pad>", "</s>", "<bos>", "<unk>", *"a red blue circle square on the left right top".split()]
PROMPTS = ["a red circle on the left", "a blue square on the top"]
STEPS, CFG = 6, 3.5


@pytest.fixture(scope="module")
def t5gemma(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5gemma")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<bos>", unk_token="<unk>"
    ).save_pretrained(folder)
    torch.manual_seed(0)
    module = dict(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    transformers.T5GemmaForConditionalGeneration(
        transformers.T5GemmaConfig(encoder=module, decoder=module, vocab_size=len(WORDS))
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  block_out_channels=(8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4,
                  sample_size=32, scaling_factor=0.5, shift_factor=0.1).save_pretrained(folder)
    return folder


def make_ckpt(path: Path, overrides: list[str]) -> Path:
    """A checkpoint of random weights (a fresh model predicts zero) with EMA ≠ raw, in the trainer's layout."""
    cfg = load_config("tiny", overrides)
    torch.manual_seed(1)
    parts = build_parts(cfg)
    raw = {k: v + 0.1 * torch.randn_like(v) for k, v in parts.transformer.state_dict().items()}
    ema = {k: v + 0.05 * torch.randn_like(v) for k, v in raw.items()}
    files = {"config.yaml": cfg.to_yaml(), "transformer.safetensors": raw, "transformer_ema.safetensors": ema}
    if cfg.text.kind == "demo":  # trained with the model, so saved with it, with its tokenizer
        files["text_encoder.safetensors"] = files["text_encoder_ema.safetensors"] = parts.text_encoder.state_dict()
        files.update(parts.text_encoder.checkpoint_files())
    return write_checkpoint(path, files, {"step": 1})


def model_inputs(in_channels: int, size: int = 32, text_dim: int = 16):
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    return (torch.randn(2, in_channels, size, size, generator=g), torch.tensor([0.3, 0.9]),
            torch.randn(2, 8, text_dim, generator=g), mask)


def daybreak_sample(ckpt: Path, noise: torch.Tensor) -> torch.Tensor:
    """daybreak's sampler on the checkpoint's parts: CFG on x̂0 (a v-model's x̂0 = x_t - t·v)."""
    pipe = load_pipeline(ckpt, device=torch.device("cpu"))
    denoiser = pipe.parts.denoiser
    text = {"cond": pipe.text_encoder.encode(PROMPTS), "uncond": pipe.text_encoder.encode([""] * len(PROMPTS))}

    def predict(x, t, branches):
        return {b: denoiser.x0_from_output(pipe.transformer(x, t, *text[b]), x, t) for b in branches}

    with torch.no_grad():
        return sample(SimpleNamespace(predict=predict), noise, steps=STEPS, shift=3.0, guidance=Guidance("cfg", CFG),
                      denoiser=denoiser)


def exact_schedule(pipe) -> dict:
    """diffusers call arguments that give daybreak's sigmas shift₃(linspace(1, 0, N + 1)) exactly."""
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    return {"timesteps": (1000 * sigma_schedule(STEPS, 3.0)[:-1]).tolist()}


def seeds() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(10 + i) for i in range(len(PROMPTS))]


def run_pipe(pipe, **call):
    """One prompt per call: the PRX pipelines give the timestep a batch of 2, so CFG breaks for more prompts."""
    images = [pipe(prompt, generator=g, guidance_scale=CFG, use_resolution_binning=False, **call).images
              for prompt, g in zip(PROMPTS, seeds())]
    return torch.cat(images) if isinstance(images[0], torch.Tensor) else [im for batch in images for im in batch]


def test_transformer_matches_and_demo_text_exports_a_pipeline(tmp_path, capsys):
    ckpt = make_ckpt(tmp_path / "ck", ["text.dim=16"])  # SPRINT export: tests/integration/test_ema_sprint.py
    out = export(ckpt, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [  # the demo tower is a transformers model
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "transformer"]
    assert sorted(p.name for p in (out / "transformer").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]

    theirs = PRXTransformer2DModel.from_pretrained(out, subfolder="transformer").eval()
    ours = load_model(ckpt)
    x, t, text, mask = model_inputs(3)
    with torch.no_grad():
        ref, got = ours(x, t, text, mask), theirs(x, t, text, mask).sample
    assert ref.abs().mean() > 0.1  # a model that predicts something
    assert (ref - got).abs().max() <= 1e-4
    assert theirs.config.bottleneck_size == 32 and theirs.config.context_in_dim == 16

    raw = export(ckpt, tmp_path / "raw", ema=False)
    weights = load_file(str(raw / "transformer" / "diffusion_pytorch_model.safetensors"))
    expected = load_model(ckpt, ema=False).state_dict()
    assert all(torch.equal(weights[k], v) for k, v in expected.items())
    with pytest.raises(UserError, match="not empty"):
        export(ckpt, tmp_path / "raw")

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    assert scheduler.config.shift == 3.0


@pytest.fixture(scope="module")
def pixel_export(tmp_path_factory, t5gemma):
    root = tmp_path_factory.mktemp("pixel")
    ckpt = make_ckpt(root / "ck", ["text.kind=t5gemma", f"text.path={t5gemma}", "text.max_tokens=8"])
    return ckpt, export(ckpt, root / "out")


def test_pixel_pipeline_reproduces_daybreak_sampling(pixel_export):
    ckpt, out = pixel_export
    pipe = diffusers.DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "PRXPixelPipeline"
    assert (pipe.config.noise_scale, pipe.config.default_sample_size, pipe.config.prompt_max_tokens) == (1.0, 32, 8)

    noise = torch.stack([torch.randn(3, 32, 32, generator=g) for g in seeds()])
    ref = daybreak_sample(ckpt, noise)
    got = run_pipe(pipe, output_type="pt", **exact_schedule(pipe))
    assert ref.abs().mean() > 0.1
    assert (ref - got).abs().max() <= 1e-4

    # diffusers' own sigmas, shift₃(linspace(1, shift₃(1e-3), N)), end lower than daybreak's by design
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    pipe.scheduler.set_timesteps(STEPS)
    s = torch.linspace(1.0, 3e-3 / (1 + 2e-3), STEPS)
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1], 3 * s / (1 + 2 * s))
    assert pipe.scheduler.sigmas[-2] < 0.02 < sigma_schedule(STEPS, 3.0)[-2]
    default = run_pipe(pipe, output_type="pt", num_inference_steps=STEPS)
    assert (ref - default).abs().max() > 1e-2


def test_pixel_pipeline_pil_images_match_daybreak_generate(pixel_export):
    ckpt, out = pixel_export
    pipe = diffusers.DiffusionPipeline.from_pretrained(out)
    ours = generate(ckpt, PROMPTS, seed=10, steps=STEPS, cfg=CFG)
    theirs = run_pipe(pipe, **exact_schedule(pipe))
    for a, b in zip(ours, theirs):
        diff = torch.tensor(list(a.getdata())) - torch.tensor(list(b.getdata()))
        assert diff.abs().max() <= 1


def test_export_import_round_trip(pixel_export, tmp_path, capsys):
    ckpt, out = pixel_export
    imported = import_diffusers(out, tmp_path / "imported")
    cfg = load_config(imported / "config.yaml")
    assert (cfg.text.kind, cfg.text.max_tokens) == ("t5gemma", 8)
    assert (cfg.objective.prediction, cfg.space.kind) == ("x", "pixels")
    assert Path(cfg.text.path) == imported / "text_encoder"
    again = export(imported, tmp_path / "again")
    first = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    second = load_file(str(again / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((out / "transformer" / "config.json").read_text()) == json.loads(
        (again / "transformer" / "config.json").read_text())
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    assert torch.equal(daybreak_sample(ckpt, noise), daybreak_sample(imported, noise))
    with pytest.raises(UserError, match="exists"):
        import_diffusers(out, imported)
    assert not is_diffusers_dir(imported) and is_diffusers_dir(out)


def test_latent_pipeline_reproduces_daybreak_sampling(tmp_path, t5gemma, vae_dir):
    ckpt = make_ckpt(tmp_path / "ck", [
        "model.preset=demo", "model.in_channels=4", "model.patch_size=2", "model.hidden_size=64", "model.num_heads=4",
        "model.depth=2", "model.axes_dim=[8,8]", "space.kind=latents", f"space.vae_path={vae_dir}",
        "objective.prediction=v", "text.kind=t5gemma", f"text.path={t5gemma}", "text.max_tokens=8"])
    out = export(ckpt, tmp_path / "out")
    pipe = diffusers.DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "PRXPipeline" and pipe.transformer.config.bottleneck_size is None
    noise = torch.stack([torch.randn(4, 16, 16, generator=g) for g in seeds()])
    ref = daybreak_sample(ckpt, noise)
    got = run_pipe(pipe, height=32, width=32, output_type="latent", **exact_schedule(pipe))
    assert ref.abs().mean() > 0.1
    assert (ref - got).abs().max() <= 1e-4

    imported = import_diffusers(out, tmp_path / "imported")
    cfg = load_config(imported / "config.yaml")
    assert (cfg.space.kind, cfg.objective.prediction) == ("latents", "v") and (imported / "vae").is_dir()
    assert torch.equal(daybreak_sample(imported, noise), ref)


def test_latent_x_prediction_gets_no_pipeline(tmp_path, t5gemma, vae_dir, capsys):
    ckpt = make_ckpt(tmp_path / "ck", ["model.in_channels=4", "model.patch_size=2", "space.kind=latents",
                                       f"space.vae_path={vae_dir}", "text.kind=t5gemma", f"text.path={t5gemma}"])
    out = export(ckpt, tmp_path / "out")
    assert "PRXPipeline expects a velocity" in capsys.readouterr().out
    assert not (out / "model_index.json").exists()


def diffusers_transformer(folder: Path, **overrides) -> Path:
    torch.manual_seed(2)
    kwargs = dict(in_channels=3, patch_size=4, context_in_dim=16, hidden_size=32, num_heads=2, depth=2,
                  axes_dim=[8, 8], bottleneck_size=None)
    model = PRXTransformer2DModel(**{**kwargs, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # diffusers zero-inits nothing; keep outputs far from trivial
    model.save_pretrained(folder)
    return folder


def test_import_of_a_diffusers_transformer_matches_its_forward(tmp_path):
    folder = diffusers_transformer(tmp_path / "dit")
    assert is_diffusers_dir(folder)
    kwargs, state = load_diffusers_transformer(folder)
    assert kwargs["hidden_size"] == 32 and kwargs["bottleneck_size"] is None and "_class_name" not in kwargs
    ckpt = import_diffusers(folder, tmp_path / "ck")
    cfg = load_config(ckpt / "config.yaml")
    assert (cfg.text.kind, cfg.text.dim, cfg.model.bottleneck_size) == ("demo", 16, None)
    assert PRESETS[cfg.model.preset]["bottleneck_size"] is None  # `null` reads as the preset's value
    x, t, text, mask = model_inputs(3)
    theirs = PRXTransformer2DModel.from_pretrained(folder).eval()
    with torch.no_grad():
        ref, got = theirs(x, t, text, mask).sample, load_model(ckpt)(x, t, text, mask)
    assert ref.abs().mean() > 0.1
    assert (ref - got).abs().max() <= 1e-5
    assert all(torch.equal(load_model(ckpt, ema=False).state_dict()[k], v) for k, v in state.items())


def test_incompatible_folders_are_user_errors(tmp_path):
    folder = diffusers_transformer(tmp_path / "dit")
    config = json.loads((folder / "config.json").read_text())

    def variant(name: str, **changes) -> Path:
        target = tmp_path / name
        target.mkdir()
        (target / "config.json").write_text(json.dumps({**config, **changes}))
        (target / "diffusion_pytorch_model.safetensors").symlink_to(folder / "diffusion_pytorch_model.safetensors")
        return target

    with pytest.raises(UserError, match="not a PRXTransformer2DModel"):
        load_diffusers_transformer(variant("unet", _class_name="UNet2DConditionModel"))
    with pytest.raises(UserError, match="unsupported .*config keys qk_norm"):
        load_diffusers_transformer(variant("extra", qk_norm=True))
    with pytest.raises(UserError, match="weights do not match.*wrong shape"):
        load_diffusers_transformer(variant("shape", context_in_dim=24))
    # PRX-7B's resolution embeddings are daybreak's resolution-aware ingredient in mode vec
    res = import_diffusers(diffusers_transformer(tmp_path / "res", resolution_embeds=True), tmp_path / "a")
    assert load_config(res / "config.yaml").resolution_aware.mode == "vec"
    with pytest.raises(UserError, match="needs its pipeline folder with vae"):
        import_diffusers(diffusers_transformer(tmp_path / "lat", in_channels=4, patch_size=2), tmp_path / "b")
    with pytest.raises(UserError, match="not a diffusers folder"):
        import_diffusers(tmp_path / "nowhere", tmp_path / "c")
    assert not (tmp_path / "b").exists()
