"""File-system helpers for what the package writes: the mode a shared folder expects, fsync, content hashes.

No package imports: checkpoints, the token cache and the entry points all use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO


def follow_umask(paths: Iterable[Path | str]) -> None:
    """Give files the mode a plain `open()` would (0666 less the umask, usually 0644). Files written through a
    private temp file (`tempfile.mkstemp`, safetensors' `save_file`) are 0600, unreadable to the rest of a
    team, while their neighbours are 0644."""
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    for path in paths:
        os.chmod(path, 0o666 & ~umask)


def fsync(path: Path | str) -> None:
    """Flush a file's content, or a folder's entries (the files created or renamed in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """`fsync` every file and folder under `path`, and `path` itself last."""
    for p in [*path.rglob("*"), path]:
        fsync(p)


def sha256_file(path: Path | str) -> str:
    """The SHA-256 of a file's bytes, read in blocks (hex)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextlib.contextmanager
def atomic_file(out: Path | str) -> Iterator[IO[bytes]]:
    """A binary file to write `out` through: a temporary file beside it, flushed, fsynced and renamed onto `out`
    when the block ends (removed if it fails), with the mode a plain `open()` would give (`follow_umask`). So
    `out` is never seen half written, and an existing `out` is replaced whole or not at all."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        follow_umask([tmp])
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
