"""`daybreak ablate STUDY.yaml`: a baseline and named variants, trained and measured the same way.

A study file names one base config, overrides common to every run, the metrics, and an ordered
list of variants, each a few dotted overrides on top (same data, seed and steps unless a variant
changes them on purpose). Each variant trains into `<out>/<name>/`; then its final checkpoint and
every kept step checkpoint are evaluated (the metric-vs-step curve), and the training throughput
is read from its metrics.jsonl. `<out>/<name>/result.json` is written last, so a study re-run
skips finished variants and resumes an interrupted one from its newest checkpoint.

Seeds (`seeds: N` in the study, or `daybreak ablate --seeds N`): every variant is trained and
evaluated N times, with `seed` and `eval.seed` moved by 0 … N − 1 from the config's values; seed
offset 0 is `<out>/<name>/`, offset k is `<out>/<name>.seed<k>/` (an `init_from` variant starts from
the same offset of its source). A variant runs all its seeds before the next variant starts, so a
study cut short has complete spreads for the variants it reached. The report averages the seeds and
shows their standard deviation.

Variant keys: `name`, `about` (one line for the report), `config` (its own config, a path or a
bundled name such as `ablations/muon`; default the study's), `overrides` (dotted key → value),
`needs` (why it cannot run here: skipped, but listed), `compare_to` (the run its Δ is against;
default the study's baseline), `init_from` (another variant whose final checkpoint it starts from,
e.g. an SFT phase), `article` (the published numbers, printed beside the measured ones).
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from daybreak.config import read_mapping
from daybreak.errors import UserError
from daybreak.io.store import check_output, write_json
from daybreak.evaluate.run import Evaluator, evaluate_checkpoint, parse_metrics
from daybreak.recipe import INGREDIENTS, enabled

STUDY_KEYS = {"name", "about", "config", "out", "overrides", "metrics", "primary", "num", "curve", "baseline",
              "article_scale", "variants", "seeds"}
VARIANT_KEYS = {"name", "about", "config", "overrides", "needs", "compare_to", "init_from", "article"}


@dataclass
class Variant:
    name: str
    about: str = ""
    config: str | None = None
    overrides: dict = field(default_factory=dict)
    needs: str | None = None
    compare_to: str | None = None
    init_from: str | None = None
    article: dict = field(default_factory=dict)


@dataclass
class Study:
    name: str
    config: str | None
    out: Path
    metrics: list[str]
    primary: str
    num: int
    variants: list[Variant]
    baseline: str
    overrides: dict = field(default_factory=dict)
    curve: bool = True
    about: str = ""
    article_scale: str = ""
    seeds: int = 1

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise UserError(f"study {self.name}: no variant named '{name}'")

    def reference_of(self, v: Variant) -> str:
        return v.compare_to or self.baseline

    def config_of(self, v: Variant) -> str:
        return v.config or self.config


def _as_override(key: str, value) -> str:
    """`key=value` in the syntax `daybreak train` parses back (YAML flow style for the value)."""
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return f"{key}={text.removesuffix(chr(10) + '...')}"


def _config_path(study_file: Path, config: str) -> str:
    """A config named in a study: a path relative to the study file, else a bundled config name."""
    return os.path.relpath(study_file.parent / config) if (study_file.parent / config).is_file() else config


def load_study(path: str | os.PathLike) -> Study:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"study file '{path}' not found")
    raw = read_mapping(p, "a study must be a mapping (name, config, out, variants)")
    unknown = set(raw) - STUDY_KEYS
    if unknown:
        raise UserError(f"{p}: unknown study key '{sorted(unknown)[0]}' (known: {', '.join(sorted(STUDY_KEYS))})")
    for key in ("name", "out", "variants"):
        if key not in raw:
            raise UserError(f"{p}: the study needs '{key}'")
    if not isinstance(raw["variants"], list) or not isinstance(raw.get("overrides") or {}, dict):
        raise UserError(f"{p}: 'variants' must be a list of variants and 'overrides' a mapping of key: value")
    variants = []
    for i, v in enumerate(raw["variants"]):
        if not isinstance(v, dict) or "name" not in v:
            raise UserError(f"{p}: variants[{i}] needs a name")
        bad = set(v) - VARIANT_KEYS
        if bad:
            raise UserError(f"{p}: variant '{v['name']}': unknown key '{sorted(bad)[0]}'")
        if not isinstance(v.get("overrides") or {}, dict):
            raise UserError(f"{p}: variant '{v['name']}': 'overrides' must be a mapping of key: value")
        if v.get("config") is None and "config" not in raw:
            raise UserError(f"{p}: variant '{v['name']}' needs a config (or give the study one)")
        variants.append(Variant(**{**v, "config": _config_path(p, v["config"]) if v.get("config") else None}))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise UserError(f"{p}: variant names must be unique")
    config = _config_path(p, raw["config"]) if "config" in raw else None
    metrics = parse_metrics(raw.get("metrics", ["adherence"]))
    study = Study(name=raw["name"], config=config, out=Path(raw["out"]), metrics=metrics,
                  primary=raw.get("primary", metrics[0]), num=raw.get("num", 64), variants=variants,
                  baseline=raw.get("baseline", names[0]), overrides=raw.get("overrides") or {},
                  curve=raw.get("curve", True), about=raw.get("about", ""),
                  article_scale=raw.get("article_scale", ""), seeds=raw.get("seeds", 1))
    if not isinstance(study.seeds, int) or isinstance(study.seeds, bool) or study.seeds < 1:
        raise UserError(f"{p}: 'seeds' must be a positive integer, got {study.seeds!r}")
    for v in variants:
        for ref in (study.reference_of(v), v.init_from):
            if ref is not None:
                study.variant(ref)
    return study


def run_dir(study: Study, name: str, offset: int = 0) -> Path:
    """Where variant `name` trains with seed offset `offset`."""
    return study.out / (name if offset == 0 else f"{name}.seed{offset}")


def seed_runs(study_dir: Path, name: str) -> list[Path]:
    """The run directories of variant `name` that exist under `study_dir`, seed offset 0 first."""
    found = [(int(p.name.rsplit(".seed", 1)[1]), p) for p in study_dir.glob(f"{name}.seed*")
             if p.name.rsplit(".seed", 1)[1].isdigit()]
    return [p for p in [study_dir / name, *(p for _, p in sorted(found))] if p.is_dir()]


def variant_overrides(study: Study, v: Variant, offset: int = 0) -> list[str]:
    items = [_as_override(k, val) for k, val in {**study.overrides, **v.overrides}.items()]
    if offset:
        from daybreak.config import load_config

        base = load_config(study.config_of(v), items)
        items += [f"seed={base.seed + offset}", f"eval.seed={base.eval.seed + offset}"]
    name = v.name if offset == 0 else f"{v.name}.seed{offset}"
    items += [f"run.dir={run_dir(study, v.name, offset)}", f"run.name={name}"]
    if v.init_from:
        items.append(f"init_from={run_dir(study, v.init_from, offset) / 'final'}")
    return items


def commands(study: Study) -> list[str]:
    """The shell commands a cluster would run, one train + one eval per runnable variant."""
    lines = []
    for offset in range(study.seeds):
        for v in study.variants:
            if v.needs:
                if offset == 0:
                    lines.append(f"# {v.name}: skipped, needs {v.needs}")
                continue
            where = run_dir(study, v.name, offset)
            lines.append(f"# {where.name}" + (f": {v.about}" if v.about else ""))
            lines.append(shlex.join(["daybreak", "train", study.config_of(v), *variant_overrides(study, v, offset)]))
            lines.append(shlex.join(["daybreak", "eval", str(where / "final"), "--metrics", ",".join(study.metrics),
                                     "--num", str(study.num), "--out", str(where / "eval" / "final.json")]))
    return lines


# metric → the eval.* key of the pretrained network it needs
METRIC_WEIGHTS = {"fid": "eval.inception_path", "cmmd": "eval.clip_path", "clip_score": "eval.clip_path",
                  "dino_mmd": "eval.dino_path", "fd_dino": "eval.dino_path"}


def pretrained_paths(cfg, metrics: list[str]) -> dict[str, str | None]:
    """{config key: path} of every pretrained part a run of `cfg` scored with `metrics` loads, and its data."""
    keys = [METRIC_WEIGHTS[m] for m in metrics if m in METRIC_WEIGHTS]
    if cfg.text.kind != "demo":
        keys.append("text.path")
    if cfg.space.kind == "latents":
        keys.append("space.vae_path")
    out = {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in keys}
    for name in enabled(cfg):
        out |= INGREDIENTS[name].pretrained(getattr(cfg, name))
    if cfg.data.source != "shapes":
        out["data.path"] = cfg.data.path
    return out


def check_study(study: Study, log=print) -> list[tuple[str, str | None, bool, list[str]]]:
    """`daybreak ablate --check`: every pretrained weight (and data path) the study's variants need, with
    the config key to set and whether the path exists; rows (key, path, exists, variants)."""
    from daybreak.config import load_config

    needed: dict[tuple[str, str | None], list[str]] = {}
    for v in study.variants:
        cfg = load_config(study.config_of(v), variant_overrides(study, v))
        for key, path in pretrained_paths(cfg, study.metrics).items():
            needed.setdefault((key, path), []).append(v.name + (" (skipped)" if v.needs else ""))
    rows = [(key, path, path is not None and Path(path).exists(), names) for (key, path), names in needed.items()]
    width = max((len(k) for k, *_ in rows), default=0)
    for key, path, ok, names in rows:
        state = "ok" if ok else ("NOT SET" if path is None else "MISSING")
        log(f"{state:8} {key:{width}}  {path if path is not None else '-'}   ({', '.join(names)})")
    return rows


def throughput(run_dir: Path, global_batch: int) -> dict[str, float] | None:
    """Median images/s over the logged windows, without the first (start-up, compilation)."""
    from daybreak.training.logger import read_metrics

    rates = [r["images_per_s"] for r in read_metrics(run_dir) if "images_per_s" in r]
    rates = rates[1:] if len(rates) > 1 else rates
    if not rates:
        return None
    ips = statistics.median(rates)
    return {"images_per_s": ips, "batches_per_s": ips / global_batch}


def _cached_eval(ckpt: Path, out: Path, study: Study, evaluator: Evaluator, cache_dir: Path, grid: bool) -> dict:
    """A checkpoint's eval JSON, computed unless one with these metrics and count already exists."""
    if out.is_file():
        old = json.loads(out.read_text())
        if set(study.metrics) <= set(old["metrics"]) and old["num"] == study.num:
            return old
    return evaluate_checkpoint(ckpt, study.metrics, num=study.num, out=out, evaluator=evaluator,
                               cache_dir=cache_dir, grid=grid)


