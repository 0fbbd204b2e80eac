"""Plain helpers shared by several test modules (fixtures live in conftest.py)."""

import json
import socket
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import daybreak  # noqa: F401  (torchvision fix before transformers' and diffusers' model imports)
from daybreak.config import load_config

WORDS = ["<pad>", "</s>", "<bos>", "<unk>", *"a red blue circle square on the left right".split()]


# 16 px shapes, 16 tokens: about 0.1 s a step on one CPU thread.
SMALL = ["data.image_size=16", "train.global_batch=4", "train.micro_batch=2", "train.log_every=1",
         "sample.prompts=[]", "optim.name=muon"]


def tiny(run_dir: Path, *extra: str):
    return load_config("tiny", [f"run.dir={run_dir}", *SMALL, *extra])


class Tap:
    """Wraps a trainer's loader: `on_batch(i, batch)` sees (and may change) the i-th batch handed out."""

    def __init__(self, data, on_batch):
        self.data, self.on_batch = data, on_batch

    def __iter__(self):
        for i, batch in enumerate(self.data):
            self.on_batch(i, batch)
            yield batch

    def state_dict(self):
        return self.data.state_dict()

    def load_state_dict(self, state):
        self.data.load_state_dict(state)

    def stats(self):
        return self.data.stats()


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("transformer", "transformer_ema", "text_encoder", "text_encoder_ema"):
        out.update({f"{name}/{k}": v for k, v in load_file(str(ckpt / f"{name}.safetensors")).items()})
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def tiny_vae(dtype: torch.dtype = torch.float32):
    """A random diffusers AutoencoderKL: 4 latent channels, downscale 2, ~44 k parameters."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return vae.to(dtype)


def tiny_flux2_vae():
    """A random diffusers AutoencoderKLFlux2 (FLUX.2's class; no scaling_factor in its config): 4 channels, ×2."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    return AutoencoderKLFlux2(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def tiny_dc_ae():
    """A random diffusers AutoencoderDC (DC-AE): 4 latent channels, ×2, DC-AE SANA's scaling factor."""
    from diffusers import AutoencoderDC

    torch.manual_seed(0)
    return AutoencoderDC(latent_channels=4, attention_head_dim=4, encoder_block_out_channels=(8, 16),
                         decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1),
                         decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                         decoder_qkv_multiscales=((), ()), scaling_factor=0.41407)


def tiny_qwen3vl():
    """A random transformers Qwen3VLForConditionalGeneration (vision tower included): text width 16, vocab WORDS."""
    torch.manual_seed(0)
    text = dict(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=1, deepstack_visual_indexes=[0])
    config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision)
    return transformers.Qwen3VLForConditionalGeneration(config)


def save_tokenizer(folder, template: str | None) -> None:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[("<bos>", 2), ("</s>", 1)]
        )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<bos>", unk_token="<unk>"
    ).save_pretrained(folder)


def tiny_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    n = len(WORDS)
    if kind == "t5gemma":
        module = dict(vocab_size=n, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
        return transformers.T5GemmaForConditionalGeneration(
            transformers.T5GemmaConfig(encoder=module, decoder=module, vocab_size=n)
        )
    if kind == "t5":
        return transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=n, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2))
    if kind == "clip":
        return transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=n, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=16,
            pad_token_id=0, bos_token_id=2, eos_token_id=1))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=n, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, pad_token_id=0))


TEMPLATES = {"t5gemma": "<bos> $A", "t5": "$A </s>", "clip": "<bos> $A </s>", "causal-lm": None}


def free_port() -> int:
    """A TCP port nobody listens on, for a spawned gloo session's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish_rank(root, rank: int, out: dict) -> None:
    """A spawned rank's last act: its results as ROOT/rank{rank}.json, then leave the process group."""
    with open(f"{root}/rank{rank}.json", "w") as f:
        json.dump(out, f)
    torch.distributed.destroy_process_group()
