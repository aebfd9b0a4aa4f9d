"""``icl_tasks:`` and ``eval_gauntlet:`` — in-context-learning evaluation, in LLM Foundry's keys.

Each task names a local jsonl file in Foundry's format for its ``icl_task_type`` (docs/eval.md). Both
sections may also be given as the path of a YAML file holding them (``icl_tasks: eval/tasks.yaml``),
as Foundry allows; the file's content then replaces the path in the resolved config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf

from dbrx_train.config.schema import ConfigError

ICL_TASK_TYPES = ("language_modeling", "multiple_choice", "schema", "generation_task_with_answers")
# The one metric each task type computes (Foundry's default metric_names), by Foundry's class name.
ICL_METRICS = {
    "language_modeling": "InContextLearningLMAccuracy",
    "multiple_choice": "InContextLearningMultipleChoiceAccuracy",
    "schema": "InContextLearningMultipleChoiceAccuracy",
    "generation_task_with_answers": "InContextLearningGenerationExactMatchAccuracy",
}


@dataclass
class ICLTaskConfig:
    """One entry of ``icl_tasks:``; the prompt keys mean what they mean in LLM Foundry."""

    label: str  # the task's name in metric keys: icl/<label>/<shots>-shot/<metric>
    # A local .jsonl file, one example per line, with the fields of icl_task_type (docs/eval.md).
    dataset_uri: str
    # language_modeling: context/continuation, right if every continuation token is the greedy one.
    # multiple_choice: query/choices/gold; schema: context_options/continuation/gold; both pick the
    # option with the lowest mean per-token loss of its continuation. generation_task_with_answers:
    # context/answer(/aliases), greedy generation with the KV cache, exact match after normalisation.
    icl_task_type: Literal[ICL_TASK_TYPES]
    # One evaluation per entry: that many solved examples (drawn from the same file, never the
    # example itself) precede each question.
    num_fewshot: list[int] = field(default_factory=lambda: [0])
    batch_size: int | None = None  # sequences per forward on one device; null: device_eval_batch_size
    # Tokens per sequence (prompt + answer), cut from the left of the context; null: icl_seq_len.
    max_seq_len: int | None = None
    # Only the task type's own metric (ICL_METRICS); null: that metric.
    metric_names: list[str] | None = None
    prompt_string: str = ""  # text once before the few-shot examples and the question
    example_delimiter: str = "\n"  # text between consecutive examples
    continuation_delimiter: str = " "  # text between an example's context and its answer
    prelimiter: str = ""  # text before every example's context (e.g. "Question: ")
    fewshot_random_seed: int = 1234  # seeds the choice of few-shot examples
    # Strip whitespace from the file's string fields and the end of each context (Foundry's default);
    # false keeps it, e.g. for code where indentation matters.
    strip_dataset: bool = True
    # generation_task_with_answers: the generated text is cut at the first of these strings.
    early_stopping_criteria: list[str] | None = None
    # generation_task_with_answers with a `chain_of_thought` field: the answer is what follows this.
    cot_delimiter: str = ""
    # generation_task_with_answers: compare lower-cased, without punctuation, articles or extra spaces.
    do_normalization: bool = True

    def __post_init__(self):
        if not self.label or "/" in self.label:
            raise ValueError(f"label must be a non-empty name without '/'; got {self.label!r}")
        if not self.num_fewshot or any(n < 0 for n in self.num_fewshot):
            raise ValueError(f"num_fewshot must be a non-empty list of counts >= 0; got {self.num_fewshot}")
        if len(set(self.num_fewshot)) != len(self.num_fewshot):
            raise ValueError(f"num_fewshot lists a count twice: {self.num_fewshot}")
        for key in ("batch_size", "max_seq_len"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"{key} must be positive; got {value}")
        metric = ICL_METRICS[self.icl_task_type]
        if self.metric_names is not None and self.metric_names != [metric]:
            raise ValueError(
                f"metric_names: {self.icl_task_type} computes [{metric}] only; got {self.metric_names}"
            )
        if "://" in self.dataset_uri:
            raise ValueError(
                f"dataset_uri {self.dataset_uri!r}: only local files are read (no network at run time); "
                "download the jsonl and give its path"
            )

    @property
    def metric(self) -> str:
        return ICL_METRICS[self.icl_task_type]


@dataclass
class GauntletBenchmark:
    name: str  # an icl_tasks label
    num_fewshot: int  # which of the task's num_fewshot evaluations counts
    random_baseline: float = 0.0  # the accuracy of guessing (e.g. 0.25 for four choices)


@dataclass
class GauntletCategory:
    name: str  # the category's name in metric keys: icl/metrics/eval_gauntlet/<name>
    benchmarks: list[GauntletBenchmark]  # the tasks averaged into the category's score


@dataclass
class EvalGauntletConfig:
    """``eval_gauntlet:`` LLM Foundry's composite score over icl_tasks, logged as
    icl/metrics/eval_gauntlet/<category> and icl/metrics/eval_gauntlet/<average>."""

    categories: list[GauntletCategory]  # each benchmark's score is averaged into its category
    # How benchmarks are weighted within a category: EQUAL, SAMPLE_SZ (by examples) or LOG_SAMPLE_SZ
    # (by log2 of examples).
    weighting: Literal["EQUAL", "SAMPLE_SZ", "LOG_SAMPLE_SZ"] = "EQUAL"
    subtract_random_baseline: bool = True  # score = accuracy - random_baseline
    # With subtract_random_baseline: also divide by (1 - random_baseline), so a perfect score is 1.
    rescale_accuracy: bool = True
    # Named averages over categories; null: one, `default_average`, over all categories.
    averages: dict[str, list[str]] | None = None

    def __post_init__(self):
        if self.rescale_accuracy and not self.subtract_random_baseline:
            raise ValueError("rescale_accuracy needs subtract_random_baseline: true")
        names = [c.name for c in self.categories]
        for average, members in (self.averages or {}).items():
            if average in names:
                raise ValueError(f"average {average!r} has the name of a category")
            unknown = [m for m in members if m not in names]
            if unknown:
                raise ValueError(f"average {average!r} names unknown categories {unknown}")


def expand_file_reference(data: dict[str, Any], key: str) -> None:
    """``key: path/to.yaml`` -> the file's ``key:`` section, in place (Foundry's file form).
    A relative path is taken from the working directory, as every other path in the config."""
    value = data.get(key)
    if not isinstance(value, str):
        return
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"{key}: {value!r} is neither a list of tasks nor an existing YAML file")
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # yaml errors carry line and column
        raise ConfigError(f"{key}: {path} is not valid YAML: {e}") from e
    if not isinstance(loaded, dict) or key not in loaded:
        raise ConfigError(f"{key}: {path} must hold a top-level '{key}:' section")
    data[key] = loaded[key]


def check_gauntlet(gauntlet: EvalGauntletConfig, tasks: list[ICLTaskConfig]) -> None:
    """Every benchmark names a task and one of its shot counts, so no category is silently dropped."""
    shots = {t.label: t.num_fewshot for t in tasks}
    for category in gauntlet.categories:
        for bench in category.benchmarks:
            if bench.name not in shots:
                raise ConfigError(
                    f"eval_gauntlet: category {category.name!r} names benchmark {bench.name!r}, which is not "
                    f"an icl_tasks label ({', '.join(shots) or 'none'})"
                )
            if bench.num_fewshot not in shots[bench.name]:
                raise ConfigError(
                    f"eval_gauntlet: benchmark {bench.name!r} asks for {bench.num_fewshot}-shot but icl_tasks "
                    f"evaluates it at num_fewshot {shots[bench.name]}"
                )
