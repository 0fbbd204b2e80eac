"""`daybreak` command line. Each subcommand parses its arguments and calls one function elsewhere.

A `UserError` anywhere becomes one line on stderr and exit code 2; nothing a user can get wrong
ends in a traceback.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from daybreak.errors import Stopped, UserError


def _cmd_demo(a: argparse.Namespace) -> None:
    from daybreak.demo import run_demo

    run_demo(out=a.out, minutes=a.minutes, overrides=a.overrides, allow_changed=a.allow_changed)


def _cmd_train(a: argparse.Namespace) -> None:
    from daybreak.config import load_config
    from daybreak.run import train

    cfg = load_config(a.config, a.overrides)
    final = train(cfg, progress=not a.no_progress, allow_changed=a.allow_changed)
    if os.environ.get("RANK", "0") == "0":
        print(f"wrote {final}")
        _report_drawn(Path(cfg.run.dir))
        _report_skipped(Path(cfg.run.dir))


def _report_drawn(run_dir: Path) -> None:
    """A mix's end-of-training line: the samples drawn from each entry, and their shares."""
    from daybreak.training.logger import read_metrics

    rows = [r for r in read_metrics(run_dir) if any(k.startswith("data/") for k in r)]
    if rows:
        drawn = {k.split("/", 1)[1]: int(v) for k, v in rows[-1].items() if k.startswith("data/")}
        total = sum(drawn.values()) or 1
        print("samples drawn per data.mix entry: " + ", ".join(
            f"{name} {n} ({100 * n / total:.1f} %)" for name, n in drawn.items()))


def _report_skipped(run_dir: Path) -> None:
    """Bad samples are skipped, never silently: say how many and why."""
    from daybreak.training.logger import read_metrics

    rows = [r for r in read_metrics(run_dir) if "skipped/total" in r]
    replaced = {k: v for k, v in rows[-1].items() if k.startswith("replaced/") and v} if rows else {}
    if rows and (rows[-1]["skipped/total"] or replaced):
        last = rows[-1]
        why = ", ".join(f"{k.split('/', 1)[1]} {int(v)}" for k, v in last.items()
                        if k.startswith("skipped/") and k != "skipped/total" and v)
        why = ", ".join(x for x in (why, ", ".join(f"{k.split('/', 1)[1]} {int(v)} (failed to decode)"
                                                 for k, v in replaced.items())) if x)
        total = int(last["skipped/total"] + sum(replaced.values()))
        print(f"skipped {total} samples ({why}); see the warnings above for the first paths")


def _data_config(src: str, overrides: list[str]) -> Any:
    """The config `data convert|inspect SRC` names (a YAML file, a bundled name, or any SRC given
    key=value overrides), loaded; None when SRC is a data path."""
    from daybreak.config import load_config, resolve_config_path

    if not overrides and Path(src).suffix not in (".yaml", ".yml"):
        if Path(src).exists() or "://" in src:
            return None
        try:
            resolve_config_path(src)
        except UserError:
            return None
    return load_config(src, list(overrides))


def _cmd_data(a: argparse.Namespace) -> None:
    import json

    from daybreak.data import tools

    if a.data_command == "convert":
        print(json.dumps(tools.convert(a.src, a.out, format=a.format, shard_size=a.shard_size, force=a.force,
                                       source=a.source, cfg=_data_config(a.src, a.overrides))))
    elif a.data_command == "inspect":
        from daybreak.io.store import check_output

        cfg = _data_config(a.path, a.overrides)
        out = Path(a.out) if a.out is not None else Path(str(a.path).rstrip("/").removesuffix(".yaml") + "-inspect")
        check_output(out, directory=True, force=True)
        for folder in [out, *(out / e.name for e in (cfg.data.mix if cfg is not None else []))]:
            for name in ("inspect.json", "contact_sheet.png"):  # other files in OUT are left alone
                check_output(folder / name, directory=False, force=a.force)
        print(json.dumps(tools.inspect(a.path, a.source, out=out, limit=a.limit, cfg=cfg), indent=2))
    else:
        if not 0 <= a.rank < a.world_size:
            raise UserError(f"--rank must be in [0, --world-size), got {a.rank} of {a.world_size}")
        print(json.dumps(tools.bench(a.source, a.path, seconds=a.seconds, batch_size=a.batch, resolution=a.resolution,
                                     num_workers=a.workers, world_size=a.world_size, rank=a.rank)))


