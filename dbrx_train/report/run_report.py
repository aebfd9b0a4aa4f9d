"""A run's report: PNG plots and one self-contained HTML page, drawn from ``metrics.jsonl``.

Reads only the run folder's ``metrics.jsonl``, so it works on a finished
run, a crashed one, or one still training, on any machine.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

LOAD_KEY = re.compile(r"moe/layer_(\d+)/load/expert_(\d+)")
# icl/<label>/<n>-shot/<metric> (training/icl_eval.py) and the gauntlet's icl/metrics/eval_gauntlet/<name>
ICL_KEY = re.compile(r"icl/(?!metrics/)([^/]+/\d+-shot)/\w+")
GAUNTLET_KEY = re.compile(r"icl/metrics/eval_gauntlet/(.+)")


@dataclass
class RunMetrics:
    rows: list[dict]

    def series(self, key: str, x: str = "batch") -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for row in self.rows:
            value = row.get(key)
            if isinstance(value, (int, float)) and row.get(x) is not None and math.isfinite(value):
                xs.append(row[x])
                ys.append(value)
        return xs, ys

    def keys(self, prefix: str) -> list[str]:
        return sorted({k for row in self.rows for k in row if k.startswith(prefix)})


@dataclass
class Report:
    folder: Path
    pngs: list[Path] = field(default_factory=list)
    html: Path | None = None
    summary: dict[str, float | int | None] = field(default_factory=dict)


def read_metrics(run_folder: Path) -> RunMetrics:
    path = run_folder / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; is {run_folder} a dbrx-train run folder (save_folder)?"
        )
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON object ({e})") from None
    if not rows:
        raise ValueError(f"{path} is empty: the run has not logged a batch yet")
    return RunMetrics(rows)


def write_report(run_folder: str | Path, out: str | Path | None = None) -> Report:
    """Draw every plot the metrics allow into ``out`` (default ``<run>/report``) plus report.html."""
    run_folder = Path(run_folder)
    metrics = read_metrics(run_folder)
    report = Report(Path(out) if out else run_folder / "report", summary=summarize(metrics))
    report.folder.mkdir(parents=True, exist_ok=True)
    for name, draw in PLOTS:
        fig = draw(metrics)
        if fig is None:
            continue
        path = report.folder / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        report.pngs.append(path)
    report.html = report.folder / "report.html"
    report.html.write_text(render_html(run_folder, report.summary, report.pngs))
    return report


def plot_loss(m: RunMetrics):
    x_key = "tokens" if any(r.get("tokens") for r in m.rows) else "batch"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label, style in (
        ("loss/train/total", "train total (LM + load balancing)", "-"),
        ("loss/train/lm_cross_entropy", "train LM cross-entropy", "-"),
        ("metrics/eval/LanguageCrossEntropy", "eval LM cross-entropy", "o-"),
    ):
        xs, ys = m.series(key, x_key)
        if xs:
            ax.plot(xs, ys, style, label=label, markersize=4)
    if not ax.lines:
        plt.close(fig)
        return None
    ax.set(
        title="Loss",
        xlabel="tokens seen" if x_key == "tokens" else "batch",
        ylabel="cross-entropy (nats/token)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_lr(m: RunMetrics):
    keys = m.keys("lr-")
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for key in keys:
        ax.plot(*m.series(key), label=key.removeprefix("lr-"))
    ax.set(title="Learning rate", xlabel="batch", ylabel="learning rate")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_throughput(m: RunMetrics):
    tok = m.series("throughput/device/tokens_per_sec")
    mfu = m.series("throughput/device/mfu")
    if not tok[0]:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax1.plot(*tok)
    ax1.set(title="Throughput per device", xlabel="batch", ylabel="tokens / s")
    ax1.grid(alpha=0.3)
    if mfu[0]:
        ax2.plot(mfu[0], [100 * v for v in mfu[1]], color="tab:orange")
    ax2.set(title="Model FLOP utilisation", xlabel="batch", ylabel="MFU (% of device peak)")
    ax2.grid(alpha=0.3)
    return fig


def plot_data_mix(m: RunMetrics):
    keys = m.keys("data/mix/")
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.8))
    batches = [r["batch"] for r in m.rows if any(k in r for k in keys)]
    shares = [[r.get(k, 0.0) for r in m.rows if any(kk in r for kk in keys)] for k in keys]
    ax.stackplot(batches, shares, labels=[k.removeprefix("data/mix/") for k in keys], alpha=0.85)
    ax.set(
        title="Data mix (share of samples per stream)", xlabel="batch", ylabel="share of batch", ylim=(0, 1)
    )
    ax.legend(loc="upper right")
    return fig


def plot_expert_load(m: RunMetrics):
    """One heatmap per layer: load / fair share per expert over time (1 = balanced)."""
    cells: dict[int, dict[int, dict[int, float]]] = {}
    for row in m.rows:
        for key, value in row.items():
            match = LOAD_KEY.fullmatch(key)
            if match:
                layer, expert = int(match.group(1)), int(match.group(2))
                cells.setdefault(layer, {}).setdefault(row["batch"], {})[expert] = value
    if not cells:
        return None
    layers = sorted(cells)
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    image = None
    for ax, layer in zip(axes.flat, layers, strict=False):
        batches = sorted(cells[layer])
        num_experts = 1 + max(e for b in batches for e in cells[layer][b])
        grid = [[num_experts * cells[layer][b].get(e, 0.0) for b in batches] for e in range(num_experts)]
        image = ax.imshow(
            grid,
            aspect="auto",
            origin="lower",
            cmap="RdBu_r",
            vmin=0.0,
            vmax=2.0,
            extent=(batches[0] - 0.5, batches[-1] + 0.5, -0.5, num_experts - 0.5),
        )
        ax.set(title=f"layer {layer}", xlabel="batch", ylabel="expert")
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    fig.suptitle("Expert load (share of assignments / fair share; 1 = balanced, 0 = starved)", y=1.04)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="load / fair share")
    return fig


def plot_icl(m: RunMetrics):
    """ICL accuracy of every task (and the gauntlet's scores) against tokens seen."""
    tasks = [k for k in m.keys("icl/") if ICL_KEY.fullmatch(k)]
    gauntlet = [k for k in m.keys("icl/metrics/eval_gauntlet/") if GAUNTLET_KEY.fullmatch(k)]
    if not tasks:
        return None
    x_key = "tokens" if any(r.get("tokens") for r in m.rows) else "batch"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in tasks:
        ax.plot(*m.series(key, x_key), "o-", markersize=4, label=ICL_KEY.fullmatch(key).group(1))
    for key in gauntlet:
        ax.plot(
            *m.series(key, x_key),
            "s--",
            markersize=4,
            label=f"gauntlet {GAUNTLET_KEY.fullmatch(key).group(1)}",
        )
    ax.set(
        title="In-context learning (icl_tasks)",
        xlabel="tokens seen" if x_key == "tokens" else "batch",
        ylabel="accuracy (gauntlet: above chance)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


PLOTS = (
    ("loss", plot_loss),
    ("icl_accuracy", plot_icl),
    ("learning_rate", plot_lr),
    ("throughput", plot_throughput),
    ("data_mix", plot_data_mix),
    ("expert_load", plot_expert_load),
)


def summarize(m: RunMetrics) -> dict[str, float | int | None]:
    last = m.rows[-1]
    evals = m.series("metrics/eval/LanguageCrossEntropy")[1]
    train = m.series("loss/train/total")[1]
    summary = {
        "batches": last.get("batch"),
        "tokens": last.get("tokens"),
        "final_train_loss": train[-1] if train else None,
        "best_eval_loss": min(evals) if evals else None,
    }
    for key in m.keys("icl/"):  # the latest score of every ICL task and gauntlet category
        match = ICL_KEY.fullmatch(key) or GAUNTLET_KEY.fullmatch(key)
        values = m.series(key)[1]
        if match and values:
            name = match.group(1) if key.startswith("icl/metrics/") else key.removeprefix("icl/")
            summary[f"ICL {'gauntlet ' if key.startswith('icl/metrics/') else ''}{name}"] = round(
                values[-1], 4
            )
    return summary


def render_html(run_folder: Path, summary: dict, pngs: list[Path]) -> str:
    items = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items()
    )
    images = "".join(
        f'<h2>{html.escape(p.stem.replace("_", " "))}</h2><img alt="{html.escape(p.stem)}" '
        f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        for p in pngs
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>dbrx-train report: {html.escape(run_folder.name)}</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%}"
        "th{text-align:left;padding-right:1em}</style></head><body>"
        f"<h1>Run {html.escape(run_folder.name)}</h1><table>{items}</table>{images}</body></html>"
    )
