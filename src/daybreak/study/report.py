"""`daybreak report STUDY_DIR`: the study as the article shows it, plus what the article could not.

One table: per variant each metric with its Δ against the variant's reference run, throughput with
its Δ %, and the article's FID and Δ beside them with whether the measured direction agrees. Then
metric-vs-step curves per variant (PNG) and the sample grids side by side (PNG). Written as
Markdown and as a self-contained-looking HTML page with the same content.

With several seeds per variant (`daybreak ablate --seeds N`) each value is the mean over the seeds
± their standard deviation (N − 1), and a Δ is marked real (`*`) only when it is larger than the
two spreads added (`|mean_v − mean_ref| > sd_v + sd_ref`: the two mean ± sd intervals do not
overlap). A rough rule, not a significance test: with 3 seeds a spread is itself uncertain.
Curves and sample grids show seed offset 0.
"""

from __future__ import annotations

import html
import json
import os
import statistics
from pathlib import Path

from PIL import Image, ImageDraw

from daybreak.errors import UserError
from daybreak.study.ablate import Study, load_study, seed_runs
from daybreak.evaluate.run import HIGHER_IS_BETTER
from daybreak.training.logger import read_metrics

ARTICLE_METRIC = "fid"


def val_rows(run_dir: Path) -> list[dict]:
    """The run's validation-loss rows (`val/loss`, `val/loss_<lo>-<hi>`) from its metrics.jsonl, by step."""
    rows = [r for r in read_metrics(run_dir) if "val/loss" in r]
    return [{"step": r["step"], **{k: v for k, v in r.items() if k.startswith("val/")}} for r in rows]


def _load_results(study: Study, study_dir: Path) -> dict[str, list[dict]]:
    """Each finished variant's result.json files, one per seed, seed offset 0 first; `val`: the validation
    loss at the run's last step and `val_curve` all of them, from the run's metrics.jsonl."""
    out = {}
    for v in study.variants:
        found = []
        for d in [d for d in seed_runs(study_dir, v.name) if (d / "result.json").is_file()]:
            path = d / "result.json"
            try:
                result = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as e:  # UnicodeDecodeError included
                raise UserError(f"{path} is not a result (not valid JSON: {str(e)[:80]}); remove it and run "
                                "the study again to remake it") from None
            curve = val_rows(d)
            result["val_curve"] = curve
            result["val"] = {k: x for k, x in curve[-1].items() if k != "step"} if curve else {}
            found.append(result)
        if found:
            out[v.name] = found
    return out


def val_keys(results: dict[str, list[dict]]) -> list[str]:
    """`val/loss` then the bins in the order the runs logged them."""
    keys = list(dict.fromkeys(k for runs in results.values() for r in runs for k in r.get("val", {})))
    return sorted(keys, key=lambda k: k != "val/loss")


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def is_real(delta: float, sd: float | None, sd_ref: float | None) -> bool | None:
    """The report's rule: a difference is real when it exceeds both spreads added; None without spreads."""
    if sd is None or sd_ref is None:
        return None
    return abs(delta) > sd + sd_ref


def _better(metric: str, delta: float) -> bool:
    return delta > 0 if metric in HIGHER_IS_BETTER else delta < 0


def _summary(runs: list[dict]) -> dict:
    """Mean and spread over a variant's seeds: metrics, images/s and training seconds."""
    out = {"metrics": {}, "sd": {}, "seeds": len(runs)}
    for m in {k for r in runs for k in r["metrics"]}:
        vals = [r["metrics"][m] for r in runs if r["metrics"].get(m) is not None]
        if vals:
            out["metrics"][m], out["sd"][m] = mean_sd(vals)
    for m in {k for r in runs for k in r.get("val", {})}:
        out["metrics"][m], out["sd"][m] = mean_sd([r["val"][m] for r in runs if m in r.get("val", {})])
    rates = [r["throughput"]["images_per_s"] for r in runs if r.get("throughput")]
    out["images_per_s"] = statistics.fmean(rates) if rates else None
    secs = [r["train_s"] for r in runs if r.get("train_s") is not None]
    out["train_s"] = statistics.fmean(secs) if secs else None
    return out


