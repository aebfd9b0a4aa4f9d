"""What a run starts from (resolve_start) on one process: autoresume's newest intact checkpoint,
load_path as a run folder, a checkpoint folder or a Composer checkpoint without a manifest."""

from __future__ import annotations

import pytest

from dbrx_train.checkpoint import store
from dbrx_train.checkpoint.space import saves_to_write
from dbrx_train.checkpoint.start import resolve_start
from tests.bad_inputs.test_bad_checkpoints import RunsCode, dcp_checkpoint, with_manifest


def checkpoint(run, batch: int) -> store.Checkpoint:
    folder = with_manifest(dcp_checkpoint(run / f"ep0-ba{batch}", {"step": batch}), batch)
    return store.Checkpoint(folder, store.read_manifest(folder))


def start_from(run, load_path=None, *, autoresume: bool = False, weights_only: bool = False):
    path = None if load_path is None else str(load_path)
    return resolve_start(
        run, autoresume=autoresume, load_path=path, load_weights_only=weights_only, hashes=True
    )


def test_autoresume_takes_the_newest_intact_checkpoint_and_moves_damaged_ones_aside(tmp_path, capsys):
    assert start_from(tmp_path, autoresume=True).load_path is None
    checkpoint(tmp_path, 3)
    newest = checkpoint(tmp_path, 6)
    (tmp_path / ".tmp-ep0-ba9-0000").mkdir()  # a save that never committed
    shard = next(newest.path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1])
    start = start_from(tmp_path, autoresume=True)
    assert start.resumed and start.batch == 3 and start.load_path == str(tmp_path / "ep0-ba3")
    assert "checkpoint ep0-ba6 is damaged" in capsys.readouterr().out
    assert (tmp_path / "ep0-ba6.corrupt").is_dir() and not list(tmp_path.glob(".tmp-*"))


def test_autoresume_without_checkpoints_falls_back_to_load_path(tmp_path):
    pretrained = tmp_path / "pretrain"
    checkpoint(pretrained, 3)
    checkpoint(pretrained, 8)
    start = start_from(tmp_path / "run", pretrained, autoresume=True, weights_only=True)
    # a run folder as load_path: its newest intact checkpoint; weights only, so the run starts at batch 0
    assert start.load_path == str(pretrained / "ep0-ba8") and start.weights_only and start.batch == 0


def test_explicit_load_paths(tmp_path):
    good = checkpoint(tmp_path / "a", 4)
    start = start_from(tmp_path / "run", good.path)
    assert start.resumed and start.batch == 4
    with pytest.raises(store.CheckpointError, match="does not exist"):
        start_from(tmp_path / "run", tmp_path / "none")
    (tmp_path / "run").mkdir()
    with pytest.raises(store.CheckpointError, match="holds no complete checkpoint"):
        start_from(tmp_path / "run", tmp_path / "run")
    # written by Composer itself (no manifest): loaded after the no-code check, without checksums
    legacy = dcp_checkpoint(tmp_path / "legacy" / "ep0-ba2", {"step": 2})
    start = start_from(tmp_path / "run", legacy)
    assert start.load_path == str(legacy) and start.checkpoint is None
    evil = dcp_checkpoint(tmp_path / "evil" / "ep0-ba2", {"evil": RunsCode(tmp_path / "pwned")})
    with pytest.raises(store.CheckpointError, match="would run code"):
        start_from(tmp_path / "run", evil)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("max_duration", "save_interval", "start_batch", "expected"),
    [
        ("8ba", "3ba", 0, 3),  # batches 3, 6 and the end (8)
        ("9ba", "3ba", 0, 3),  # 3, 6, 9: the end is one of them
        ("8ba", "3ba", 3, 2),  # resumed at 3: 6 and 8
        ("8ba", "3ba", 8, 0),  # already finished
        ("2ep", "3ba", 0, None),  # epochs: unknown in batches before the data is read
        ("8ba", "1ep", 0, None),
    ],
)
def test_saves_to_write(max_duration, save_interval, start_batch, expected):
    assert saves_to_write(max_duration, save_interval, start_batch) == expected
