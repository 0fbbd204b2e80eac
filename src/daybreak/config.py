"""Typed configuration: one dataclass per concern, loaded from YAML, with dotted `key=value` overrides.

A config file may name a `base:` config (a path or a bundled name) whose values it overrides, so an
ablation is a few lines on top of its baseline. Every key is checked: an unknown key or a value of
the wrong type is a one-line `UserError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from daybreak import recipe
from daybreak.data.buckets import BUCKET_KINDS
from daybreak.data.sources import SOURCES
from daybreak.diffusion.objective import PREDICTIONS
from daybreak.diffusion.sampling import GUIDANCE, SAMPLERS
from daybreak.optim import OPTIMIZERS, SCHEDULES
from daybreak.space import SPACE_KINDS
from daybreak.text import TEXT_ENCODER_KINDS
from daybreak.errors import UserError
from daybreak.recipe import INGREDIENTS

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class _Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `1e-3` and `3E-4` (no dot, or no exponent sign) are strings; this
    loader also reads them as floats, as YAML 1.2's core schema does (yaml.org/spec/1.2.2, 10.3.2)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """YAML as people type it: `1e-3` is a number (see `_Loader`)."""
    return yaml.load(text, Loader=_Loader)


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = "runs/run"  # output directory; training resumes from its newest complete checkpoint


@dataclass
class ModelConfig:
    """A preset, then any of diffusers' PRXTransformer2DModel arguments on top of it."""

    preset: str = "tiny"
    in_channels: int | None = None
    patch_size: int | None = None
    context_in_dim: int | None = None
    hidden_size: int | None = None
    mlp_ratio: float | None = None
    num_heads: int | None = None
    depth: int | None = None
    axes_dim: list[int] | None = None
    theta: int | None = None
    time_factor: float | None = None
    time_max_period: int | None = None
    bottleneck_size: int | None = None


@dataclass
class MixEntry:
    """One source of `data.mix`: the single-source keys, plus its relative share of the samples."""

    name: str | None = None  # default: the path's last component; metrics.jsonl counts it as data/<name>
    source: str | None = None  # imagefolder | hf | webdataset | mds | shapes
    path: str | None = None
    weight: float = 1.0
    captions: dict[str, float] = field(default_factory=dict)  # column → weight, as data.captions
    image_column: str = "image"


@dataclass
class DataConfig:
    source: str = "shapes"  # shapes | imagefolder | hf | webdataset | mds
    path: str | None = None
    image_size: int = 32  # base resolution: the square bucket's side, or the aspect buckets' base
    buckets: str = "square"  # square | aspect (sides multiple of 16, aspect 0.5-2, ~image_size² pixels)
    captions: dict[str, float] = field(default_factory=dict)  # column → weight; {}: the named columns equally
    image_column: str = "image"
    caption_columns: list[str] | None = None  # the caption columns (default: those `captions` weighs, else the
    # data's only string column; data with several string columns and none named is refused)
    length: int = 100_000  # shapes: dataset size
    num_workers: int = 0
    cache_dir: str | None = None  # remote streaming sources: local shard cache; the sample-metadata table
    max_pixels: int | None = None  # images with more pixels are skipped (too_large); None: PIL's bomb limit
    # several sources trained together; non-empty, it replaces data.source / data.path / data.captions
    mix: list[MixEntry] = field(default_factory=list)


@dataclass
class TextConfig:
    kind: str = "demo"  # demo | t5gemma | t5 | clip | causal-lm | qwen3vl
    path: str | None = None
    max_tokens: int = 16
    dim: int = 128  # demo encoder width (transformers encoders report their own)
    layers: int = 2  # demo encoder depth
    vocab_size: int = 8192  # demo tokenizer: most BPE tokens (merges stop earlier once no pair repeats)
    tokenizer_sample: int = 20_000  # demo tokenizer: items whose captions it is trained on (all, when fewer)
    hidden_state: int = -1
    cache_dir: str | None = None  # text-embedding cache (frozen encoders only)
    dtype: str | None = None  # frozen pretrained towers' weights: bf16 | fp32; None: bf16 on CUDA, fp32 elsewhere


@dataclass
class SpaceConfig:
    kind: str = "pixels"  # pixels | latents
    vae_path: str | None = None
    cache_dir: str | None = None
    scale: float | None = None  # latents = (z - shift) * scale; None: the VAE config's scaling_factor (else 1)
    shift: float | None = None  # None: the VAE config's shift_factor (else 0)


