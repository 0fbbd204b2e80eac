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


# PRX's scripts/fine-t2i-to-mds.py MDS_COLUMNS, plus a precomputed text embedding in its bf16 encoding
PRX_COLUMNS = {
    "image": "jpeg", "width": "int", "height": "int", "original_width": "int", "original_height": "int",
    "id": "str", "prompt": "str", "enhanced_prompt": "str", "aesthetic_predictor_v_2_5_score": "str",
    "image_generator": "str", "prompt_generator": "str", "prompt_category": "str", "style": "str", "task": "str",
    "enhancer": "str", "image_aspect_ratio": "str", "image_generated_with_enhanced_prompt": "str", "length": "int",
    "enhanced_length": "int", "subset": "str",
}
LATENT = "latent_prompt_t5gemma2b-256-bf16"
ASPECTS = {"0.500": (16, 32), "1.000": (24, 24), "2.000": (32, 16)}  # folder → (width, height)


def make_prx_mds(root: Path, per_worker: int = 2) -> dict[str, dict]:
    """PRX's layout: ROOT/<aspect>/w<k>/ shards written by MDSWriter, merged per aspect folder as its
    script does; returns each sample's values by id."""
    from glob import glob

    import numpy as np
    from PIL import Image
    from streaming import MDSWriter
    from streaming.base.util import merge_index

    from daybreak.data.mds import register_bf16

    register_bf16()
    rng, written = np.random.default_rng(0), {}
    for ar, (w, h) in ASPECTS.items():
        for worker in (0, 1):
            with MDSWriter(out=str(root / ar / f"w{worker}"), columns=PRX_COLUMNS | {LATENT: "bf16"}) as sink:
                for _ in range(per_worker):
                    n = len(written)
                    sample = {c: "" for c, e in PRX_COLUMNS.items() if e == "str"}
                    sample |= {c: 0 for c, e in PRX_COLUMNS.items() if e == "int"}
                    sample |= {"image": Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
                               "width": w, "height": h, "original_width": 3 * w, "original_height": 3 * h,
                               "id": f"id{n}", "prompt": f"prompt {n}", "enhanced_prompt": f"a long prompt {n}",
                               "style": "photo", "subset": "synthetic", "length": 2,
                               LATENT: torch.randn(3, 4, generator=torch.Generator().manual_seed(n)).bfloat16()}
                    sink.write(sample)
                    written[sample["id"]] = sample
        merge_index(sorted(glob(str(root / ar / "w*" / "index.json"))), str(root / ar), keep_local=True)
    return written