def study_rows(study: Study, results: dict[str, list[dict]]) -> list[dict]:
    """One dict per variant: mean values and spreads over its seeds, Δ vs its reference and whether it is
    real (see the module docstring), throughput Δ %, article numbers, agreement."""
    rows = []
    summaries = {name: _summary(runs) for name, runs in results.items()}
    for v in study.variants:
        ref_name = study.reference_of(v)
        res, ref = summaries.get(v.name), summaries.get(ref_name)
        row = {"name": v.name, "about": v.about, "reference": ref_name, "needs": v.needs,
               "status": "skipped" if v.needs else ("done" if res else "not run"), "values": {}, "delta": {},
               "sd": {}, "real": {}, "seeds": res["seeds"] if res else 0}
        if res:
            for m in [*study.metrics, *(k for k in res["metrics"] if k.startswith("val/"))]:
                row["values"][m] = res["metrics"].get(m)
                row["sd"][m] = res["sd"].get(m)
                if ref and v.name != ref_name and m in ref["metrics"] and m in res["metrics"]:
                    row["delta"][m] = res["metrics"][m] - ref["metrics"][m]
                    row["real"][m] = is_real(row["delta"][m], res["sd"][m], ref["sd"][m])
            tp, ref_tp = res["images_per_s"], (ref or {}).get("images_per_s")
            row["images_per_s"] = tp
            if tp and ref_tp and v.name != ref_name:
                row["throughput_delta_pct"] = 100.0 * (tp / ref_tp - 1.0)
            row["train_s"] = res["train_s"]
        art, art_ref = v.article.get(ARTICLE_METRIC), study.variant(ref_name).article.get(ARTICLE_METRIC)
        row["article"] = art
        if art is not None and art_ref is not None and v.name != ref_name:
            row["article_delta"] = art - art_ref
            measured = row["delta"].get(study.primary)
            if measured is not None and measured != 0 and row["article_delta"] != 0:
                row["agrees"] = _better(study.primary, measured) == _better(ARTICLE_METRIC, row["article_delta"])
        rows.append(row)
    return rows


def _num(x: float | None, signed: bool = False, digits: int = 3) -> str:
    if x is None:
        return "—"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _value(x: float | None, sd: float | None) -> str:
    return _num(x) if sd is None or x is None else f"{x:.3f} ± {sd:.3f}"


def _delta(x: float | None, real: bool | None) -> str:
    return _num(x, signed=True) + ("*" if real else "")


def table(study: Study, rows: list[dict], val: list[str] = ()) -> tuple[list[str], list[list[str]]]:
    head = ["variant", "vs", "seeds"]
    for m in study.metrics:
        head += [m, f"Δ {m}"]
    head += list(val)
    head += ["img/s", "Δ img/s", "train s", "article FID", "article Δ", "same direction"]
    body = []
    for r in rows:
        cells = [r["name"], r["reference"] if r["reference"] != r["name"] else "", str(r["seeds"] or "—")]
        for m in study.metrics:
            cells += [_value(r["values"].get(m), r["sd"].get(m)), _delta(r["delta"].get(m), r["real"].get(m))]
        cells += [_value(r["values"].get(m), r["sd"].get(m)) for m in val]
        pct = r.get("throughput_delta_pct")
        cells += [_num(r.get("images_per_s"), digits=1), "—" if pct is None else f"{pct:+.1f} %",
                  _num(r.get("train_s"), digits=0), _num(r["article"], digits=2),
                  _num(r.get("article_delta"), signed=True, digits=2),
                  {True: "yes", False: "no"}.get(r.get("agrees"), "—")]
        if r["status"] != "done":
            cells[0] += f" ({r['status']}" + (f": needs {r['needs']})" if r["needs"] else ")")
        body.append(cells)
    return head, body


