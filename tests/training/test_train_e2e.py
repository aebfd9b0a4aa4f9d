"""Real Composer runs of a tiny DBRX on real MDS data: 1 rank and 2 CPU ranks (gloo, FSDP2)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dbrx_train.data.tokenizer import DBRX_VOCAB_SIZE
from tests.launches import run_training
from tests.run_env import run_env
from tests.small_vocab import SMALL_VOCAB

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "yamls/pretrain/dbrx-tiny.yaml"

# A smaller model than dbrx-tiny so each run takes seconds; still 16 experts top-4, GQA, clip_qkv. Its
# vocabulary is default_corpus's folded one (tests/small_vocab.py); lr 1e-2 because a small vocabulary
# starts nearer its floor (ln 1024 = 6.9 vs ln 100352 = 11.5), so the loss falls by 1 in ~10 batches.
# W&B is off (its import costs ~2 s per rank); the runs of this file turn it on and check it.
# No MFU: on CPU its peak is a ~1.3 s matmul timed at every rank's start (training/peak_flops.py).
# test_one_rank_run_trains_logs_and_checkpoints and the progress bar's run measure and check it.
NO_MFU = "callbacks.speed_monitor.peak_flops=null"
MEASURED_MFU = "callbacks.speed_monitor.peak_flops=auto"
SMALL = [
    "precision=fp32",  # pinned: auto is amp_bf16 on CPUs with AVX512-BF16/AMX; the tests check fp32 numerics
    "max_seq_len=64",
    f"model.vocab_size={SMALL_VOCAB}",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_layers=2",
    "model.attn_config.kv_n_heads=2",
    "model.ffn_config.ffn_hidden_size=64",
    "global_train_batch_size=8",
    "device_train_microbatch_size=4",
    "device_eval_batch_size=8",
    "eval_subset_num_batches=1",
    "console_log_interval=1ba",
    "callbacks.speed_monitor.window_size=2",
    "optimizer.lr=1e-2",
    "scheduler.t_warmup=2ba",
    "loggers.wandb=null",
    NO_MFU,
    # the YAML's ICL suite is DBRX-tokenized text (and its files come from `make data`): tests/eval run it
    "icl_tasks=null",
    "eval_gauntlet=null",
]


# For the runs that need DBRX's own vocabulary (fine-tuning, exports with the tokenizer, text), on
# real_vocab_corpus: after SMALL, it sets the vocabulary back.
REAL_VOCAB = f"model.vocab_size={DBRX_VOCAB_SIZE}"
# Turns W&B (offline) back on for a run: SMALL turns it off.
WANDB_OFFLINE = "loggers.wandb={project: dbrx-train, mode: offline}"
TWO_RANK_RUN = ("max_duration=12ba", "save_interval=12ba", "eval_interval=12ba")


def launch(
    nproc: int, run_dir: Path, data_root: Path, *overrides: str, timeout: float = 600
) -> subprocess.CompletedProcess:
    args = [str(TINY), f"variables.data_root={data_root}", f"save_folder={run_dir}", *SMALL, *overrides]
    proc = run_training(nproc, args, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_loss_falls(rows: list[dict]) -> None:
    losses = [r["loss/train/total"] for r in rows if "loss/train/total" in r]
    assert len(losses) >= 10
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 1.0, f"loss did not fall: {losses}"


@pytest.fixture(scope="module")
def one_rank_run(default_corpus, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("run1") / "run1"
    proc = launch(
        1,
        run_dir,
        default_corpus,
        "max_duration=14ba",
        "save_interval=7ba",
        "eval_interval=7ba",
        "fsdp_config.activation_checkpointing=true",  # the default run (2 ranks) covers it off
        WANDB_OFFLINE,
        MEASURED_MFU,
    )
    return run_dir, proc


@pytest.fixture(scope="module")
def two_rank_run(default_corpus, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The YAML's FSDP2 run on 2 ranks, eager: also the reference of the compiled run."""
    run_dir = tmp_path_factory.mktemp("run2") / "run2"
    proc = launch(2, run_dir, default_corpus, *TWO_RANK_RUN, "progress_bar=true", WANDB_OFFLINE, MEASURED_MFU)
    return run_dir, proc


