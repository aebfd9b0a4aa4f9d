"""lm-eval-harness on our model equals lm-eval's own `hf` model on our exported HF folder.

One local task per request type (multiple choice -> loglikelihood, perplexity ->
loglikelihood_rolling, exact match -> generate_until), over jsonl files written here: per-sample
log-likelihoods within 1e-4 in fp32, identical accuracy and identical generations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="needs the [eval] extra")

from dbrx_train.model.hf import save_pretrained  # noqa: E402
from tests.tiny_models import text_dbrx

ROOT = Path(__file__).resolve().parents[2]
WORDS = "list dict tuple set string integer float module class function loop return yield import".split()


def write_tasks(folder: Path) -> None:
    data = folder / "data"
    data.mkdir(parents=True)
    mc = [
        {
            "query": f"In Python, a {w} is a",
            "choices": [" type", " keyword", " value of " + v, " thing"],
            "gold": i % 4,
        }
        for i, (w, v) in enumerate(zip(WORDS, reversed(WORDS), strict=True))
    ]
    ppl = [{"text": " ".join(WORDS[i:] + WORDS[:i]) * 3} for i in range(6)]  # > max_seq_len: several windows
    gen = [{"context": f"Q: spell {w}\nA:", "answer": w} for w in WORDS[:6]]
    for name, rows in (("mc", mc), ("ppl", ppl), ("gen", gen)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        f"task: dbrx_parity_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {data / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{query}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "ppl.yaml").write_text(
        f"task: dbrx_parity_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {data / 'ppl.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    (folder / "gen.yaml").write_text(
        f"task: dbrx_parity_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {data / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf-cache")  # the json builder's cache, not ~/.cache
    export = root / "hf"
    save_pretrained(text_dbrx(max_seq_len=64), export, dtype=torch.float32)
    write_tasks(root / "tasks")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from dbrx_train.eval.lm_eval_model import DbrxLM
    from dbrx_train.model.hf import load_pretrained

    tasks = ["dbrx_parity_mc", "dbrx_parity_ppl", "dbrx_parity_gen"]
    manager = TaskManager(include_path=str(root / "tasks"))
    run = {"tasks": tasks, "task_manager": manager, "log_samples": True, "bootstrap_iters": 0}
    ours = lm_eval.simple_evaluate(model=DbrxLM(load_pretrained(export), batch_size=4), **run)
    theirs = lm_eval.simple_evaluate(
        model=HFLM(pretrained=str(export), dtype="float32", device="cpu", batch_size=4), **run
    )
    return root, export, ours, theirs


def test_loglikelihoods_equal_lm_evals_hf_model(parity):
    _, _, ours, theirs = parity
    for task in ("dbrx_parity_mc", "dbrx_parity_ppl"):
        a, b = ours["samples"][task], theirs["samples"][task]
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert x["doc_id"] == y["doc_id"]
            ll_x = [r[0] if isinstance(r, (list, tuple)) else r for r in x["filtered_resps"]]
            ll_y = [r[0] if isinstance(r, (list, tuple)) else r for r in y["filtered_resps"]]
            assert len(ll_x) == len(ll_y)
            for p, q in zip(ll_x, ll_y, strict=True):
                assert abs(float(p) - float(q)) < 1e-4, (task, x["doc_id"], p, q)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["dbrx_parity_mc"][metric] == theirs["results"]["dbrx_parity_mc"][metric]
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        p, q = ours["results"]["dbrx_parity_ppl"][metric], theirs["results"]["dbrx_parity_ppl"][metric]
        assert abs(p - q) <= 1e-5 * abs(q), (metric, p, q)


def test_generations_equal_lm_evals_hf_model(parity):
    _, _, ours, theirs = parity
    a, b = ours["samples"]["dbrx_parity_gen"], theirs["samples"]["dbrx_parity_gen"]
    assert [x["filtered_resps"] for x in a] == [y["filtered_resps"] for y in b]
    assert (
        ours["results"]["dbrx_parity_gen"]["exact_match,none"]
        == theirs["results"]["dbrx_parity_gen"]["exact_match,none"]
    )


def test_eval_command_runs_a_local_task_and_refuses_the_hub(parity):
    root, export, ours, _ = parity
    env = {**os.environ, "HF_DATASETS_CACHE": str(root / "hf-cache")}
    out = root / "results.json"
    cmd = [
        sys.executable,
        "-m",
        "dbrx_train.cli",
        "eval",
        "--model",
        str(export),
        "--tasks",
        "dbrx_parity_mc",
    ]
    proc = subprocess.run(
        [*cmd, "--include-path", str(root / "tasks"), "--batch-size", "4", "--output", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = json.loads(out.read_text())["results"]["dbrx_parity_mc"]["acc,none"]
    assert acc == ours["results"]["dbrx_parity_mc"]["acc,none"]
    # a task whose data lives on the hub: one line, no traceback, no download
    proc = subprocess.run(
        [sys.executable, "-m", "dbrx_train.cli", "eval", "--model", str(export), "--tasks", "piqa"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "needs the Hugging Face hub" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
