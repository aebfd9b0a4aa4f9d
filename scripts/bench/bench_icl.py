"""What ICL evaluation adds to `make train`: one evaluation of the default suite against one training
step of the tiny model, measured interleaved in one process (so machine load hits both alike).

    python scripts/bench/bench_icl.py [--data data/default] [--rounds 3]

Prints seconds per evaluation and per step, their ratio, and the share of `make train`'s steps +
evaluations that ICL takes with the tiny YAMLs' schedule (pretraining: 120 steps, ICL at 40/80/120;
fine-tuning: 40 steps, ICL at 20/40). Needs the default corpus (`make data`) for the suite's files.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from dbrx_train.config.run import load_config
from dbrx_train.data.tokenizer import load_tokenizer
from dbrx_train.eval.icl_suite import build_icl_suite, evaluate_suite, model_generate_fn, model_logits_fn
from dbrx_train.model import DbrxForCausalLM

ROOT = Path(__file__).resolve().parents[2]
SCHEDULE = {"pretrain": (120, 3), "finetune": (40, 2)}  # (steps, ICL evaluations) of make train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="data/default", help="the default corpus (with icl/)")
    parser.add_argument("--rounds", type=int, default=3, help="evaluations (and step pairs) measured")
    args = parser.parse_args(argv)
    cfg = load_config(ROOT / "yamls/pretrain/dbrx-tiny.yaml", [f"variables.data_root={args.data}"])
    tokenizer = load_tokenizer()
    suite = build_icl_suite(
        cfg.icl_tasks,
        tokenizer,
        default_batch_size=16,
        icl_seq_len=cfg.max_seq_len,
        gauntlet=cfg.eval_gauntlet,
    )
    torch.manual_seed(0)
    model = DbrxForCausalLM(cfg.model.dbrx)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, 100_000, (cfg.global_train_batch_size, cfg.max_seq_len))

    def step() -> float:
        started = time.perf_counter()
        model.train()
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - started

    def evaluate() -> float:
        started = time.perf_counter()
        model.eval()
        with torch.no_grad():
            evaluate_suite(suite, model_logits_fn(model, "cpu"), model_generate_fn(model), tokenizer)
        return time.perf_counter() - started

    step()  # warm-up
    steps, evals = [], []
    for _ in range(args.rounds):
        steps += [step(), step()]
        evals.append(evaluate())
    s, e = statistics.median(steps), statistics.median(evals)
    questions = sum(len(t.questions) for t in suite.tasks)
    print(f"ICL suite: {len(suite.tasks)} tasks, {questions} questions")
    print(f"one ICL evaluation: {e:.2f} s   one training step: {s:.2f} s   ratio: {e / s:.2f} steps")
    total_steps = sum(n for n, _ in SCHEDULE.values())
    total_evals = sum(k for _, k in SCHEDULE.values())
    share = total_evals * e / (total_steps * s + total_evals * e)
    print(
        f"make train: {total_steps} steps + {total_evals} ICL evaluations -> ICL is {100 * share:.1f}% of "
        "steps + ICL (less of the whole wall time, which also holds data, LM eval, checkpoints, start-up)"
    )


if __name__ == "__main__":
    main()
