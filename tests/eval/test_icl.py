"""ICL tasks in-process: Foundry's prompt rules, metrics against a one-sequence-at-a-time reference,
rank shares, generation, task-file errors, the gauntlet, and the default suite's hold-out."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dbrx_train.config.icl import EvalGauntletConfig, ICLTaskConfig
from dbrx_train.config.run import load_config
from dbrx_train.config.schema import ConfigError, build
from dbrx_train.data.tokenizer import load_tokenizer
from dbrx_train.eval.gauntlet import gauntlet_scores
from dbrx_train.eval.icl_prompts import fewshot_indices, prepare_task
from dbrx_train.eval.icl_scoring import generation_is_correct, normalize_answer, score_task
from dbrx_train.eval.icl_suite import build_icl_suite, evaluate_suite, model_generate_fn, model_logits_fn
from dbrx_train.model.generate import SamplingConfig, generate
from tests.small_vocab import SMALL_VOCAB
from tests.tiny_models import text_dbrx

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "yamls/pretrain/dbrx-tiny.yaml"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    return text_dbrx(max_seq_len=96)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def task(path: str, kind: str, **keys) -> ICLTaskConfig:
    return build(
        ICLTaskConfig, {"label": Path(path).stem, "dataset_uri": path, "icl_task_type": kind, **keys}
    )


MC_ROWS = [
    {"query": f"Q{i}: {i} + {i} =", "choices": [str(2 * i), str(2 * i + 1), "none"], "gold": 0}
    for i in range(5)
]
SCHEMA_ROWS = [
    {"context_options": [f"The cat {i}", f"The dog {i}"], "continuation": "barked at the mail.", "gold": 1}
    for i in range(4)
]


def test_prompts_follow_foundry(tmp_path, tokenizer):
    decode = tokenizer.decode
    lm = task(
        write_jsonl(
            tmp_path / "lm.jsonl", [{"context": f"x{i} =", "continuation": f"{i}"} for i in range(4)]
        ),
        "language_modeling",
        prompt_string="Numbers:",
        example_delimiter="\n",
        continuation_delimiter=" ",
    )
    rows = [json.loads(line) for line in Path(lm.dataset_uri).read_text().splitlines()]
    prepared = prepare_task(lm, rows, 2, 64, tokenizer)
    rng = random.Random(1234)
    for index, question in enumerate(prepared.questions):
        shots = list(fewshot_indices(4, 2, index, rng))
        assert index not in shots and len(shots) == 2
        prompt = "Numbers:" + "".join(f"\nx{i} = {i}" for i in shots)
        [seq] = question.sequences
        assert decode(seq.ids) == f"{prompt}\nx{index} = {index}"
        # the prompt, the context and the answer are tokenized apart (token boundaries fall there)
        head = tokenizer.encode(prompt) + tokenizer.encode(f"\nx{index} =")
        assert seq.ids[: seq.start] == head and seq.ids[seq.start :] == tokenizer.encode(f" {index}")
    # multiple choice: each option after the query with a leading space; 0-shot
    mc = task(write_jsonl(tmp_path / "mc.jsonl", MC_ROWS), "multiple_choice")
    q = prepare_task(mc, MC_ROWS, 0, 64, tokenizer).questions[3]
    assert [decode(s.ids) for s in q.sequences] == ["Q3: 3 + 3 = 6", "Q3: 3 + 3 = 7", "Q3: 3 + 3 = none"]
    assert q.gold == 0 and all(decode(s.ids[s.start :]).startswith(" ") for s in q.sequences)
    # schema, Foundry's quirks: 0-shot options get no delimiter; with shots, the options follow the
    # example delimiter and the continuation is the shared answer
    schema = task(write_jsonl(tmp_path / "s.jsonl", SCHEMA_ROWS), "schema", continuation_delimiter=" ")
    q0 = prepare_task(schema, SCHEMA_ROWS, 0, 64, tokenizer).questions[0]
    assert [decode(s.ids) for s in q0.sequences] == [
        "The cat 0 barked at the mail.",
        "The dog 0 barked at the mail.",
    ]
    q1 = prepare_task(schema, SCHEMA_ROWS, 1, 64, tokenizer).questions[0]
    assert all(decode(s.ids).count("barked at the mail.") == 2 for s in q1.sequences)
    assert {decode(s.ids[s.start :]) for s in q1.sequences} == {" barked at the mail."}
    # a sequence longer than max_seq_len loses context from the left, never answer tokens
    short = prepare_task(lm, rows, 2, 6, tokenizer).questions[1].sequences[0]
    assert len(short.ids) == 6 and short.ids[short.start :] == tokenizer.encode(" 1")


def reference_mc(model, question) -> tuple[list[float], bool]:
    """One sequence at a time, full logits, no padding: the slow reference."""
    sums, means = [], []
    for seq in question.sequences:
        logits = model(torch.tensor([seq.ids])).logits[0].float()
        targets = torch.tensor(seq.ids[seq.start :])
        nll = F.cross_entropy(logits[seq.start - 1 : len(seq.ids) - 1], targets, reduction="none")
        sums.append(-float(nll.sum()))
        means.append(float(nll.mean()))
    return sums, means.index(min(means)) == question.gold


def test_scores_equal_a_one_sequence_reference_and_any_rank_split(tmp_path, tokenizer, model):
    mc = task(write_jsonl(tmp_path / "mc.jsonl", MC_ROWS), "multiple_choice", batch_size=7)
    prepared = prepare_task(mc, MC_ROWS, 1, 96, tokenizer)
    logits_fn = model_logits_fn(model, "cpu")
    calls = []

    def counting(ids, positions):
        calls.append(ids.shape)
        return logits_fn(ids, positions)

    with torch.no_grad():
        whole = score_task(prepared, 7, logits_fn, None, tokenizer.decode, tokenizer.pad_token_id)
        for i, question in enumerate(prepared.questions):
            sums, correct = reference_mc(model, question)
            assert whole[i].correct == correct
            assert whole[i].log_likelihoods == pytest.approx(sums, abs=1e-4)
        # 5 questions x 3 options, 7 sequences per batch -> 3 batches (2 questions each, then 1):
        # rank 0 scores batches 0 and 2, rank 1 batch 1 and then an empty forward to keep step
        shares = []
        for rank in (0, 1):
            calls.clear()
            shares.append(
                score_task(prepared, 7, counting, None, tokenizer.decode, tokenizer.pad_token_id, rank, 2)
            )
            assert len(calls) == 2
        assert sorted(shares[0]) == [0, 1, 4] and sorted(shares[1]) == [2, 3]
        for i, result in {**shares[0], **shares[1]}.items():
            assert result.correct == whole[i].correct and result.log_likelihoods == whole[i].log_likelihoods


def test_generation_with_kv_cache_equals_without(tmp_path, tokenizer, model):
    rows = [{"context": f"Q: name {i}?", "answer": "python", "aliases": ["py"]} for i in range(3)]
    gen = task(
        write_jsonl(tmp_path / "g.jsonl", rows),
        "generation_task_with_answers",
        continuation_delimiter="\nA:",
        early_stopping_criteria=["\n"],
    )
    prepared = prepare_task(gen, rows, 1, 96, tokenizer)
    assert prepared.max_new_tokens == 1  # Foundry: the longest answer or alias, in tokens
    with torch.no_grad():
        cached = generate(model, [q.prompt for q in prepared.questions], SamplingConfig(max_new_tokens=5))
        plain = generate(
            model, [q.prompt for q in prepared.questions], SamplingConfig(max_new_tokens=5, use_cache=False)
        )
        scored = score_task(
            prepared, 2, None, model_generate_fn(model), tokenizer.decode, tokenizer.pad_token_id
        )
    assert cached == plain
    assert [r.generation for r in scored.values()] == [tokenizer.decode(ids[:1]) for ids in cached]


def test_generation_metric_is_foundrys():
    prepared = type("T", (), {"stop_strings": ["\n"], "cot_delimiter": "", "do_normalization": True})()
    assert normalize_answer(" The  Python_3, language!") == "python 3 language"
    assert generation_is_correct(prepared, " the Python language\nQ: next", ["python"])
    assert not generation_is_correct(prepared, " a snake\npython", ["python"])  # cut at the stop string
    cot = type("T", (), {"stop_strings": [], "cot_delimiter": "#### ", "do_normalization": False})()
    assert generation_is_correct(cot, "2 + 2 is 4 #### 4 apples", ["4"])


def test_bad_task_files_are_one_line_naming_file_line_and_field(default_corpus, tmp_path):
    path = tmp_path / "mc.jsonl"
    cases = {
        '{"query": "q", "choices": ["a", "b"]}': "mc.jsonl:2: missing field 'gold'",
        '{"query": "q", "choices": ["a", "b"], "gold": 2}': "mc.jsonl:2: field 'gold' is 2, not an index",
        '{"query": "q", "choices": "ab", "gold": 0}': "mc.jsonl:2: field 'choices' must be list[str]",
        '{"query": "q", "choices": ["a", "b"], "gold": 0': "mc.jsonl:2: not a JSON object",
    }
    for line, message in cases.items():
        path.write_text(json.dumps(MC_ROWS[0]) + "\n" + line + "\n")
        overrides = [
            # the training data is checked first: default_corpus fits this model
            f"variables.data_root={default_corpus}",
            "max_seq_len=64",
            f"model.vocab_size={SMALL_VOCAB}",
            f"icl_tasks=[{{label: mc, dataset_uri: {path}, icl_task_type: multiple_choice}}]",
            "eval_gauntlet=null",
        ]
        cfg = load_config(TINY, overrides)
        from dbrx_train.training.preflight import check_config

        with pytest.raises(ConfigError) as error:
            check_config(cfg, "cpu", 1)
        # (other pre-run problems, e.g. a clean clone's missing data/, are listed beside it, one per line)
        assert [p for p in error.value.problems if message in p and "\n" not in p]
    bad_keys = {
        ("dataset_uri", "hf://datasets/x"): "only local files are read",
        ("icl_task_type", "qa"): "must be one of",
        (
            "metric_names",
            "[InContextLearningLMAccuracy]",
        ): "computes [InContextLearningMultipleChoiceAccuracy] only",
    }
    for (key, value), message in bad_keys.items():
        entry = {"label": "mc", "dataset_uri": str(path), "icl_task_type": "multiple_choice", key: value}
        text = ", ".join(f"{k}: {v}" for k, v in entry.items())
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_config(TINY, [f"icl_tasks=[{{{text}}}]", "eval_gauntlet=null"])
    gauntlet = "eval_gauntlet={categories: [{name: c, benchmarks: [{name: nope, num_fewshot: 0}]}]}"
    with pytest.raises(ConfigError, match="names benchmark 'nope', which is not an icl_tasks label"):
        load_config(TINY, [gauntlet])


def test_gauntlet_is_foundrys_arithmetic():
    gauntlet = build(
        EvalGauntletConfig,
        {
            "weighting": "SAMPLE_SZ",
            "categories": [
                {"name": "a", "benchmarks": [{"name": "x", "num_fewshot": 0, "random_baseline": 0.25}]},
                {
                    "name": "b",
                    "benchmarks": [
                        {"name": "y", "num_fewshot": 0, "random_baseline": 0.5},
                        {"name": "z", "num_fewshot": 1},
                    ],
                },
            ],
        },
    )
    scores = gauntlet_scores(
        gauntlet,
        {"x/0-shot": 0.5, "y/0-shot": 0.75, "z/1-shot": 0.1},
        {"x/0-shot": 10, "y/0-shot": 30, "z/1-shot": 10},
    )
    assert scores["a"] == pytest.approx((0.5 - 0.25) / 0.75)
    assert scores["b"] == pytest.approx((0.5 * 30 + 0.1 * 10) / 40)
    assert scores["default_average"] == pytest.approx((scores["a"] + scores["b"]) / 2)


def test_default_suite_is_held_out_of_pretraining(real_vocab_corpus, tokenizer, model):
    sys.path.insert(0, str(ROOT / "data_prep"))
    from pydoc_data.topics import topics

    from default_icl_suite import held_out_blocks, topic_blocks, without_held_out

    held = 0
    for name, text in topics.items():
        blocks = topic_blocks(text)
        kept = without_held_out(name, text)
        for i in held_out_blocks(name, text):
            assert i >= 3 and blocks[i] not in kept  # never the title or the first two paragraphs
            held += 1
    assert held > 50
    cfg = load_config(TINY, [f"variables.data_root={real_vocab_corpus}"])
    suite = build_icl_suite(
        cfg.icl_tasks,
        tokenizer,
        default_batch_size=16,
        icl_seq_len=96,
        subset_num_batches=1,
        gauntlet=cfg.eval_gauntlet,
    )
    manifest = json.loads((real_vocab_corpus / "manifest.json").read_text())
    assert {t.label for t in suite.tasks} == set(manifest["icl"])
    with torch.no_grad():
        scores = evaluate_suite(suite, model_logits_fn(model, "cpu"), model_generate_fn(model), tokenizer)
    assert set(scores.logged()) >= {
        "icl/pydoc_topic/0-shot/InContextLearningMultipleChoiceAccuracy",
        "icl/stdlib_line_end_qa/0-shot/InContextLearningGenerationExactMatchAccuracy",
        "icl/metrics/eval_gauntlet/default_average",
    }
    assert suite.chance(suite.tasks[0]) == pytest.approx(0.25)