def val_table(rows: list[dict], val: list[str]) -> tuple[list[str], list[list[str]]]:
    """The variants that ran, best (lowest) validation loss first: per key mean ± sd and Δ against the
    reference, * where the Δ exceeds the two spreads added."""
    head = ["rank", "variant", "vs", "seeds"] + [c for k in val for c in (k, f"Δ {k}")]
    done = sorted((r for r in rows if r["values"].get("val/loss") is not None), key=lambda r: r["values"]["val/loss"])
    body = []
    for i, r in enumerate(done, 1):
        cells = [str(i), r["name"], r["reference"] if r["reference"] != r["name"] else "", str(r["seeds"])]
        for k in val:
            cells += [_value(r["values"].get(k), r["sd"].get(k)), _delta(r["delta"].get(k), r["real"].get(k))]
        body.append(cells)
    return head, body


def plot_val(results: dict[str, list[dict]], val: list[str], out: Path) -> Path | None:
    """First panel: `val/loss` against step, mean over seeds with a ± sd band. Then one panel per bin:
    each variant's value at its last step, mean ± sd over seeds, best first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not val:
        return None
    bins = [k for k in val if k != "val/loss"] or list(val)
    fig, axes = plt.subplots(1, 1 + len(bins), figsize=(5 + 3.2 * len(bins), 4.2), squeeze=False)
    left = axes[0][0]
    colours = {}
    for name, runs in results.items():
        by_step: dict[int, list[float]] = {}
        for r in runs:
            for row in r.get("val_curve", []):
                by_step.setdefault(row["step"], []).append(row["val/loss"])
        if by_step:
            steps = sorted(by_step)
            stats = [mean_sd(by_step[s]) for s in steps]
            mean = [m for m, _ in stats]
            sd = [d or 0.0 for _, d in stats]
            line = left.plot(steps, mean, marker="o", markersize=3, label=name)[0]
            colours[name] = line.get_color()
            left.fill_between(steps, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)],
                              color=line.get_color(), alpha=0.15)
    left.set_xlabel("step")
    left.set_yscale("log")
    left.set_title("val/loss (mean ± sd over seeds)")
    left.legend(fontsize=7)
    for ax, k in zip(axes[0][1:], bins):
        stats = sorted((mean_sd([r["val"][k] for r in runs if k in r.get("val", {})]), name)
                       for name, runs in results.items() if any(k in r.get("val", {}) for r in runs))
        for i, ((m, d), name) in enumerate(stats):
            ax.errorbar([i], [m], yerr=[d or 0.0], fmt="o", capsize=3, color=colours.get(name))
        ax.set_xlim(-0.6, len(stats) - 0.4)
        ax.set_xticks(range(len(stats)), [name for _, name in stats], rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{k.removeprefix('val/loss_')} at the last step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_curves(study: Study, results: dict[str, list[dict]], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        return None
    fig, axes = plt.subplots(1, len(study.metrics), figsize=(5 * len(study.metrics), 3.8), squeeze=False)
    for ax, m in zip(axes[0], study.metrics):
        for name, runs in results.items():
            pts = [(c["step"], c[m]) for c in runs[0].get("curve", []) if c.get(m) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_xlabel("step")
        ax.set_title(m + (" (higher is better)" if m in HIGHER_IS_BETTER else " (lower is better)"))
    if axes[0][-1].lines:
        axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def sample_strip(study_dir: Path, names: list[str], out: Path) -> Path | None:
    """Each variant's sample grid in one picture, named above it, same prompts and seeds in each."""
    paths = [(name, study_dir / name / "eval" / "final_grid.png") for name in names]
    grids = [(name, Image.open(p).convert("RGB")) for name, p in paths if p.is_file()]
    if not grids:
        return None
    label = 16
    cols = 2
    w = max(g.width for _, g in grids)
    h = max(g.height for _, g in grids) + label
    rows = (len(grids) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, g) in enumerate(grids):
        x, y = (i % cols) * w, (i // cols) * h
        draw.text((x + 4, y + 2), name, fill="black")
        sheet.paste(g, (x, y + label))
    sheet.save(out)
    return out


def build_report(study_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write `out` (default STUDY_DIR/report.md), an .html twin and its PNGs beside it; returns the .md path."""
    study_dir = Path(study_dir)
    if not (study_dir / "study.yaml").is_file():
        raise UserError(f"{study_dir} is not a study directory (no study.yaml; run `daybreak ablate` first)")
    study = load_study(study_dir / "study.yaml")
    results = _load_results(study, study_dir)
    out = Path(out) if out else study_dir / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    curves = plot_curves(study, results, out.with_name(f"{out.stem}-curves.png"))
    samples = sample_strip(study_dir, list(results), out.with_name(f"{out.stem}-samples.png"))
    val = val_keys(results)
    rows = study_rows(study, results)
    head, body = table(study, rows, val)
    val_plot = plot_val(results, val, out.with_name(f"{out.stem}-val.png"))

    intro = [study.about.strip()] if study.about else []
    intro.append(f"Δ is against the run named in *vs* (the baseline unless stated). The primary metric is "
                 f"`{study.primary}`; *same direction* says whether its change goes the way the article's FID "
                 f"change went{f' ({study.article_scale})' if study.article_scale else ''}.")
    if any(len(runs) > 1 for runs in results.values()):
        intro.append("Values are the mean ± standard deviation (N − 1) over the seeds in *seeds* (training and "
                     "evaluation seeds both moved). A Δ marked * is larger than the two spreads added "
                     "(|mean − mean_ref| > sd + sd_ref: the mean ± sd intervals do not overlap); an unmarked Δ "
                     "is within run-to-run noise. Curves and sample grids are seed offset 0.")
    md = [f"# {study.name}", "", *(line for p in intro for line in (p, "")),
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
          *("| " + " | ".join(row) + " |" for row in body), ""]
    if val:
        vhead, vbody = val_table(rows, val)
        md += ["## Validation loss per noise bin, best first", "",
               "The flow loss of held-out examples at a fixed t per bin and fixed noise (the same for every run "
               "of a seed), at each run's last step; lower is better. Δ and * as above.", "",
               "| " + " | ".join(vhead) + " |", "|" + "---|" * len(vhead),
               *("| " + " | ".join(row) + " |" for row in vbody), ""]
        if val_plot:
            md += [f"![validation loss]({val_plot.name})", ""]
    for v in study.variants:
        bits = [v.about] if v.about else []
        bits += [f"`{k}={json.dumps(val)}`" for k, val in v.overrides.items()]
        md.append(f"- **{v.name}**: " + "; ".join(bits or ["the baseline"]))
    if curves:
        md += ["", "## Metrics against training step", "", f"![curves]({curves.name})"]
    if samples:
        md += ["", "## Samples (same prompts and seeds)", "", f"![samples]({samples.name})"]
    out.write_text("\n".join(md) + "\n")

    cell = lambda tag, xs: "".join(f"<{tag}>{html.escape(x)}</{tag}>" for x in xs)  # noqa: E731
    page = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(study.name)}</title>",
            "<style>body{font-family:sans-serif}td,th{padding:2px 8px;border-bottom:1px solid #ddd}</style>",
            f"<h1>{html.escape(study.name)}</h1>", *(f"<p>{html.escape(p)}</p>" for p in intro),
            f"<table><tr>{cell('th', head)}</tr>", *(f"<tr>{cell('td', row)}</tr>" for row in body), "</table>"]
    if val:
        page += ["<h2>Validation loss per noise bin, best first</h2>", f"<table><tr>{cell('th', vhead)}</tr>",
                 *(f"<tr>{cell('td', row)}</tr>" for row in vbody), "</table>"]
        page += [f"<img src='{val_plot.name}'>"] if val_plot else []
    page += [f"<h2>{t}</h2><img src='{p.name}'>" for t, p in (("Metrics against training step", curves),
                                                              ("Samples", samples)) if p]
    out.with_suffix(".html").write_text("\n".join(page) + "\n")
    return out
