"""Typed configuration: the root `Config`, loaded from YAML, with dotted `key=value` overrides.

Each section's dataclass lives with the component that reads it (`optim.OptimConfig`,
`text.TextConfig`, the recipe's `IngredientSections`, ...) and carries its ranges and choices on its
fields (`daybreak.schema`); `Config` composes them and `validate` checks a loaded config once. A
config file may name a `base:` config (a path or a bundled name) whose values it overrides, so an
ablation is a few lines on top of its baseline. Every key is checked: an unknown key or a value of
the wrong type or out of its range is a one-line `UserError` naming the key.
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
from typing import Any, Literal, Union

import yaml

from daybreak import recipe
from daybreak.data.config import DataConfig
from daybreak.diffusion.objective import ObjectiveConfig
from daybreak.diffusion.sampling import GUIDANCE, SampleConfig
from daybreak.errors import UserError
from daybreak.model.presets import ModelConfig
from daybreak.optim import OptimConfig
from daybreak.recipe import IngredientSections
from daybreak.schema import check_fields, ranged, seed_field
from daybreak.space import SpaceConfig
from daybreak.text import TextConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
MAX_INT = 2**63 - 1  # torch's int64


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


# The sections below are read by the run's driver (training/, evaluate/, run.py), which sits above
# this module; every other section lives with the component that reads it.


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = "runs/run"  # output directory; training resumes from its newest complete checkpoint


@dataclass
class EMAConfig:
    """Config section `ema`, read by `daybreak.training.ema.EMA`."""

    enabled: bool = True  # false: no shadow copy; sampling, eval and export use the raw weights
    decay: float = ranged(0.999, ge=0, le=1)
    every: int = ranged(10, ge=1)
    start: int = ranged(0, ge=0)


def _check_replicate(key: str, value: int | str) -> None:
    if value != "node" and not (isinstance(value, int) and value >= 1):
        raise UserError(f"config key '{key}' must be an integer >= 1 or node, got {value!r}")


@dataclass
class TrainConfig:
    steps: int = ranged(100, ge=1)
    global_batch: int = ranged(8, ge=1)
    micro_batch: int = ranged(8, ge=1)
    checkpoint_every: int = ranged(1000, ge=1)
    keep_checkpoints: int = ranged(3, ge=0)
    async_checkpoint: bool = False  # write step checkpoints in the background (DCP async save)
    log_every: int = ranged(10, ge=1)
    sample_every: int = ranged(0, ge=0)  # 0: only at the end
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    device: str = "auto"
    max_nonfinite: int = ranged(5, ge=1)  # consecutive non-finite steps before the run stops
    weights_dtype: Literal["fp32", "bf16"] = "fp32"  # fp32 master weights (the recipe) | bf16 (the article's ablation)
    time_limit_minutes: float = ranged(0.0, ge=0)  # >0: end the run (final checkpoint) after this much wall time
    activation_checkpointing: bool = False
    compile: bool | None = None  # regional torch.compile; None: on for CUDA, off on CPU (measured slower there)
    # Scale-out past one node (`training/parallel.py`): HSDP replicas (1: FSDP over every rank; N: N replicas
    # each sharding over world/N ranks; node: one replica per node), the gradients' reduce dtype, how many
    # last blocks keep their gathered weights from forward to backward, and FP8 matmuls (torchao).
    replicate: Union[int, str] = field(default=1, metadata={"check": _check_replicate})  # int >= 1 | node
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    keep_gathered_blocks: int = ranged(1, ge=0)
    fp8: Literal[False, "tensorwise", "rowwise"] = False
    fp8_emulate: bool = False  # torchao's FP8 emulation (same rounding, no speed-up): the only FP8 off FP8 GPUs


@dataclass
class EvalConfig:
    every: int = ranged(0, ge=0)  # periodic evaluation during training (0: off)
    metrics: list[str] = field(default_factory=lambda: ["adherence"])  # fid cmmd dino_mmd fd_dino clip_score fd_tiny adherence
    num: int = ranged(32, ge=1)  # generated images per evaluation
    steps: int = ranged(50, ge=1)
    cfg: float = ranged(3.5, ge=0)
    guidance: GUIDANCE.choices | None = None  # None: the run's sample.guidance
    seed: int = seed_field()
    batch_size: int = ranged(32, ge=1)
    ref_num: int = ranged(1000, ge=1)  # reference images (statistics cached in cache_dir)
    cache_dir: str | None = None  # None: ~/.cache/daybreak/refstats
    inception_path: str | None = None  # pt_inception-2015-12-05 weights (FID)
    clip_path: str | None = None  # openai/clip-vit-large-patch14-336 (CMMD, CLIP score)
    dino_path: str | None = None  # facebook/dinov2-with-registers-large (DINO-MMD, FD-DINO)
    dino_resolution: int = ranged(518, ge=1)


def _check_bins(key: str, b: list[float]) -> None:
    if len(b) != 2 or not 0.0 <= b[0] < b[1] <= 1.0:
        raise UserError(f"config key '{key}' must be [lo, hi] with 0 <= lo < hi <= 1, got {b}")


@dataclass
class ValConfig:
    """The validation loss per noise bin (`daybreak.training.validation`): every `every` steps (0: off),
    the flow loss of `num` held-out examples at a fixed t per bin and fixed noise, keyed on `seed`."""

    every: int = ranged(0, ge=0)
    num: int = ranged(64, ge=1)  # held-out examples: the last `num` of the training source (then not trained on)
    data: DataConfig | None = None  # another source for them (same keys as `data`); its first `num`
    bins: list[list[float]] = field(default_factory=lambda: [[0.0, 0.3], [0.3, 0.6], [0.6, 1.0]],
                                    metadata={"check": _check_bins})
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


@dataclass
class _RunSections:
    seed: int = seed_field()
    init_from: str | None = None  # a checkpoint, run directory or diffusers folder whose weights (and EMA) start this run
    init_optimizer: bool = False  # also take init_from's optimizer state
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    log: LogConfig = field(default_factory=LogConfig)


@dataclass
class Config(IngredientSections, _RunSections):
    """The whole config: the run-level keys and one section per concern, then the recipe's ingredient
    sections (`daybreak.recipe.IngredientSections`), then eval and val. A dataclass collects its bases'
    fields in reverse method-resolution order, so the sections keep that order in a resolved config."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    val: ValConfig = field(default_factory=ValConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


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
    if origin is Literal:  # a choice: a registry's names (`schema.Registry.choices`) or a fixed few
        options = typing.get_args(tp)
        for option in options:
            try:
                v = _check(type(option), value, key)
            except UserError:
                continue
            if v == option:
                return option
        shown = ", ".join(str(o).lower() if isinstance(o, bool) else str(o) for o in options)
        raise UserError(f"config key '{key}' must be one of {shown}; got '{value}'")
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