def run_variant(study: Study, v: Variant, log=print, offset: int = 0) -> dict:
    from daybreak.config import load_config
    from daybreak.io import checkpoint as ck
    from daybreak.run import train

    run_dir_ = run_dir(study, v.name, offset)
    cfg = load_config(study.config_of(v), variant_overrides(study, v, offset))
    if v.init_from and not (run_dir(study, v.init_from, offset) / "final").is_dir():
        raise UserError(f"variant {v.name} starts from {v.init_from}, which has not finished")
    train_s = None
    if not (run_dir_ / "final").is_dir():
        log(f"[{study.name}] training {run_dir_.name}")
        t0 = time.perf_counter()
        final = train(cfg, progress=False)
        train_s = time.perf_counter() - t0
        if final.name != "final":
            raise UserError(f"variant {v.name} stopped early at {final}; run the study again to resume it")
    log(f"[{study.name}] evaluating {run_dir_.name}")
    cache_dir = study.out / "refstats"
    evaluator = Evaluator(cfg, study.metrics, num=study.num, cache_dir=cache_dir)
    final_eval = _cached_eval(run_dir_ / "final", run_dir_ / "eval" / "final.json", study, evaluator, cache_dir, True)
    curve = []
    if study.curve:
        steps = sorted(p for p in (run_dir_ / "checkpoints").glob("step_*") if ck.STEP_RE.match(p.name)
                       and int(ck.STEP_RE.match(p.name).group(1)) != final_eval["step"])
        for p in steps:
            e = _cached_eval(p, run_dir_ / "eval" / f"{p.name}.json", study, evaluator, cache_dir, False)
            curve.append({"step": e["step"], **e["metrics"]})
    curve.append({"step": final_eval["step"], **final_eval["metrics"]})
    result = {"variant": v.name, "seed": cfg.seed, "metrics": final_eval["metrics"], "step": final_eval["step"],
              "throughput": throughput(run_dir_, cfg.train.global_batch), "train_s": train_s,
              "grid": final_eval.get("grid"), "curve": curve}
    write_json(run_dir_ / "result.json", result)
    return result


