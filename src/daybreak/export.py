"""diffusers export and import: a daybreak checkpoint ⇄ a diffusers PRX folder.

daybreak's transformer has diffusers' `PRXTransformer2DModel` constructor arguments and parameter
names, so the transformer moves across as a config dump plus an unchanged state dict. Around it,
export writes what a diffusers pipeline needs to reproduce daybreak's sampler:

* pixels + x-prediction → `PRXPixelPipeline`, which applies CFG on x̂0 and turns it into a velocity
  with the same `max(t, 0.05)` clamp as daybreak. It was built for a larger PRX (noise scale 2.0,
  1024 px aspect bins), so `noise_scale` is set to 1.0 in `model_index.json`; resolution binning is
  a call argument, so the printed usage passes `use_resolution_binning=False` where the model's
  resolution has no bins.
* latents + v-prediction → `PRXPipeline`, which treats the output as the velocity `noise - x0`.
* anything else (an x-predicting latent model; a v-predicting pixel model; a text tower read from an
  inner hidden state) gets the transformer and the scheduler only, and a message saying why no
  pipeline can be assembled.

The download-free demo tower is a transformers `DistilBertModel` with a `tokenizers` tokenizer, so a
demo model exports as a complete pipeline: its trained encoder (EMA weights with the transformer's)
and the tokenizer its run learned.

The scheduler is `FlowMatchEulerDiscreteScheduler` with daybreak's shift. Its default sigmas are
`shift(linspace(1, shift(1e-3), N))`, not daybreak's `shift(linspace(1, 0, N + 1))`: same start,
finer last steps; the exact daybreak schedule is a scheduler with `shift=1.0` and
`timesteps=1000 * sigma_schedule(N)[:-1]` passed to the pipeline call.

Resolution-aware conditioning in mode `vec` is diffusers' `resolution_embeds=True` (the same
`resolution_embedder.mlp.*` weights, its period `time_max_period`), so it is exported into the
transformer and imported back; mode `token` (two extra text tokens) has no diffusers form and is refused.

Training-only parts (REPA projector, token routing, SPRINT fusion) are not exported. Text towers are
saved under their transformers base class (T5-Gemma as `T5GemmaEncoderModel`: the bare
`T5GemmaEncoder` that PRXPipeline's signature names is not importable from `transformers`, so
diffusers logs a type warning and loads it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from daybreak.config import Config, load_config
from daybreak.errors import UserError
from daybreak.model import PRESETS, PRXTransformer
from daybreak.recipe import INGREDIENTS, enabled
from daybreak.model.diffusers_folder import TRANSFORMER_CLASS, is_diffusers_dir, load_diffusers_transformer
from daybreak.build import build_text, model_kwargs
from daybreak.io.checkpoint import check_checkpoint, has_tensors, load_tensors, write_checkpoint, write_manifest
from daybreak.io.store import check_output, file_mode

# transformers classes of text towers → daybreak's text.kind
TEXT_KINDS = {"T5GemmaEncoderModel": "t5gemma", "T5EncoderModel": "t5", "CLIPTextModel": "clip",
              "Qwen3VLTextModel": "qwen3vl"}


# ---------------------------------------------------------------------------------------------
# export


def _fresh_dir(out: Path) -> Path:
    out = check_output(out, directory=True, force=True)  # a file in the way, a parent that is a file, no permission
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output folder '{out}' exists and is not empty; choose a new folder or remove it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _save_transformer(config: dict, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Through diffusers' own class, so names and shapes are checked strictly and the files are its own."""
    from diffusers import PRXTransformer2DModel

    with torch.device("meta"):
        model = PRXTransformer2DModel(**config)
    model.load_state_dict(state, strict=True, assign=True)
    model.save_pretrained(folder, safe_serialization=True)


def _recipe_weights(ckpt: Path, ema: bool, name: str) -> dict[str, torch.Tensor]:
    """Ingredient `name`'s trained weights in the checkpoint (EMA ones when `ema` and kept), without its prefix."""
    file = "recipe_ema.safetensors" if ema and has_tensors(ckpt, "recipe_ema.safetensors") else "recipe.safetensors"
    if not has_tensors(ckpt, file):
        return {}
    prefix = f"{name}."
    return {k[len(prefix):]: v for k, v in load_tensors(ckpt, file).items() if k.startswith(prefix)}


def _pipeline_blocker(cfg: Config) -> str | None:
    """Why no diffusers pipeline reproduces this model's sampler, or None when one does."""
    if cfg.text.hidden_state != -1:
        return f"its text embeddings come from hidden state {cfg.text.hidden_state}; PRX pipelines use the last one"
    pixels, x_pred = cfg.space.kind == "pixels", cfg.objective.prediction == "x"
    if pixels and not x_pred:
        return "PRXPixelPipeline expects x-prediction and this pixel model predicts the velocity"
    if not pixels and x_pred:
        return "PRXPipeline expects a velocity and this latent model predicts x0"
    return None