def validate(cfg: Config) -> None:
    """Every field's own check (`schema.check_fields`), then what spans fields: the batch split, the data
    paths, the validation bins, the wandb extra, and the enabled ingredients' checks (`recipe.check`)."""
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if f.name in recipe.INGREDIENTS:  # an ingredient's section is checked when it is enabled
            continue
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{f.name}.")
        elif "check" in f.metadata:
            f.metadata["check"](f.name, value)
    t = cfg.train
    if t.global_batch % t.micro_batch:
        raise UserError(
            f"train.global_batch ({t.global_batch}) must be a multiple of train.micro_batch ({t.micro_batch}) × world size"
        )
    if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
        raise UserError("config key 'log.wandb'=true needs the wandb extra: pip install 'daybreak[wandb]' "
                        "(or uv sync --extra wandb)")
    cfg.data.check("data")
    if not cfg.val.bins:
        raise UserError("config key 'val.bins' needs at least one [lo, hi] bin")
    if cfg.val.data is not None:
        cfg.val.data.check("val.data")
    recipe.check(cfg)


def field_bounds(key: str) -> tuple:
    """(lower, upper) bounds of a ranged config key such as `sample.cfg` (for CLI options standing for it)."""
    section, name = key.split(".")
    cls = _section(typing.get_type_hints(Config)[section])
    check = next(f.metadata["check"] for f in dataclasses.fields(cls) if f.name == name)
    return check.bounds
