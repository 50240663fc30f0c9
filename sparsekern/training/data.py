"""Data for the experiments: MNIST as whole tensors behind a DataLoader that yields whole
batches, and ImageFolder loaders (ImageNet, or a synthetic stand-in) with DistributedSampler."""

from __future__ import annotations

import copy
import gzip
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "holdout_split",
    "imagefolder_loaders",
    "load_mnist",
    "make_synthetic_imagefolder",
    "tensor_loader",
]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_mnist(root) -> dict[str, torch.Tensor]:
    """MNIST as whole tensors: ``x_train`` ``[60000, 1, 28, 28]`` and ``x_test`` ``[10000, 1, 28,
    28]`` float32, normalised (mean 0.1307, std 0.3081); ``y_*`` ``[N]`` int64. Offline: the
    ``*-ubyte.gz`` files in ``root`` are unpacked once into ``root/MNIST/raw/``, where
    torchvision looks for them (each through a temp file and a rename: a concurrent reader never
    sees half a file)."""
    import torchvision

    root = Path(root)
    gz_files = sorted(root.glob("*-ubyte.gz"))
    raw = root / "MNIST" / "raw"
    if not gz_files and not raw.exists():
        raise FileNotFoundError(
            f"{root}: expected MNIST's four *-ubyte.gz files (the repository ships them in "
            f"data/mnist/), found none"
        )
    raw.mkdir(parents=True, exist_ok=True)
    for gz in gz_files:
        dst = raw / gz.name[:-3]
        if not dst.exists():
            tmp = dst.with_suffix(f".tmp{os.getpid()}")
            with gzip.open(gz) as src, open(tmp, "wb") as f:
                shutil.copyfileobj(src, f)
            os.replace(tmp, dst)
    out = {}
    for split, train in (("train", True), ("test", False)):
        ds = torchvision.datasets.MNIST(root=str(root), train=train, download=False)
        out[f"x_{split}"] = ds.data.float().div_(255).sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)
        out[f"y_{split}"] = ds.targets.long()
    return out


def holdout_split(n: int, n_holdout: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(n)`` into kept and held-out indices, fixed by ``seed``: the held-out set is
    the first ``n_holdout`` of ``torch.randperm(n)`` under a generator seeded with ``seed``, the
    rest keep their original order (so "the first N training images" still means something).

    Returns:
        ``(kept [n - n_holdout], held_out [n_holdout])``, int64 index tensors, each sorted.
    """
    if not 0 <= n_holdout < n:
        raise ValueError(f"holdout_split: expected 0 <= n_holdout < n = {n}, got {n_holdout}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = perm[:n_holdout].sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[held] = False
    return keep.nonzero().flatten(), held


def tensor_loader(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over in-memory tensors ``x`` ``[N, ...]``, ``y`` ``[N]`` that indexes a whole
    batch at once (``x[idx]``), not image by image: no per-sample collation, so MNIST epochs run
    at the model's speed. With ``shuffle``, the order is ``torch.randperm(N, generator=...)``
    per epoch: the generator's state at an epoch boundary is all a resumed run needs."""
    ds = TensorDataset(x, y)
    base = RandomSampler(ds, generator=generator) if shuffle else SequentialSampler(ds)
    return DataLoader(ds, sampler=BatchSampler(base, batch_size, drop_last), batch_size=None)


def make_synthetic_imagefolder(root, classes: int, n_train: int, n_val: int, res: int, seed: int):
    """An ImageFolder-shaped random dataset: ``root/{train,val}/class_<k>/<i>.png``, RGB, size
    ``res + res/8`` (so the crops have something to cut). Class ``k`` is a fixed random
    low-frequency colour pattern plus noise, so a net can learn it. Written once;
    ``root/DONE`` marks completion."""
    from PIL import Image

    root = Path(root)
    if (root / "DONE").exists():
        return
    g = torch.Generator().manual_seed(seed)
    size = res + res // 8
    patterns = F.interpolate(
        torch.rand(classes, 3, 2, 2, generator=g), size=(size, size), mode="bilinear",
        align_corners=False,
    )  # fmt: skip
    for split, n in (("train", n_train), ("val", n_val)):
        for k in range(classes):
            d = root / split / f"class_{k}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = (0.8 * patterns[k] + 0.2 * torch.rand(3, size, size, generator=g)) * 255
                arr = img.clamp(0, 255).byte().permute(1, 2, 0).numpy()
                Image.fromarray(arr).save(d / f"{i}.png")
    (root / "DONE").write_text("ok\n")


def imagefolder_loaders(
    root,
    res: int,
    batch_size: int,
    workers: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    val_images: int = 0,
    sens_images: int = 0,
    pin_memory: bool = False,
):
    """Train / val / sensitivity loaders over ``root/train`` and ``root/val`` with torchvision's
    standard pipelines (train: RandomResizedCrop + flip; val: Resize(res * 256/224) +
    CenterCrop(res)).

    Train is sharded by a DistributedSampler (its order depends on seed and epoch only: a
    resumed epoch replays it; call ``sampler.set_epoch``); val (``val_images`` spread over the
    set, 0: all) and the sensitivity set (``sens_images`` random *training* images with the eval
    transform) are split ``rank::world`` without padding, so all-reduced counts are exact.
    Workers are not persistent: each epoch's workers are seeded from the main RNG (restored on
    resume), so a resumed epoch sees the same crops.

    Returns:
        ``(loaders: {"train", "val", "sens"}, sampler, classes: list[str], n_train, n_val)``.
    """
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    root = Path(root)
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_tf = T.Compose([T.RandomResizedCrop(res), T.RandomHorizontalFlip(), *norm])
    val_tf = T.Compose([T.Resize(round(res * 256 / 224)), T.CenterCrop(res), *norm])
    train = ImageFolder(root / "train", train_tf)
    val = ImageFolder(root / "val", val_tf)
    if train.classes != val.classes:
        raise ValueError(
            f"{root}: expected the same class folders in train/ and val/, got "
            f"{len(train.classes)} and {len(val.classes)}"
        )
    n_val = min(len(val), val_images) if val_images else len(val)
    val_idx = torch.linspace(0, len(val) - 1, n_val).round().long().tolist()
    sens_src = copy.copy(train)  # training images with the eval transform (no 2nd folder scan)
    sens_src.transform = val_tf
    g = torch.Generator().manual_seed(seed + 1)
    sens_idx = torch.randperm(len(sens_src), generator=g)[:sens_images].sort().values.tolist()
    kw = dict(num_workers=workers, pin_memory=pin_memory, persistent_workers=False)
    sampler = torch.utils.data.DistributedSampler(
        train, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    loaders = {
        "train": DataLoader(train, batch_size, sampler=sampler, drop_last=True, **kw),
        "val": DataLoader(Subset(val, val_idx[rank::world]), batch_size, **kw),
        "sens": DataLoader(Subset(sens_src, sens_idx[rank::world]), batch_size, **kw),
    }
    return loaders, sampler, train.classes, len(train), n_val