def _sample_size(cfg: Config) -> int:
    return cfg.data.image_size


def _save_text(cfg: Config, out: Path, ckpt: Path, ema: bool) -> tuple[list[str], list[str]]:
    """Text encoder and tokenizer folders; returns their model_index entries. The demo tower is the
    checkpoint's own (its tokenizer/ and trained encoder weights, EMA when `ema`)."""
    import transformers

    from daybreak.text import build_text_encoder

    if cfg.text.kind == "demo":
        enc = build_text(cfg, ckpt / "tokenizer")
        enc.load_state_dict(load_tensors(ckpt, f"text_encoder{'_ema' if ema else ''}.safetensors"))
    else:
        enc = build_text_encoder(cfg.text)
    model = enc.model
    model.save_pretrained(out / "text_encoder", safe_serialization=True)
    enc.tokenizer.model_max_length = enc.max_tokens  # PRXPipeline pads to this
    enc.tokenizer.save_pretrained(out / "tokenizer")
    classes = []
    for obj in (model, enc.tokenizer):
        cls = type(obj)
        while not hasattr(transformers, cls.__name__):  # a local subclass: name its library base
            cls = cls.__base__
        classes.append(["transformers", cls.__name__])
    return classes[0], classes[1]


def export(ckpt: str | Path, out: str | Path, ema: bool = True, drop_sprint_fusion: bool = False) -> Path:
    """Write checkpoint `ckpt` as a diffusers folder `out` (EMA weights unless `ema=False` or the run kept no
    EMA); returns `out`. A SPRINT model is refused unless `drop_sprint_fusion`: diffusers' PRX transformer has
    no place for its fusion layer, so the exported model is a different network from the one daybreak samples."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    ckpt = check_checkpoint(ckpt)
    cfg = load_config(ckpt / "config.yaml")
    ema = ema and cfg.ema.enabled
    state = load_tensors(ckpt, "transformer_ema.safetensors" if ema else "transformer.safetensors")
    with torch.device("meta"):  # only the resolved kwargs are needed, not the weights
        config = PRXTransformer(**model_kwargs(cfg, context_dim=state["txt_in.weight"].shape[1])).config
    notes = []
    for name in enabled(cfg):  # each trained ingredient goes into diffusers' transformer, is dropped, or refuses
        cls, c = INGREDIENTS[name], getattr(cfg, name)
        refusal = cls.export_refusal(c, config)
        if refusal is None:
            entries, weights = cls.to_diffusers(c, _recipe_weights(ckpt, ema, name))
            config, state = {**config, **entries}, {**state, **weights}
        elif drop_sprint_fusion and cls.export_drop_warning:
            notes.append(cls.export_drop_warning)
        else:
            raise UserError(f"{ckpt} is {refusal}")
    out = _fresh_dir(Path(out))
    _save_transformer(config, state, out / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=cfg.sample.shift).save_pretrained(out / "scheduler")
    written = ["transformer", "scheduler"]
    if "self" in cfg.sample.guidance:
        notes.append(f"note: daybreak samples this model with '{cfg.sample.guidance}' guidance; "
                     "diffusers pipelines do classifier-free guidance only")

    blocker = _pipeline_blocker(cfg)
    if blocker is None:
        text_encoder, tokenizer = _save_text(cfg, out, ckpt, ema)
        written += ["text_encoder", "tokenizer"]
        index = {"_diffusers_version": diffusers.__version__,
                 "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": text_encoder,
                 "tokenizer": tokenizer, "transformer": ["diffusers", TRANSFORMER_CLASS],
                 "default_sample_size": _sample_size(cfg)}
        if cfg.space.kind == "pixels":
            pipeline = "PRXPixelPipeline"
            index.update(prompt_max_tokens=cfg.text.max_tokens, noise_scale=1.0)
            bins = (1024,)
        else:
            from daybreak.space import build_space

            pipeline = "PRXPipeline"
            vae = build_space(cfg.space).vae
            vae.save_pretrained(out / "vae", safe_serialization=True)
            index["vae"] = ["diffusers", type(vae).__name__]
            written.append("vae")
            bins = (256, 512, 1024)
        (out / "model_index.json").write_text(json.dumps({"_class_name": pipeline, **index}, indent=2))
        binning = "" if index["default_sample_size"] in bins else ", use_resolution_binning=False"
        notes.append(
            f"load with: pipe = diffusers.DiffusionPipeline.from_pretrained('{out}')  ({pipeline}); "
            f"pipe(prompt, num_inference_steps={cfg.sample.steps}, guidance_scale={cfg.sample.cfg}{binning}) "
            "- one prompt per call: with guidance, diffusers' PRX pipelines fail on a batch of prompts"
        )
    else:
        notes.append(f"no diffusers pipeline assembled: {blocker}. "
                     "Load the transformer with "
                     f"PRXTransformer2DModel.from_pretrained('{out}', subfolder='transformer')")
    for f in out.rglob("*.safetensors"):  # diffusers writes them through safetensors, as 0o600
        os.chmod(f, file_mode())
    print(f"exported {'EMA' if ema else 'raw'} weights of {ckpt} to {out} ({', '.join(written)})")
    for line in notes:
        print(line)
    return out


# ---------------------------------------------------------------------------------------------
# import


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link (else copy) the files of `src` into `dst`: text towers are gigabytes and never modified."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)


def _text_config(src: Path, index: dict, path: Path) -> dict:
    """daybreak's text.* for the pipeline's tower: its kind, its folder and its token budget."""
    cls = index["text_encoder"][1]
    tok_config = src / "tokenizer" / "tokenizer_config.json"
    budget = json.loads(tok_config.read_text()).get("model_max_length", 256) if tok_config.is_file() else 256
    max_tokens = index.get("prompt_max_tokens") or min(int(budget), 4096)  # "unlimited" is stored as ~1e30
    return {"kind": TEXT_KINDS.get(cls, "causal-lm"), "path": str(path), "max_tokens": int(max_tokens)}


def _copy_text(src: Path, index: dict, dst: Path) -> None:
    """The pipeline's text tower and tokenizer in one folder (daybreak loads both from `text.path`)."""
    _link_tree(src / "text_encoder", dst)
    _link_tree(src / "tokenizer", dst)


