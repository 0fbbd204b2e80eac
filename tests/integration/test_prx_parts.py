"""The parts PRX's last configs need, each in a tiny training run with tiny random models of their classes:
a training step, the checkpoint read back (load_model, sampling, init_from, export), and sampling.

resolution-aware conditioning (token mode with EMA on pixels; vec mode on DC-AE latents, exported to diffusers
and imported back), the FLUX.2 VAE (cached latents) with the Qwen3-VL text tower."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import daybreak  # noqa: F401  (torchvision fix before transformers / diffusers)
from daybreak import generate, load_model
from daybreak.build import model_kwargs
from daybreak.config import load_config
from daybreak.errors import UserError
from daybreak.export import export, import_diffusers
from daybreak.model import build_transformer
from daybreak.pipeline import FusedTransformer
from daybreak.recipe.resolution_aware import ResolutionAware
from daybreak.run import build_trainer, train
from helpers import SMALL, save_tokenizer, tiny_dc_ae, tiny_flux2_vae, tiny_qwen3vl

RUN = [*SMALL, "train.steps=3", "train.checkpoint_every=3", "optim.lr=1e-2", "data.length=64"]
LATENT = ["model.in_channels=4", "model.patch_size=2", "model.bottleneck_size=null", "space.kind=latents"]


def inputs(model, size=16):
    g = torch.Generator().manual_seed(3)
    c = model.config
    return (torch.randn(2, c["in_channels"], size, size, generator=g), torch.tensor([0.3, 0.8]),
            torch.randn(2, 4, c["context_in_dim"], generator=g), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).bool())


def from_files(final, mode: str, suffix: str):
    """The transformer and the resolution embedder rebuilt from a checkpoint's files by hand."""
    cfg = load_config(final / "config.yaml")
    sd = load_file(str(final / f"transformer{suffix}.safetensors"))
    model = build_transformer(**model_kwargs(cfg, context_dim=sd["txt_in.weight"].shape[1]))
    model.load_state_dict(sd)
    ing = ResolutionAware(dataclasses.replace(cfg.resolution_aware, mode=mode), model.hidden_size)
    recipe = load_file(str(final / f"recipe{suffix}.safetensors"))
    ing.load_state_dict({k.removeprefix("resolution_aware."): v for k, v in recipe.items()})
    return model.eval(), ing


def test_token_mode_trains_with_ema_checkpoints_samples_and_initialises(tmp_path):
    cfg = load_config("tiny", [f"run.dir={tmp_path / 'run'}", *RUN, "resolution_aware.enabled=true",
                               "ema.decay=0.5", "ema.every=1"])
    final = train(cfg, progress=False)
    raw, avg = (load_file(str(final / f"recipe{s}.safetensors")) for s in ("", "_ema"))
    assert sorted(raw) == sorted(avg) and all(k.startswith("resolution_aware.resolution_embedder.") for k in raw)
    assert any(not torch.equal(raw[k], avg[k]) for k in raw)  # trained, and tracked by the EMA

    # load_model runs the EMA embedder's tokens: the same output as the parts rebuilt from the files by hand
    model = load_model(final)
    assert isinstance(model, FusedTransformer)
    ref_model, ing = from_files(final, "token", "_ema")
    x = inputs(ref_model)
    with torch.no_grad():
        got = model(*x)
        torch.testing.assert_close(got, ref_model(*x, hooks=ing.dense_hooks()))
        assert (got - ref_model(*x)).abs().max() > 1e-4
    images = generate(final, ["a red circle on the left"], steps=2)
    assert images[0].size == (16, 16)

    # init_from carries the embedder (weights and EMA) into a new run
    trainer = build_trainer(load_config("tiny", [f"run.dir={tmp_path / 'next'}", *RUN, "resolution_aware.enabled=true",
                                                 f"init_from={final}"]), progress=False)
    trainer.state.init_from(str(final))
    got = {f"resolution_aware.{k}": v for k, v in trainer.ingredients["resolution_aware"].state_dict().items()}
    assert all(torch.equal(got[k], raw[k]) for k in raw)
    shadow = {k.removeprefix("recipe."): v for k, v in trainer.ema.shadow.items() if k.startswith("recipe.")}
    assert sorted(shadow) == sorted(avg) and all(torch.equal(shadow[k], avg[k]) for k in avg)

    with pytest.raises(UserError, match="resolution-aware model: diffusers' PRXTransformer2DModel has no place for its "
                                        "resolution tokens"):
        export(final, tmp_path / "out")


