"""Content-addressed adapter store on disk.

An adapter lives at `<root>/<digest[:2]>/<digest>/` where digest is the SHA-256 of its config
and weights. New adapters are staged under `<root>/.staging/`, their files fsynced, moved into
place with one `rename`, and the parent folder fsynced, so a crash leaves at most a stray
staging folder, never a half-written adapter; identical uploads share one copy.

The store never decides alone when a folder may go: `adapters.service` removes one only through
`Registry.release_digest`, under the registry's per-digest lock, when no live version and no
registration in progress (a pin) uses it."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from adapters.archive import CONFIG_FILE, WEIGHTS_FILE

# Staging folders older than this are leftovers of interrupted uploads. Younger ones may belong
# to another replica sharing this store, mid-upload (an upload takes seconds, not an hour).
STALE_STAGING_SECONDS = 3600
_DIGEST = re.compile(r"[0-9a-f]{64}\Z")


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.staging = self.root / ".staging"
        self.staging.mkdir(parents=True, exist_ok=True)

    def new_staging_dir(self) -> Path:
        """A fresh path (not created) under the staging area."""
        return self.staging / uuid.uuid4().hex

    @staticmethod
    def digest(folder: Path) -> str:
        sha = hashlib.sha256()
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            sha.update(name.encode())
            with (folder / name).open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    sha.update(chunk)
        return sha.hexdigest()

    def path_for(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def _complete(self, folder: Path, staged: Path) -> bool:
        """Whether a stored folder holds both files at the staged sizes (same digest)."""
        try:
            return all(
                (folder / n).stat().st_size == (staged / n).stat().st_size
                for n in (CONFIG_FILE, WEIGHTS_FILE)
            )
        except OSError:
            return False

    def commit(self, staged: Path, digest: str) -> tuple[Path, int]:
        """Move a validated staged folder into the store under `digest`; return (path, size).

        The caller holds a pin on `digest` (see `Registry.pin_digest`), so nothing removes the
        stored folder meanwhile. A stored folder that lacks a file (a crash before this
        version's fsyncs) is replaced by the staged copy."""
        final = self.path_for(digest)
        size = sum((staged / n).stat().st_size for n in (CONFIG_FILE, WEIGHTS_FILE))
        if self._complete(final, staged):
            shutil.rmtree(staged, ignore_errors=True)
            return final, size
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            with (staged / name).open("rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(staged)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # incomplete: move it aside, then put the good copy in its place
            broken = self.new_staging_dir()
            os.rename(final, broken)
            shutil.rmtree(broken, ignore_errors=True)
        try:
            os.rename(staged, final)
        except OSError:
            if not self._complete(final, staged):  # lost a race with an identical upload: fine
                raise
            shutil.rmtree(staged, ignore_errors=True)
        fsync_dir(final.parent)
        fsync_dir(self.root)
        return final, size

    @staticmethod
    def holds(folder: Path) -> bool:
        """Whether a stored adapter folder has both of its files."""
        return all((folder / n).is_file() for n in (CONFIG_FILE, WEIGHTS_FILE))

    def remove(self, digest: str) -> None:
        final = self.path_for(digest)
        if not final.exists():
            return
        # Rename first: a crash mid-delete leaves a staging leftover, not a half-removed adapter.
        doomed = self.new_staging_dir()
        os.rename(final, doomed)
        fsync_dir(final.parent)
        shutil.rmtree(doomed, ignore_errors=True)

    def digests(self) -> Iterator[str]:
        """Digests of the folders in the store."""
        for shard in self.root.iterdir():
            if shard.name == self.staging.name or not shard.is_dir():
                continue
            for folder in shard.iterdir():
                if _DIGEST.match(folder.name) and folder.name[:2] == shard.name:
                    yield folder.name

    def clean_staging(self, older_than: float = STALE_STAGING_SECONDS) -> int:
        """Remove staging leftovers older than `older_than` seconds; return how many."""
        cutoff = time.time() - older_than
        removed = 0
        for leftover in self.staging.iterdir():
            try:
                if leftover.lstat().st_mtime >= cutoff:
                    continue
            except FileNotFoundError:
                continue
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed += 1
        return removed
