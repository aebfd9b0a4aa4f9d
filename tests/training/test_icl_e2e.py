"""ICL tasks in real Composer runs: 1 rank and 2 gloo ranks (FSDP2) give identical scores, and the
final scores equal scoring the exported HF folder outside training (`dbrx-train eval --icl-tasks`,
and transformers' own DbrxForCausalLM for the log-likelihood tasks).

Two launches of 4 batches, with tiny task files of every type, few-shot included (the default suite
runs in test_train_e2e's runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.test_train_e2e import ROOT, launch, read_metrics

TYPES = {
    "lm": "language_modeling",
    "mc": "multiple_choice",
    "schema": "schema",
    "qa": "generation_task_with_answers",
}


def write_tasks(folder: Path) -> Path:
    words = "list dict tuple set str int float bytes module class def return yield import".split()
    rows = {
        "lm": [{"context": f"x = {w}(", "continuation": ")"} for w in words[:9]],
        "mc": [
            {"query": f"The Python type {w} is a", "choices": ["builtin", "keyword", "module"], "gold": i % 3}
            for i, w in enumerate(words[:9])
        ],
        "schema": [
            {
                "context_options": [f"A {w} holds", f"A {v} holds"],
                "continuation": "items in order.",
                "gold": i % 2,
            }
            for i, (w, v) in enumerate(zip(words[:7], words[7:], strict=True))
        ],
        "qa": [{"context": f"Q: the builtin {w}?", "answer": w, "aliases": [w.upper()]} for w in words[:7]],
    }
    folder.mkdir(parents=True)
    tasks = []
    for name, kind in TYPES.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
        extra = ', early_stopping_criteria: ["\\n"], continuation_delimiter: "\\nA:"' if name == "qa" else ""
        tasks.append(
            f"  - {{label: {name}, dataset_uri: {path}, icl_task_type: {kind}, num_fewshot: [0, 2], batch_size: 4{extra}}}"
        )
    yaml = folder / "tasks.yaml"
    gauntlet = (
        "eval_gauntlet:\n  categories:\n    - name: choice\n      benchmarks:\n"
        "        - {name: mc, num_fewshot: 2, random_baseline: 0.333}\n"
        "        - {name: schema, num_fewshot: 0, random_baseline: 0.5}\n"
    )
    # the same subset on both sides: the run gets it from COMMON, `dbrx-train eval` from this file
    yaml.write_text("icl_subset_num_batches: 3\nicl_tasks:\n" + "\n".join(tasks) + "\n" + gauntlet)
    return yaml


COMMON = (
    "max_duration=4ba",
    "eval_interval=2ba",
    "save_interval=4ba",
    "eval_first=true",
    "icl_subset_num_batches=3",
)


@pytest.fixture(scope="module")
def icl_runs(default_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("icl")
    tasks = write_tasks(root / "tasks")
    runs = {}
    for nproc in (1, 2):
        run_dir = root / f"run{nproc}"
        proc = launch(
            nproc,
            run_dir,
            default_corpus,
            *COMMON,
            f"icl_tasks={tasks}",
            f"eval_gauntlet={tasks}",
            "callbacks.hf_export.save_interval=4ba",
            "callbacks.hf_export.dtype=fp32",
        )
        runs[nproc] = (run_dir, proc)
    return tasks, runs


def icl_rows(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k.startswith("icl/") and k != "icl/eval_seconds"}
        | {"batch": r["batch"]}
        for r in read_metrics(run_dir)
        if any(k.startswith("icl/") for k in r)
    ]


@pytest.mark.slow
def test_icl_scores_identical_on_one_and_two_ranks(icl_runs):
    _, runs = icl_runs
    one, two = icl_rows(runs[1][0]), icl_rows(runs[2][0])
    # eval_first (on the first batch's line), at 2ba and at the end (4ba)
    assert [r["batch"] for r in one] == [1, 2, 4] == [r["batch"] for r in two]
    keys = set(one[0]) - {"batch"}
    for label in TYPES:
        for shots in (0, 2):
            assert any(k.startswith(f"icl/{label}/{shots}-shot/InContextLearning") for k in keys), (
                label,
                keys,
            )
    assert "icl/metrics/eval_gauntlet/choice" in keys and "icl/metrics/eval_gauntlet/default_average" in keys
    # same weights at eval_first: identical scores, every task, on 1 and 2 ranks
    assert one[0] == two[0]
    for rows in (one, two):
        assert all(0.0 <= v <= 1.0 for k, v in rows[-1].items() if k != "batch" and "gauntlet" not in k)
    summary = runs[1][1].stdout
    assert "ICL tasks at batch 4" in summary and "mc/2-shot" in summary and "chance 0.333" in summary
    page = (runs[1][0] / "report" / "report.html").read_text()
    assert "icl_accuracy" in page


@pytest.mark.slow
def test_icl_scores_equal_scoring_the_hf_export_outside_training(icl_runs):
    tasks, runs = icl_runs
    run_dir = runs[1][0]
    final = icl_rows(run_dir)[-1]
    export = run_dir / "hf" / "ba4"
    out = run_dir / "icl.json"
    cmd = [sys.executable, "-m", "dbrx_train.cli", "eval", "--model", str(export), "--icl-tasks", str(tasks)]
    proc = subprocess.run(
        [*cmd, "--icl-seq-len", "64", "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outside = json.loads(out.read_text())
    assert outside, proc.stdout
    for key, value in outside.items():  # same batches, same weights: the same scores
        assert final[key] == value, key
    # transformers' own model on the export: the same answers for the log-likelihood tasks
    from transformers import AutoModelForCausalLM

    from dbrx_train.config.icl import ICLTaskConfig
    from dbrx_train.config.run import load_yaml
    from dbrx_train.config.schema import build
    from dbrx_train.data.tokenizer import load_tokenizer
    from dbrx_train.eval.icl_suite import build_icl_suite, evaluate_suite

    hf = AutoModelForCausalLM.from_pretrained(export, torch_dtype=torch.float32).eval()

    def hf_logits(ids_BT, positions_BC):
        logits_BTV = hf(ids_BT).logits
        return logits_BTV.gather(1, positions_BC[..., None].expand(-1, -1, logits_BTV.shape[-1]))

    configs = [build(ICLTaskConfig, t) for t in load_yaml(tasks)["icl_tasks"] if t["label"] != "qa"]
    tokenizer = load_tokenizer()
    suite = build_icl_suite(configs, tokenizer, default_batch_size=4, icl_seq_len=64, subset_num_batches=3)
    with torch.no_grad():
        scores = evaluate_suite(suite, hf_logits, None, tokenizer)
    for key, value in scores.logged().items():
        assert final[key] == value, key
