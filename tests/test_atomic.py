"""Folders replaced only once their new content is complete (data prep, the default corpus, HF exports)."""

from __future__ import annotations

import pytest

from dbrx_train import atomic
from dbrx_train.atomic import FolderKind, replacing

KIND = FolderKind("a test folder (it has no mark)", lambda folder: (folder / "mark").is_file())


def write(tmp, text: str) -> None:
    tmp.mkdir()
    (tmp / "mark").write_text(text)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_the_old_content_stays_until_the_new_is_complete(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    with replacing(out, overwrite=False, kind=KIND) as tmp:
        write(tmp, "one")
    with pytest.raises(RuntimeError), replacing(out, overwrite=True, kind=KIND) as tmp:
        write(tmp, "two")
        raise RuntimeError("the input had a bad line")
    assert (out / "mark").read_text() == "one"
    with replacing(out, overwrite=True, kind=KIND) as tmp:
        write(tmp, "three")
    assert (out / "mark").read_text() == "three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old copy left


def test_refusals_come_before_any_work(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="lies inside the output folder"):
        atomic.check_replaceable(out, overwrite=True, kind=KIND, inputs=[out / "notes.txt"])
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        atomic.check_replaceable(out, overwrite=False, kind=KIND)
    with pytest.raises(FileExistsError, match="is not a test folder"):
        atomic.check_replaceable(out, overwrite=True, kind=KIND)
    (tmp_path / ".fresh.tmp-deadbeef").mkdir()  # left by a crashed write: removed by the next one
    with replacing(tmp_path / "fresh", overwrite=False, kind=KIND) as tmp:
        write(tmp, "x")
    assert not (tmp_path / ".fresh.tmp-deadbeef").exists()
    with replacing(out / "sub", overwrite=False, kind=KIND) as tmp:
        write(tmp, "x")
    assert (out / "notes.txt").read_text() == "precious"
