"""Files the formats write: atomic (a temporary file in the same directory, then ``os.replace``),
with temporary files left by a killed write cleaned up by the next write, and a SHA-256 trailer
that a load checks before it parses anything."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from pathlib import Path

__all__ = ["atomic_write", "checked_payload", "with_checksum"]

# A temporary file of a killed write is this old at least before a later write removes it: a
# younger one may belong to a write still in progress in another process.
_STALE_TMP_SECONDS = 60.0
_DIGEST = 32


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


def _remove_stale_temporaries(path: Path) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    now = time.time()
    with contextlib.suppress(OSError):
        for tmp in directory.glob(f"{_tmp_prefix(path)}*.tmp"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                    tmp.unlink()


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: readers see the old file or the new one, never a
    part. A failure removes the temporary file; one a killed process left behind is removed by
    the next write to the same path."""
    path = Path(path)
    _remove_stale_temporaries(path)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=_tmp_prefix(path), suffix=".tmp")
    except OSError as e:  # name the target, not the hidden temporary (missing / read-only folder)
        if e.errno is None:
            raise
        raise type(e)(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file 0600; give it the mode a plain open() would (0666 less umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def with_checksum(magic: bytes, body: bytes) -> bytes:
    """``magic + body + sha256(magic + body)``."""
    data = magic + body
    return data + hashlib.sha256(data).digest()


def checked_payload(data: bytes, magic: bytes, what: str) -> bytes:
    """The ``body`` of :func:`with_checksum`'s output; raises ``ValueError`` naming expected vs got
    for a wrong magic, a truncated file or a checksum mismatch (any flipped bit)."""
    if len(data) < len(magic) + _DIGEST:
        raise ValueError(
            f"{what}: expected at least {len(magic) + _DIGEST} bytes, got {len(data)} (truncated)"
        )
    if not data.startswith(magic):
        got = data[: len(magic)]
        raise ValueError(f"{what}: expected a file starting with {magic!r}, got {got!r}")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    actual = hashlib.sha256(body).digest()
    if actual != digest:
        raise ValueError(
            f"{what}: checksum mismatch (corrupted file): expected SHA-256 {digest.hex()[:16]}..., "
            f"got {actual.hex()[:16]}..."
        )
    return body[len(magic) :]
