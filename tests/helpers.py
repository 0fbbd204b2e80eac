"""Plain helpers shared by several test modules (fixtures live in conftest.py)."""

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import daybreak  # noqa: F401  (torchvision fix before transformers' and diffusers' model imports)
from daybreak.config import load_config
from daybreak.diffusion.objective import Denoiser

WORDS = ["<pad>", "</s>", "<bos>", "<unk>", *"a red blue circle square on the left right".split()]


# 16 px shapes, 16 tokens: about 0.1 s a step on one CPU thread.
SMALL = ["data.image_size=16", "train.global_batch=4", "train.micro_batch=2", "train.log_every=1",
         "sample.prompts=[]", "optim.name=muon"]


def tiny(run_dir: Path, *extra: str):
    return load_config("tiny", [f"run.dir={run_dir}", *SMALL, *extra])


def denoiser(**objective) -> Denoiser:
    """The tiny config's denoiser with these `objective` keys changed, unchecked (t_clamp=0: no clamp)."""
    cfg = load_config("tiny")
    section = SimpleNamespace(**{**vars(cfg.objective), **objective})
    return Denoiser(section, seed=cfg.seed, global_batch=cfg.train.global_batch, steps=cfg.train.steps)


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


# Multi-rank checks share spawned gloo sessions, one per world size: starting a rank (a new interpreter importing
# torch and the package) costs more than most checks run in it. `gloo_job` registers a check; at session start
# the suite starts `GlooPool` (conftest.py), which runs the sessions one after the other in the background
# while the suite's tests, most on one thread, use the other core.
# The gloo sessions yield to the rest: the tests in the foreground run one after the other, so their course
# bounds the suite's time, and a background run (`background_cli`) is one long course of its own. Fresh clones
# on 2 cores: the suite took 318 s with every process equal, 308 s with the ranks at niceness 10, 319 s at 5,
# 337 s with the background run niced as well (it then held up its test by 49 s).
BACKGROUND_NICENESS = 10


class GlooJob(NamedTuple):
    fn: Callable[[int, str], dict]
    prepare: Callable[[Path], object] | None
    timeout: float
    env: Callable[[int], dict[str, str]] | None


GLOO_JOBS: dict[int, list[GlooJob]] = {}


def gloo_job(world: int, prepare=None, timeout: float = 240, env=None):
    """Registers `fn(rank, root) -> dict` to run on every rank of the session's `world`-rank gloo group (already
    initialised, 1 intra-op thread), in its own folder `root`; `prepare(root)` runs first in the parent, `env(rank)`
    names environment variables set for the job's duration (a launcher's LOCAL_WORLD_SIZE, say). What each rank
    returns comes back to the test as JSON. `timeout` adds to the session's deadline (a hang fails)."""
    def register(fn):
        GLOO_JOBS.setdefault(world, []).append(GlooJob(fn, prepare, timeout, env))
        return fn

    return register


def job_name(fn) -> str:
    return f"{fn.__module__}.{fn.__name__}"


