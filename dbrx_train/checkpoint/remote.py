"""Checkpoints mirrored to an object store: `save_folder: s3://bucket/runs/x` (any URI Composer supports).

A checkpoint is first written and committed in the local run folder (dbrx_train/checkpoint/store.py),
then uploaded as `<prefix>/<ep..-ba..>/<file>`; the ranks upload shares of the files in parallel and
rank 0 uploads `manifest.json` last, so a checkpoint whose manifest is in the store is complete there.
On autoresume a newer checkpoint in the store than on the local disk (a new machine, a wiped disk) is
downloaded into the run folder, verified against its manifest and committed there before loading.

`file:///path` URIs name a folder used as a store (e.g. a shared filesystem mount behind fast local
disks); it is also how the tests exercise this code without a network.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from composer.utils import dist
from composer.utils.file_helpers import maybe_create_object_store_from_uri, parse_uri
from composer.utils.object_store import ObjectStore

from dbrx_train.checkpoint import store
from dbrx_train.checkpoint.rank_zero import on_rank0, rank_share
from dbrx_train.checkpoint.store import Checkpoint, CheckpointError


class FolderObjectStore(ObjectStore):
    """A directory as an object store: objects are files; uploads land by rename, so none is partial."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def get_uri(self, object_name: str) -> str:
        return f"file://{self.root / object_name}"

    def upload_object(self, object_name: str, filename: str | Path, callback=None, **kwargs: Any) -> None:
        target = self.root / object_name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{store.TMP_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}")
        shutil.copyfile(filename, tmp)
        store.fsync_path(tmp)
        os.replace(tmp, target)

    def get_object_size(self, object_name: str) -> int:
        path = self.root / object_name
        if not path.is_file():
            raise FileNotFoundError(f"{self.get_uri(object_name)} does not exist")
        return path.stat().st_size

    def download_object(
        self, object_name: str, filename: str | Path, overwrite: bool = False, callback=None
    ) -> None:
        source = self.root / object_name
        if not source.is_file():
            raise FileNotFoundError(f"{self.get_uri(object_name)} does not exist")
        if Path(filename).exists() and not overwrite:
            raise FileExistsError(filename)
        shutil.copyfile(source, filename)

    def list_objects(self, prefix: str | None = None) -> list[str]:
        base = self.root / (prefix or "")
        if not base.exists():
            return []
        names = [str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file()]
        return sorted(n for n in names if not Path(n).name.startswith(store.TMP_PREFIX))


class RemoteCheckpoints:
    """The checkpoints under one object-store URI."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        backend, bucket, path = parse_uri(self.uri)
        if backend == "file":
            self.store: ObjectStore = FolderObjectStore("/" + (bucket + "/" + path).strip("/"))
            self.prefix = ""
        else:
            opened = maybe_create_object_store_from_uri(self.uri)
            if opened is None:
                raise ValueError(f"{uri} is not an object-store URI")
            self.store, self.prefix = opened, path.strip("/")

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def upload(self, checkpoint: Checkpoint) -> None:
        """Every rank uploads a share of the files; rank 0 uploads the manifest after all of them."""
        for name in rank_share(sorted(checkpoint.manifest["files"])):
            self.store.upload_object(self._key(checkpoint.name, name), checkpoint.path / name)
        dist.barrier()
        if dist.get_global_rank() == 0:
            self.store.upload_object(
                self._key(checkpoint.name, store.MANIFEST), checkpoint.path / store.MANIFEST
            )
        dist.barrier()

    def list(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, manifest) of the complete checkpoints in the store, oldest first (rank 0 reads them)."""
        found = []
        for key in self.store.list_objects(self.prefix or None):
            parts = key[len(self.prefix) :].strip("/").split("/")
            if len(parts) != 2 or parts[1] != store.MANIFEST or not store.NAME_RE.match(parts[0]):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / store.MANIFEST
                self.store.download_object(key, local)
                try:
                    manifest = json.loads(local.read_text())
                except ValueError:
                    continue
            if manifest.get("format") == store.FORMAT:
                found.append((parts[0], manifest))
        return sorted(found, key=lambda item: item[1]["batch"])

    def download(self, name: str, manifest: dict[str, Any], run_folder: Path, *, hashes: bool) -> Checkpoint:
        """Into the local run folder through a temporary folder; verified, then committed."""
        tmp = on_rank0(lambda: store.temp_folder(run_folder, name))
        mine = rank_share(sorted(manifest["files"]))
        for file in mine:
            target = tmp / file
            target.parent.mkdir(parents=True, exist_ok=True)
            self.store.download_object(self._key(name, file), target, overwrite=True)
        dist.barrier()
        problem = None
        try:
            store.verify_files(Checkpoint(tmp, manifest), mine, hashes=hashes)
        except CheckpointError as e:
            problem = str(e)
        problems = [p for p in dist.all_gather_object(problem) if p]
        if problems:
            on_rank0(lambda: shutil.rmtree(tmp, ignore_errors=True))
            raise CheckpointError(f"{self.uri}/{name} (downloaded): {problems[0]}")
        return on_rank0(lambda: store.commit(tmp, run_folder / name, manifest))
