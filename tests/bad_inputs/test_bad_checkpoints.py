"""Bad checkpoints: crafted to run code on load, truncated, damaged. Each is refused with a message
naming the file (and entry), before Composer reads it, and nothing from the file runs."""

from __future__ import annotations

import os
import pickle
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dbrx_train.checkpoint import safe_load, store
from tests.launches import run_train_py
from tests.training.test_train_e2e import SMALL, TINY


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def dcp_checkpoint(folder: Path, extra: dict) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled": one process is the intent
        dcp.save(
            {"state": {"x": torch.ones(4), **extra}},
            storage_writer=dcp.FileSystemWriter(folder),
            no_dist=True,
        )
    return folder


def with_manifest(folder: Path, batch: int = 3, *, sharded: bool = True) -> Path:
    """The attacker can write a manifest too: checksums match, so only the content check can refuse."""
    files = {n: store.file_record(folder / n) for n in store.checkpoint_files(folder)}
    manifest = {
        "format": store.FORMAT,
        "name": folder.name,
        "batch": batch,
        "sharded": sharded,
        "files": files,
    }
    store.write_json_atomic(folder / store.MANIFEST, manifest)
    return folder


def malicious_metadata(tmp: Path, marker: Path) -> Path:
    folder = dcp_checkpoint(tmp / "ep0-ba3", {})
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))  # DCP would pickle.load it
    return folder


def malicious_entry(tmp: Path, marker: Path) -> Path:
    return dcp_checkpoint(tmp / "ep0-ba3", {"evil": RunsCode(marker)})


def malicious_pt(tmp: Path, marker: Path) -> Path:
    folder = tmp / "ep0-ba3"
    folder.mkdir()
    torch.save(
        {"state": {"model": {"w": torch.ones(2)}, "evil": RunsCode(marker)}}, folder / store.MONOLITH_FILE
    )
    return folder / store.MONOLITH_FILE


CODE_CASES = {
    "metadata": (malicious_metadata, ".metadata would run code"),
    "bytes-entry": (malicious_entry, "entry 'state.evil' would run code"),
    "monolithic-pt": (malicious_pt, "rank0.pt would run code"),
}


@pytest.mark.parametrize("case", sorted(CODE_CASES))
def test_checkpoint_that_runs_code_is_refused(case, tmp_path):
    marker = tmp_path / "pwned"
    make, message = CODE_CASES[case]
    path = make(tmp_path, marker)
    with pytest.raises(store.CheckpointError, match=message):
        safe_load.check_no_code(path)
    assert not marker.exists()


@pytest.mark.parametrize("case", sorted(CODE_CASES))
def test_loading_under_restricted_loading_cannot_run_code(case, tmp_path):
    """The second layer: Composer's own load (DCP, or torch.load of a .pt) runs inside
    restricted_loading, so a file changed after check_no_code still cannot run code."""
    marker = tmp_path / "pwned"
    path = CODE_CASES[case][0](tmp_path, marker)
    with (
        safe_load.restricted_loading(),
        pytest.raises((pickle.UnpicklingError, CheckpointException)) as error,
    ):
        if path.is_file():
            torch.load(path, weights_only=False)  # what Composer asks for
        else:
            state = {"state": {"x": torch.empty(4), "evil": None}}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    assert "system" in str(error.value) and not marker.exists()  # refused at os.system / posix.system
    if path.is_file():  # the payload is real: without the restriction it runs
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_a_real_composer_checkpoint_passes(tmp_path):
    safe_load.check_no_code(dcp_checkpoint(tmp_path / "ok", {"step": 3, "name": "run", "lrs": [0.1, 0.2]}))


def test_truncated_checkpoints_are_named(tmp_path):
    pt = tmp_path / "rank0.pt"
    torch.save({"state": {"model": {"w": torch.ones(1000)}}}, pt)
    pt.write_bytes(pt.read_bytes()[:200])
    with pytest.raises(store.CheckpointError, match="rank0.pt cannot be read"):
        safe_load.check_no_code(pt)
    folder = with_manifest(dcp_checkpoint(tmp_path / "ep0-ba3", {"step": 3}))
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    checkpoint = store.Checkpoint(folder, store.read_manifest(folder))
    with pytest.raises(
        store.CheckpointError, match=r"\.distcp has \d+ bytes, its manifest says \d+ \(truncated"
    ):
        store.verify_files(checkpoint)


def train(tmp_path: Path, default_corpus: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [
        str(TINY),
        f"variables.data_root={default_corpus}",
        f"save_folder={tmp_path / 'run'}",
        *SMALL,
        "max_duration=2ba",
        *overrides,
    ]
    return run_train_py(args, timeout=300)


@pytest.mark.slow
def test_training_refuses_a_malicious_checkpoint_before_loading_it(default_corpus, tmp_path):
    marker = tmp_path / "pwned"
    folder = with_manifest(malicious_entry(tmp_path, marker))
    proc = train(tmp_path, default_corpus, f"load_path={folder}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "entry 'state.evil' would run code from the file when loaded; refusing it" in proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()
    # a damaged explicit load_path is named too
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    proc = train(tmp_path, default_corpus, f"load_path={folder}")
    assert proc.returncode == 2 and "(truncated?)" in proc.stderr and "Traceback" not in proc.stderr
