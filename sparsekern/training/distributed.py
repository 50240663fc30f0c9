"""Distributed helpers over ``torch.distributed`` (torchrun / DDP): set-up from the environment,
all-reduce and all-gather that degrade to no-ops in a single process, and digests that check
masks (and whole models) are bit-identical on every rank."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistEnv",
    "all_sum",
    "barrier",
    "check_masks_identical",
    "gather_objects",
    "is_dist",
    "mask_digest",
    "setup_distributed",
    "shutdown",
    "state_digest",
]


@dataclass
class DistEnv:
    """Where this process runs: ``rank`` of ``world`` processes, ``local_rank`` on its node."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0


def setup_distributed(threads: int = 0) -> DistEnv:
    """Start the process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``; nccl on GPUs, gloo on CPU), or a single process without it.

    Args:
        threads: torch threads per process on CPU (0: torch's default). On 2 shared cores, 1
            thread per rank: OpenMP threads spin waiting for a core another rank holds.
    """
    if threads and not torch.cuda.is_available():
        torch.set_num_threads(threads)
    if "RANK" not in os.environ:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistEnv(0, 1, 0, dev)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl", init_method="env://", device_id=dev)
        return DistEnv(rank, world, local, dev)
    dist.init_process_group("gloo", init_method="env://")
    return DistEnv(rank, world, local, torch.device("cpu"))


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def shutdown() -> None:
    if is_dist():
        dist.destroy_process_group()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks, in place (a no-op in one process)."""
    if is_dist():
        dist.all_reduce(t)
    return t


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order, on every rank."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_dist():
        dist.barrier()


def _sparse_layers(model: nn.Module):
    return [
        (n, m) for n, m in model.named_modules() if isinstance(m._buffers.get("mask"), torch.Tensor)
    ]


def mask_digest(model: nn.Module) -> str:
    """SHA-256 over every sparse layer's name and mask bytes (bool, C order)."""
    h = hashlib.sha256()
    for n, m in _sparse_layers(model):
        h.update(n.encode())
        h.update(m.mask.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def state_digest(model: nn.Module) -> str:
    """SHA-256 over the model's whole state dict (names and bytes): equal iff bit-identical."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_masks_identical(model: nn.Module, where: str) -> list[str]:
    """All-gather every rank's :func:`mask_digest`; raise ``RuntimeError`` if any rank differs
    (masks are computed on each rank from weights DDP keeps identical: a difference is a bug,
    never to be trained on). Returns the digests in rank order."""
    digests = gather_objects(mask_digest(model))
    if len(set(digests)) != 1:
        raise RuntimeError(
            f"masks differ across ranks {where}: expected one SHA-256 on all {len(digests)} "
            f"ranks, got " + ", ".join(f"rank {r}: {d[:16]}" for r, d in enumerate(digests))
        )
    return digests
