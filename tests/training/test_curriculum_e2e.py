"""Real Composer runs with a data-mix curriculum: the mix changes within one run as planned, and a run
resumed mid-segment on another world size sees exactly the same samples. Fine-tuning a pretraining
run on the default chat set: `finetune` here, the run in test_hf_export.py (it needs DBRX's vocabulary)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

from tests.launches import run_train_py
from tests.training.test_train_e2e import NO_MFU, launch, read_metrics

ROOT = Path(__file__).resolve().parents[2]

# Batches 0-3 at 75/25 prose/code, a linear ramp to 25/75 over 4-11 in steps of 4, then 25/75:
# segments [0,4) 0.75, [4,8) 0.625, [8,12) 0.375, [12,16) 0.25 (prose share).
CURRICULUM = [
    "max_duration=16ba",
    "curriculum.interpolation=linear",
    "curriculum.step=4ba",
    "curriculum.phases=[{start: 0ba, mix: {prose: 3, code: 1}}, {start: 4ba, mix: {prose: 3, code: 1}},"
    " {start: 12ba, mix: {prose: 1, code: 3}}]",
    "eval_interval=100ba",
    "callbacks.expert_load=null",
]
PLAN = [(0, 4, 0.75), (4, 8, 0.625), (8, 12, 0.375), (12, 16, 0.25)]
GLOBAL_BATCH = 8  # test_train_e2e.SMALL


def per_batch_prose(rows: list[dict], first_cumulative: int = 0) -> dict[int, int]:
    counts, previous = {}, first_cumulative
    for row in rows:
        counts[row["batch"]] = row["data/samples/prose"] - previous
        previous = row["data/samples/prose"]
    return counts


@pytest.mark.slow
def test_curriculum_mix_and_resume_on_other_world_size(default_corpus, tmp_path):
    two = tmp_path / "two_ranks"
    launch(2, two, default_corpus, *CURRICULUM, "save_interval=6ba", "save_num_checkpoints_to_keep=-1")
    rows = read_metrics(two)
    assert [r["batch"] for r in rows] == list(range(1, 17))

    # The mix changed during the run, and each segment's realised share is the plan (±2%).
    prose = per_batch_prose(rows)
    for start, end, share in PLAN:
        assert all(rows[b]["data/mix/prose"] == pytest.approx(share) for b in range(start, end))
        realised = sum(prose[b] for b in range(start + 1, end + 1)) / ((end - start) * GLOBAL_BATCH)
        assert abs(realised - share) <= 0.02, (start, end, realised, share)
    last = rows[-1]
    assert last["data/samples/prose"] + last["data/samples/code"] == 16 * GLOBAL_BATCH
    assert last["data/tokens/code"] == last["data/samples/code"] * 64

    # Resume from the mid-segment checkpoint at batch 6 on one rank: the same samples per batch.
    (checkpoint,) = [p for p in two.iterdir() if p.name.startswith("ep") and p.name.endswith("-ba6")]
    one = tmp_path / "resumed_one_rank"
    launch(1, one, default_corpus, *CURRICULUM, f"load_path={checkpoint}", "save_interval=100ba")
    resumed = read_metrics(one)
    assert [r["batch"] for r in resumed] == list(range(7, 17))
    for row in resumed:
        original = rows[row["batch"] - 1]
        for key in ("data/fingerprint", "data/samples/prose", "data/samples/code", "data/mix/prose"):
            assert row[key] == original[key], (row["batch"], key)

    # planned vs realised mix as a PNG
    spec = importlib.util.spec_from_file_location("plot_mix", ROOT / "scripts/plot_mix.py")
    plot_mix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_mix)
    plot_mix.main([str(two), "--window", "4"])
    assert (two / "data_mix.png").stat().st_size > 10_000


# The fine-tuning runs' model: SMALL's sizes at DBRX's vocabulary (the loader pads with <|pad|> = 100277).
FINETUNE_SMALL = [
    "precision=fp32",  # pinned, as test_train_e2e.SMALL
    "max_seq_len=64",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_layers=2",
    "model.attn_config.kv_n_heads=2",
    "model.ffn_config.ffn_hidden_size=64",
    "global_train_batch_size=8",
    "device_train_microbatch_size=8",
    "device_eval_batch_size=8",
    "eval_subset_num_batches=1",
    "console_log_interval=1ba",
    "loggers.wandb=null",
    "callbacks.expert_load=null",
    NO_MFU,
]


def finetune(data_root: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [
        str(ROOT / "yamls/finetune.yaml"),
        f"variables.data_root={data_root}",
        f"save_folder={run_dir}",
        *FINETUNE_SMALL,
        *overrides,
    ]
    return run_train_py(args, timeout=300)


@pytest.mark.slow
def test_finetune_without_pretrained_weights_says_how_to_make_them(real_vocab_corpus, tmp_path):
    proc = finetune(real_vocab_corpus, tmp_path / "ft", f"variables.pretrained_run={tmp_path / 'none'}")
    assert proc.returncode == 2
    assert "load_path" in proc.stderr and "make pretrain" in proc.stderr and "Traceback" not in proc.stderr