def _read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    prompts = list(prompts)
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise UserError(f"--prompts-file '{prompts_file}' not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"--prompts-file '{prompts_file}' is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError("give a prompt with --prompt TEXT or --prompts-file FILE")
    if any(not p.strip() for p in prompts):
        raise UserError("prompts must not be empty")
    return prompts


def _cmd_sample(a: argparse.Namespace) -> None:
    from daybreak.pipeline import save_samples

    written = save_samples(a.ckpt, _read_prompts(a.prompt, a.prompts_file), a.out, seed=a.seed, steps=a.steps,
                           cfg=a.cfg, guidance=a.guidance, sampler=a.sampler, size=a.size, batch=a.batch,
                           force=a.force, captions=a.captions, progress=True)
    if len(written) == 1:  # --out named a file
        print(f"wrote {written[0]}")
    else:
        print(f"wrote {len(written) - 1} images and grid.png to {written[0].parent}")


def _cmd_cache(a: argparse.Namespace) -> None:
    from daybreak.precompute import cache_latents, cache_text
    from daybreak.config import load_config

    cfg = load_config(a.config, a.overrides)
    if a.cache_command == "latents":
        print(f"cached {cache_latents(cfg, progress=not a.no_progress)} new latents in {cfg.space.cache_dir}")
    else:
        print(f"cached {cache_text(cfg, progress=not a.no_progress)} new captions in {cfg.text.cache_dir}")


def _cmd_convert(a: argparse.Namespace) -> None:
    from daybreak.io.checkpoint import convert_checkpoint

    print(f"wrote {convert_checkpoint(a.ckpt, a.out, force=a.force)}")


def _cmd_bench(a: argparse.Namespace) -> None:
    from daybreak.bench.harness import run_bench
    from daybreak.config import load_config

    run_bench(load_config(a.config, a.overrides), a.steps, a.warmup)


def _cmd_plan(a: argparse.Namespace) -> None:
    from daybreak.bench.plan import compare, format_compare, format_json, format_plan, plan
    from daybreak.config import load_config

    configs = [load_config(c) for c in a.configs]
    if a.compare:
        print(format_compare(compare(configs, a.gpus, a.gpu, a.price, a.mfu), a.gpus, a.gpu, a.mfu))
        return
    result = plan(configs, a.gpus, a.gpu, a.price, a.mfu)
    print(format_json(result) if a.json else format_plan(result))


def _cmd_eval(a: argparse.Namespace) -> None:
    import json

    from daybreak.evaluate.run import default_eval_path, evaluate_checkpoint
    from daybreak.io.checkpoint import check_checkpoint
    from daybreak.io.store import check_output

    out = Path(a.out) if a.out else default_eval_path(check_checkpoint(a.ckpt))
    for path in (out, out.with_name(f"{out.stem}_grid.png")):
        check_output(path, directory=False, force=a.force)
    result = evaluate_checkpoint(a.ckpt, a.metrics, data=a.data, num=a.num, out=out, seed=a.seed, steps=a.steps,
                                 scale=a.cfg, guidance=a.guidance, ema=not a.no_ema)
    print(json.dumps(result, indent=2))


def _cmd_config(a: argparse.Namespace) -> None:
    import yaml

    from daybreak.config import changed_keys, load_config

    cfg = load_config(a.config, a.overrides)  # checked like `daybreak train` would, nothing built or loaded
    if a.diff is None:
        sys.stdout.write(cfg.to_yaml())
        return
    other = load_config(a.diff)
    mine = a.config + (" " + " ".join(a.overrides) if a.overrides else "")
    names = (mine, a.diff) if mine != a.diff else ("CONFIG", "OTHER")
    changed = changed_keys(cfg.to_dict(), other.to_dict())
    sys.stdout.write(yaml.safe_dump({k: {names[0]: va, names[1]: vb} for k, (va, vb) in changed.items()},
                                    sort_keys=False, width=10**6, allow_unicode=True) if changed else "")


def _cmd_ablate(a: argparse.Namespace) -> None:
    from daybreak.study.ablate import check_study, load_study, run_study
    from daybreak.study.report import build_report

    if a.check:
        rows = check_study(load_study(a.study))
        runnable = [r for r in rows if any(not n.endswith("(skipped)") for n in r[3])]  # skipped variants don't run
        missing = [key for key, _, ok, _ in runnable if not ok]
        if missing:
            raise UserError(f"{len(missing)} of {len(runnable)} pretrained weights or data paths the runnable variants "
                            f"need are missing or not set: set {', '.join(dict.fromkeys(missing))} "
                            "(in the configs or the study's overrides)")
        print(f"the runnable variants need {len(runnable)} pretrained weights or data paths; all exist")
        return

    study_dir = run_study(a.study, dry_run=a.print, only=a.only or None, seeds=a.seeds)
    if not a.print:
        print(f"report: {build_report(study_dir)}")


def _cmd_report(a: argparse.Namespace) -> None:
    from daybreak.io.store import check_output
    from daybreak.study.report import build_report

    if a.out:  # the default, STUDY_DIR/report.md, is the study's own and rewritten with it
        out = Path(a.out)
        for path in (out, out.with_suffix(".html"), out.with_name(f"{out.stem}-curves.png"),
                     out.with_name(f"{out.stem}-samples.png")):
            check_output(path, directory=False, force=a.force)
    print(build_report(a.study_dir, a.out))


def _cmd_export(a: argparse.Namespace) -> None:
    from daybreak.export import export

    export(a.ckpt, a.out, ema=not a.no_ema, drop_sprint_fusion=a.drop_sprint_fusion)


def _cmd_import(a: argparse.Namespace) -> None:
    from daybreak.export import import_diffusers

    print(f"wrote {import_diffusers(a.src, a.out)}")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (the usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(lo: int):
    """An argparse type: an integer >= lo."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        if value > 2**63 - 1:  # torch's int64: an overflow deep inside otherwise
            raise argparse.ArgumentTypeError(f"must be at most 2**63 - 1, got {value}")
        return value
    parse.__name__ = f"integer >= {lo}"
    return parse


def _number(lo: float | None = None, hi: float | None = None, *, open_lo: bool = False, key: str | None = None):
    """An argparse type: a finite number within [lo, hi] ((lo, hi] with `open_lo`), or the range of config
    key `key` (the option then follows the rule of the key it stands for, e.g. --cfg and sample.cfg)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if key is not None:
            from daybreak.config import field_bounds
            from daybreak.schema import check_range

            try:
                check_range(key, value, *field_bounds(key))
            except UserError as e:
                raise argparse.ArgumentTypeError(f"must {str(e).split(' must ', 1)[1]} (as {key})") from None
        elif (lo is not None and (value <= lo if open_lo else value < lo)) or (hi is not None and value > hi):
            span = f"{'(' if open_lo else '['}{lo:g}, {hi:g}]" if hi is not None else f"{'>' if open_lo else '>='} {lo:g}"
            raise argparse.ArgumentTypeError(f"must be {'in ' if hi is not None else ''}{span}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


def _seed(text: str) -> int:
    """An argparse type: a seed every generator takes (see schema.MAX_SEED)."""
    from daybreak.schema import MAX_SEED

    value = _count(0)(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be a seed in [0, {MAX_SEED}], got {value}")
    return value


def _keys(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


def build_parser() -> argparse.ArgumentParser:
    from daybreak.bench.plan import GPU_MEMORY
    from daybreak.data.sources import SOURCES
    from daybreak.data.tools import FORMATS
    from daybreak.diffusion.sampling import GUIDANCE, SAMPLERS

    p = _Parser(prog="daybreak", description="Train a text-to-image diffusion transformer from "
                                "scratch in a day, and measure every ingredient of the recipe.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="train the demo model on synthetic shapes (CPU, ~7 min) and score its prompt adherence")
    d.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    d.add_argument("--minutes", type=_number(0, open_lo=True), default=None,
                   help="scale the demo's fixed training steps to about M minutes of 2 idle CPU cores (the steps trained "
                        "are printed; the result never depends on the machine's speed)")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    d.add_argument("--allow-changed", type=_keys, action="extend", default=[], metavar="KEYS",
                   help="config keys (or sections) that may differ from the run already in the run directory, "
                   "comma-separated, e.g. train.steps: continue that run deliberately under the new values")
    d.set_defaults(fn=_cmd_demo)

    t = sub.add_parser("train", help="train from a YAML config (path or bundled name) with key=value overrides")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", metavar="key=value")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--allow-changed", type=_keys, action="extend", default=[], metavar="KEYS",
                   help="config keys (or sections) that may differ from the run already in the run directory, "
                   "comma-separated, e.g. train.steps: continue that run deliberately under the new values")
    t.set_defaults(fn=_cmd_train)

    cf = sub.add_parser("config", help="print the fully resolved config (what run.dir/config.yaml would hold) "
                        "and exit; loads no weights")
    cf.add_argument("config", help="a YAML path or a bundled name (e.g. ablations/muon)")
    cf.add_argument("overrides", nargs="*", metavar="key=value")
    cf.add_argument("--diff", metavar="OTHER", default=None,
                    help="print only the keys whose values differ from config OTHER's, as KEY: {CONFIG: value, OTHER: value}")
    cf.set_defaults(fn=_cmd_config)

    dp = sub.add_parser("data", help="convert, inspect and benchmark datasets")
    dsub = dp.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    c = dsub.add_parser("convert", help="any source (or each data.mix entry of a config) → webdataset | mds | hf "
                        "shards, read back to check")
    c.add_argument("src", help="a data path of kind --source, or a config (each data.mix entry goes to OUT/<name>)")
    c.add_argument("out")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (SRC a config)")
    c.add_argument("--source", default="imagefolder", choices=[x for x in SOURCES if x != "shapes"],
                   help="the kind of data at SRC (hf: a save_to_disk folder, parquet/arrow/json files, or a hub id)")
    c.add_argument("--format", choices=FORMATS, default="webdataset")
    c.add_argument("--shard-size", type=_count(1), default=1000)
    c.add_argument("--force", action="store_true", help="write into a non-empty OUT (mds: replaces its contents)")
    i = dsub.add_parser("inspect", help="counts, caption lengths, resolution/aspect histograms, contact sheet")
    i.add_argument("path", help="a data path of kind --source, or a config (each data.mix entry is inspected)")
    i.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (PATH a config)")
    i.add_argument("--source", default="imagefolder", choices=[x for x in SOURCES if x != "shapes"])
    i.add_argument("--out", default=None, help="folder for inspect.json and contact_sheet.png (default PATH-inspect)")
    i.add_argument("--limit", type=_count(1), default=2000)
    i.add_argument("--force", action="store_true", help="overwrite inspect.json and contact_sheet.png in OUT")
    b = dsub.add_parser("bench", help="images/s the data loader delivers")
    b.add_argument("source", choices=SOURCES)
    b.add_argument("path", nargs="?")
    b.add_argument("--seconds", type=_number(0, open_lo=True), default=10.0)
    b.add_argument("--batch", type=_count(1), default=16, help="images per rank per step")
    b.add_argument("--resolution", type=_count(1), default=512)
    b.add_argument("--workers", type=_count(0), default=2,
                   help="decoding worker processes (0: all of a rank's loading work in the timed main process)")
    b.add_argument("--world-size", type=_count(1), default=1, help="ranks sharing each global batch of batch × W")
    b.add_argument("--rank", type=_count(0), default=0, help="which rank's loader to run")
    dp.set_defaults(fn=_cmd_data)

    cp = sub.add_parser("cache", help="precompute VAE latents or text embeddings for a config's data")
    csub = cp.add_subparsers(dest="cache_command", required=True, metavar="CACHE_COMMAND")
    for name, what in (("latents", "VAE latents into space.cache_dir"), ("text", "text embeddings into text.cache_dir")):
        cc = csub.add_parser(name, help=what)
        cc.add_argument("config")
        cc.add_argument("overrides", nargs="*", metavar="key=value")
        cc.add_argument("--no-progress", action="store_true")
    cp.set_defaults(fn=_cmd_cache)

    s = sub.add_parser("sample", help="generate images from a checkpoint")
    s.add_argument("ckpt", help="checkpoint directory (runs/NAME/final or a step directory)")
    s.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    s.add_argument("--prompts-file", help="a text file with one prompt per line")
    s.add_argument("--out", required=True, help="x.png for one prompt, or DIR/ for one PNG per prompt + grid.png")
    s.add_argument("--seed", type=_seed, default=0, help="seed of the first prompt; prompt i uses seed + i")
    s.add_argument("--steps", type=_count(1), default=None)
    s.add_argument("--cfg", type=_number(key="sample.cfg"), default=None, help="guidance scale")
    s.add_argument("--guidance", choices=GUIDANCE, default=None)
    s.add_argument("--sampler", choices=SAMPLERS, default=None)
    s.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None)
    s.add_argument("--batch", type=_count(1), default=16, help="prompts per forward batch")
    s.add_argument("--force", action="store_true", help="overwrite an existing --out file or the PNGs in a non-empty DIR/")
    s.add_argument("--captions", action="store_true", help="write the prompts under the grid's images")
    s.set_defaults(fn=_cmd_sample)

    e = sub.add_parser("export", help="write a diffusers folder (PRXTransformer2DModel, scheduler, pipeline parts)")
    e.add_argument("ckpt")
    e.add_argument("out")
    e.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA ones")
    e.add_argument("--drop-sprint-fusion", action="store_true",
                   help="export a SPRINT model without its fusion layer (diffusers cannot hold it; outputs change)")
    e.set_defaults(fn=_cmd_export)

    ev = sub.add_parser("eval", help="generate with fixed seeds and compute metrics; prints and writes JSON")
    ev.add_argument("ckpt")
    ev.add_argument("--metrics", default=None, help="comma-separated: fid,cmmd,dino_mmd,fd_dino,clip_score,fd_tiny,adherence")
    ev.add_argument("--data", default=None, help="reference data: shapes, a folder of images, or KIND:PATH")
    ev.add_argument("--num", type=_count(1), default=None, help="images to generate")
    ev.add_argument("--out", default=None, help="JSON path (default RUN/eval/<ckpt>.json)")
    ev.add_argument("--seed", type=_seed, default=None)
    ev.add_argument("--steps", type=_count(1), default=None)
    ev.add_argument("--force", action="store_true", help="overwrite an existing --out JSON (and its grid)")
    ev.add_argument("--cfg", type=_number(key="eval.cfg"), default=None)
    ev.add_argument("--guidance", choices=GUIDANCE, default=None)
    ev.add_argument("--no-ema", action="store_true", help="score the raw weights instead of the EMA ones "
                    "(a run with ema.enabled=false always uses its raw weights)")
    ev.set_defaults(fn=_cmd_eval)

    ab = sub.add_parser("ablate", help="train and evaluate a study's baseline and variants, then write its report")
    ab.add_argument("study", help="a study YAML (e.g. studies/demo-ablations.yaml)")
    ab.add_argument("--print", action="store_true", help="print the training commands instead (for a cluster)")
    ab.add_argument("--only", action="append", default=[], metavar="NAME", help="run only these variants")
    ab.add_argument("--check", action="store_true", help="list every pretrained weight and data path the study "
                    "needs, with its config key and whether it exists; exit 2 when one is missing")
    ab.add_argument("--seeds", type=_count(1), default=None, metavar="N",
                    help="train and evaluate every variant with N seeds (default: the study's `seeds`, else 1)")
    ab.set_defaults(fn=_cmd_ablate)

    rp = sub.add_parser("report", help="Markdown + HTML report of a study directory")
    rp.add_argument("study_dir")
    rp.add_argument("--out", default=None, help="the report's .md path (default STUDY_DIR/report.md)")
    rp.add_argument("--force", action="store_true", help="overwrite an existing --out report (and its .html, PNGs)")
    rp.set_defaults(fn=_cmd_report)

    be = sub.add_parser("bench", help="time the training step; one JSON line (ms/step, images/s, FLOP/s, MFU, memory)")
    be.add_argument("config")
    be.add_argument("overrides", nargs="*", metavar="key=value")
    be.add_argument("--steps", type=_count(1), default=10)
    be.add_argument("--warmup", type=_count(0), default=3)
    be.set_defaults(fn=_cmd_bench)

    pl = sub.add_parser("plan", help="step time, hours, cost and per-GPU memory of each stage")
    pl.add_argument("configs", nargs="+", metavar="CONFIG")
    pl.add_argument("--gpus", type=_count(1), required=True)
    pl.add_argument("--gpu", default="h200", choices=list(GPU_MEMORY))
    pl.add_argument("--price", type=_number(0), default=2.0, help="$ per GPU-hour")
    pl.add_argument("--mfu", type=_number(0, 1, open_lo=True), default=0.4, help="assumed model-FLOP utilisation")
    pl.add_argument("--json", action="store_true", help="one JSON object per stage (every term), then the totals")
    pl.add_argument("--compare", action="store_true",
                    help="step time and hours under each layout side by side (FSDP, HSDP per node, + bf16 reduce, + FP8)")
    pl.set_defaults(fn=_cmd_plan)

    cv = sub.add_parser("convert", help="a sharded (DCP) step checkpoint → the single-file layout of final/")
    cv.add_argument("ckpt")
    cv.add_argument("out")
    cv.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    cv.set_defaults(fn=_cmd_convert)

    im = sub.add_parser("import", help="a diffusers PRX transformer or pipeline folder → a daybreak checkpoint")
    im.add_argument("src")
    im.add_argument("out")
    im.set_defaults(fn=_cmd_import)
    return p


# OS errors that are the environment's, not a bug: an output path in the way, no permission, a full disk
_USER_ERRNOS = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS,
                errno.EDQUOT, errno.ENAMETOOLONG}


PEER_GRACE_S = 10.0


def _say(message: str) -> None:
    """One line on stderr. Under torchrun every rank usually meets the same mistake: rank 0 says it
    and exits, and torchrun then stops the others, which wait for that first; a rank still running
    after `PEER_GRACE_S` met a mistake of its own and says it, naming itself."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if rank != 0 and world > 1:
        time.sleep(PEER_GRACE_S)
        message = f"(rank {rank}) {message}"
    message = "; ".join(line.strip() for line in message.splitlines() if line.strip())  # a library's lines, joined
    print(f"daybreak: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C anywhere: SIGINT's 128 + 2; unfinished writes' temporaries are gone
        print("daybreak: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        # `train tiny --no-progress train.steps=9`: overrides typed after an option are overrides too
        if rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
            args.overrides += rest
        elif rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    except SystemExit as e:  # --help (0) or a usage error (2, said in one line)
        return e.code
    try:
        args.fn(args)
    except UserError as e:
        _say(str(e))
        return 2
    except OSError as e:
        if e.errno not in _USER_ERRNOS or not e.filename:
            raise
        _say(f"{e.strerror}: '{e.filename}'" + (f" -> '{e.filename2}'" if e.filename2 else ""))
        return 2
    except MemoryError:  # a size or batch this machine cannot hold (torch's OutOfMemoryError is below)
        _say("out of memory: lower train.micro_batch, data.image_size, --size or --batch")
        return 2
    except RuntimeError as e:
        if type(e).__name__ != "OutOfMemoryError":
            raise
        _say(f"out of accelerator memory ({str(e).splitlines()[0][:120]}); lower train.micro_batch, "
             "data.image_size, --size or --batch")
        return 2
    except Stopped as e:  # SIGTERM / SIGUSR1: checkpoint saved; 128 + N, as the shell reports a signal's end
        if os.environ.get("RANK", "0") == "0":
            print(f"daybreak: {e}", file=sys.stderr)
        return 128 + e.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