@dataclass
class ObjectiveConfig:
    prediction: str = "x"  # x | v
    t_clamp: float = 0.05
    shift: float = 3.0
    shift_end: float | None = None  # a shift annealed linearly from `shift` at step 0 to this at the last step
    uniform_prob: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    caption_dropout: float = 0.1


@dataclass
class OptimConfig:
    name: str = "muon"  # muon | adamw
    lr: float = 1e-4
    warmup_steps: int = 1000
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.2
    muon_lr: float | None = None
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_distributed: bool = True  # under FSDP2 each matrix's Newton-Schulz runs on one owner rank
    schedule: str = "constant"  # after warm-up: constant (PRX) | cosine | linear | wsd (decay over the last decay_fraction)
    decay_fraction: float = 0.2  # wsd: the share of train.steps spent decaying
    min_lr_ratio: float = 0.0  # cosine, linear, wsd: the lr at the last step, as a multiple of optim.lr


@dataclass
class EMAConfig:
    enabled: bool = True  # false: no shadow copy; sampling, eval and export use the raw weights
    decay: float = 0.999
    every: int = 10
    start: int = 0


@dataclass
class TrainConfig:
    steps: int = 100
    global_batch: int = 8
    micro_batch: int = 8
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    async_checkpoint: bool = False  # write step checkpoints in the background (DCP async save)
    log_every: int = 10
    sample_every: int = 0  # 0: only at the end
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    device: str = "auto"
    max_nonfinite: int = 5  # consecutive non-finite steps before the run stops
    weights_dtype: str = "fp32"  # fp32 master weights (the recipe) | bf16 (the article's ablation: stored in bf16)
    time_limit_minutes: float = 0.0  # >0: end the run (final checkpoint) after this much wall time
    activation_checkpointing: bool = False
    compile: bool | None = None  # regional torch.compile; None: on for CUDA, off on CPU (measured slower there)
    # Scale-out past one node (`training/parallel.py`): HSDP replicas (1: FSDP over every rank; N: N replicas
    # each sharding over world/N ranks; node: one replica per node), the gradients' reduce dtype, how many
    # last blocks keep their gathered weights from forward to backward, and FP8 matmuls (torchao).
    replicate: Union[int, str] = 1  # int >= 1 | node
    reduce_dtype: str = "fp32"  # fp32 | bf16
    keep_gathered_blocks: int = 1
    fp8: Union[bool, str] = False  # false | tensorwise | rowwise
    fp8_emulate: bool = False  # torchao's FP8 emulation (same rounding, no speed-up): the only FP8 off FP8 GPUs


@dataclass
class SampleConfig:
    steps: int = 28
    cfg: float = 3.5
    self_scale: float = 1.0  # the self-guidance weight when guidance is cfg+self
    guidance: str = "cfg"  # cfg | self | none | cfg+self
    self_redraw: bool = False  # self-guidance: a new routed token subset every step (PRX: one per generation)
    sampler: str = "euler"  # euler | heun
    shift: float = 3.0
    prompts: list[str] = field(default_factory=list)
    seed: int = 0


@dataclass
class EvalConfig:
    every: int = 0  # periodic evaluation during training (0: off)
    metrics: list[str] = field(default_factory=lambda: ["adherence"])  # fid cmmd dino_mmd fd_dino clip_score fd_tiny adherence
    num: int = 32  # generated images per evaluation
    steps: int = 50
    cfg: float = 3.5
    guidance: str | None = None  # None: the run's sample.guidance
    seed: int = 0
    batch_size: int = 32
    ref_num: int = 1000  # reference images (statistics cached in cache_dir)
    cache_dir: str | None = None  # None: ~/.cache/daybreak/refstats
    inception_path: str | None = None  # pt_inception-2015-12-05 weights (FID)
    clip_path: str | None = None  # openai/clip-vit-large-patch14-336 (CMMD, CLIP score)
    dino_path: str | None = None  # facebook/dinov2-with-registers-large (DINO-MMD, FD-DINO)
    dino_resolution: int = 518


@dataclass
class ValConfig:
    """The validation loss per noise bin (`daybreak.training.validation`): every `every` steps (0: off),
    the flow loss of `num` held-out examples at a fixed t per bin and fixed noise, keyed on `seed`."""

    every: int = 0
    num: int = 64  # held-out examples: the last `num` of the training source (then not trained on)
    data: DataConfig | None = None  # another source for them (same keys as `data`); its first `num`
    bins: list[list[float]] = field(default_factory=lambda: [[0.0, 0.3], [0.3, 0.6], [0.6, 1.0]])
    seed: int = 0


