"""`daybreak ablate STUDY.yaml`: a baseline and named variants, trained and measured the same way.

A study file names one base config, overrides common to every run, the metrics, and an ordered
list of variants, each a few dotted overrides on top (same data, seed and steps unless a variant
changes them on purpose). Each variant trains into `<out>/<name>/`; then its final checkpoint and
every kept step checkpoint are evaluated (the metric-vs-step curve), and the training throughput
is read from its metrics.jsonl. `<out>/<name>/result.json` is written last, so a study re-run
skips finished variants and resumes an interrupted one from its newest checkpoint.

Variant keys: `name`, `about` (one line for the report), `overrides` (dotted key → value),
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

from daybreak.errors import UserError
from daybreak.io.store import write_json
from daybreak.evaluate.run import Evaluator, evaluate_checkpoint, parse_metrics

STUDY_KEYS = {"name", "about", "config", "out", "overrides", "metrics", "primary", "num", "curve", "baseline",
              "article_scale", "variants"}
VARIANT_KEYS = {"name", "about", "overrides", "needs", "compare_to", "init_from", "article"}


@dataclass
class Variant:
    name: str
    about: str = ""
    overrides: dict = field(default_factory=dict)
    needs: str | None = None
    compare_to: str | None = None
    init_from: str | None = None
    article: dict = field(default_factory=dict)


@dataclass
class Study:
    name: str
    config: str
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

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise UserError(f"study {self.name}: no variant named '{name}'")

    def reference_of(self, v: Variant) -> str:
        return v.compare_to or self.baseline


def _as_override(key: str, value) -> str:
    """`key=value` in the syntax `daybreak train` parses back (YAML flow style for the value)."""
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return f"{key}={text.removesuffix(chr(10) + '...')}"


def load_study(path: str | os.PathLike) -> Study:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"study file '{path}' not found")
    raw = yaml.safe_load(p.read_text()) or {}
    unknown = set(raw) - STUDY_KEYS
    if unknown:
        raise UserError(f"{p}: unknown study key '{sorted(unknown)[0]}' (known: {', '.join(sorted(STUDY_KEYS))})")
    for key in ("name", "config", "out", "variants"):
        if key not in raw:
            raise UserError(f"{p}: the study needs '{key}'")
    variants = []
    for i, v in enumerate(raw["variants"]):
        if not isinstance(v, dict) or "name" not in v:
            raise UserError(f"{p}: variants[{i}] needs a name")
        bad = set(v) - VARIANT_KEYS
        if bad:
            raise UserError(f"{p}: variant '{v['name']}': unknown key '{sorted(bad)[0]}'")
        variants.append(Variant(**v))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise UserError(f"{p}: variant names must be unique")
    config = raw["config"]
    if (p.parent / config).is_file():  # relative to the study file, else a bundled config name
        config = os.path.relpath(p.parent / config)
    metrics = parse_metrics(raw.get("metrics", ["adherence"]))
    study = Study(name=raw["name"], config=config, out=Path(raw["out"]), metrics=metrics,
                  primary=raw.get("primary", metrics[0]), num=raw.get("num", 64), variants=variants,
                  baseline=raw.get("baseline", names[0]), overrides=raw.get("overrides") or {},
                  curve=raw.get("curve", True), about=raw.get("about", ""),
                  article_scale=raw.get("article_scale", ""))
    for v in variants:
        for ref in (study.reference_of(v), v.init_from):
            if ref is not None:
                study.variant(ref)
    return study


def variant_overrides(study: Study, v: Variant) -> list[str]:
    items = [_as_override(k, val) for k, val in {**study.overrides, **v.overrides}.items()]
    items += [f"run.dir={study.out / v.name}", f"run.name={v.name}"]
    if v.init_from:
        items.append(f"init_from={study.out / v.init_from / 'final'}")
    return items


def commands(study: Study) -> list[str]:
    """The shell commands a cluster would run, one train + one eval per runnable variant."""
    lines = []
    for v in study.variants:
        if v.needs:
            lines.append(f"# {v.name}: skipped, needs {v.needs}")
            continue
        run_dir = study.out / v.name
        lines.append(f"# {v.name}" + (f": {v.about}" if v.about else ""))
        lines.append(shlex.join(["daybreak", "train", study.config, *variant_overrides(study, v)]))
        lines.append(shlex.join(["daybreak", "eval", str(run_dir / "final"), "--metrics", ",".join(study.metrics),
                                 "--num", str(study.num), "--out", str(run_dir / "eval" / "final.json")]))
    return lines


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


def run_variant(study: Study, v: Variant, log=print) -> dict:
    from daybreak.config import load_config
    from daybreak.io import checkpoint as ck
    from daybreak.run import train

    run_dir = study.out / v.name
    cfg = load_config(study.config, variant_overrides(study, v))
    if v.init_from and not (study.out / v.init_from / "final").is_dir():
        raise UserError(f"variant {v.name} starts from {v.init_from}, which has not finished")
    train_s = None
    if not (run_dir / "final").is_dir():
        log(f"[{study.name}] training {v.name}")
        t0 = time.perf_counter()
        final = train(cfg, progress=False)
        train_s = time.perf_counter() - t0
        if final.name != "final":
            raise UserError(f"variant {v.name} stopped early at {final}; run the study again to resume it")
    log(f"[{study.name}] evaluating {v.name}")
    cache_dir = study.out / "refstats"
    evaluator = Evaluator(cfg, study.metrics, num=study.num, cache_dir=cache_dir)
    final_eval = _cached_eval(run_dir / "final", run_dir / "eval" / "final.json", study, evaluator, cache_dir, True)
    curve = []
    if study.curve:
        steps = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if ck.STEP_RE.match(p.name)
                       and int(ck.STEP_RE.match(p.name).group(1)) != final_eval["step"])
        for p in steps:
            e = _cached_eval(p, run_dir / "eval" / f"{p.name}.json", study, evaluator, cache_dir, False)
            curve.append({"step": e["step"], **e["metrics"]})
    curve.append({"step": final_eval["step"], **final_eval["metrics"]})
    result = {"variant": v.name, "metrics": final_eval["metrics"], "step": final_eval["step"],
              "throughput": throughput(run_dir, cfg.train.global_batch), "train_s": train_s,
              "grid": final_eval.get("grid"), "curve": curve}
    write_json(run_dir / "result.json", result)
    return result


def run_study(study_yaml: str | os.PathLike, *, dry_run: bool = False, only: list[str] | None = None,
              log=print) -> Path:
    """Run (or with dry_run, print the commands of) every variant not yet finished; returns the study dir."""
    study = load_study(study_yaml)
    if dry_run:
        print("\n".join(commands(study)))
        return study.out
    study.out.mkdir(parents=True, exist_ok=True)
    (study.out / "study.yaml").write_text(Path(study_yaml).read_text())
    for v in study.variants:
        if only and v.name not in only:
            continue
        if v.needs:
            log(f"[{study.name}] skip {v.name}: needs {v.needs}")
            continue
        done = (study.out / v.name / "final").is_dir() and (study.out / v.name / "result.json").is_file()
        if done:
            log(f"[{study.name}] {v.name}: finished earlier")
            continue
        t0 = time.perf_counter()
        run_variant(study, v, log)
        log(f"[{study.name}] {v.name}: done in {time.perf_counter() - t0:.0f} s")
    return study.out
