"""Checkpoint folders: atomic commit, manifest verification, rotation, and the resume config guard."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dbrx_train.checkpoint import store
from dbrx_train.checkpoint.resume_guard import check_resume_config


def make_checkpoint(run, name: str, batch: int, payload: bytes = b"weights") -> store.Checkpoint:
    tmp = store.temp_folder(run, name)
    tmp.mkdir(parents=True)
    (tmp / "rank0.pt").write_bytes(payload)
    files = {n: store.file_record(tmp / n) for n in store.checkpoint_files(tmp)}
    manifest = {"format": store.FORMAT, "name": name, "batch": batch, "sharded": False, "files": files}
    return store.commit(tmp, run / name, manifest)


def test_commit_is_a_rename_and_lists_oldest_first(tmp_path):
    make_checkpoint(tmp_path, "ep0-ba20", 20)
    make_checkpoint(tmp_path, "ep0-ba10", 10)
    assert [c.name for c in store.list_checkpoints(tmp_path)] == ["ep0-ba10", "ep0-ba20"]
    assert not list(tmp_path.glob(".tmp-*"))
    checkpoint = store.list_checkpoints(tmp_path)[-1]
    store.verify_files(checkpoint)
    assert checkpoint.load_path == tmp_path / "ep0-ba20" / "rank0.pt"


def test_a_folder_without_manifest_is_not_a_checkpoint(tmp_path):
    (tmp_path / "ep0-ba30").mkdir()  # a save that died before its manifest: never listed
    (tmp_path / "ep0-ba30" / "rank0.pt").write_bytes(b"partial")
    assert store.list_checkpoints(tmp_path) == []
    with pytest.raises(store.CheckpointError, match="no manifest.json"):
        store.read_manifest(tmp_path / "ep0-ba30")


def test_truncated_and_corrupted_files_are_named(tmp_path):
    checkpoint = make_checkpoint(tmp_path, "ep0-ba10", 10, b"0123456789")
    (checkpoint.path / "rank0.pt").write_bytes(b"01234")
    with pytest.raises(
        store.CheckpointError, match=r"rank0.pt has 5 bytes, its manifest says 10 \(truncated"
    ):
        store.verify_files(checkpoint)
    (checkpoint.path / "rank0.pt").write_bytes(b"0123456780")
    store.verify_files(checkpoint, hashes=False)  # same size: only the hash sees it
    with pytest.raises(store.CheckpointError, match="does not match the sha256"):
        store.verify_files(checkpoint)
    moved = store.quarantine(checkpoint)
    assert moved.name == "ep0-ba10.corrupt" and store.list_checkpoints(tmp_path) == []


def test_rotation_counts_what_is_on_disk_and_keeps_at_least_one(tmp_path):
    for batch in (10, 20, 30):
        make_checkpoint(tmp_path, f"ep0-ba{batch}", batch)
    assert store.rotate(tmp_path, -1) == []
    assert store.rotate(tmp_path, 2) == ["ep0-ba10"]
    assert store.rotate(tmp_path, 0) == ["ep0-ba20"]  # never the newest (only) good one
    assert [c.name for c in store.list_checkpoints(tmp_path)] == ["ep0-ba30"]
    make_checkpoint(tmp_path, "ep0-ba5", 5)  # a save at a lower batch than what is on disk
    assert store.rotate(tmp_path, 1, just_saved="ep0-ba5") == []  # the checkpoint just saved stays


def test_same_name_again_keeps_the_old_folder_aside(tmp_path):
    make_checkpoint(tmp_path, "ep0-ba10", 10, b"old")
    make_checkpoint(tmp_path, "ep0-ba10", 10, b"new")
    assert (tmp_path / "ep0-ba10" / "rank0.pt").read_bytes() == b"new"
    assert len(list(tmp_path.glob("ep0-ba10.replaced-*"))) == 1


def test_a_process_killed_mid_save_leaves_only_a_temporary(tmp_path):
    make_checkpoint(tmp_path, "ep0-ba10", 10)
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(os.getcwd())!r})
from pathlib import Path
from dbrx_train.checkpoint import store
tmp = store.temp_folder(Path({str(tmp_path)!r}), "ep0-ba20")
tmp.mkdir()
with open(tmp / "rank0.pt", "wb") as f:
    f.write(b"x" * 1000)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert proc.returncode == -9
    assert [c.name for c in store.list_checkpoints(tmp_path)] == ["ep0-ba10"]
    assert store.remove_stale_temporaries(tmp_path) and not list(tmp_path.glob(".tmp-*"))
    store.verify_files(store.list_checkpoints(tmp_path)[0])


def test_resume_guard_names_refused_keys_and_passes_harmless_ones():
    saved = {
        "seed": 17,
        "global_train_batch_size": 8,
        "model": {"dbrx": {"d_model": 64}, "init_device": "cpu"},
        "optimizer": {"lr": 1e-3},
        "train_loader": {"dataset": {"streams": {"a": {"local": "x"}}, "download_timeout": 60}},
        "console_log_interval": "1ba",
        "max_duration": "8ba",
    }
    harmless = {
        **saved,
        "model": {"dbrx": {"d_model": 64}, "init_device": "mixed"},
        "train_loader": {"dataset": {"streams": {"a": {"local": "x"}}, "download_timeout": 120}},
        "console_log_interval": "5ba",
        "max_duration": "16ba",
    }
    accepted = check_resume_config(saved, harmless, [], "ep0-ba8")
    assert "max_duration: '8ba' -> '16ba'" in accepted and len(accepted) == 4
    harmful = {
        **saved,
        "seed": 1,
        "optimizer": {"lr": 2e-3},
        "train_loader": {
            "dataset": {"streams": {"a": {"local": "x"}, "b": {"local": "y"}}, "download_timeout": 60}
        },
    }
    with pytest.raises(ValueError) as error:
        check_resume_config(saved, harmful, [], "ep0-ba8")
    message = str(error.value)
    assert "seed: 17 -> 1" in message and "optimizer.lr: 0.001 -> 0.002" in message
    assert "train_loader.dataset.streams.b.local: (absent) -> 'y'" in message
    assert (
        len(check_resume_config(saved, harmful, ["seed", "optimizer.lr", "train_loader.dataset"], "x")) == 3
    )


def test_leftovers_are_rotated_with_the_checkpoints(tmp_path):
    for batch in (10, 20):
        make_checkpoint(tmp_path, f"ep0-ba{batch}", batch)
    make_checkpoint(tmp_path, "ep0-ba20", 20, b"again")  # the old ep0-ba20 is set aside as .replaced-*
    store.quarantine(store.list_checkpoints(tmp_path)[0], "does not match the sha256")  # ep0-ba10.corrupt
    (tmp_path / "ep0-ba30").mkdir()  # no manifest: not ours to delete
    (tmp_path / "ep0-ba30.replaced-0000beef").mkdir()
    assert {r[0]: r[2] for r in store.rejected_checkpoints(tmp_path)} == {
        "ep0-ba10.corrupt": "does not match the sha256",
        "ep0-ba30": f"{tmp_path / 'ep0-ba30'} has no manifest.json: it is not a complete dbrx-train checkpoint",
    }
    make_checkpoint(tmp_path, "ep0-ba40", 40)
    removed = store.rotate(tmp_path, 1, just_saved="ep0-ba40")
    # ep0-ba20 rotated out, its superseded copy and the .corrupt older than every kept checkpoint too
    assert sorted(removed) == ["ep0-ba10.corrupt", "ep0-ba20", *[p for p in removed if ".replaced-" in p]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ep0-ba30",
        "ep0-ba30.replaced-0000beef",
        "ep0-ba40",
    ]


def test_keeping_every_checkpoint_still_drops_superseded_copies(tmp_path):
    make_checkpoint(tmp_path, "ep0-ba10", 10, b"old")
    make_checkpoint(tmp_path, "ep0-ba10", 10, b"new")
    assert [p for p in store.rotate(tmp_path, -1) if ".replaced-" in p]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ep0-ba10"]


@pytest.mark.parametrize(
    ("max_duration", "position", "finished"),
    [
        ("8ba", {"batch": 8}, True),
        ("8ba", {"batch": 6}, False),
        ("2ep", {"epoch": 2}, True),
        ("1000tok", {"token": 999}, False),
        ("0.5dur", {"batch": 8}, False),  # a fraction of the run: the manifest cannot say
        (None, {"batch": 8}, False),
    ],
)
def test_a_checkpoint_knows_whether_its_run_finished(tmp_path, max_duration, position, finished):
    manifest = {"format": store.FORMAT, "batch": 0, **position, "config": {"max_duration": max_duration}}
    assert store.reached_max_duration(store.Checkpoint(tmp_path, manifest)) is finished