@dataclass
class LogConfig:
    """Where a run reports besides metrics.jsonl and TensorBoard: Weights & Biases (the `wandb` extra;
    WANDB_MODE=offline works without an account), one W&B run per run directory, resumed with it."""

    wandb: bool = False
    project: str = "daybreak"
    name: str | None = None  # None: run.name
    group: str | None = None
    entity: str | None = None


def _to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _to_yaml(self) -> str:
    return yaml.safe_dump(self.to_dict(), sort_keys=False)


# The whole config: the run-level keys, one section per concern, then one section per recipe
# ingredient, each owned by (and named after) its ingredient in `daybreak.recipe`.
Config = dataclasses.make_dataclass("Config", [
    ("seed", int, field(default=0)),
    # a checkpoint, run directory or diffusers folder whose weights (and EMA) start this run
    ("init_from", Union[str, None], field(default=None)),
    ("init_optimizer", bool, field(default=False)),  # also take init_from's optimizer state
    *((name, cls, field(default_factory=cls)) for name, cls in (
        ("run", RunConfig), ("model", ModelConfig), ("data", DataConfig), ("text", TextConfig),
        ("space", SpaceConfig), ("objective", ObjectiveConfig), ("optim", OptimConfig), ("ema", EMAConfig),
        ("train", TrainConfig), ("sample", SampleConfig), ("log", LogConfig),
        *((name, ing.Config) for name, ing in INGREDIENTS.items()),
        ("eval", EvalConfig), ("val", ValConfig),
    )),
], namespace={"to_dict": _to_dict, "to_yaml": _to_yaml, "__module__": __name__})


# ---------------------------------------------------------------------------------------------
# loading, merging, checking


def resolve_config_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    for candidate in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    bundled = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
    raise UserError(f"config '{name_or_path}' not found (not a file; bundled configs: {bundled})")


def read_mapping(path: Path, what: str) -> dict:
    """A YAML file (numbers as `yaml_load` reads them) that must hold a mapping; `what` completes
    the error, e.g. "a config must be a mapping of sections"."""
    try:
        data = yaml_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
                        f"save it as UTF-8") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what}")
    return data


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A config file merged over its `base:` chain (a chain that comes back to a file is refused)."""
    if path.resolve() in chain:
        loop = " -> ".join(str(p) for p in (*chain[chain.index(path.resolve()):], path.resolve()))
        raise UserError(f"{chain[-1]}: its base: chain loops ({loop})")
    data = read_mapping(path, "a config must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UserError(f"{path}: base: must be a config path or bundled name, got {base!r}")
    parent = resolve_config_path(base) if not (path.parent / base).is_file() else path.parent / base
    return _deep_merge(_read_yaml(parent, (*chain, path.resolve())), data)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _check(tp: Any, value: Any, key: str) -> Any:
    """Return `value` converted to type `tp`, or raise a UserError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(a, value, key)
            except UserError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):  # an entry of a list of mappings (data.mix)
        names = [f.name for f in dataclasses.fields(tp)]
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' must be a mapping of {', '.join(names)}, got {value!r}")
        unknown = [str(k) for k in value if k not in names]
        if unknown:
            raise UserError(f"config key '{key}' has unknown keys {', '.join(unknown)} (its keys: {', '.join(names)})")
        return _build(tp, value, f"{key}.")
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' must be a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _check(vt, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):  # an optional section (val.data)
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' is a section; give its keys, e.g. {key}.<name>=...")
        return _build(tp, value, f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if type(value) is int and value in (0, 1):
            return bool(value)
        raise UserError(f"config key '{key}' must be true or false (yes/no, 1/0), got {value!r}")
    if tp is int:
        if isinstance(value, float) and value.is_integer():  # train.steps=1e5
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_INT:  # past what torch and numpy take: an overflow deep inside, not a value
                raise UserError(f"config key '{key}' must be an integer of at most 2**63 - 1, got {value}")
            return value
        raise UserError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # .nan, .inf, 1e999: no key means anything by them
                raise UserError(f"config key '{key}' must be a finite number, got {value!r}")
            return float(value)
        raise UserError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config key '{key}' must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} for {key}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise unknown_key(key)
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise UserError(f"config key '{key}' is a section; give its keys, e.g. {key}.<name>=...")
            kwargs[k] = _build(tp, v, f"{key}.")
        else:
            kwargs[k] = _check(tp, v, key)
    return cls(**kwargs)


