"""A save folder on a disk too small for the run's checkpoints, as a real (tmpfs) filesystem: refused
before the first step when not even one checkpoint fits; warned about at the start when a later one
will not fit, which then fails with a real ENOSPC, keeps the earlier checkpoint, and is refused again
on resume while there is still no room."""

from __future__ import annotations

import pytest

from dbrx_train.checkpoint import store
from tests.training.test_resume_e2e import NO_BIAS, checkpoints, run

# One checkpoint of the test model (SMALL in test_train_e2e: 1024-token vocabulary, d_model 64)
# with its AdamW moments is ~6.3 MiB (0.55M parameters).
NO_ROOM_MIB = 4
ONE_CHECKPOINT_MIB = 10


def last_message(stderr: str) -> str:
    return stderr.split("dbrx-train:")[-1]


@pytest.mark.slow
def test_no_room_for_one_checkpoint_is_refused_before_training(small_disk, default_corpus):
    run_dir = small_disk(NO_ROOM_MIB) / "run"
    proc = run(1, run_dir, default_corpus)
    assert proc.returncode != 0
    message = last_message(proc.stderr)
    assert f"{run_dir} (where checkpoints are written) has" in message, proc.stderr[-3000:]
    # 0.55M parameters x (fp32 weight + 2 AdamW moments) = 6.3 MiB
    assert "free, but one checkpoint of this run takes about 6 MiB (0.6M parameters" in message
    assert "AdamW" not in message and "decoupled_adamw moments" in message
    assert "Traceback" not in message
    assert not (run_dir / "metrics.jsonl").exists() or "batch" not in (run_dir / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_room_for_one_checkpoint_warns_then_fails_cleanly_and_resume_is_refused(small_disk, default_corpus):
    run_dir = small_disk(ONE_CHECKPOINT_MIB) / "run"
    # RELIABLE keeps 2 checkpoints; saves at batches 2 and 4: two checkpoints must fit, one does.
    first = run(1, run_dir, default_corpus, "max_duration=4ba", "save_interval=2ba")
    assert "dbrx-train: warning:" in first.stderr, first.stderr[-3000:]
    assert "needs room for 2 more checkpoints" in first.stderr
    # A real ENOSPC at the second save: the run stops with one line, the first checkpoint is intact.
    assert first.returncode != 0
    message = last_message(first.stderr)
    assert "checkpoint ep0-ba4 could not be written" in message and "latest: ep0-ba2" in message, message
    assert "Traceback" not in message
    assert checkpoints(run_dir) == ["ep0-ba2"] and not list(run_dir.glob(".tmp-*"))
    (good,) = store.list_checkpoints(run_dir)
    store.verify_files(good)  # every file matches its manifest's size and sha256

    # Resuming with the disk still full is refused before any step, sized by the checkpoint on disk.
    again = run(1, run_dir, default_corpus, "max_duration=4ba", "save_interval=2ba")
    assert again.returncode != 0
    message = last_message(again.stderr)
    assert "one checkpoint of this run takes about" in message and "(the size of ep0-ba2)" in message, message
    assert checkpoints(run_dir) == ["ep0-ba2"]


@pytest.mark.slow
def test_no_room_for_one_hf_export_is_refused_before_training(small_disk, default_corpus, tmp_path):
    hf = small_disk(12) / "hf"  # a bf16 export of the test model with its tokenizer is ~15 MiB
    run_dir = tmp_path / "run"
    proc = run(1, run_dir, default_corpus, NO_BIAS, f"callbacks.hf_export.folder={hf}")
    assert proc.returncode != 0
    message = last_message(proc.stderr)
    assert f"callbacks.hf_export.folder {hf} has" in message, proc.stderr[-3000:]
    assert (
        "one HF export of this run takes about" in message
        and "parameters in bf16 + tokenizer files" in message
    )
    assert "Traceback" not in message and checkpoints(run_dir) == []


@pytest.mark.slow
def test_a_failed_hf_export_keeps_its_batch_checkpoint_and_stops_every_rank(
    small_disk, default_corpus, tmp_path
):
    hf = small_disk(24) / "hf"  # room for one ~15 MiB export of two
    run_dir = tmp_path / "run"
    export_every_2 = [
        NO_BIAS,
        "max_duration=4ba",
        "save_interval=2ba",
        "callbacks.hf_export.save_interval=2ba",
    ]
    proc = run(2, run_dir, default_corpus, *export_every_2, f"callbacks.hf_export.folder={hf}")
    assert "this run writes 2 more HF exports" in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode != 0
    message = last_message(proc.stderr)
    assert f"HF export {hf}/ba4 could not be written" in message, proc.stderr[-3000:]
    assert "Training checkpoints are written before exports and are unaffected" in message
    assert "Traceback" not in message
    # The checkpoint of the same batch was committed before the export, and verifies.
    assert checkpoints(run_dir) == ["ep0-ba2", "ep0-ba4"]
    store.verify_files(store.list_checkpoints(run_dir)[-1])
    assert sorted(p.name for p in hf.iterdir()) == ["ba2"]  # complete; no partial ba4, no temporary

    # With room for exports again, the rerun resumes at the end and writes the missing export.
    roomy = tmp_path / "hf"
    done = run(2, run_dir, default_corpus, *export_every_2, f"callbacks.hf_export.folder={roomy}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr and "ep0-ba4 (batch 4)" in done.stderr
    assert "wrote the missing HF export" in done.stdout and "nothing to train" in done.stdout, done.stdout[
        -2000:
    ]
    assert sorted(p.name for p in roomy.iterdir()) == ["ba4"]
    assert (roomy / "ba4/config.json").exists() and any(roomy.glob("ba4/*.safetensors"))
