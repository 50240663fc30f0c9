"""Checkpoints: atomic writes, a checksum, a format tag, validation before anything is touched,
exact resume.

* :func:`save_checkpoint` writes ``MAGIC + torch.save output + SHA-256`` to a temporary file in
  the same folder, flushes it to disk and renames it over the old one (``os.replace`` is atomic on
  POSIX): a kill at any moment leaves either the previous checkpoint or the new one, never half of
  one. It records ``torch.get_num_threads()`` as ``torch_threads``.
* :func:`load_checkpoint` checks the magic and the SHA-256 before it parses anything (any flipped
  bit is refused), then reads with ``weights_only=True`` (no code runs from the file); it raises
  :class:`CheckpointError`, naming what was expected and what was found, for a file that is
  truncated or corrupted, of another format, or of another run (model, width, ...). A plain
  ``torch.save`` file (no checksum) is refused too.
* :func:`resume_differences` lists the settings a resumed command changes; scripts refuse them,
  because a run resumed with other hyperparameters is reproduced by no single command.
  :func:`load_run_checkpoint` also refuses a resume with another torch thread count: on the CPU,
  reductions (matmul, convolution, sums) split their work by thread and round differently, so
  the weights of a run resumed with other threads differ from the uninterrupted run's.
* :func:`rng_state` / :func:`set_rng_state`: torch (CPU and CUDA) and Python ``random`` state of
  one process; the scripts gather every rank's (``sparsekern.training.distributed``).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import torch
from torch import nn

from sparsekern.formats._files import atomic_write, checked_payload, with_checksum

__all__ = [
    "CHECKPOINT_MAGIC",
    "CheckpointError",
    "load_checkpoint",
    "load_run_checkpoint",
    "resume_differences",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "state_dict_problems",
]


CHECKPOINT_MAGIC = b"SKCKPT1\n"  # then torch.save output, then its SHA-256


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names expected vs got."""


def save_checkpoint(path, state: dict, kind: str) -> Path:
    """Write ``{"format": kind, "torch_threads": torch.get_num_threads(), **state}`` to ``path``
    atomically, with a SHA-256 trailer; returns the path.

    Args:
        path: the checkpoint file (its folder must exist; an error names ``path``).
        state: tensors and plain Python values (what ``torch.load(weights_only=True)`` reads).
        kind: the format tag, e.g. ``"sparsekern/prune_mnist/2"``.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save({"format": kind, "torch_threads": torch.get_num_threads(), **state}, buf)
    atomic_write(path, with_checksum(CHECKPOINT_MAGIC, buf.getvalue()))
    return path


def load_checkpoint(path, kind: str, expect: dict | None = None) -> dict:
    """Read and validate a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the file.
        kind: the format tag it must carry.
        expect: ``{key: value}`` the checkpoint must hold (e.g. the model's name and width).

    Returns:
        The checkpoint dict (tensors on the CPU).

    Raises:
        CheckpointError: unreadable, truncated or corrupted (checksum), without a checksum (a
            plain ``torch.save`` file), another format, or an ``expect`` mismatch.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it: {e}") from None
    if data[:2] == b"PK":  # a zip archive: torch.save's own format, without our checksum
        raise CheckpointError(
            f"{path}: expected a checksummed sparsekern checkpoint (starting "
            f"{CHECKPOINT_MAGIC!r}), got a plain torch.save file, which cannot be checked for "
            "corruption: delete it (or move it away) and let the run write a new one"
        )
    try:
        body = checked_payload(data, CHECKPOINT_MAGIC, "checkpoint")
        ck = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot read it (truncated or corrupted?): expected a complete checkpoint "
            f"of format {kind!r}; {type(e).__name__}: {e}"
        ) from None
    got = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
    if got != kind:
        raise CheckpointError(f"{path}: expected a checkpoint of format {kind!r}, got {got!r}")
    if expect:
        have = {k: ck.get(k) for k in expect}
        if have != expect:
            raise CheckpointError(
                f"{path} is a checkpoint of {have}; expected {expect} (another run: choose a "
                f"fresh --out, or the settings it was made with)"
            )
    return ck


def state_dict_problems(model: nn.Module, state: dict) -> list[str]:
    """What keeps ``state`` from loading into ``model`` strictly: missing / unexpected keys and
    shape mismatches (empty when it fits)."""
    own = model.state_dict()
    out = [f"missing {k}" for k in own if k not in state]
    out += [f"unexpected {k}" for k in state if k not in own]
    out += [
        f"{k}: expected shape {list(own[k].shape)}, got {list(v.shape)}"
        for k, v in state.items()
        if k in own and tuple(own[k].shape) != tuple(v.shape)
    ]
    return out


def resume_differences(saved: dict, now: dict, ignore=()) -> list[str]:
    """``["--epochs: saved 20, now 10", ...]``: the settings (argparse ``vars(args)``) that differ
    between a checkpoint's run and this command, except the keys in ``ignore`` (those that do
    not change the result: output folder, progress bar, ...)."""
    out = []
    for k in sorted(set(saved) | set(now)):
        if k in ignore:
            continue
        a, b = saved.get(k, "<absent>"), now.get(k, "<absent>")
        if a != b:
            out.append(f"--{k.replace('_', '-')}: saved {a!r}, now {b!r}")
    return out


def rng_state(device: torch.device | str | None = None) -> dict:
    """This process's random state: torch's CPU generator, the current CUDA device's (if
    ``device`` is CUDA) and Python's ``random``."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
        "python": random.getstate(),
    }


def set_rng_state(state: dict, device: torch.device | str | None = None) -> None:
    """Restore :func:`rng_state`'s output."""
    torch.set_rng_state(state["torch"])
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], dev)
    if state.get("python") is not None:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))


def load_run_checkpoint(
    path, kind: str, model: nn.Module, expect: dict, args: dict | None = None, ignore=()
) -> dict:
    """:func:`load_checkpoint`, then check that its state dict fits ``model`` and, for a
    resume (``args`` given: this command's ``vars(args)``), that it was made with the same
    settings except ``ignore`` and with this process's ``torch.get_num_threads()`` (whatever
    ``ignore`` says: the thread count changes CPU results). Raises :class:`CheckpointError`
    naming every difference; nothing is loaded or written."""
    ck = load_checkpoint(path, kind, expect)
    if problems := state_dict_problems(model, ck["model"]):
        raise CheckpointError(f"{path}: its state dict does not fit the model: {problems[:5]}")
    threads, now = ck.get("torch_threads"), torch.get_num_threads()
    if args is not None and threads != now:
        raise CheckpointError(
            f"{path} was made with {threads} torch thread(s), this run has {now}. Expected the "
            "same: on the CPU the thread count changes how reductions are split and rounded, so "
            f"a resume with another count gives other weights. Resume with --threads {threads}"
        )
    if args is not None and (diffs := resume_differences(ck["args"], args, ignore)):
        raise CheckpointError(
            f"{path} was made with other settings: {'; '.join(diffs)}. Expected the same (a "
            "resumed run must be one run): use them, or start a fresh run in another folder"
        )
    return ck
