"""Replace a folder only once its new content is complete: write a temporary sibling, fsync, swap.

    with replacing(out, overwrite=True, kind=MDS_DATASET) as tmp:
        ...write everything into tmp (it does not exist yet)...
    # `out` now holds the new content. On any error (bad input, full disk, Ctrl-C) `out` is exactly as
    # it was and the temporary is gone.

Used for everything a command rewrites in place: MDS datasets (data prep), the default corpus, HF
exports. The swap is one `renameat2(RENAME_EXCHANGE)` on Linux, so `out` never goes missing; where
that call is unavailable, two renames leave a moment in which the old content sits beside `out` as
`.<name>.old-<id>` (a crash then leaves it there, never deleted). A leftover `.<name>.tmp-*` of a
crashed write is removed by the next one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@dataclass(frozen=True)
class FolderKind:
    """What may be replaced: `describes` says what the folder is; `marker` tells one from any other folder."""

    describes: str
    marker: Callable[[Path], bool]


def check_replaceable(out: Path, *, overwrite: bool, kind: FolderKind, inputs: Iterable[Path] = ()) -> None:
    """Refuse before any work: an input inside `out` (rewriting `out` would delete it), an existing `out`
    without overwrite, and an `out` that is not `kind` (a mistyped path must not be wiped)."""
    resolved = out.resolve()
    for path in inputs:
        if resolved == Path(path).resolve() or resolved in Path(path).resolve().parents:
            raise ValueError(
                f"input {path} lies inside the output folder {out}: replacing {out} would delete it. Move it "
                f"out of {out} or choose another output folder"
            )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    if not kind.marker(out):
        raise FileExistsError(
            f"{out} is not empty and is not {kind.describes}; refusing to replace it even with --overwrite. "
            f"Remove it yourself or choose another output folder"
        )


def fsync_tree(folder: Path) -> None:
    """Every file and folder under `folder`, then `folder` itself, on disk."""
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        fsync_path(path)
    fsync_path(folder)


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory so that a rename inside it survives power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2); False where not supported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem or kernel cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def swap_in(tmp: Path, out: Path) -> None:
    """Make the finished `tmp` be `out`, deleting the old `out` only after the new one is in place."""
    fsync_tree(tmp)
    if not out.exists():
        tmp.rename(out)
    elif out.is_dir() and _exchange(tmp, out):
        shutil.rmtree(tmp)  # now the old content
    else:
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)
            raise
        shutil.rmtree(old)
    fsync_path(out.parent)


@contextlib.contextmanager
def replacing(
    out: str | Path, *, overwrite: bool, kind: FolderKind, inputs: Iterable[Path] = ()
) -> Iterator[Path]:
    """A temporary sibling of `out` to write into; swapped in when the block ends without an error."""
    out = Path(out)
    check_replaceable(out, overwrite=overwrite, kind=kind, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        swap_in(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
