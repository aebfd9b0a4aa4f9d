"""Router balancing options compared on the tiny pretraining: the same steps and data, one table.

    python scripts/bench/balance_runs.py --data data/default --out runs/balance --max-duration 120ba

On 2 shared CPU cores DBRX's 100352-token head makes each step 13-30 s; the table in docs/training.md
was made at a 1024-token vocabulary, on the same corpus with its token ids folded by frequency
(tests/small_vocab.py), at the YAML's full 120 steps:

    .venv/bin/python -c "from pathlib import Path; from tests.small_vocab import fold_corpus; \
        fold_corpus(Path('data/default'), Path('data/default-vocab1024'))"
    .venv/bin/python scripts/bench/balance_runs.py --data data/default-vocab1024 --vocab-size 1024
    (and again with --seed 18 --out runs/balance-seed18, --seed 19 --out runs/balance-seed19)

Each variant is `yamls/pretrain/dbrx-tiny.yaml` (16 experts top-4, moe_loss_weight 0.05) on one rank
with `device_train_microbatch_size` 4, so a step of 16 samples is 4 microbatches (where per-microbatch
and step-wide statistics differ), evaluated once at the end. Variants (model.ffn_config):
    microbatch  the default: load-balancing loss over each microbatch's tokens
    global      moe_loss_scope: global (over the step's 16 samples)
    z-loss      the default plus moe_z_loss_weight 1e-3
    bias        moe_bias_update_rate 1e-3 and moe_loss_weight 0 (DeepSeek-V3: no auxiliary loss)
    none        moe_loss_weight 0 and no bias: no balancing at all, the floor to compare against
Columns: eval cross-entropy at the end; the worst layer's busiest-expert load over the mean load
(moe/max_over_mean, global batch) and its share of assignments over capacity factor 1.25, both
averaged over the second half of the run; the median step time over the second half and the load
average when the run ended. The variants run one after another, so their step times saw different
machine load: compare step costs with `make bench` (router balancing rows, peers interleaved), not
here. Runs that finished already (their metrics.jsonl reaches max_duration) are read, not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from dbrx_train.config.schema import parse_time

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {
    "microbatch": [],
    "global": ["model.ffn_config.moe_loss_scope=global"],
    "z-loss": ["model.ffn_config.moe_z_loss_weight=0.001"],
    "bias": ["model.ffn_config.moe_bias_update_rate=0.001", "model.ffn_config.moe_loss_weight=0"],
    "none": ["model.ffn_config.moe_loss_weight=0"],
}


def read_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run_variant(
    name: str, out: Path, data: Path, max_duration: str, vocab_size: int | None, seed: int | None
) -> Path:
    run = out / name
    batches = parse_time(max_duration, "--max-duration", units=("ba",)).value
    if any(r.get("batch") == batches and "metrics/eval/LanguageCrossEntropy" in r for r in read_rows(run)):
        return run
    cmd = [
        sys.executable,
        "-m",
        "composer.cli.launcher",
        "-n",
        "1",
        str(ROOT / "train.py"),
        str(ROOT / "yamls/pretrain/dbrx-tiny.yaml"),
        f"variables.data_root={data}",
        f"save_folder={run}",
        f"run_name=balance-{name}",
        f"max_duration={max_duration}",
        f"eval_interval={max_duration}",
        f"save_interval={max_duration}",
        "save_overwrite=true",
        "device_train_microbatch_size=4",
        "loggers.wandb=null",
        "console_log_interval=10ba",
        "callbacks.expert_load={log_interval: 5}",
        # the table is about training: no ICL suite at the end (its own minutes on 2 cores)
        "icl_tasks=null",
        "eval_gauntlet=null",
        *([f"model.vocab_size={vocab_size}"] if vocab_size else []),
        *([f"seed={seed}"] if seed is not None else []),
        *VARIANTS[name],
    ]
    print(f"balance_runs: {name}: {' '.join(VARIANTS[name]) or 'defaults'}", flush=True)
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"balance_runs: {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    (run / "loadavg.json").write_text(json.dumps(os.getloadavg()))
    return run


def summarize(run: Path) -> dict[str, float]:
    merged: dict[int, dict] = {}  # Composer may write a batch's metrics over several rows
    for row in read_rows(run):
        merged.setdefault(row["batch"], {}).update(row)
    rows = [merged[b] for b in sorted(merged)]
    last = rows[-1]["batch"]
    half = [r for r in rows if r["batch"] > last // 2]
    logged = [r for r in half if "moe/max_over_mean" in r]
    layers = sorted({k.split("/")[1] for r in logged for k in r if k.endswith("/over_capacity_1.25")})
    times = [r["time/train"] for r in rows]  # hours since the start of training
    steps = [3600 * (b - a) for a, b in zip(times, times[1:], strict=False)][last // 2 :]
    return {
        "eval_ce": [
            r["metrics/eval/LanguageCrossEntropy"] for r in rows if "metrics/eval/LanguageCrossEntropy" in r
        ][-1],
        "max_over_mean": max(
            statistics.mean(r[f"moe/{layer}/max_over_mean"] for r in logged) for layer in layers
        ),
        "over_1.25": max(
            statistics.mean(r[f"moe/{layer}/over_capacity_1.25"] for r in logged) for layer in layers
        ),
        "step_s": statistics.median(steps),
        "load": json.loads(load.read_text())[1] if (load := run / "loadavg.json").is_file() else float("nan"),
    }


def table(results: dict[str, dict[str, float]]) -> str:
    lines = [
        "| variant | eval CE | worst max/mean load | worst over capacity 1.25 | step time in its run (s) "
        "| load (5-min avg at its end) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['eval_ce']:.4f} | {r['max_over_mean']:.2f} | {100 * r['over_1.25']:.1f}% "
            f"| {r['step_s']:.2f} | {r['load']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="data/default", help="the default corpus (make data)")
    parser.add_argument("--out", default="runs/balance", help="one run folder per variant")
    parser.add_argument(
        "--max-duration",
        default="120ba",
        help="training length of every variant (NNba; 120ba: the tiny pretraining)",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        help="model.vocab_size for a corpus whose token ids were folded below it (tests/small_vocab.py); "
        "default: the YAML's 100352",
    )
    parser.add_argument(
        "--seed", type=int, help="another seed than the YAML's 17 (weights and sample order): the noise"
    )
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)
    out = Path(args.out)
    results = {
        name: summarize(
            run_variant(name, out, Path(args.data), args.max_duration, args.vocab_size, args.seed)
        )
        for name in args.variants
    }
    print(table(results))


if __name__ == "__main__":
    main()
