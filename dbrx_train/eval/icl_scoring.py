"""Scoring prepared ICL tasks with a model: batches, forwards, LLM Foundry's metrics.

Batches are formed over the whole task, the same way on any number of ranks, and each rank scores
whole batches (batch i on rank i mod world): every question is computed in the same batch, with the
same padding, whether one rank or eight score the task, so the totals summed over ranks are identical.
A rank with fewer batches runs empty forwards so that every rank runs as many as the others (FSDP
gathers weights in every forward: all ranks must take part in each).

Metrics, as Foundry's (llmfoundry/eval/metrics/nlp.py):
- language_modeling: right iff every continuation token is the argmax of the logits before it;
- multiple_choice and schema: the option with the lowest exp(mean cross-entropy) of its continuation
  (the first one on a tie) is the model's answer;
- generation_task_with_answers: the greedy generation, cut at the first stop string and after the
  chain-of-thought delimiter, normalised (lower case, no punctuation/articles/extra spaces) unless
  do_normalization is off, is right iff it starts with the normalised answer or one of its aliases.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dbrx_train.eval.icl_prompts import GenerationQuestion, PreparedTask, ScoredQuestion

# ((B, T) token ids, (B, C) positions) -> (B, C, V) logits at those positions
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (prompts, max_new_tokens, is_finished(new ids) -> bool) -> new ids per prompt (greedy, KV cache)
GenerateFn = Callable[[list[list[int]], int, Callable[[list[int]], bool]], list[list[int]]]


@dataclass
class QuestionResult:
    correct: bool
    # multiple_choice/schema: per option, the continuation's summed log-probability and token count
    # (for checks against other tools); generation: the generated text.
    log_likelihoods: list[float] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)
    generation: str | None = None


def batches_of(task: PreparedTask, batch_size: int) -> list[list[int]]:
    """Question indices per batch. A batch holds up to batch_size sequences; a multiple-choice
    question's options stay together (at least one question per batch), as in Foundry."""
    batches: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for i, question in enumerate(task.questions):
        n = len(question.sequences) if isinstance(question, ScoredQuestion) else 1
        if current and rows + n > batch_size:
            batches.append(current)
            current, rows = [], 0
        current.append(i)
        rows += n
    if current:
        batches.append(current)
    return batches


def normalize_answer(answer: str) -> str:
    """Foundry's (TriviaQA's) normalisation: lower case, '_' -> ' ', no punctuation, no articles,
    single spaces."""
    text = answer.replace("_", " ").lower()
    excluded = set(string.punctuation + "‘’´`")
    text = "".join(" " if ch in excluded else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split()).strip()


def generation_is_correct(task: PreparedTask, text: str, answers: list[str]) -> bool:
    if task.stop_strings:
        text = re.split("|".join(task.stop_strings), text)[0]
    if task.cot_delimiter:
        text = text.split(task.cot_delimiter)[-1]
    if task.do_normalization:
        text, answers = normalize_answer(text), [normalize_answer(a) for a in answers]
    else:
        text, answers = text.strip(), [a.strip() for a in answers]
    return any(text.startswith(a) for a in answers)


def score_questions(
    logits_fn: LogitsFn, questions: list[ScoredQuestion], pad_id: int
) -> list[QuestionResult]:
    """One forward over every sequence of `questions`, right-padded (causal: padding after a
    sequence cannot change its logits, so no attention mask is needed)."""
    rows = [seq for q in questions for seq in q.sequences]
    longest = max(len(seq.ids) for seq in rows)
    widest = max(len(seq.ids) - seq.start for seq in rows)
    ids_BT = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    # Position t's logits predict token t + 1: an answer's tokens are scored at [start - 1, end - 1).
    positions_BC = torch.zeros((len(rows), widest), dtype=torch.long)
    for b, seq in enumerate(rows):
        ids_BT[b, : len(seq.ids)] = torch.tensor(seq.ids)
        positions_BC[b] = torch.arange(seq.start - 1, seq.start - 1 + widest).clamp(max=len(seq.ids) - 2)
    logits_BCV = logits_fn(ids_BT, positions_BC).float()
    results, row = [], 0
    for question in questions:
        losses, sums, counts, greedy = [], [], [], True
        for seq in question.sequences:
            n = len(seq.ids) - seq.start
            logits_CV = logits_BCV[row, :n]
            targets_C = ids_BT[row, seq.start : len(seq.ids)].to(logits_CV.device)
            loss_C = F.cross_entropy(logits_CV, targets_C, reduction="none")
            losses.append(torch.exp(loss_C.mean()))  # Foundry's per-token perplexity
            sums.append(-float(loss_C.sum()))
            counts.append(n)
            greedy = bool((logits_CV.argmax(dim=-1) == targets_C).all())
            row += 1
        if len(question.sequences) == 1:  # language_modeling
            correct = greedy
        else:
            values = [float(v) for v in losses]
            correct = values.index(min(values)) == question.gold
        results.append(QuestionResult(correct, sums, counts))
    return results


def generate_answers(
    generate_fn: GenerateFn, task: PreparedTask, questions: list[GenerationQuestion], decode: Callable
) -> list[QuestionResult]:
    def finished(new_ids: list[int]) -> bool:
        return bool(task.stop_strings) and any(s in decode(new_ids) for s in task.stop_strings)

    outputs = generate_fn([q.prompt for q in questions], task.max_new_tokens, finished)
    results = []
    for question, new_ids in zip(questions, outputs, strict=True):
        text = decode(new_ids)
        results.append(QuestionResult(generation_is_correct(task, text, question.answers), generation=text))
    return results


def score_task(
    task: PreparedTask,
    batch_size: int,
    logits_fn: LogitsFn,
    generate_fn: GenerateFn | None,
    decode: Callable[[list[int]], str],
    pad_id: int,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int | None = None,
) -> dict[int, QuestionResult]:
    """This rank's share of `task` (batch i on rank i % world_size), by question index. Every rank
    runs the same number of batches; ranks short of one run an empty one."""
    batches = batches_of(task, batch_size)[:max_batches]
    mine = batches[rank::world_size]
    rounds = -(-len(batches) // world_size)
    results: dict[int, QuestionResult] = {}
    generation = task.task_type == "generation_task_with_answers"
    for r in range(rounds):
        if r >= len(mine):  # keep step with the other ranks
            if generation:
                generate_fn([[pad_id]], task.max_new_tokens, lambda ids: True)
            else:
                logits_fn(torch.full((1, 1), pad_id, dtype=torch.long), torch.zeros((1, 1), dtype=torch.long))
            continue
        questions = [task.questions[i] for i in mine[r]]
        if generation:
            scored = generate_answers(generate_fn, task, questions, decode)
        else:
            scored = score_questions(logits_fn, questions, pad_id)
        results.update(zip(mine[r], scored, strict=True))
    return results
