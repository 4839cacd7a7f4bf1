"""Tables and figures of an experiment's results (``report/`` of its output directory).

Every number is a test metric of the state chosen on valid (best valid ``stop_metric``),
mean ± sample standard deviation over the seeds that finished; a cell with no finished run
shows as "—". Each report writes ``<name>.md`` and ``<name>.json``, and figures a
``<name>.png``; ``report.md`` joins the markdown of all of them.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from experiments.config import ExperimentConfig, ReportSpec


def runs_of(results: dict, cell: str, fraction: float = 1.0) -> list[dict]:
    """Finished fine-tuning runs of ``cell`` at ``fraction``, any seed."""
    prefix = f"finetune/{cell}/f{fraction:g}/"
    return [v for k, v in sorted(results.items()) if k.startswith(prefix)]


def mean_std(values: list[float]) -> tuple[float | None, float | None, int]:
    if not values:
        return None, None, 0
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std, len(values)


def cell_metrics(results: dict, cell: str, metrics: list[str], fraction: float = 1.0) -> dict:
    """``{metric: {"mean", "std", "n"}}`` plus ``seeds``, ``best_epochs``, ``epochs_run``."""
    runs = runs_of(results, cell, fraction)
    out: dict = {}
    for metric in metrics:
        m, s, n = mean_std([r["test"][metric] for r in runs])
        out[metric] = {"mean": m, "std": s, "n": n}
    out["valid_" + metrics[0]] = mean_std([r["valid"][metrics[0]] for r in runs])[0]
    out["best_epochs"] = [r.get("best_epoch") for r in runs]
    out["epochs_run"] = [r.get("epochs_run") for r in runs]
    out["minutes"] = sum(r.get("wall_seconds", 0.0) for r in runs) / 60
    return out


def _fmt(entry: dict) -> str:
    if entry["mean"] is None:
        return "—"
    return f"{entry['mean']:.4f} ± {entry['std']:.4f} (n={entry['n']})"


def _labels(spec: ReportSpec) -> list[str]:
    return spec.labels or spec.cells


def table(spec: ReportSpec, results: dict) -> tuple[str, dict]:
    rows = {cell: cell_metrics(results, cell, spec.metrics, spec.fraction) for cell in spec.cells}
    lines = [
        f"| cell | {' | '.join(spec.metrics)} | best epochs | epochs run | minutes |",
        "|---" * (len(spec.metrics) + 4) + "|",
    ]
    for label, cell in zip(_labels(spec), spec.cells):
        r = rows[cell]
        lines.append(
            f"| {label} | "
            + " | ".join(_fmt(r[m]) for m in spec.metrics)
            + f" | {r['best_epochs']} | {r['epochs_run']} | {r['minutes']:.1f} |"
        )
    return "\n".join(lines), rows


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, png: Path) -> None:
    """Lay out, write and release a report figure."""
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    _plt().close(fig)


def bars(spec: ReportSpec, results: dict, png: Path) -> tuple[str, dict]:
    text, rows = table(spec, results)
    plt = _plt()
    fig, axes = plt.subplots(1, len(spec.metrics), figsize=(3.2 * len(spec.metrics), 3.2))
    axes = axes if len(spec.metrics) > 1 else [axes]
    labels = _labels(spec)
    for ax, metric in zip(axes, spec.metrics):
        means = [rows[c][metric]["mean"] or 0.0 for c in spec.cells]
        stds = [rows[c][metric]["std"] or 0.0 for c in spec.cells]
        ax.bar(range(len(labels)), means, yerr=stds, capsize=3, color="#4C72B0")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric)
        finite = [m for m in means if m]
        if finite:
            ax.set_ylim(min(finite) * 0.9, max(finite) * 1.05)
    fig.suptitle(spec.title or spec.name, fontsize=9)
    _save(fig, png)
    return text, rows


def popularity(spec: ReportSpec, results: dict, png: Path) -> tuple[str, dict]:
    """Per target-popularity group: mean Recall@K of each cell minus the baseline's (in %)."""

    def groups(cell: str) -> list[list[dict]]:
        return [r["test_by_popularity"] for r in runs_of(results, cell, spec.fraction)]

    base = groups(spec.baseline)
    if not base:
        return f"(baseline {spec.baseline} has no finished run)", {}
    metric = next(k for k in base[0][0] if k.startswith("recall@"))
    n_groups = len(base[0])
    base_mean = [statistics.fmean(g[i][metric] for g in base) for i in range(n_groups)]
    rows = {"groups": base[0], "baseline": base_mean, "metric": metric, "cells": {}}
    header = " | ".join(
        f"g{i} ({base[0][i]['min_count']}-{base[0][i]['max_count']})" for i in range(n_groups)
    )
    lines = [f"| cell | {header} |", "|---" * (n_groups + 1) + "|"]
    lines.append(
        f"| {spec.baseline} ({metric}) | " + " | ".join(f"{v:.4f}" for v in base_mean) + " |"
    )
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    width = 0.8 / max(len(spec.cells), 1)
    for j, (label, cell) in enumerate(zip(_labels(spec), spec.cells)):
        own = groups(cell)
        if not own:
            lines.append(f"| {label} | " + " | ".join("—" for _ in range(n_groups)) + " |")
            continue
        mean = [statistics.fmean(g[i][metric] for g in own) for i in range(n_groups)]
        gain = [100 * (m - b) / b if b else 0.0 for m, b in zip(mean, base_mean)]
        rows["cells"][cell] = {"mean": mean, "improvement_percent": gain}
        lines.append(f"| {label} | " + " | ".join(f"{g:+.1f}%" for g in gain) + " |")
        ax.bar([i + j * width for i in range(n_groups)], gain, width, label=label)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(
        [i + width * (len(spec.cells) - 1) / 2 for i in range(n_groups)],
        [f"g{i}\n{base[0][i]['min_count']}-{base[0][i]['max_count']}" for i in range(n_groups)],
        fontsize=7,
    )
    ax.set_ylabel(f"{metric} vs {spec.baseline} (%)")
    ax.set_xlabel("target popularity group (training interactions)")
    ax.legend(fontsize=7)
    ax.set_title(spec.title or spec.name, fontsize=9)
    _save(fig, png)
    return "\n".join(lines), rows