def assert_wandb_logged_offline(run_dir: Path) -> None:
    # W&B's own files of the run (offline: nothing leaves the machine), under WANDB_DIR = the run folder
    [folder] = (run_dir / "wandb").glob("offline-run-*")
    assert any(folder.glob("*.wandb")), sorted(p.name for p in folder.iterdir())


@pytest.mark.slow
def test_one_rank_run_trains_logs_and_checkpoints(one_rank_run):
    run_dir, proc = one_rank_run
    rows = read_metrics(run_dir)
    assert [r["batch"] for r in rows] == list(range(1, 15))
    assert rows[-1]["tokens"] == 14 * 8 * 64
    assert_loss_falls(rows)
    # every loss term, throughput and MFU are logged under Composer's names
    last = rows[-1]
    for key in (
        "loss/train/lm_cross_entropy",
        "loss/train/load_balancing",
        "metrics/train/LanguagePerplexity",
        "throughput/device/tokens_per_sec",
        "throughput/device/mfu",
        "lr-DecoupledAdamW/group0",
    ):
        assert key in last, key
    assert 0 < last["throughput/device/mfu"] < 1
    assert any("metrics/eval/LanguageCrossEntropy" in r for r in rows)
    # MoE health every 10 batches (callbacks.expert_load default), per layer
    moe = rows[9]
    for layer in (0, 1):
        loads = [moe[f"moe/layer_{layer}/load/expert_{e}"] for e in range(16)]
        assert abs(sum(loads) - 1) < 1e-5 and min(loads) >= 0
        assert 0 < moe[f"moe/layer_{layer}/router_entropy"] <= math.log(16) + 1e-6
        assert moe[f"moe/layer_{layer}/load_balancing"] > 0
    assert moe["moe/collapsed_experts"] >= 0
    assert (run_dir / "config.yaml").exists()
    assert_wandb_logged_offline(run_dir)
    # FSDP2 sharded checkpoints: one folder per save, named ep<epoch>-ba<batch>
    checkpoints = {int(p.name.split("-ba")[1]) for p in run_dir.glob("ep*-ba*") if p.is_dir()}
    assert checkpoints == {7, 14}, sorted(p.name for p in run_dir.iterdir())
    assert "finished 14 batches" in proc.stdout


@pytest.mark.slow
def test_two_rank_fsdp_run_shards_and_trains(two_rank_run):
    run_dir, proc = two_rank_run
    bar = proc.stdout + proc.stderr
    assert "tok/s=" in bar and "MFU=" in bar and "ETA=" in bar, bar[-3000:]
    rows = read_metrics(run_dir)
    assert [r["batch"] for r in rows] == list(range(1, 13))
    assert rows[-1]["tokens"] == 12 * 8 * 64  # global batch over both ranks
    assert_loss_falls(rows)
    assert_wandb_logged_offline(run_dir)
    # a sharded checkpoint: one shard file per rank plus the metadata
    [ckpt] = [p for p in run_dir.glob("ep*-ba12") if p.is_dir()] or [None]
    assert ckpt is not None, sorted(p.name for p in run_dir.iterdir())
    shards = sorted(p.name for p in ckpt.rglob("*.distcp"))
    assert len(shards) == 2, shards