def test_vec_mode_on_dc_ae_latents_exports_to_diffusers_and_back(tmp_path, capsys):
    from diffusers import PRXTransformer2DModel

    tiny_dc_ae().save_pretrained(tmp_path / "dcae")
    cfg = load_config("tiny", [f"run.dir={tmp_path / 'run'}", *RUN, *LATENT, f"space.vae_path={tmp_path / 'dcae'}",
                               "objective.prediction=v", "resolution_aware.enabled=true", "resolution_aware.mode=vec"])
    final = train(cfg, progress=False)
    assert generate(final, ["a blue square"], steps=2)[0].size == (16, 16)

    out = export(final, tmp_path / "out")
    assert json.loads((out / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderDC"]
    theirs = PRXTransformer2DModel.from_pretrained(out, subfolder="transformer").eval()
    assert theirs.config.resolution_embeds
    ours = load_model(final)
    x = inputs(ours.transformer, size=8)
    with torch.no_grad():
        want = theirs(x[0], x[1], x[2], attention_mask=x[3], return_dict=False)[0]
        torch.testing.assert_close(ours(*x), want, atol=1e-4, rtol=1e-4)
        imported = load_model(import_diffusers(out, tmp_path / "imported"))
        torch.testing.assert_close(imported(*x), want, atol=1e-4, rtol=1e-4)
    assert load_config(tmp_path / "imported" / "config.yaml").resolution_aware.mode == "vec"

    # the diffusers folder as init_from: its resolution_embedder.* become the ingredient's weights and EMA
    again = [f"run.dir={tmp_path / 'next'}", *RUN, *LATENT, f"space.vae_path={tmp_path / 'dcae'}",
             "objective.prediction=v", f"init_from={out}"]
    trainer = build_trainer(load_config("tiny", [*again, "resolution_aware.enabled=true", "resolution_aware.mode=vec"]),
                            progress=False)
    trainer.state.init_from(str(out))
    mine = trainer.ingredients["resolution_aware"].resolution_embedder.mlp.out_layer.weight
    assert torch.equal(mine, theirs.resolution_embedder.mlp.out_layer.weight)
    assert torch.equal(trainer.ema.shadow["recipe.resolution_aware.resolution_embedder.mlp.out_layer.weight"], mine)
    plain = build_trainer(load_config("tiny", [*again, f"run.dir={tmp_path / 'plain'}"]), progress=False)
    with pytest.raises(UserError, match="resolution embeddings .* set resolution_aware.enabled=true"):
        plain.state.init_from(str(out))


def test_flux2_vae_and_qwen3vl_tower_train_cache_and_sample(tmp_path):
    tiny_flux2_vae().save_pretrained(tmp_path / "flux2")
    tiny_qwen3vl().save_pretrained(tmp_path / "qwen")
    save_tokenizer(tmp_path / "qwen", None)
    cfg = load_config("tiny", [f"run.dir={tmp_path / 'run'}", *RUN, *LATENT, f"space.vae_path={tmp_path / 'flux2'}",
                               "space.scale=0.18215", "space.shift=0.0", f"space.cache_dir={tmp_path / 'latents'}",
                               "text.kind=qwen3vl", f"text.path={tmp_path / 'qwen'}", "text.max_tokens=8"])
    final = train(cfg, progress=False)
    assert len(list((tmp_path / "latents").rglob("*.safetensors"))) == 12  # 3 steps × 4 samples, each cached once
    model = load_model(final)
    assert model.config["context_in_dim"] == 16 and model.config["in_channels"] == 4
    assert generate(final, ["a red circle"], steps=2)[0].size == (16, 16)