def gloo_rank(rank: int, port: int, world: int, root: str, jobs: list) -> None:
    """One spawned rank of a session: the gloo group, then each (job, environment per rank) in turn, its result
    as ROOT/<job>/rank{rank}.json."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    os.nice(BACKGROUND_NICENESS)
    torch.distributed.init_process_group("gloo")
    for fn, envs in jobs:
        saved = {k: os.environ.get(k) for k in envs[rank]}
        os.environ.update(envs[rank])
        try:
            out = fn(rank, f"{root}/{job_name(fn)}")
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        path = Path(root) / job_name(fn) / f"rank{rank}.json"
        path.with_suffix(".tmp").write_text(json.dumps(out))
        path.with_suffix(".tmp").rename(path)  # whole, for the parent that polls for it
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


class GlooPool:
    """Every registered check of `modules`, one spawned session per world size, smallest first, run by a
    background thread (started on construction, not awaited). A session that fails or passes its deadline
    fails the tests that ask for its jobs; the next session still runs."""

    def __init__(self, root: Path, modules: set[str]):
        import threading

        self.root, self.errors, self.closing = root, {}, threading.Event()
        picked = {w: [j for j in jobs if j.fn.__module__ in modules] for w, jobs in sorted(GLOO_JOBS.items())}
        self.jobs = {w: jobs for w, jobs in picked.items() if jobs}
        for job in (j for jobs in self.jobs.values() for j in jobs):
            (root / job_name(job.fn)).mkdir()
            if job.prepare is not None:
                job.prepare(root / job_name(job.fn))
        self.thread = threading.Thread(target=self._sessions, daemon=True)
        self.thread.start()

    def _sessions(self) -> None:
        import torch.multiprocessing as mp

        for world, jobs in self.jobs.items():
            timeout = sum(j.timeout for j in jobs)
            plan = [(j.fn, [j.env(r) if j.env else {} for r in range(world)]) for j in jobs]
            try:
                ctx = mp.spawn(gloo_rank, args=(free_port(), world, str(self.root), plan), nprocs=world, join=False)
                deadline = time.monotonic() + timeout
                while not ctx.join(timeout=0.5):
                    if self.closing.is_set() or time.monotonic() > deadline:
                        for p in ctx.processes:
                            p.kill()
                        raise TimeoutError(f"{world} ranks did not finish {len(jobs)} jobs within {timeout:.0f} s "
                                           "(a hang)")
            except Exception as e:  # the failing rank's traceback, for every test of this session
                self.errors[world] = e
            if self.closing.is_set():
                return

    def results(self, fn) -> tuple[Path, list[dict]]:
        """(the job's folder, what each rank returned), once every rank has written it."""
        world = next(w for w, jobs in self.jobs.items() if any(j.fn is fn for j in jobs))
        files = [self.root / job_name(fn) / f"rank{r}.json" for r in range(world)]
        while not all(f.exists() for f in files):
            if world in self.errors:
                raise self.errors[world]
            if not self.thread.is_alive():
                raise RuntimeError(f"the gloo sessions ended without {job_name(fn)}'s results")
            time.sleep(0.2)
        return files[0].parent, [json.loads(f.read_text()) for f in files]

    def close(self) -> None:
        self.closing.set()
        self.thread.join()


# Long single-process runs that a test only reads the outcome of run as `daybreak` commands in the background
# from session start, on one thread, like the gloo pool: `background_cli` registers one; the `background_run`
# fixture (conftest.py) waits for it.
BACKGROUND: list[Callable[[Path], list[str]]] = []


def background_cli(fn):
    """Registers `fn(root) -> [daybreak arguments]` (`fn` may write its inputs under `root` first)."""
    BACKGROUND.append(fn)
    return fn


class BackgroundRun:
    """`python -m daybreak <fn(root)>` started now, its output in ROOT/output.txt."""

    def __init__(self, root: Path, fn):
        import subprocess
        import sys
        import threading

        self.root = root
        argv = [sys.executable, "-m", "daybreak", *fn(root)]
        with open(root / "output.txt", "w") as out:
            self.start = time.monotonic()
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self.timer = threading.Thread(target=self._time, daemon=True)  # stamps the end when it comes
        self.timer.start()

    def _time(self):
        self.proc.wait()
        self.end = time.monotonic()

    def result(self, timeout: float = 900) -> tuple[Path, float]:
        """(root, the command's wall-clock seconds) once it exits 0; its output's end if it does not."""
        self.timer.join(timeout)
        if self.timer.is_alive():
            self.close()
            raise TimeoutError(f"{self.proc.args[3:]} did not finish within {timeout:.0f} s")
        code = self.proc.returncode
        if code != 0:
            tail = (self.root / "output.txt").read_text()[-3000:]
            raise RuntimeError(f"{self.proc.args[3:]} exited {code}:\n{tail}")
        return self.root, self.end - self.start

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# The speedrun's three datasets as published on the Hugging Face hub (column names and types from their
# dataset cards and the code that reads them): lehduong/flux_generated, LucasFang/FLUX-Reason-6M (8 caption
# kinds, each in English and Chinese `_cn`), brivangl/midjourney-v6-llava.
FLUX_REASON_KINDS = ["composition", "entity", "text", "imaginative", "style", "abstract", "detail", "original"]
REPLICA_SIZES = {"flux_generated": 6, "FLUX-Reason-6M": 12, "midjourney-v6-llava": 4}


def replica_captions(name: str, i: int) -> dict[str, str]:
    """Row i's string columns in replica `name` (an empty string where the real data has empty cells)."""
    if name == "flux_generated":
        return {"caption_caption": f"a red circle number {i} in a flux picture"}
    if name == "FLUX-Reason-6M":
        out = {"id": f"fr{i:05d}"}
        for kind in FLUX_REASON_KINDS:
            text = {"detail": f"a detailed long description of blue square {i}", "original": f"blue square {i}"}.get(
                kind, f"a {kind} caption {i}" if i % 3 == 0 else "")
            out[f"caption_{kind}"], out[f"caption_{kind}_cn"] = text, f"蓝色方块 {kind} {i}" if text else ""
        return out
    return {"id": f"mj{i:05d}", "prompt": f"green blob {i} --ar 1:1",
            "llava": f"the image shows a long llava description of a green blob {i}", "llava_status": "success"}


def write_replicas(root: Path) -> dict[str, Path]:
    """Tiny parquet replicas (hub layout `data/train-*.parquet`) of the three datasets: noise images of
    16-24 px (flux_generated's width/height columns say their sizes), `replica_captions` as text."""
    import io

    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = {}
    for name, n in REPLICA_SIZES.items():
        rows = []
        for i in range(n):
            w, h = [(16, 16), (24, 16), (16, 24)][i % 3]
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG" if i % 2 else "JPEG")
            row = {"image": {"bytes": buf.getvalue(), "path": None}, **replica_captions(name, i)}
            if name == "flux_generated":
                row |= {"height": h, "width": w}
            rows.append(row)
        features = {c: datasets.Value("string") for c in rows[0] if c != "image"} | {"image": datasets.Image()}
        features |= {c: datasets.Value("int64") for c in ("height", "width") if c in rows[0]}
        order = {"flux_generated": ["image", "height", "width", "caption_caption"],
                 "FLUX-Reason-6M": ["id", "image"] + [f"caption_{k}{s}" for k in FLUX_REASON_KINDS for s in ("", "_cn")],
                 "midjourney-v6-llava": ["id", "prompt", "image", "llava", "llava_status"]}[name]
        table = {c: [r[c] for r in rows] for c in order}
        path = root / name / "data" / "train-00000-of-00001.parquet"
        path.parent.mkdir(parents=True)
        datasets.Dataset.from_dict(table, features=datasets.Features({c: features[c] for c in order})).to_parquet(str(path))
        out[name] = root / name
    return out


def mix_overrides(paths: dict[str, Path], stage: str = "speedrun-512") -> list[str]:
    """`stage`'s data.mix (names, weights, caption columns) pointed at the replicas in `paths`."""
    cfg = load_config(stage)
    entries = [f"{{name: {e.name}, source: hf, path: '{paths[e.name]}', weight: {e.weight}, "
               f"captions: {{{', '.join(f'{c}: {w}' for c, w in e.captions.items())}}}}}" for e in cfg.data.mix]
    return [f"data.mix=[{', '.join(entries)}]"]


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
