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

__all__ = [
    "atomic_write",
    "checked_payload",
    "load_torch_checked",
    "save_torch_checked",
    "with_checksum",
]

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
        try:
            os.replace(tmp, path)
        except OSError as e:  # a folder in the way: name the target alone, as above
            if e.errno is None:
                raise
            raise type(e)(e.errno, e.strerror, str(path)) from None
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


def save_torch_checked(obj, path: str | os.PathLike, magic: bytes) -> int:
    """``torch.save(obj)`` bytes written atomically with ``magic`` and a SHA-256 trailer
    (:func:`with_checksum`); returns the file's size in bytes."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = with_checksum(magic, buf.getvalue())
    atomic_write(path, data)
    return len(data)


def load_torch_checked(path: str | os.PathLike, magic: bytes, what: str, map_location=None):
    """Inverse of :func:`save_torch_checked`: the checksum is verified before anything is parsed,
    then ``torch.load(weights_only=True)``. Raises ``ValueError`` naming ``path`` and what was
    expected vs got for a missing, truncated, corrupted or foreign file."""
    import io

    import torch

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: expected a {what} file, could not read it ({e})") from e
    body = checked_payload(data, magic, f"{path}: {what}")
    try:
        return torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except Exception as e:  # a checksummed file that torch cannot parse: written by another version
        raise ValueError(f"{path}: expected a {what} file, could not parse it ({e})") from e