def config_keys(cls: type = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config schema (sections and leaves)."""
    out = []
    for f in dataclasses.fields(cls or Config):
        tp = _section(typing.get_type_hints(cls or Config)[f.name])
        out.append(f"{prefix}{f.name}")
        if dataclasses.is_dataclass(tp):
            out += config_keys(tp, f"{prefix}{f.name}.")
    return out


def unknown_key(key: str) -> UserError:
    """The error for a key that is not in the schema, named in full, with the nearest valid keys."""
    near = difflib.get_close_matches(key, config_keys(), n=3, cutoff=0.6)
    top = ", ".join(f.name for f in dataclasses.fields(Config))
    hint = f"; did you mean {' or '.join(near)}?" if near else f" (top-level keys: {top})"
    return UserError(f"unknown config key '{key}'{hint}")


def _section(tp: Any) -> Any:
    """The dataclass of an optional section (`DataConfig | None` -> DataConfig); other types unchanged."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (Union, types.UnionType) else []
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else tp


def _check_path(path: list[str]) -> int | None:
    """An override's dotted key walks the schema: an unknown part fails naming the whole key as typed.
    Returns where the key passes through a list of entries (`data.mix.NAME_OR_INDEX.path`), else None."""
    cls = Config
    for i, part in enumerate(path):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise unknown_key(".".join(path))
        tp = _section(hints[part])
        item = (typing.get_args(tp) or [None])[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(tp):
            cls = tp
        elif dataclasses.is_dataclass(item) and i < len(path) - 1:
            fields = [f.name for f in dataclasses.fields(item)]
            if len(path) != i + 3 or path[-1] not in fields:
                raise UserError(f"config key '{'.'.join(path)}': give one entry's key as "
                                f"{'.'.join(path[:i + 1])}.<name or index>.<{'|'.join(fields)}>")
            return i
        elif i < len(path) - 1 and typing.get_origin(tp) is not dict:
            raise UserError(f"config key '{'.'.join(path[:i + 1])}' is a value, not a section "
                            f"(got '{'.'.join(path)}')")
        else:
            return None
    return None


def _entry(entries: Any, selector: str, key: str) -> dict:
    """The entry of a list of mappings that `selector` names: its index, or its name."""
    from daybreak.data.mix import entry_name

    if not isinstance(entries, list) or not entries:
        raise UserError(f"config key '{key}' lists no entries to override (set it whole: {key}=[{{...}}])")
    names = [str(e.get("name") or entry_name(e.get("source"), e.get("path"))) if isinstance(e, dict) else ""
             for e in entries]
    if selector.isdigit() and int(selector) < len(entries):
        return entries[int(selector)]
    if selector in names:
        return entries[names.index(selector)]
    raise UserError(f"config key '{key}' has no entry '{selector}' (entries: {', '.join(names)}; or an index "
                    f"0-{len(entries) - 1})")


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"override '{item}' must look like key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if key.strip() == "" or any(p == "" for p in key.split(".")):
        raise UserError(f"override '{item}' has an empty key")
    return key.split("."), value


def load_config(source: str | Path | dict | None = None, overrides: list[str] = ()) -> Config:
    """Build a checked Config from a YAML path / bundled name / dict, then apply overrides."""
    if source is None:
        data: dict = {}
    elif isinstance(source, dict):
        data = dict(source)
    else:
        data = _read_yaml(resolve_config_path(str(source)))
    for item in overrides:
        path, value = parse_override(item)
        at = _check_path(path)
        node = data
        for depth, p in enumerate(path[:-1]):
            if at is not None and depth == at + 1:
                node = _entry(node, p, ".".join(path[:depth]))
                continue
            nxt = node.get(p)
            if at is not None and depth == at:
                node = nxt
                continue
            if not isinstance(nxt, dict):
                nxt = {}
                node[p] = nxt
            node = nxt
        node[path[-1]] = value
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def flatten(d: dict) -> dict[str, Any]:
    """A resolved config dict as {dotted key: value}: sections opened, mapping values (data.captions) kept whole."""
    sections = {k for k, tp in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(tp)}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k in sections and isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def changed_keys(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} of two resolved configs' differing keys (None: absent)."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise UserError(f"config key '{key}' must be one of {', '.join(options)}; got '{value}'")


def validate(cfg: Config) -> None:
    _choice("data.source", cfg.data.source, SOURCES)
    _choice("text.kind", cfg.text.kind, TEXT_ENCODER_KINDS)
    _choice("optim.name", cfg.optim.name, OPTIMIZERS)
    _choice("optim.schedule", cfg.optim.schedule, SCHEDULES)
    _choice("objective.prediction", cfg.objective.prediction, PREDICTIONS)
    _choice("train.precision", cfg.train.precision, ("auto", "fp32", "bf16"))
    _choice("train.weights_dtype", cfg.train.weights_dtype, ("fp32", "bf16"))
    _choice("train.reduce_dtype", cfg.train.reduce_dtype, ("fp32", "bf16"))
    if cfg.train.fp8 not in (False, "tensorwise", "rowwise"):
        raise UserError(f"config key 'train.fp8' must be one of false, tensorwise, rowwise; got {cfg.train.fp8!r}")
    r = cfg.train.replicate
    if r != "node" and not (isinstance(r, int) and r >= 1):
        raise UserError(f"config key 'train.replicate' must be an integer >= 1 or node, got {r!r}")
    if cfg.text.dtype is not None:
        _choice("text.dtype", cfg.text.dtype, ("bf16", "fp32"))
    _choice("sample.guidance", cfg.sample.guidance, GUIDANCE)
    _choice("sample.sampler", cfg.sample.sampler, SAMPLERS)
    _choice("space.kind", cfg.space.kind, SPACE_KINDS)
    _choice("data.buckets", cfg.data.buckets, BUCKET_KINDS)
    if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
        raise UserError("config key 'log.wandb'=true needs the wandb extra: pip install 'daybreak[wandb]' "
                        "(or uv sync --extra wandb)")
    for key, value in (("seed", cfg.seed), ("sample.seed", cfg.sample.seed), ("eval.seed", cfg.eval.seed)):
        if not 0 <= value <= MAX_SEED:
            raise UserError(f"config key '{key}' must be a seed in [0, {MAX_SEED}], got {value}")
    for key, lo, hi in RANGES:
        section, name = key.split(".")
        check_range(key, getattr(getattr(cfg, section), name), lo, hi)
    for i, b in enumerate(cfg.optim.betas):
        check_range(f"optim.betas[{i}]", b, (0, "["), (1, ")"))
    for k, w in cfg.data.captions.items():
        check_range(f"data.captions.{k}", w, (0, "["), None)
    for name, v in ((f.name, getattr(cfg.model, f.name)) for f in dataclasses.fields(ModelConfig)):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            check_range(f"model.{name}", v, (0, "("), None)
    t = cfg.train
    if t.global_batch % t.micro_batch:
        raise UserError(
            f"train.global_batch ({t.global_batch}) must be a multiple of train.micro_batch ({t.micro_batch}) × world size"
        )
    if not cfg.data.mix and cfg.data.source != "shapes" and not cfg.data.path:
        raise UserError(f"data.path is required for data.source={cfg.data.source}")
    _check_val(cfg)
    _check_mix(cfg.data.mix)
    recipe.check(cfg)


def _check_val(cfg: Config) -> None:
    """The `val` section: bins inside [0, 1] with lo < hi, and a usable `val.data` when one is given."""
    if not cfg.val.bins:
        raise UserError("config key 'val.bins' needs at least one [lo, hi] bin")
    for i, b in enumerate(cfg.val.bins):
        if len(b) != 2 or not 0.0 <= b[0] < b[1] <= 1.0:
            raise UserError(f"config key 'val.bins[{i}]' must be [lo, hi] with 0 <= lo < hi <= 1, got {b}")
    if cfg.val.data is not None:
        _choice("val.data.source", cfg.val.data.source, SOURCES)
        if cfg.val.data.source != "shapes" and not cfg.val.data.path:
            raise UserError(f"val.data.path is required for val.data.source={cfg.val.data.source}")


def _check_mix(entries: list[MixEntry]) -> None:
    """Each entry's keys checked; its name filled in (the path's last component), unique in the mix."""
    from daybreak.data.mix import entry_name

    seen: set[str] = set()
    for i, e in enumerate(entries):
        key = f"data.mix[{i}]"
        if e.source is None:
            raise UserError(f"config key '{key}.source' is required (one of {', '.join(SOURCES)})")
        _choice(f"{key}.source", e.source, SOURCES)
        if e.source != "shapes" and not e.path:
            raise UserError(f"config key '{key}.path' is required for source {e.source}")
        check_range(f"{key}.weight", e.weight, (0, "("), None)
        for c, w in e.captions.items():
            check_range(f"{key}.captions.{c}", w, (0, "["), None)
        e.name = e.name or entry_name(e.source, e.path)
        if e.name in seen:
            raise UserError(f"data.mix has two entries named '{e.name}': set {key}.name")
        seen.add(e.name)


def check_range(key: str, value: float | None, lo: tuple[float, str] | None, hi: tuple[float, str] | None) -> None:
    """`value` within `lo`/`hi` ((bound, "[" or "(") / (bound, "]" or ")"), None: unbounded), or one line
    naming the key and the allowed range. None (an optional key left unset) always passes."""
    if value is None:
        return
    ok = math.isfinite(value) or (hi is None and value == math.inf)
    if lo is not None:
        ok = ok and (value >= lo[0] if lo[1] == "[" else value > lo[0])
    if hi is not None:
        ok = ok and (value <= hi[0] if hi[1] == "]" else value < hi[0])
    if not ok:
        if lo is not None and hi is not None:
            allowed = f"in {lo[1]}{lo[0]:g}, {hi[0]:g}{hi[1]}"
        elif lo is not None:
            allowed = f"{'>=' if lo[1] == '[' else '>'} {lo[0]:g}"
        else:
            allowed = f"{'<=' if hi[1] == ']' else '<'} {hi[0]:g}"
        raise UserError(f"config key '{key}' must be {allowed}, got {value!r}")


MAX_INT = 2**63 - 1  # torch's int64
MAX_SEED = 2**32 - 1  # what every generator the run seeds (torch, numpy, Python) takes

_POS, _NONNEG, _ONE = (0, "("), (0, "["), (1, "[")
# (key, lower, upper) of every core numeric key with a meaning; ingredients check their own sections.
RANGES = [
    ("optim.lr", _POS, None),
    ("optim.muon_lr", _POS, None), ("optim.warmup_steps", _NONNEG, None), ("optim.eps", _POS, None),
    ("optim.weight_decay", _NONNEG, None), ("optim.grad_clip", _POS, None),
    ("optim.muon_momentum", _NONNEG, (1, ")")), ("optim.muon_ns_steps", _ONE, None),
    ("optim.decay_fraction", _POS, (1, "]")), ("optim.min_lr_ratio", _NONNEG, (1, "]")),
    ("ema.decay", _NONNEG, (1, "]")), ("ema.every", _ONE, None), ("ema.start", _NONNEG, None),
    ("train.steps", _ONE, None), ("train.global_batch", _ONE, None), ("train.micro_batch", _ONE, None),
    ("train.checkpoint_every", _ONE, None), ("train.keep_checkpoints", _NONNEG, None),
    ("train.log_every", _ONE, None), ("train.sample_every", _NONNEG, None), ("train.max_nonfinite", _ONE, None),
    ("train.time_limit_minutes", _NONNEG, None), ("train.keep_gathered_blocks", _NONNEG, None),
    ("objective.t_clamp", _POS, (1, "]")), ("objective.shift", _POS, None),
    ("objective.shift_end", _POS, None),
    ("objective.uniform_prob", _NONNEG, (1, "]")), ("objective.logit_std", _POS, None),
    ("objective.caption_dropout", _NONNEG, (1, ")")),
    ("data.image_size", _ONE, None), ("data.length", _ONE, None), ("data.num_workers", _NONNEG, None),
    ("data.max_pixels", _ONE, None),
    ("text.max_tokens", _ONE, None), ("text.dim", _ONE, None), ("text.layers", _ONE, None),
    ("text.vocab_size", (259, "["), None), ("text.tokenizer_sample", _ONE, None),
    ("sample.steps", _ONE, None), ("sample.shift", _POS, None), ("sample.cfg", _NONNEG, None),
    ("eval.every", _NONNEG, None), ("eval.num", _ONE, None), ("eval.steps", _ONE, None),
    ("eval.cfg", _NONNEG, None), ("eval.batch_size", _ONE, None), ("eval.ref_num", _ONE, None),
    ("eval.dino_resolution", _ONE, None), ("space.scale", _POS, None),
    ("val.every", _NONNEG, None), ("val.num", _ONE, None),
]
