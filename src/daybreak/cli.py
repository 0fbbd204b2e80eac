"""`daybreak` command line. Each subcommand parses its arguments and calls one function elsewhere.

A `UserError` anywhere becomes one line on stderr and exit code 2; nothing a user can get wrong
ends in a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from daybreak.errors import UserError


def _cmd_demo(a: argparse.Namespace) -> None:
    from daybreak.demo import run_demo

    run_demo(out=a.out, minutes=a.minutes, overrides=a.overrides)


def _cmd_train(a: argparse.Namespace) -> None:
    from daybreak.config import load_config
    from daybreak.run import train

    cfg = load_config(a.config, a.overrides)
    final = train(cfg, progress=not a.no_progress)
    if os.environ.get("RANK", "0") == "0":
        print(f"wrote {final}")
        _report_skipped(Path(cfg.run.dir))


def _report_skipped(run_dir: Path) -> None:
    """Bad samples are skipped, never silently: say how many and why."""
    from daybreak.training.logger import read_metrics

    rows = [r for r in read_metrics(run_dir) if "skipped/total" in r]
    if rows and rows[-1]["skipped/total"]:
        last = rows[-1]
        why = ", ".join(f"{k.split('/', 1)[1]} {int(v)}" for k, v in last.items()
                        if k.startswith("skipped/") and k != "skipped/total" and v)
        print(f"skipped {int(last['skipped/total'])} samples ({why}); see the warnings above for the first paths")


def _cmd_data(a: argparse.Namespace) -> None:
    import json

    from daybreak.data import tools

    if a.data_command == "convert":
        print(json.dumps(tools.convert(a.src, a.out, format=a.format, shard_size=a.shard_size)))
    elif a.data_command == "inspect":
        print(json.dumps(tools.inspect(a.path, a.source, out=a.out, limit=a.limit), indent=2))
    else:
        rate = tools.bench(a.source, a.path, seconds=a.seconds, batch_size=a.batch, resolution=a.resolution,
                           num_workers=a.workers)
        print(json.dumps({"source": a.source, "images_per_s": round(rate, 1), "resolution": a.resolution,
                          "batch": a.batch, "workers": a.workers}))


def _read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    prompts = list(prompts)
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise UserError(f"--prompts-file '{prompts_file}' not found")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError("give a prompt with --prompt TEXT or --prompts-file FILE")
    if any(not p.strip() for p in prompts):
        raise UserError("prompts must not be empty")
    return prompts


def _cmd_sample(a: argparse.Namespace) -> None:
    from daybreak.images import image_grid, save_png
    from daybreak.pipeline import load_pipeline

    prompts = _read_prompts(a.prompt, a.prompts_file)
    pipe = load_pipeline(a.ckpt)
    settings = dict(steps=a.steps, cfg=a.cfg, guidance=a.guidance, sampler=a.sampler,
                    size=tuple(a.size) if a.size else None)
    out = Path(a.out)
    as_dir = a.out.endswith(("/", "\\")) or out.is_dir() or len(prompts) > 1
    images = []
    for i in range(0, len(prompts), a.batch):
        chunk = prompts[i: i + a.batch]
        images += pipe(chunk, seeds=[a.seed + i + j for j in range(len(chunk))], progress=True, **settings)
    meta = {k: v for k, v in settings.items() if v is not None}
    if not as_dir:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_png(images[0], out, {"prompt": prompts[0], "seed": a.seed, **meta})
        print(f"wrote {out}")
        return
    out.mkdir(parents=True, exist_ok=True)
    for i, (img, p) in enumerate(zip(images, prompts)):
        save_png(img, out / f"{i:03d}.png", {"prompt": p, "seed": a.seed + i, **meta})
    image_grid(images, captions=prompts if a.captions else None).save(out / "grid.png")
    print(f"wrote {len(images)} images and grid.png to {out}")


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

    print(f"wrote {convert_checkpoint(a.ckpt, a.out)}")


def _cmd_bench(a: argparse.Namespace) -> None:
    from daybreak.bench.harness import run_bench
    from daybreak.config import load_config

    run_bench(load_config(a.config, a.overrides), a.steps, a.warmup)


def _cmd_plan(a: argparse.Namespace) -> None:
    from daybreak.bench.plan import format_plan, plan
    from daybreak.config import load_config

    print(format_plan(plan([load_config(c) for c in a.configs], a.gpus, a.gpu, a.price, a.mfu)))


def _cmd_eval(a: argparse.Namespace) -> None:
    import json

    from daybreak.evaluate.run import evaluate_checkpoint

    result = evaluate_checkpoint(a.ckpt, a.metrics, data=a.data, num=a.num, out=a.out, seed=a.seed, steps=a.steps,
                                 scale=a.cfg, guidance=a.guidance)
    print(json.dumps(result, indent=2))


def _cmd_ablate(a: argparse.Namespace) -> None:
    from daybreak.study.ablate import run_study
    from daybreak.study.report import build_report

    study_dir = run_study(a.study, dry_run=a.print, only=a.only or None)
    if not a.print:
        print(f"report: {build_report(study_dir)}")


def _cmd_report(a: argparse.Namespace) -> None:
    from daybreak.study.report import build_report

    print(build_report(a.study_dir, a.out))


def _cmd_export(a: argparse.Namespace) -> None:
    from daybreak.export import export

    export(a.ckpt, a.out, ema=not a.no_ema)


def _cmd_import(a: argparse.Namespace) -> None:
    from daybreak.export import import_diffusers

    print(f"wrote {import_diffusers(a.src, a.out)}")


def build_parser() -> argparse.ArgumentParser:
    from daybreak.bench.plan import GPU_MEMORY
    from daybreak.data.sources import SOURCES
    from daybreak.diffusion.sampling import GUIDANCE, SAMPLERS

    p = argparse.ArgumentParser(prog="daybreak", description="Train a text-to-image diffusion transformer from "
                                "scratch in a day, and measure every ingredient of the recipe.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="train the demo model on synthetic shapes (CPU, ~6 min) and score its prompt adherence")
    d.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    d.add_argument("--minutes", type=float, default=None, help="wall-clock budget for training")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    d.set_defaults(fn=_cmd_demo)

    t = sub.add_parser("train", help="train from a YAML config (path or bundled name) with key=value overrides")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", metavar="key=value")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(fn=_cmd_train)

    dp = sub.add_parser("data", help="convert, inspect and benchmark datasets")
    dsub = dp.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    c = dsub.add_parser("convert", help="image folder → webdataset | mds | hf shards")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--format", choices=["webdataset", "mds", "hf"], default="webdataset")
    c.add_argument("--shard-size", type=int, default=1000)
    i = dsub.add_parser("inspect", help="counts, caption lengths, resolution/aspect histograms, contact sheet")
    i.add_argument("path")
    i.add_argument("--source", default="imagefolder", choices=[x for x in SOURCES if x != "shapes"])
    i.add_argument("--out", default=None, help="folder for inspect.json and contact_sheet.png")
    i.add_argument("--limit", type=int, default=2000)
    b = dsub.add_parser("bench", help="images/s the data loader delivers")
    b.add_argument("source", choices=SOURCES)
    b.add_argument("path", nargs="?")
    b.add_argument("--seconds", type=float, default=10.0)
    b.add_argument("--batch", type=int, default=16)
    b.add_argument("--resolution", type=int, default=512)
    b.add_argument("--workers", type=int, default=2)
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
    s.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed + i")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--cfg", type=float, default=None, help="guidance scale")
    s.add_argument("--guidance", choices=GUIDANCE, default=None)
    s.add_argument("--sampler", choices=SAMPLERS, default=None)
    s.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None)
    s.add_argument("--batch", type=int, default=16, help="prompts per forward batch")
    s.add_argument("--captions", action="store_true", help="write the prompts under the grid's images")
    s.set_defaults(fn=_cmd_sample)

    e = sub.add_parser("export", help="write a diffusers folder (PRXTransformer2DModel, scheduler, pipeline parts)")
    e.add_argument("ckpt")
    e.add_argument("out")
    e.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA ones")
    e.set_defaults(fn=_cmd_export)

    ev = sub.add_parser("eval", help="generate with fixed seeds and compute metrics; prints and writes JSON")
    ev.add_argument("ckpt")
    ev.add_argument("--metrics", default=None, help="comma-separated: fid,cmmd,dino_mmd,fd_dino,clip_score,fd_tiny,adherence")
    ev.add_argument("--data", default=None, help="reference data: shapes, a folder of images, or KIND:PATH")
    ev.add_argument("--num", type=int, default=None, help="images to generate")
    ev.add_argument("--out", default=None, help="JSON path (default RUN/eval/<ckpt>.json)")
    ev.add_argument("--seed", type=int, default=None)
    ev.add_argument("--steps", type=int, default=None)
    ev.add_argument("--cfg", type=float, default=None)
    ev.add_argument("--guidance", choices=GUIDANCE, default=None)
    ev.set_defaults(fn=_cmd_eval)

    ab = sub.add_parser("ablate", help="train and evaluate a study's baseline and variants, then write its report")
    ab.add_argument("study", help="a study YAML (e.g. studies/demo-ablations.yaml)")
    ab.add_argument("--print", action="store_true", help="print the training commands instead (for a cluster)")
    ab.add_argument("--only", action="append", default=[], metavar="NAME", help="run only these variants")
    ab.set_defaults(fn=_cmd_ablate)

    rp = sub.add_parser("report", help="Markdown + HTML report of a study directory")
    rp.add_argument("study_dir")
    rp.add_argument("--out", default=None)
    rp.set_defaults(fn=_cmd_report)

    be = sub.add_parser("bench", help="time the training step; one JSON line (ms/step, images/s, FLOP/s, MFU, memory)")
    be.add_argument("config")
    be.add_argument("overrides", nargs="*", metavar="key=value")
    be.add_argument("--steps", type=int, default=10)
    be.add_argument("--warmup", type=int, default=3)
    be.set_defaults(fn=_cmd_bench)

    pl = sub.add_parser("plan", help="step time, hours, cost and per-GPU memory of each stage")
    pl.add_argument("configs", nargs="+", metavar="CONFIG")
    pl.add_argument("--gpus", type=int, required=True)
    pl.add_argument("--gpu", default="h200", choices=list(GPU_MEMORY))
    pl.add_argument("--price", type=float, default=2.0, help="$ per GPU-hour")
    pl.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOP utilisation")
    pl.set_defaults(fn=_cmd_plan)

    cv = sub.add_parser("convert", help="a sharded (DCP) step checkpoint → the single-file layout of final/")
    cv.add_argument("ckpt")
    cv.add_argument("out")
    cv.set_defaults(fn=_cmd_convert)

    im = sub.add_parser("import", help="a diffusers PRX transformer or pipeline folder → a daybreak checkpoint")
    im.add_argument("src")
    im.add_argument("out")
    im.set_defaults(fn=_cmd_import)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except UserError as e:
        print(f"daybreak: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("daybreak: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