def _matching_preset(kwargs: dict) -> str:
    """A preset for config.yaml: every model key is written, but `bottleneck_size: null` reads as "the
    preset's", so the preset must agree on it; one that matches every key reads best."""
    agree = [n for n, p in PRESETS.items() if p["bottleneck_size"] == kwargs["bottleneck_size"]]
    full = [n for n in agree if all(PRESETS[n][k] == v for k, v in kwargs.items() if k in PRESETS[n])]
    return (full or agree or ["prx-small"])[0]


def import_diffusers(src_dir: str | Path, out_ckpt: str | Path) -> Path:
    """Write a daybreak checkpoint `out_ckpt` from a diffusers PRX transformer or pipeline folder."""
    src, out = Path(src_dir), Path(out_ckpt).resolve()
    if not is_diffusers_dir(src):
        raise UserError(f"'{src}' is not a diffusers folder (expected model_index.json or a transformer config.json)")
    check_output(out, directory=True, force=True)  # a parent that is a file, no permission
    if out.exists():
        raise UserError(f"'{out}' exists; choose a new checkpoint folder")
    kwargs, state = load_diffusers_transformer(src)
    recipe, sections = {}, {}
    for name, cls in INGREDIENTS.items():  # diffusers' parts that are daybreak ingredients (resolution_embeds)
        section, weights = cls.from_diffusers(kwargs, state)
        if section is not None:
            sections[name] = section
            recipe |= {f"{name}.{k}": v for k, v in weights.items()}
    index = json.loads((src / "model_index.json").read_text()) if (src / "model_index.json").is_file() else {}
    pixels = kwargs["in_channels"] == 3
    if not pixels and "vae" not in index:
        raise UserError(f"'{src}': a latent model (in_channels={kwargs['in_channels']}) needs its pipeline folder "
                        "with vae/ to be sampled; for init_from a transformer folder is enough")
    data = {"model": {"preset": _matching_preset(kwargs), **kwargs},
            "objective": {"prediction": "x" if pixels else "v"},
            "space": {"kind": "pixels"} if pixels else {"kind": "latents", "vae_path": str(out / "vae")}}
    if index.get("default_sample_size"):
        data["data"] = {"image_size": int(index["default_sample_size"])}
    data |= sections
    has_text = "text_encoder" in index and "tokenizer" in index
    if has_text:
        data["text"] = _text_config(src, index, out / "text_encoder")
    else:
        data["text"] = {"kind": "demo", "dim": kwargs["context_in_dim"]}
    cfg = load_config(data)
    files = {"config.yaml": cfg.to_yaml(), "transformer.safetensors": state, "transformer_ema.safetensors": state}
    if recipe:
        files["recipe.safetensors"] = files["recipe_ema.safetensors"] = recipe
    if not has_text:  # daybreak's trainable demo tower, untrained, so the checkpoint samples and fine-tunes
        print(f"note: '{src}' has no text encoder; attached an untrained demo text tower of width "
              f"{kwargs['context_in_dim']} (set text.* to the tower the model was trained with)")
        tower = build_text(cfg)
        files["text_encoder.safetensors"] = files["text_encoder_ema.safetensors"] = tower.state_dict()
        files.update(tower.checkpoint_files())
    staged = write_checkpoint(out.parent / f".tmp-import-{out.name}-{os.getpid()}", files,
                              {"step": 0, "imported_from": str(src)})
    try:  # the folders go in before the final rename, so `out` appears complete or not at all
        if has_text:
            _copy_text(src, index, staged / "text_encoder")
        if not pixels:
            _link_tree(src / "vae", staged / "vae")
        write_manifest(staged)  # again, now that the folders are in
        os.replace(staged, out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    print(f"imported {src} as daybreak checkpoint {out}")
    return out
