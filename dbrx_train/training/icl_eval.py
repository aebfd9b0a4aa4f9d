"""``icl_tasks``: ICL scores of the sharded model at eval_interval, at the end, and with eval_first.

The schedule is Composer's own for evaluators (create_interval_scheduler with the FIT_END final
event), so ICL tasks run exactly when `eval_loader` is evaluated. Every rank scores its share of
each task (dbrx_train/eval/icl_scoring.py: whole batches, the same ones on any world size) on the
FSDP-sharded model, the totals are summed over ranks, and rank 0's logger writes
icl/<label>/<n>-shot/<metric> (and the gauntlet's scores) to metrics.jsonl, W&B and the console.
"""

from __future__ import annotations

import logging
import time

import torch
from composer.core import Callback, Event, State, get_precision_context
from composer.loggers import Logger
from composer.utils import create_interval_scheduler, dist, model_eval_mode

from dbrx_train.config.run import BatchLayout, TrainConfig
from dbrx_train.data.tokenizer import DbrxTokenizer, load_tokenizer
from dbrx_train.eval.icl_suite import ICLScores, ICLSuite, build_icl_suite, evaluate_suite, model_generate_fn

log = logging.getLogger("dbrx_train")

SECONDS_KEY = "icl/eval_seconds"  # wall time of one evaluation of every task, logged with the scores


class ICLEvaluation(Callback):
    def __init__(self, suite: ICLSuite, tokenizer: DbrxTokenizer, eval_interval: str):
        self.suite = suite
        self.tokenizer = tokenizer
        self.due = create_interval_scheduler(
            eval_interval, checkpoint_events=False, final_events={Event.FIT_END}
        )
        self.latest: ICLScores | None = None
        self.latest_batch: int | None = None
        self.seconds = 0.0  # spent in ICL evaluation by this run

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.due(state, Event.BATCH_END):
            self.evaluate(state, logger)

    def epoch_end(self, state: State, logger: Logger) -> None:
        if self.due(state, Event.EPOCH_END):
            self.evaluate(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        if self.due(state, Event.FIT_END) and self.latest_batch != int(state.timestamp.batch):
            self.evaluate(state, logger)

    def evaluate(self, state: State, logger: Logger) -> ICLScores:
        """Score every task now (all ranks must call this together)."""
        model = state.model.model  # DbrxForCausalLM: its forward gathers the FSDP shards

        def logits(ids_BT: torch.Tensor, positions_BC: torch.Tensor) -> torch.Tensor:
            to_device = state.device.tensor_to_device
            return model(to_device(ids_BT), logits_positions=to_device(positions_BC)).logits

        world_size = dist.get_world_size()

        def all_finished(done_here: bool) -> bool:
            if world_size == 1:
                return done_here
            busy = state.device.tensor_to_device(torch.tensor([0 if done_here else 1]))
            dist.all_reduce(busy, reduce_operation="MAX")
            return int(busy.item()) == 0

        def sum_over_ranks(values: list[float]) -> list[float]:
            if world_size == 1:
                return values
            totals = state.device.tensor_to_device(torch.tensor(values, dtype=torch.float64))
            dist.all_reduce(totals, reduce_operation="SUM")
            return totals.cpu().tolist()

        started = time.monotonic()
        with (
            torch.no_grad(),
            model_eval_mode(state.model),
            get_precision_context(state.precision, state.precision_config),
        ):
            scores = evaluate_suite(
                self.suite,
                logits,
                model_generate_fn(model, all_finished),
                self.tokenizer,
                rank=dist.get_global_rank(),
                world_size=world_size,
                sum_over_ranks=sum_over_ranks,
            )
        elapsed = time.monotonic() - started
        self.seconds += elapsed
        self.latest, self.latest_batch = scores, int(state.timestamp.batch)
        logger.log_metrics({**scores.logged(), SECONDS_KEY: elapsed})
        return scores

    def summary_lines(self) -> list[str]:
        """For the end-of-run summary: each task's latest accuracy against chance, the gauntlet."""
        if self.latest is None:
            return []
        lines = [
            f"  ICL tasks at batch {self.latest_batch} ({self.seconds:.0f}s of ICL evaluation in this run):"
        ]
        for task in self.suite.tasks:
            accuracy = self.latest.accuracies[task.key]
            lines.append(
                f"    {task.key:<28} {accuracy:.3f}  (chance {self.suite.chance(task):.3f}, "
                f"{int(self.latest.total[task.key])} questions)"
            )
        for name, score in (self.latest.gauntlet or {}).items():
            lines.append(f"    gauntlet {name:<19} {score:+.3f}")
        return lines


def build_icl_evaluation(cfg: TrainConfig, layout: BatchLayout) -> ICLEvaluation | None:
    """The callback for the config's icl_tasks (None without them); task files are read and prompts
    tokenized here, before the model is built, so a bad file stops the run in seconds."""
    if not cfg.icl_tasks:
        return None
    tokenizer = load_tokenizer()
    suite = build_icl_suite(
        cfg.icl_tasks,
        tokenizer,
        default_batch_size=layout.device_eval_batch_size,
        icl_seq_len=cfg.icl_seq_len or cfg.max_seq_len,
        subset_num_batches=cfg.icl_subset_num_batches,
        gauntlet=cfg.eval_gauntlet,
    )
    counts = ", ".join(f"{t.key} ({len(t.questions)})" for t in suite.tasks)
    log.info("ICL tasks: %s, every %s and at the end", counts, cfg.eval_interval)
    return ICLEvaluation(suite, tokenizer, cfg.eval_interval)
