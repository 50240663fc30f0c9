"""Distributed helpers over ``torch.distributed`` (torchrun): set-up from the environment,
all-reduce and all-gather that degrade to no-ops in a single process, digests that check masks
(and whole models) are bit-identical on every rank, and the engines a sparse model trains under:
DDP (every rank the whole model), FSDP2 (``fully_shard``: every rank a row shard of each weight,
its mask and its optimizer state) and HSDP (FSDP2 over a 2-D mesh: replicas of sharded groups),
chosen by one argument (:func:`distribute`), with sharded checkpoints through
``torch.distributed.checkpoint`` (:func:`save_sharded`, :func:`load_sharded`). See
``docs/distributed.md``."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "ENGINES",
    "DistEnv",
    "all_sum",
    "barrier",
    "check_masks_identical",
    "distribute",
    "full_optimizer_state",
    "full_state_dict",
    "gather_objects",
    "is_dist",
    "load_full_into_sharded",
    "load_sharded",
    "mask_digest",
    "save_sharded",
    "setup_distributed",
    "shard_model",
    "shard_optimizer_state",
    "shutdown",
    "state_digest",
]

#: what :func:`distribute` accepts
ENGINES = ("none", "ddp", "fsdp", "hsdp")


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


def _full(t: torch.Tensor) -> torch.Tensor:
    # a sharded (DTensor) value all-gathered: a collective, every rank calls it in the same order
    return t.full_tensor() if type(t).__name__ == "DTensor" else t


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every sharded (DTensor) value all-gathered: the one-process
    state dict (same keys, full tensors), on every rank (a collective: every rank calls). A
    no-op copy for an unsharded model."""
    return {k: _full(v).detach() for k, v in model.state_dict().items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` (keyed by parameter index, as one process saves it) with every
    sharded state tensor (momentum, Adam moments of FSDP2 parameters) all-gathered; every rank
    calls. Loads back with ``optimizer.load_state_dict`` then :func:`shard_optimizer_state`."""
    sd = optimizer.state_dict()
    state = {i: {k: _full(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for i, s in sd["state"].items()}  # fmt: skip
    return {**sd, "state": state}


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` of a full (one-process) state: every state tensor of
    a sharded parameter's shape becomes a DTensor of its placement (this rank keeps its rows;
    nothing is communicated), so the optimizer's step combines it with the sharded parameter.
    Every rank must load the same full state."""
    from sparsekern.nn._dtensor import is_dtensor, local_like

    for p, s in optimizer.state.items():
        if not is_dtensor(p):
            continue
        for k, v in s.items():
            if isinstance(v, torch.Tensor) and not is_dtensor(v) and v.shape == p.shape:
                s[k] = local_like(v, p)


def mask_digest(model: nn.Module) -> str:
    """SHA-256 over every sparse layer's name and full mask bytes (bool, C order); sharded
    masks are all-gathered first (every rank must call)."""
    h = hashlib.sha256()
    for n, m in _sparse_layers(model):
        h.update(n.encode())
        h.update(_full(m.mask).detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def state_digest(model: nn.Module) -> str:
    """SHA-256 over the model's whole state dict (names and full bytes, sharded values
    all-gathered): equal iff bit-identical."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        v = _full(v).detach().cpu().contiguous()
        h.update(v.view(-1).view(torch.uint8).numpy().tobytes())
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


