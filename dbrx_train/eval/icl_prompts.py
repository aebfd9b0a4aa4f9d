"""ICL examples -> token sequences, exactly as LLM Foundry builds them.

Foundry's rules (llmfoundry/eval/datasets/in_context_learning_evaluation.py), kept here so that a
task scores the same in both tools:
- few-shot examples are drawn per question with one `random.Random(fewshot_random_seed)` per task
  and shot count, consumed in file order, never the question itself;
- the prompt is `prompt_string` + the few-shot examples, each `[example_delimiter] prelimiter
  context continuation_delimiter answer`; it is tokenized apart from the question's context, and the
  context apart from the answer (token boundaries fall there);
- with `strip_dataset` the file's string fields are stripped and the question's context right-
  stripped, and an answer gets a leading space (the tokenizer is GPT-style BPE, as Foundry detects);
- a sequence longer than max_seq_len loses tokens from the left of its context.
Schema tasks keep Foundry's quirks: without few-shot examples the options get no continuation
delimiter, with them the delimiter is right-stripped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from dbrx_train.config.icl import ICLTaskConfig
from dbrx_train.data.tokenizer import DbrxTokenizer

# Foundry lets a chain-of-thought answer run this many tokens past the longest reference.
COT_ANSWER_BUFFER = 10


class Sequence(NamedTuple):
    ids: list[int]  # context then continuation, cut from the left to max_seq_len
    start: int  # index of the first continuation token


@dataclass(frozen=True)
class ScoredQuestion:
    """language_modeling (one sequence), multiple_choice and schema (one per option)."""

    sequences: list[Sequence]
    gold: int


@dataclass(frozen=True)
class GenerationQuestion:
    prompt: list[int]  # cut from the left to max_seq_len - max_new_tokens
    answers: list[str]  # the answer and its aliases: a generation starting with any of them is right


@dataclass
class PreparedTask:
    """One (task, shot count): what is scored, and how."""

    label: str
    num_fewshot: int
    task_type: str
    metric: str
    questions: list[ScoredQuestion] | list[GenerationQuestion]
    max_new_tokens: int = 0  # generation only
    stop_strings: list[str] = field(default_factory=list)
    cot_delimiter: str = ""
    do_normalization: bool = True

    @property
    def key(self) -> str:
        return f"{self.label}/{self.num_fewshot}-shot"


def fewshot_indices(size: int, num_fewshot: int, example_idx: int, rng: random.Random) -> set[int]:
    """Foundry's get_fewshot_sample_idxs: a set (its iteration order is the prompt's order)."""
    num_fewshot = min(size - 1, num_fewshot)
    chosen = set(rng.sample(range(0, size), num_fewshot))
    if example_idx in chosen:
        chosen.remove(example_idx)
        if len(chosen) >= size - 1:
            return chosen
        replacement = rng.choice(range(0, size))
        while replacement in chosen or replacement == example_idx:
            replacement = rng.choice(range(0, size))
        chosen.add(replacement)
    return chosen


class PromptBuilder:
    """The strings and tokens of one task's questions (Foundry's InContextLearning*Dataset)."""

    def __init__(self, task: ICLTaskConfig, examples: list[dict[str, Any]], tokenizer: DbrxTokenizer):
        self.task = task
        self.tokenizer = tokenizer
        strip = task.strip_dataset
        self.examples = [
            {k: v.strip() if strip and isinstance(v, str) else v for k, v in e.items()} for e in examples
        ]
        self.prefix_space = len(tokenizer.encode(" a")) == 1  # GPT-style BPE: answers start with a space

    # ------------------------------------------------------------------ strings
    def answer(self, example: dict, in_context: bool) -> str:
        kind = self.task.icl_task_type
        if kind == "multiple_choice":
            return example["choices"][example["gold"]]
        if kind == "generation_task_with_answers":
            if "chain_of_thought" in example:
                return f"{example['chain_of_thought']}{self.task.cot_delimiter}{example['answer']}"
            return example["answer"]
        answer = example["continuation"]
        if self.prefix_space and not answer.startswith(" ") and not in_context:
            answer = f" {answer}"
        return answer

    def context(self, example: dict, preceding: str, add_answer: bool) -> str:
        t = self.task
        if t.icl_task_type == "schema":  # the gold option with its continuation (few-shot use only)
            text = example["context_options"][example["gold"]]
            if preceding:
                text = f"{t.example_delimiter}{text}"
            return f"{t.prelimiter}{text}{t.continuation_delimiter}{example['continuation']}"
        text = example["query" if t.icl_task_type == "multiple_choice" else "context"]
        text = f"{t.prelimiter}{text}"
        if preceding:
            text = f"{t.example_delimiter}{text}"
        text = f"{text}{t.continuation_delimiter}"
        if add_answer:
            text += self.answer(example, in_context=True)
        return text

    def fewshot_prompt(self, num_fewshot: int, index: int, rng: random.Random) -> str:
        text = self.task.prompt_string
        if num_fewshot > 0:
            for i in fewshot_indices(len(self.examples), num_fewshot, index, rng):
                text += self.context(self.examples[i], text, add_answer=True)
        return text

    # ------------------------------------------------------------------ tokens
    def _sequence(self, context: list[int], continuation: list[int], max_len: int, where: str) -> Sequence:
        if len(continuation) > max_len:
            raise ValueError(
                f"{where}: the answer has {len(continuation)} tokens, more than max_seq_len={max_len}"
            )
        context = (
            context[-(max_len - len(continuation)) :]
            if len(context) + len(continuation) > max_len
            else context
        )
        return Sequence(context + continuation, len(context))

    def scored_question(self, index: int, preamble: str, max_len: int) -> ScoredQuestion:
        t, e, enc = self.task, self.examples[index], self.tokenizer.encode
        where = f"{t.dataset_uri} example {index + 1}"
        head = enc(preamble)
        if t.icl_task_type == "schema":
            if preamble:
                delimiter = t.continuation_delimiter.rstrip() if t.strip_dataset else t.continuation_delimiter
                options = [f"{t.prelimiter}{t.example_delimiter}{c}{delimiter}" for c in e["context_options"]]
            else:
                options = [f"{t.prelimiter}{c}" for c in e["context_options"]]
            continuation = e["continuation"]
            if self.prefix_space and not continuation.startswith(" "):
                continuation = f" {continuation}"
            tail = enc(continuation)
            return ScoredQuestion(
                [self._sequence(head + enc(o), tail, max_len, where) for o in options], e["gold"]
            )
        context = self.context(e, preamble, add_answer=False)
        if t.strip_dataset:
            context = context.rstrip()  # a prompt ending in a space makes BPE models degenerate
        head = head + enc(context)
        if t.icl_task_type == "language_modeling":
            return ScoredQuestion(
                [self._sequence(head, enc(self.answer(e, in_context=False)), max_len, where)], 0
            )
        choices = [f" {c}" if self.prefix_space and not c.startswith(" ") else c for c in e["choices"]]
        return ScoredQuestion([self._sequence(head, enc(c), max_len, where) for c in choices], e["gold"])

    def max_answer_tokens(self) -> int:
        """Foundry's max_answer_length: the longest answer or alias, + a buffer for chains of thought."""
        longest = 0
        for e in self.examples:
            for answer in [e["answer"], *e.get("aliases", [])]:
                if "chain_of_thought" in e:
                    answer = f"{e['chain_of_thought']}{self.task.cot_delimiter}{answer}"
                longest = max(longest, len(self.tokenizer.encode(answer)))
        return longest + (COT_ANSWER_BUFFER if self.task.cot_delimiter else 0)

    def generation_question(self, index: int, preamble: str, max_prompt_len: int) -> GenerationQuestion:
        e = self.examples[index]
        context = self.context(e, preamble, add_answer=False)
        if self.task.strip_dataset:
            context = context.rstrip()
        prompt = (self.tokenizer.encode(preamble) + self.tokenizer.encode(context))[-max_prompt_len:]
        answers = list(dict.fromkeys([e["answer"], *e.get("aliases", [])]))
        return GenerationQuestion(prompt, answers)