def run_study(study_yaml: str | os.PathLike, *, dry_run: bool = False, only: list[str] | None = None,
              seeds: int | None = None, log=print) -> Path:
    """Run (or with dry_run, print the commands of) every variant not yet finished, `seeds` times (default:
    the study's `seeds`); returns the study dir."""
    study = load_study(study_yaml)
    if seeds is not None:
        if seeds < 1:
            raise UserError(f"--seeds must be a positive integer, got {seeds}")
        study.seeds = seeds
    if dry_run:
        print("\n".join(commands(study)))
        return study.out
    check_output(study.out, directory=True, force=True)  # a file in the way, a parent that is a file
    if study.out.is_dir() and any(study.out.iterdir()) and not (study.out / "study.yaml").is_file():
        raise UserError(f"the study's out '{study.out}' is not empty and holds no study (no study.yaml); "
                        "give a new or empty folder")
    study.out.mkdir(parents=True, exist_ok=True)
    (study.out / "study.yaml").write_text(Path(study_yaml).read_text())
    for v in study.variants:
        for offset in range(study.seeds):
            if only and v.name not in only:
                continue
            if v.needs:
                if offset == 0:
                    log(f"[{study.name}] skip {v.name}: needs {v.needs}")
                continue
            where = run_dir(study, v.name, offset)
            if (where / "final").is_dir() and (where / "result.json").is_file():
                log(f"[{study.name}] {where.name}: finished earlier")
                continue
            t0 = time.perf_counter()
            run_variant(study, v, log, offset)
            log(f"[{study.name}] {where.name}: done in {time.perf_counter() - t0:.0f} s")
    return study.out