@pytest.mark.extended  # CI time (pyproject: extended); tests/model/test_compile.py checks every region against eager
@pytest.mark.slow
def test_compiled_regions_train_like_eager_under_two_rank_fsdp(two_rank_run, default_corpus, tmp_path):
    """compile_config under FSDP2 on 2 ranks (parameters swapped between shards and full tensors
    around the compiled code) gives the eager run's losses, batch for batch."""
    eager_dir, _ = two_rank_run
    compiled_dir = tmp_path / "compiled"
    launch(2, compiled_dir, default_corpus, *TWO_RANK_RUN, "compile_config.regions=[loss,attention,router]")
    losses = {
        name: [r["loss/train/total"] for r in read_metrics(run_dir) if "loss/train/total" in r]
        for name, run_dir in (("eager", eager_dir), ("compiled", compiled_dir))
    }
    assert len(losses["eager"]) == 12
    for eager, compiled in zip(losses["eager"], losses["compiled"], strict=True):
        assert math.isclose(eager, compiled, rel_tol=1e-4), losses


@pytest.mark.slow
def test_config_error_is_one_clear_line(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), str(TINY), "optimizer.learning_rate=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'optimizer.learning_rate'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_report_of_a_real_run(one_rank_run):
    run_dir, proc = one_rank_run
    # the run drew its own report at the end; redraw it elsewhere with the script
    assert (run_dir / "report" / "report.html").is_file()
    assert "report: " in proc.stdout
    out = run_dir.parent / "again"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/plot_run.py"), str(run_dir), "--out", str(out)],
        check=True,
        timeout=120,
    )
    names = {p.name for p in out.glob("*.png")}
    assert {"expert_load.png", "learning_rate.png", "loss.png", "throughput.png"} <= names
    assert ("data_mix.png" in names) == any(k.startswith("data/mix/") for k in read_metrics(run_dir)[-1])
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(names)
    assert "best_eval_loss" in page


@pytest.mark.extended  # CI time (pyproject: extended); test_two_rank_fsdp_run_shards_and_trains runs 2 ranks
@pytest.mark.slow
def test_readme_two_rank_command_trains_with_a_calm_console(default_corpus, tmp_path):
    """README: `composer -n 2 train.py yamls/pretrain/dbrx-tiny.yaml`, with only the data folder, the run
    folder, the corpus' 64-token samples and a shorter run changed. Its microbatch of 16 is more than the
    8 samples each rank gets: one warning, then microbatches of 8, as Composer and LLM Foundry do. The
    console shows one line per console_log_interval (10ba), the data mix when the curriculum moves
    it and one line of ICL scores per ICL evaluation (here at the end); per-expert and other detailed metrics only go to metrics.jsonl."""
    run_dir = tmp_path / "readme"
    cmd = [
        sys.executable,
        "-m",
        "composer.cli.launcher",
        "-n",
        "2",
        "train.py",
        "yamls/pretrain/dbrx-tiny.yaml",
    ]
    cmd += [
        f"variables.data_root={default_corpus}",
        f"save_folder={run_dir}",
        "max_seq_len=64",
        "max_duration=20ba",
    ]
    env = run_env(2)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert output.count("device_train_microbatch_size=16 is more than the 8 samples") == 1, output[-6000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[batch ")]
    train_lines = [line for line in lines if " loss " in line]
    assert [line.split("]")[0] for line in train_lines] == ["[batch 10/20", "[batch 20/20"], lines
    for part in (" loss ", " lr ", " tok/s", " MFU ", " ETA "):
        assert part in train_lines[-1], train_lines
    assert any("data mix: code " in line for line in lines), lines
    icl = [line for line in proc.stdout.splitlines() if line.startswith("[ICL @ batch ")]
    assert len(icl) == 1 and icl[0].startswith("[ICL @ batch 20] pydoc_topic/0-shot 0."), icl  # at the end
    assert "; gauntlet language_understanding " in icl[0] and "default_average " in icl[0], icl
    assert "moe/layer_" not in output and "load/expert_" not in output  # only in metrics.jsonl
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "loss/train/total" in r]
    assert [r["batch"] for r in train_rows] == list(range(1, 21)) and "moe/layer_0/load/expert_0" in rows[9]
    assert "icl/metrics/eval_gauntlet/default_average" in rows[-1]  # the end's ICL scores: their own row
