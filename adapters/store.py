"""Content-addressed adapter store on disk.

An adapter lives at `<root>/<digest[:2]>/<digest>/` where digest is the SHA-256 of its config
and weights. New adapters are staged under `<root>/.staging/` and moved into place with one
`rename`, so a crash mid-upload leaves at most a stray staging folder, never a half-written
adapter; identical uploads share one copy."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from pathlib import Path

from adapters.archive import CONFIG_FILE, WEIGHTS_FILE

STALE_STAGING_SECONDS = 24 * 3600


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.staging = self.root / ".staging"
        self.staging.mkdir(parents=True, exist_ok=True)
        # Staging folders older than a day are leftovers of interrupted uploads. Younger ones may
        # belong to another replica sharing this store, mid-upload.
        cutoff = time.time() - STALE_STAGING_SECONDS
        for leftover in self.staging.iterdir():
            if leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)

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

    def commit(self, staged: Path) -> tuple[str, Path, int]:
        """Move a validated staged folder into the store; return (digest, path, size)."""
        digest = self.digest(staged)
        final = self.path_for(digest)
        size = sum(p.stat().st_size for p in staged.iterdir())
        if final.exists():
            shutil.rmtree(staged)
            return digest, final, size
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            with (staged / name).open("rb") as fh:
                os.fsync(fh.fileno())
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staged, final)
        except OSError:
            if not final.exists():  # lost a race with an identical upload: fine; else re-raise
                raise
            shutil.rmtree(staged, ignore_errors=True)
        return digest, final, size

    def remove(self, digest: str) -> None:
        shutil.rmtree(self.path_for(digest), ignore_errors=True)
