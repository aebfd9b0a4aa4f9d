"""Planned vs realised data mix of a run, from its metrics.jsonl, as a PNG.

    python scripts/plot_mix.py runs/dbrx-tiny [--out mix.png] [--window 10]

Planned: `data/mix/<stream>` (the curriculum's share for each batch). Realised: the share of each
stream among the samples actually trained (from the cumulative `data/samples/<stream>`), over a
sliding window of --window batches. Writes <run>/data_mix.png unless --out is given, and prints
each stream's planned and realised share over the whole run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402


def read_mix(metrics: Path) -> tuple[list[int], dict[str, list[float]], dict[str, list[int]]]:
    """(batches, planned share per stream, samples trained per stream in each batch)."""
    if not metrics.is_file():
        raise FileNotFoundError(
            f"{metrics} does not exist: give the run folder (save_folder) of a training run"
        )
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if any(key.startswith("data/samples/") for key in row)]
    if not rows:
        raise ValueError(
            f"{metrics} has no data/samples/<stream> metrics: the run did not train on named streams"
        )
    streams = [key.removeprefix("data/samples/") for key in rows[0] if key.startswith("data/samples/")]
    batches = [row["batch"] for row in rows]
    planned = {s: [row.get(f"data/mix/{s}", float("nan")) for row in rows] for s in streams}
    per_batch: dict[str, list[int]] = {}
    for s in streams:
        cumulative = [row[f"data/samples/{s}"] for row in rows]
        # A resumed run may log from batch k > 1; the first row's count then spans batches 1..k.
        per_batch[s] = [cumulative[0], *(b - a for a, b in zip(cumulative, cumulative[1:], strict=False))]
    return batches, planned, per_batch


def rolling_share(per_batch: dict[str, list[int]], window: int) -> dict[str, list[float]]:
    shares: dict[str, list[float]] = {s: [] for s in per_batch}
    length = len(next(iter(per_batch.values())))
    for i in range(length):
        lo = max(0, i - window + 1)
        sums = {s: sum(counts[lo : i + 1]) for s, counts in per_batch.items()}
        total = sum(sums.values()) or 1
        for s in per_batch:
            shares[s].append(sums[s] / total)
    return shares


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", help="run folder holding metrics.jsonl")
    parser.add_argument("--out", help="PNG path (default: <run>/data_mix.png)")
    parser.add_argument(
        "--window", type=int, default=10, help="batches per realised-share window (default: 10)"
    )
    args = parser.parse_args(argv)
    run = Path(args.run)
    try:
        batches, planned, per_batch = read_mix(run / "metrics.jsonl")
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    realised = rolling_share(per_batch, max(1, args.window))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, stream in enumerate(planned):
        color = f"C{i}"
        ax.step(batches, planned[stream], where="post", color=color, label=f"{stream} planned")
        ax.plot(
            batches,
            realised[stream],
            "--",
            color=color,
            label=f"{stream} realised ({args.window}-batch window)",
        )
    ax.set_xlabel("batch")
    ax.set_ylabel("share of samples")
    ax.set_ylim(0, 1)
    ax.set_title(f"data mix: {run.name}")
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    out = Path(args.out) if args.out else run / "data_mix.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)

    total = sum(sum(counts) for counts in per_batch.values()) or 1
    print(f"{'stream':<12} {'planned':>8} {'realised':>9}")
    for stream, counts in per_batch.items():
        plan = sum(planned[stream]) / len(planned[stream])
        print(f"{stream:<12} {plan:>8.3f} {sum(counts) / total:>9.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
