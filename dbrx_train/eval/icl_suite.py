"""A run's ICL tasks: read and checked, prepared per shot count, scored, reduced to accuracies.

The same code scores a sharded model inside training (training/icl_eval.py) and any model outside
it (`dbrx-train eval --icl-tasks`), so the two give the same numbers for the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dbrx_train.config.icl import EvalGauntletConfig, ICLTaskConfig
from dbrx_train.config.schema import ConfigError
from dbrx_train.data.tokenizer import DbrxTokenizer
from dbrx_train.eval.gauntlet import GAUNTLET_PREFIX, gauntlet_scores
from dbrx_train.eval.icl_data import TaskFileError, read_task_file
from dbrx_train.eval.icl_prompts import PreparedTask, prepare_task
from dbrx_train.eval.icl_scoring import GenerateFn, LogitsFn, QuestionResult, batches_of, score_task
from dbrx_train.model.generate import SamplingConfig, generate

ICL_PREFIX = "icl/"  # metric keys: icl/<label>/<n>-shot/<metric>


def read_icl_tasks(tasks: list[ICLTaskConfig]) -> dict[str, list[dict[str, Any]]]:
    """Every task file read and checked: {label: examples}; ConfigError naming file, line and field."""
    try:
        return {t.label: read_task_file(t.dataset_uri, t.icl_task_type) for t in tasks}
    except TaskFileError as e:
        raise ConfigError(f"icl_tasks: {e}") from None


@dataclass
class ICLSuite:
    tasks: list[PreparedTask]
    batch_sizes: dict[str, int]  # by task key (<label>/<n>-shot): sequences per forward
    subset_num_batches: int | None = None
    gauntlet: EvalGauntletConfig | None = None

    def num_questions(self, task: PreparedTask) -> int:
        """Questions scored per evaluation (all, or those of the first icl_subset_num_batches batches)."""
        batches = batches_of(task, self.batch_sizes[task.key])[: self.subset_num_batches]
        return sum(len(b) for b in batches)

    def chance(self, task: PreparedTask) -> float:
        """The accuracy of random guessing: mean of 1 / options (0 for LM and generation tasks)."""
        questions = task.questions[: self.num_questions(task)]
        if task.task_type in ("multiple_choice", "schema"):
            return sum(1 / len(q.sequences) for q in questions) / len(questions)
        return 0.0


def build_icl_suite(
    tasks: list[ICLTaskConfig],
    tokenizer: DbrxTokenizer,
    *,
    default_batch_size: int,
    icl_seq_len: int,
    subset_num_batches: int | None = None,
    gauntlet: EvalGauntletConfig | None = None,
) -> ICLSuite:
    examples = read_icl_tasks(tasks)
    prepared, batch_sizes = [], {}
    for task in tasks:
        for shots in task.num_fewshot:
            try:
                p = prepare_task(
                    task, examples[task.label], shots, task.max_seq_len or icl_seq_len, tokenizer
                )
            except ValueError as e:
                raise ConfigError(f"icl_tasks {task.label!r}: {e}") from None
            prepared.append(p)
            batch_sizes[p.key] = task.batch_size or default_batch_size
    return ICLSuite(prepared, batch_sizes, subset_num_batches, gauntlet)


@dataclass
class ICLScores:
    correct: dict[str, float]  # by task key, summed over ranks
    total: dict[str, float]
    metrics: dict[str, str]  # task key -> metric name
    gauntlet: dict[str, float] | None = None

    @property
    def accuracies(self) -> dict[str, float]:
        return {k: self.correct[k] / self.total[k] for k in self.correct}

    def logged(self) -> dict[str, float]:
        """icl/<label>/<n>-shot/<metric> and Foundry's icl/metrics/eval_gauntlet/<name>."""
        out = {f"{ICL_PREFIX}{k}/{self.metrics[k]}": v for k, v in self.accuracies.items()}
        out.update({f"{GAUNTLET_PREFIX}{k}": v for k, v in (self.gauntlet or {}).items()})
        return out


def evaluate_suite(
    suite: ICLSuite,
    logits_fn: LogitsFn,
    generate_fn: GenerateFn | None,
    tokenizer: DbrxTokenizer,
    *,
    rank: int = 0,
    world_size: int = 1,
    sum_over_ranks: Callable[[list[float]], list[float]] = lambda values: values,
    details: dict[str, dict[int, QuestionResult]] | None = None,
) -> ICLScores:
    """Score this rank's share of every task; totals summed over ranks by `sum_over_ranks` (one call).
    `details`, if given, receives this rank's per-question results by task key."""
    correct: list[float] = []
    total: list[float] = []
    for task in suite.tasks:
        results = score_task(
            task,
            suite.batch_sizes[task.key],
            logits_fn,
            generate_fn,
            tokenizer.decode,
            tokenizer.pad_token_id,
            rank=rank,
            world_size=world_size,
            max_batches=suite.subset_num_batches,
        )
        if details is not None:
            details[task.key] = results
        correct.append(float(sum(r.correct for r in results.values())))
        total.append(float(len(results)))
    summed = sum_over_ranks(correct + total)
    n = len(suite.tasks)
    keys = [t.key for t in suite.tasks]
    scores = ICLScores(
        dict(zip(keys, summed[:n], strict=True)),
        dict(zip(keys, summed[n:], strict=True)),
        {t.key: t.metric for t in suite.tasks},
    )
    if suite.gauntlet is not None:
        sizes = {t.key: suite.num_questions(t) for t in suite.tasks}
        scores.gauntlet = gauntlet_scores(suite.gauntlet, scores.accuracies, sizes)
    return scores


def model_logits_fn(model: torch.nn.Module, device: torch.device | str) -> LogitsFn:
    """Logits of our DbrxForCausalLM at the scored positions only (no LM head elsewhere)."""

    def logits(ids_BT: torch.Tensor, positions_BC: torch.Tensor) -> torch.Tensor:
        return model(ids_BT.to(device), logits_positions=positions_BC.to(device)).logits

    return logits


def model_generate_fn(
    model: torch.nn.Module, all_finished: Callable[[bool], bool] | None = None
) -> GenerateFn:
    """Greedy generation with our model's KV cache; `all_finished` makes sharded ranks step together."""

    def generate_ids(prompts: list[list[int]], max_new_tokens: int, finished) -> list[list[int]]:
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
        return generate(model, prompts, cfg, finished=finished, all_finished=all_finished)

    return generate_ids