def fractions(spec: ReportSpec, results: dict, png: Path) -> tuple[str, dict]:
    """Metrics against the fraction of training users, a line per cell."""
    seen = sorted({float(k.split("/")[2][1:]) for k in results if k.startswith("finetune/")})
    rows: dict = {}
    lines = [
        "| cell | fraction | " + " | ".join(spec.metrics) + " | best epochs |",
        "|---" * (len(spec.metrics) + 3) + "|",
    ]
    for label, cell in zip(_labels(spec), spec.cells):
        rows[cell] = {}
        for f in seen:
            r = cell_metrics(results, cell, spec.metrics, f)
            if r[spec.metrics[0]]["n"]:
                rows[cell][f] = r
                lines.append(
                    f"| {label} | {f:g} | "
                    + " | ".join(_fmt(r[m]) for m in spec.metrics)
                    + f" | {r['best_epochs']} |"
                )
    plt = _plt()
    fig, axes = plt.subplots(1, len(spec.metrics), figsize=(3.4 * len(spec.metrics), 3.2))
    axes = axes if len(spec.metrics) > 1 else [axes]
    for ax, metric in zip(axes, spec.metrics):
        for label, cell in zip(_labels(spec), spec.cells):
            xs = sorted(rows[cell])
            if not xs:
                continue
            ys = [rows[cell][x][metric]["mean"] for x in xs]
            es = [rows[cell][x][metric]["std"] for x in xs]
            ax.errorbar([100 * x for x in xs], ys, yerr=es, marker="o", capsize=3, label=label)
        ax.set_xlabel("% of training users")
        ax.set_title(metric)
        ax.legend(fontsize=7)
    fig.suptitle(spec.title or spec.name, fontsize=9)
    _save(fig, png)
    return "\n".join(lines), {c: {str(f): v for f, v in r.items()} for c, r in rows.items()}


def heldout(spec: ReportSpec, results: dict, png: Path) -> tuple[str, dict]:
    """Held-out pretraining loss against epochs, a line per pretraining cell."""
    rows: dict = {}
    lines = ["| backbone | evaluations | first | best (epoch) | last | minutes |", "|---" * 6 + "|"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, cell in zip(_labels(spec), spec.cells):
        summary = results.get(f"pretrain/{cell}")
        if not summary or not summary.get("heldout_history"):
            lines.append(f"| {label} | — | — | — | — | — |")
            continue
        epoch_of = dict(map(tuple, summary.get("heldout_epochs", [])))
        points = [(epoch_of.get(s, s), v) for s, v in summary["heldout_history"]]
        best = summary.get("best_heldout") or {}
        rows[cell] = {"points": points, "best": best, "wall_seconds": summary["wall_seconds"]}
        lines.append(
            f"| {label} | {len(points)} | {points[0][1]:.4f} | "
            f"{best.get('heldout_loss', float('nan')):.4f} ({best.get('epoch', 0):.2f}) | "
            f"{points[-1][1]:.4f} | {summary['wall_seconds'] / 60:.1f} |"
        )
        ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out loss")
    ax.legend(fontsize=7)
    ax.set_title(spec.title or spec.name, fontsize=9)
    _save(fig, png)
    return "\n".join(lines), rows


def write_reports(cfg: ExperimentConfig, results: dict, report_dir: Path) -> list[Path]:
    """Write every report of ``cfg`` from ``results``; returns the files written."""
    report_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sections = [f"# Experiment {cfg.name}: target {cfg.target}, seeds {cfg.seeds}\n"]
    for spec in cfg.reports:
        png = report_dir / f"{spec.name}.png"
        png.unlink(missing_ok=True)  # a figure from an earlier invocation is not this one's
        if spec.kind == "table":
            text, rows = table(spec, results)
        else:
            text, rows = {"bars": bars, "popularity": popularity, "fractions": fractions,
                          "heldout": heldout}[spec.kind](spec, results, png)  # fmt: skip
            if png.exists():  # nothing finished yet to plot (e.g. no baseline run): no figure
                written.append(png)
        md = report_dir / f"{spec.name}.md"
        md.write_text(f"## {spec.title or spec.name}\n\n{text}\n")
        data = report_dir / f"{spec.name}.json"
        data.write_text(json.dumps({"spec": spec.__dict__, "rows": rows}, indent=2, default=str))
        written += [md, data]
        sections.append(md.read_text())
    joined = report_dir / "report.md"
    joined.write_text("\n".join(sections))
    return [joined, *written]