# ---------------------------------------------------------------------------------- engines
def shard_model(model: nn.Module, mesh=None, *, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 over a sparse model: ``fully_shard`` on every sparse layer (its own all-gather
    group: weight, bias) and on the root (the other parameters), then every mask sharded like its
    weight (:mod:`sparsekern.nn._dtensor`). In place; returns ``model``.

    Args:
        model: a sparsified model (``sparsekern.sparsify``), on this rank's device, the same
            weights and masks on every rank (as after seeding, or a load).
        mesh: a 1-D DeviceMesh (FSDP) or a 2-D one ``(replicate, shard)`` (HSDP); default all
            ranks in one 1-D mesh.
        reshard_after_forward: FSDP2's flag for the sparse layers (True frees each gathered
            weight after its forward and gathers it again in the backward).

    Compact-storage layers (``CompactSparseLinear``): FSDP shards their trainable ``values
    [nnz]`` (rank r holds the chunk ``torch.chunk(range(nnz), world)[r]`` of the kept weights in
    CSR order) and all-gathers it for the forward and backward; the ``mask`` and its CSR index
    stay whole on every rank. Their mask is fixed while sharded (``set_mask``, a pruner, an
    in-place mask edit and a state-dict load with another mask are refused; the number of kept
    weights, hence the sharded parameter's size, would change).
    """
    from torch.distributed.fsdp import fully_shard

    from sparsekern.nn._dtensor import shard_mask

    kw = {} if mesh is None else {"mesh": mesh}
    for _, m in _sparse_layers(model):
        if m is not model:
            fully_shard(m, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, **kw)
    compact = False
    for _, m in _sparse_layers(model):
        if hasattr(m, "repack_mask"):  # compact: values sharded, mask and index replicated
            m.__dict__["_sk_fsdp"] = compact = True
        else:
            shard_mask(m)
    if compact and "_sk_compact_load_hook" not in model.__dict__:
        hook = model.register_load_state_dict_pre_hook(_refuse_compact_mask_change)
        model.__dict__["_sk_compact_load_hook"] = hook
    return model


def _refuse_compact_mask_change(module, state_dict, prefix, *args) -> None:
    # before any layer loads: a layer-by-layer refusal would leave the layers before it loaded
    for name, m in module.named_modules():
        if not m.__dict__.get("_sk_fsdp"):
            continue
        key = f"{prefix}{name}.mask" if name else f"{prefix}mask"
        mask = state_dict.get(key)
        ok = not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
        if ok or mask.shape != m.mask.shape or torch.equal(mask.to(m.mask.device), m.mask):
            continue  # absent or malformed: the layer's own load reports it
        raise RuntimeError(
            f"load_state_dict: {key!r}: expected the sharded compact layer's own mask "
            f"({m.values.numel()} kept weights; its mask is fixed under FSDP2: another one would "
            f"resize the sharded values), got another ({int(mask.sum())} kept); nothing loaded. "
            "Load into an unsharded model and shard it after"
        )


def distribute(model: nn.Module, engine: str, env: DistEnv | None = None, hsdp_replicas: int = 0):
    """Wrap ``model`` for ``engine`` (one of :data:`ENGINES`); returns ``(model, net)``: the
    model the pruner and optimizer are built on, and what runs the forward in ``train_epoch``.

    * ``"none"``: one process, ``(model, model)``.
    * ``"ddp"``: ``(model, DistributedDataParallel(model))``: every rank the whole model.
    * ``"fsdp"``: ``(shard_model(model), same)``: every rank a shard of each weight and mask.
    * ``"hsdp"``: FSDP2 over a ``(hsdp_replicas, world / hsdp_replicas)`` mesh: weights sharded
      within a group, groups replicated (default: 2 replicas when the world is even).
    """
    if engine not in ENGINES:
        raise ValueError(f"distribute: expected engine in {ENGINES}, got {engine!r}")
    world = dist.get_world_size() if is_dist() else 1
    if engine == "none":
        return model, model
    if world == 1 and not is_dist():
        raise ValueError(
            f"distribute: engine {engine!r} needs torch.distributed initialised (torchrun), got "
            "one process"
        )
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env is not None and env.device.type == "cuda" else None
        return model, DDP(model, device_ids=ids)
    mesh = None
    if engine == "hsdp":
        from torch.distributed.device_mesh import init_device_mesh

        r = hsdp_replicas or 2
        if r < 1 or world % r:
            raise ValueError(
                f"distribute: expected hsdp_replicas dividing the world size {world}, got {r}"
            )
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(dev, (r, world // r), mesh_dim_names=("replicate", "shard"))
    return shard_model(model, mesh), model


# ------------------------------------------------------------------------------ checkpoints
SHARDED_FORMAT = "sparsekern/sharded/1"
_MANIFEST = "sparsekern-manifest.json"


def _as_bytes(obj) -> torch.Tensor:
    # plain values travel as a uint8 tensor of torch.save's bytes, read back with
    # weights_only=True (DCP's own BytesIO items are read back with a full unpickler)
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _from_bytes(t: torch.Tensor):
    return torch.load(io.BytesIO(t.numpy().tobytes()), weights_only=True)


def _digest_files(folder: Path) -> dict[str, str]:
    out = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name != _MANIFEST:
            out[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def save_sharded(path, model: nn.Module, optimizer=None, pruner=None, extra: dict | None = None):
    """Save a sharded checkpoint (a folder) through ``torch.distributed.checkpoint``: every rank
    writes its shards of the weights, masks and optimizer state; the pruner's state, ``extra``
    (plain values and tensors, the same on every rank) and every rank's RNG state go along.

    Atomic: written to ``<path>.partial``, checksummed (``sparsekern-manifest.json``: SHA-256
    of every file) and renamed over ``path`` by rank 0; a kill at any point leaves the previous
    checkpoint or the new one. Every rank must call it. Returns ``Path(path)``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from sparsekern.training.checkpoint import rng_state

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    rank = dist.get_rank() if is_dist() else 0
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
    else:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        msd, osd = get_model_state_dict(model), None
    state = {"model": msd}
    if osd is not None:
        state["optimizer"] = osd
    meta = {
        "format": SHARDED_FORMAT,
        "world": dist.get_world_size() if is_dist() else 1,
        "torch_threads": torch.get_num_threads(),
        "pruner": pruner.state_dict() if pruner is not None else None,
        "extra": extra,
    }
    state["meta"] = _as_bytes(meta)
    state[f"rng_{rank}"] = _as_bytes(rng_state(_model_device(model)))
    dcp.save(state, checkpoint_id=str(tmp))
    barrier()
    if rank == 0:
        manifest = {"format": SHARDED_FORMAT, "sha256": _digest_files(tmp)}
        (tmp / (_MANIFEST + ".tmp")).write_text(json.dumps(manifest, indent=1))
        os.replace(tmp / (_MANIFEST + ".tmp"), tmp / _MANIFEST)
        old = path.with_name(path.name + ".old")
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    barrier()
    return path


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_manifest(path: Path) -> str | None:
    man = path / _MANIFEST
    if not man.is_file():
        return f"{path}: expected a sharded sparsekern checkpoint with {_MANIFEST}, found none"
    try:
        manifest = json.loads(man.read_text())
        want = manifest["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{path}: unreadable {_MANIFEST} ({type(e).__name__}: {e})"
    if manifest.get("format") != SHARDED_FORMAT:
        return f"{path}: expected format {SHARDED_FORMAT!r}, got {manifest.get('format')!r}"
    got = _digest_files(path)
    bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if bad:
        return f"{path}: files missing, extra or corrupted (SHA-256 differs): {bad[:6]}"
    return None


def load_sharded(path, model: nn.Module, optimizer=None, pruner=None) -> dict:
    """Load :func:`save_sharded`'s folder into the sharded ``model`` (and ``optimizer``,
    ``pruner``, this rank's RNG state), after rank 0 checked every file's SHA-256. Same world
    size as the save. Every rank must call it. Returns the ``extra`` dict saved.

    Raises:
        sparsekern.training.CheckpointError: a missing, corrupted or foreign checkpoint, or
            another world size (nothing is loaded).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    from sparsekern.nn.masks import note_mask_synced
    from sparsekern.training.checkpoint import CheckpointError, set_rng_state

    path = Path(path)
    problem = _check_manifest(path) if (not is_dist() or dist.get_rank() == 0) else None
    problem = gather_objects(problem)[0]
    if problem:
        raise CheckpointError(problem)
    rank = dist.get_rank() if is_dist() else 0
    sizes = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    key = f"rng_{rank}"
    if "meta" not in sizes or key not in sizes:
        raise CheckpointError(f"{path}: expected the entries 'meta' and {key!r}, found neither")
    small = {k: torch.empty(tuple(sizes[k].size), dtype=torch.uint8) for k in ("meta", key)}
    dcp.load(small, checkpoint_id=str(path))
    meta = _from_bytes(small["meta"])
    world = dist.get_world_size() if is_dist() else 1
    if meta.get("world") != world:
        raise CheckpointError(
            f"{path}: saved by {meta.get('world')} ranks, this run has {world}: expected the same"
        )
    _check_compact_masks(path, model, sizes)
    if pruner is not None and meta.get("pruner") is not None:
        pruner.load_state_dict(meta["pruner"])  # refuses another configuration first
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optimizer": osd}
    else:
        state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(path))
    if optimizer is not None:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
    else:
        set_model_state_dict(model, state["model"])
    for _, m in _sparse_layers(model):
        note_mask_synced(m)
    set_rng_state(_from_bytes(small[key]), _model_device(model))
    return meta.get("extra") or {}


def _check_compact_masks(path: Path, model: nn.Module, sizes) -> None:
    # a sharded compact layer's mask is fixed (its values' size is): the saved masks are read
    # and compared before anything (optimizer state included) is loaded in place
    import torch.distributed.checkpoint as dcp

    from sparsekern.training.checkpoint import CheckpointError

    layers = {f"model.{n}.mask": m for n, m in model.named_modules() if m.__dict__.get("_sk_fsdp")}
    if not layers:
        return
    saved = {k: torch.empty_like(m.mask) for k, m in layers.items() if k in sizes}
    dcp.load(saved, checkpoint_id=str(path))
    bad = [k for k, m in layers.items() if k in saved and not torch.equal(saved[k], m.mask)]
    if bad:
        raise CheckpointError(
            f"{path}: expected the masks of the sharded compact layers {bad[:4]} (fixed under "
            "FSDP2: another mask resizes the sharded values), got others; nothing loaded. "
            "Build the model with the checkpoint's masks before sharding it"
        )


def load_full_into_sharded(model: nn.Module, full_state: dict, optimizer=None) -> None:
    """Load a full (one-process) state dict, e.g. ``load_checkpoint(...)["model"]`` of the
    package's single-file checkpoint, into the sharded ``model``: each rank keeps its rows of
    every weight and mask; pruned weights are zeroed (the mask invariant), and so is the
    ``optimizer``'s state where masks prune. Every rank must call it with the same dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from sparsekern.nn._dtensor import shard_mask
    from sparsekern.nn.masks import note_mask_synced, sync_optimizer

    for _, m in _sparse_layers(model):
        shard_mask(m)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True))
    with torch.no_grad():
        for _, m in _sparse_layers(model):
            m.weight.masked_fill_(~m.mask, 0)
            note_mask_synced(m)
    if optimizer is not None:
        sync_optimizer(model, optimizer)