def prepare_task(
    task: ICLTaskConfig,
    examples: list[dict[str, Any]],
    num_fewshot: int,
    max_seq_len: int,
    tokenizer: DbrxTokenizer,
) -> PreparedTask:
    """Every question of `task` at `num_fewshot` shots, tokenized; raises ValueError naming the example."""
    builder = PromptBuilder(task, examples, tokenizer)
    rng = random.Random(task.fewshot_random_seed)  # one per (task, shots), as Foundry's datasets
    prepared = PreparedTask(task.label, num_fewshot, task.icl_task_type, task.metric, [])
    if task.icl_task_type == "generation_task_with_answers":
        max_new = max(builder.max_answer_tokens(), 1)
        if max_new >= max_seq_len:
            raise ValueError(
                f"{task.dataset_uri}: answers of {max_new} tokens leave no room in max_seq_len={max_seq_len}"
            )
        prepared.max_new_tokens = max_new
        prepared.stop_strings = list(task.early_stopping_criteria or [])
        prepared.cot_delimiter = task.cot_delimiter
        prepared.do_normalization = task.do_normalization
    for index in range(len(builder.examples)):
        preamble = builder.fewshot_prompt(num_fewshot, index, rng)
        if task.icl_task_type == "generation_task_with_answers":
            question = builder.generation_question(index, preamble, max_seq_len - prepared.max_new_tokens)
        else:
            question = builder.scored_question(index, preamble, max_seq_len)
        prepared.questions.append(question)
    return prepared
