"""Han et al. 2015 on ImageNet: prune AlexNet / VGG-16 iteratively, on one or many GPUs (torchrun).

    # CPU smoke runs (random ImageFolder of 4 classes, 1/16-width nets; ~15 s, 2 ranks ~35 s):
    python scripts/prune_imagenet.py --model alexnet --synthetic --tiny
    python -m torch.distributed.run --nproc_per_node 2 scripts/prune_imagenet.py \\
        --model alexnet-caffe --synthetic --tiny              # 2 ranks, gloo backend
    # one GPU: prune torchvision's pretrained AlexNet (a local file) to Han's per-layer keep rates
    python scripts/prune_imagenet.py --model alexnet --data /data/imagenet \\
        --weights alexnet-owt-7be5be79.pth          # no dense phase with --weights
    # one node, 8 GPUs (--batch-size is per GPU: 8 x 32 = 256 images a step, Caffe's batch)
    torchrun --standalone --nproc_per_node 8 scripts/prune_imagenet.py --model vgg16 \\
        --data /data/imagenet --weights vgg16-397923af.pth --workers 12
    # two nodes x 8 GPUs: the same command on each node, NODE_RANK 0 and 1, MASTER = node 0
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint $MASTER:29500 scripts/prune_imagenet.py --model vgg16 --data DIR --weights W
    # after a crash or pre-emption: the same command + --resume (continues from <out>/ckpt.pt)
    # train dense here, then prune later / elsewhere:  --rounds 0, then  --start <out>/ckpt.pt
    # keep rates from a sensitivity analysis instead of the paper's:  --keep sens --max-drop 2
    # fixed quality parameters:  --quality conv=0.6,fc=1.2   or per layer  --quality fc6=1.5,...

The job, in order (every epoch checkpointed to <out>/ckpt.pt by rank 0, atomically; --resume
continues exactly: model, masks, optimizer, LR scheduler, pruner, every rank's RNG, phase, round,
epoch and step; a checkpoint of another model, or a truncated one, is rejected before anything is
written):
1. Dense phase: SGD momentum 0.9 at --lr (0.01, torchvision's recipe for both nets), x0.1 every
   --lr-step epochs, L2 5e-4 on the weights (Caffe's weight decay, through HanPruner). Skipped with
   --epochs 0 (from --weights) or --start CKPT (a checkpoint of an earlier run, masks included).
   The dense net's top-1/top-5 error on the validation set is the reference.
2. Sensitivity analysis (Han Fig 6): each layer pruned alone over a grid of qualities, top-1 on
   --sens-images training images (never the validation set), reduced over all ranks so every
   rank sees the same numbers. Recorded; with --keep sens it sets the per-layer targets.
3. --rounds rounds of prune -> retrain. Each layer's target keep rate (default: the paper's, Han
   Table 4 / 5, matched to the layers in order) is reached geometrically: round r of R keeps
   target^(r/R). Pruning = Han's rule (|w| <= quality x std of the layer's surviving weights),
   computed on every rank from identical weights; the masks' SHA-256 is then all-gathered and
   the run stops if any rank differs. Retraining at 1/100 of --lr (Han, AlexNet), the first half
   of the round's epochs FC layers only (conv frozen), the second half conv only (FC frozen), as
   Han did against vanishing gradients (a round of 1 epoch trains both).
4. Results (rank 0): summary.json with Table 1's rows (top-1/top-5 error, parameters,
   compression; paper vs this run), the per-layer table (Table 4/5: weights, FLOP, activation %,
   weights %, FLOP %) and the paper's keep rate per layer; the pruned model in Han's
   relative-index format (<model>_pruned.skr) and its block-sparse inference form
   (<model>_blocksparse.pt, sparsekern.nn.to_inference), both checked against the masked model.
   Logs: <out>/log.jsonl (one JSON object per event), TensorBoard in <out>/tb if installed.

DDP: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; the process group starts from env:// with nccl
on GPUs and gloo on CPU. Frozen layers change which parameters need gradients, so the DDP wrapper
is rebuilt at every freeze switch (DDP only reduces the parameters it was built with).
AMP: bf16 autocast on CUDA (no loss scaling needed); fp32 on CPU.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere without installing: `models` and `sparsekern`
sys.path.insert(0, str(ROOT / "scripts"))

from prune_mnist import dropout_ps, per_layer, save_ckpt  # noqa: E402  (the MNIST script's)

from models import (  # noqa: E402
    IMAGENET_MODELS,
    build_imagenet_model,
    count_weights,
    paper_layer_names,
)
from sparsekern.formats.relative_index import load_compressed, save_compressed  # noqa: E402
from sparsekern.nn import (  # noqa: E402
    BlockSparseConv2d,
    BlockSparseLinear,
    sparse_modules,
    to_inference,
)
from sparsekern.pruning import (  # noqa: E402
    HanPruner,
    choose_qualities,
    format_report,
    layer_report,
    sensitivity_analysis,
)
from sparsekern.pruning._layers import resolve_per_layer  # noqa: E402

CKPT_FORMAT = "sparsekern/prune_imagenet/1"
# Han et al. 2015: Table 1 (top-1 / top-5 error, parameters, compression) and the weights kept
# per layer, Table 4 (AlexNet) and Table 5 (VGG-16). Table 5's per-layer percentages are rounded
# in the paper: weighted by torchvision's layer sizes they give 10.5M weights, vs its 10.3M.
ALEXNET_KEEP = {"conv1": 0.84, "conv2": 0.38, "conv3": 0.35, "conv4": 0.37, "conv5": 0.37,
                "fc6": 0.09, "fc7": 0.09, "fc8": 0.25}  # fmt: skip
PAPER = {
    "alexnet": {"name": "AlexNet", "top1_dense": 42.78, "top5_dense": 19.73, "top1_pruned": 42.77,
                "top5_pruned": 19.67, "params_dense": 61e6, "params_pruned": 6.7e6,
                "compression": 9, "keep": ALEXNET_KEEP, "rounds": 3, "retrain_epochs": 20},
    "vgg16": {"name": "VGG-16", "top1_dense": 31.50, "top5_dense": 11.32, "top1_pruned": 31.34,
              "top5_pruned": 10.88, "params_dense": 138e6, "params_pruned": 10.3e6,
              "compression": 13, "rounds": 5, "retrain_epochs": 10,
              "keep": {"conv1_1": 0.58, "conv1_2": 0.22, "conv2_1": 0.34, "conv2_2": 0.36,
                       "conv3_1": 0.53, "conv3_2": 0.24, "conv3_3": 0.42, "conv4_1": 0.32,
                       "conv4_2": 0.27, "conv4_3": 0.34, "conv5_1": 0.35, "conv5_2": 0.29,
                       "conv5_3": 0.36, "fc6": 0.04, "fc7": 0.04, "fc8": 0.23}},
}  # fmt: skip
PAPER["alexnet-caffe"] = dict(PAPER["alexnet"], name="AlexNet (Caffe)")
# The tiny CPU configuration: 1/16-width nets on a synthetic ImageFolder, whole pipeline in
# seconds per rank (the CI smoke run and the resume test).
TINY = dict(width=1 / 16, classes=4, train_per_class=32, val_per_class=8, batch_size=16,
            epochs=2, lr=0.02, lr_step=1, rounds=2, retrain_epochs=2, sens_images=32,
            workers=0, report_images=8)  # fmt: skip
TINY_RES = {"alexnet": 64, "alexnet-caffe": 72, "vgg16": 32}  # >= each net's smallest input
SENS_QUALITIES = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as torchvision's models


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--model", choices=sorted(IMAGENET_MODELS), default="alexnet")
    p.add_argument("--data", help="ImageFolder root with train/ and val/ (class folders)")
    p.add_argument("--synthetic", action="store_true", help="random ImageFolder in <out>/synthetic")
    p.add_argument("--tiny", action="store_true", help="tiny CPU config (see TINY)")
    p.add_argument("--out", help="output folder (default runs/<model>[-tiny])")
    p.add_argument("--weights", help="local state dict of the dense model (torchvision's .pth)")
    p.add_argument("--start", help="checkpoint of this script to prune from (skips dense phase)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=float, help="channel width multiplier (1: the real nets)")
    p.add_argument("--res", type=int, help="crop size (default 224, 227 for alexnet-caffe)")
    p.add_argument("--classes", type=int, help="synthetic classes (ImageNet: from the folders)")
    p.add_argument("--train-per-class", type=int, help="synthetic images per class (64)")
    p.add_argument("--val-per-class", type=int, help="synthetic images per class (16)")
    p.add_argument("--epochs", type=int, help="dense epochs (default 90; 0 with --weights)")
    p.add_argument("--lr", type=float, help="initial learning rate (default 0.01)")
    p.add_argument("--lr-step", type=int, help="dense LR x0.1 every N epochs (default 30)")
    p.add_argument("--batch-size", type=int, help="per process (default 32)")
    p.add_argument("--workers", type=int, help="DataLoader workers per process (default 8)")
    p.add_argument("--reg-strength", type=float, default=5e-4, help="L2 (Caffe weight decay)")
    p.add_argument("--rounds", type=int, help="prune -> retrain rounds (AlexNet 3, VGG-16 5)")
    p.add_argument("--retrain-epochs", type=int, help="per round (AlexNet 20, VGG-16 10)")
    p.add_argument("--retrain-lr-factor", type=float, default=0.01, help="Han: 1/100")
    p.add_argument(
        "--keep",
        default="paper",
        help="final keep per layer: 'paper', 'sens' (from the sensitivity analysis), "
        "'0.1' or 'conv=0.4,fc=0.09' or module names",
    )
    p.add_argument("--quality", help="fixed quality per round instead of --keep: '1.0', 'fc=1.2'")
    p.add_argument("--max-drop", type=float, default=2.0, help="--keep sens: top-1 points")
    p.add_argument("--sens-images", type=int, help="training images for sensitivity (0: skip)")
    p.add_argument("--val-images", type=int, default=0, help="evaluate on N val images (0: all)")
    p.add_argument("--report-images", type=int, help="images for Table 4/5's Act% (64)")
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA too")
    p.add_argument("--block-size", type=int, default=32, help="block-sparse export block size")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process on CPU")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--save-rank-masks", action="store_true", help="each rank: masks_rank<r>.pt")
    p.add_argument("--step-sleep", type=float, default=0.0, help=argparse.SUPPRESS)  # tests
    args = p.parse_args(argv)
    defaults = dict(
        width=1.0,
        epochs=0 if args.weights else 90,  # pretrained weights: prune them, no dense phase
        lr=0.01,
        lr_step=30,
        batch_size=32,
        workers=8,
        retrain_epochs=PAPER[args.model]["retrain_epochs"],  # see docs/imagenet.md
        sens_images=2000,
        rounds=PAPER[args.model]["rounds"],
        classes=10,
        train_per_class=64,
        val_per_class=16,
        report_images=64,
    )
    if args.tiny:
        defaults.update(TINY, res=TINY_RES[args.model])
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.res is None:
        args.res = IMAGENET_MODELS[args.model][3]
    if args.res < IMAGENET_MODELS[args.model][2]:
        p.error(f"--res {args.res}: {args.model} needs >= {IMAGENET_MODELS[args.model][2]} px")
    if args.out is None:
        args.out = str(ROOT / "runs" / (args.model + ("-tiny" if args.tiny else "")))
    if not args.synthetic and not args.data:
        p.error("give --data DIR (ImageFolder with train/ and val/) or --synthetic")
    if args.resume and args.start:
        p.error("--resume and --start exclude each other")
    return args


# ------------------------------------------------------------------------------------ distributed
def setup_distributed(threads: int):
    """(rank, world, local_rank, device). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without
    them this is a single process."""
    if threads and not torch.cuda.is_available():
        torch.set_num_threads(threads)  # 2 ranks on 2 shared cores: 1 thread each (no spinning)
    if "RANK" not in os.environ:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, 0, dev
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", init_method="env://", device_id=torch.device("cuda", local))
        return rank, world, local, torch.device("cuda", local)
    dist.init_process_group("gloo", init_method="env://")
    return rank, world, local, torch.device("cpu")


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t)
    return t


def gather_objects(obj) -> list:
    """`obj` of every rank, in rank order, on every rank."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if is_dist():
        dist.barrier()


def mask_digest(model) -> str:
    """SHA-256 over every sparse layer's name and mask bytes (bool, C order)."""
    h = hashlib.sha256()
    for n, m in sparse_modules(model):
        h.update(n.encode())
        h.update(m.mask.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_masks_identical(model, where: str) -> list[str]:
    """All-gather every rank's mask digest; raise if any rank differs (masks are computed on each
    rank from weights that DDP keeps identical: a difference is a bug, never to be trained on)."""
    digests = gather_objects(mask_digest(model))
    if len(set(digests)) != 1:
        raise RuntimeError(
            f"masks differ across ranks {where}: expected one SHA-256 on all {len(digests)} "
            f"ranks, got " + ", ".join(f"rank {r}: {d[:16]}" for r, d in enumerate(digests))
        )
    return digests


# ------------------------------------------------------------------------------------------- data
def make_synthetic(root: Path, classes: int, n_train: int, n_val: int, res: int, seed: int):
    """An ImageFolder-shaped random dataset: <root>/{train,val}/class_<k>/<i>.png, RGB, size
    res + res/8 (so the crops have something to cut). Class k = a fixed random low-frequency
    colour pattern + noise, so a net can learn it. Written once; <root>/DONE marks completion."""
    from PIL import Image

    if (root / "DONE").exists():
        return
    g = torch.Generator().manual_seed(seed)
    size = res + res // 8
    patterns = F.interpolate(
        torch.rand(classes, 3, 2, 2, generator=g),
        size=(size, size),
        mode="bilinear",
        align_corners=False,
    )
    for split, n in (("train", n_train), ("val", n_val)):
        for k in range(classes):
            d = root / split / f"class_{k}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = (0.8 * patterns[k] + 0.2 * torch.rand(3, size, size, generator=g)) * 255
                arr = img.clamp(0, 255).byte().permute(1, 2, 0).numpy()
                Image.fromarray(arr).save(d / f"{i}.png")
    (root / "DONE").write_text("ok\n")


def make_loaders(args, root: Path, rank: int, world: int, device):
    """ImageFolder train / val / sensitivity loaders with torchvision's standard pipelines
    (train: RandomResizedCrop + flip; val: Resize(res * 256/224) + CenterCrop(res)). Train is
    sharded by DistributedSampler (its order depends on seed and epoch only: a resumed epoch
    replays it); val and sensitivity sets are split rank::world without padding, so the
    all-reduced counts are exact."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    norm = [T.ToTensor(), T.Normalize(MEAN, STD)]
    train_tf = T.Compose([T.RandomResizedCrop(args.res), T.RandomHorizontalFlip(), *norm])
    val_tf = T.Compose([T.Resize(round(args.res * 256 / 224)), T.CenterCrop(args.res), *norm])
    train = ImageFolder(root / "train", train_tf)
    val = ImageFolder(root / "val", val_tf)
    if train.classes != val.classes:
        raise SystemExit(
            f"{root}: train/ has {len(train.classes)} classes, val/ "
            f"{len(val.classes)}: expected the same class folders"
        )
    n_val = min(len(val), args.val_images) if args.val_images else len(val)
    val_idx = torch.linspace(0, len(val) - 1, n_val).round().long().tolist()  # spread out
    sens_src = copy.copy(train)  # training images with the eval transform (no 2nd folder scan)
    sens_src.transform = val_tf
    g = torch.Generator().manual_seed(args.seed + 1)
    sens_idx = torch.randperm(len(sens_src), generator=g)[: args.sens_images].sort().values
    kw = dict(
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        # not persistent: each epoch's workers are seeded from the main RNG (restored by
        # --resume), so a resumed epoch sees the same crops; persistent workers would not
        persistent_workers=False,
    )
    sampler = torch.utils.data.DistributedSampler(
        train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True
    )
    Sub = torch.utils.data.Subset
    loaders = {
        "train": torch.utils.data.DataLoader(
            train, args.batch_size, sampler=sampler, drop_last=True, **kw
        ),
        "val": torch.utils.data.DataLoader(Sub(val, val_idx[rank::world]), args.batch_size, **kw),
        "sens": torch.utils.data.DataLoader(
            Sub(sens_src, sens_idx.tolist()[rank::world]), args.batch_size, **kw
        ),
    }
    return loaders, sampler, len(train.classes), len(train), n_val


# ------------------------------------------------------------------------------- train / evaluate
def train_epoch(net, model, loader, opt, pruner, device, amp, bar, step_sleep=0.0) -> float:
    """One epoch over this rank's shard. `net` is `model` or its DDP wrapper. Loss = cross-entropy
    (bf16 autocast on CUDA) + the pruner's L2 term. Returns the mean loss over all ranks."""
    model.train()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, steps: no per-step sync
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        (loss + pruner.regularization_loss()).backward()
        opt.step()
        pruner.step()
        total += torch.stack([loss.detach().double(), torch.ones((), device=device).double()])
        if bar is not None:
            bar.update(1)
        if step_sleep:
            time.sleep(step_sleep)  # tests: slows the run so that a kill lands mid-round
    total = all_sum(total)
    return float(total[0] / total[1].clamp(min=1))


@torch.no_grad()
def evaluate(model, loader, device, amp) -> dict:
    """Top-1 / top-5 error in % over every rank's shard (counts all-reduced: the same numbers on
    every rank). Eval mode: no dropout."""
    was = model.training
    model.eval()
    c = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 right, top-5 right, images
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices  # [B, 5]
        hit = top == y[:, None]
        c += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(y), device=device)])
    c = all_sum(c)
    model.train(was)
    n = float(c[2].clamp(min=1))
    return {
        "top1_error": 100 * (1 - float(c[0]) / n),
        "top5_error": 100 * (1 - float(c[1]) / n),
        "images": int(c[2]),
    }


def make_optimizer(model, lr):
    # weight_decay=0: the L2 term comes from the pruner (weights only, Caffe's scaling)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


# ------------------------------------------------------------------------------------ checkpoints
def read_checkpoint(path: Path, args, model, what: str) -> dict:
    """Load and validate a checkpoint of this script before anything else happens: unreadable
    (truncated, corrupted), not ours, another model/width/class count, or state dict keys and
    shapes that do not fit -> SystemExit naming expected vs got. Nothing is written."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(
            f"{what} {path}: cannot read it (truncated or corrupted?): expected a complete "
            f"checkpoint written by scripts/prune_imagenet.py; {type(e).__name__}: {e}"
        ) from None
    got = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
    if got != CKPT_FORMAT:
        raise SystemExit(
            f"{what} {path}: expected a checkpoint of format {CKPT_FORMAT!r}, got {got!r}"
        )
    want = {"model_name": args.model, "width": args.width, "num_classes": model_classes(model)}
    have = {k: ck.get(k) for k in want}
    if have != want:
        raise SystemExit(
            f"{what} {path} is a checkpoint of {have}; expected {want} "
            f"(another model: choose a fresh --out or the matching --model)"
        )
    own = model.state_dict()
    bad = [k for k in own if k not in ck["model"] or ck["model"][k].shape != own[k].shape]
    bad += [k for k in ck["model"] if k not in own]
    if bad:
        raise SystemExit(f"{what} {path}: state dict does not fit {args.model}: {bad[:5]}")
    return ck


def state_digest(model) -> str:
    """SHA-256 over the model's whole state dict (names and bytes): equal iff bit-identical."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_classes(model) -> int:
    return [m for _, m in sparse_modules(model)][-1].weight.shape[0]


# ------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()  # this invocation's wall time counts from here (summed over --resume)
    rank, world, local, device = setup_distributed(args.threads)
    main0 = rank == 0
    amp = device.type == "cuda" and not args.no_amp
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    paper = PAPER[args.model]
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    if argv is not None:
        command = "python scripts/prune_imagenet.py " + " ".join(argv)
    if world > 1:
        command = f"torchrun --nproc_per_node {world} " + command.removeprefix("python ")

    # The model first (needs only the class count), so a bad checkpoint fails before any write.
    classes = args.classes
    if not args.synthetic:
        classes = len([d for d in (Path(args.data) / "train").iterdir() if d.is_dir()])
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = build_imagenet_model(args.model, classes, args.width, weights=args.weights)
    model.to(device)
    layers = dict(sparse_modules(model))
    names = paper_layer_names(args.model, model)  # {paper name: module name}
    label = {m: p if p == m else f"{p} ({m})" for p, m in names.items()}  # for the tables
    seen = gather_objects(ckpt_path.exists())  # multi-node: every rank must see the same --out
    if len(set(seen)) != 1:
        raise SystemExit(
            f"{ckpt_path} exists on ranks {[r for r, x in enumerate(seen) if x]} only: expected "
            f"--out on a file system that every node shares"
        )
    ck = None
    if args.resume and ckpt_path.exists():
        ck = read_checkpoint(ckpt_path, args, model, "--resume")
    elif args.resume:
        if main0:
            print(f"--resume: no {ckpt_path}, starting from scratch")
    elif ckpt_path.exists():
        raise SystemExit(
            f"{ckpt_path} exists: add --resume to continue it, or choose another "
            f"--out (refusing to overwrite it)"
        )
    start = read_checkpoint(Path(args.start), args, model, "--start") if args.start else None

    # Data (rank 0 writes the synthetic set, the others wait for it).
    data_root = out / "synthetic" if args.synthetic else Path(args.data)
    if main0:
        out.mkdir(parents=True, exist_ok=True)
        if args.synthetic:
            make_synthetic(
                data_root, classes, args.train_per_class, args.val_per_class, args.res, args.seed
            )
    barrier()
    loaders, sampler, n_cls, n_train, n_val = make_loaders(args, data_root, rank, world, device)
    if n_cls != classes:
        raise SystemExit(f"{data_root}: expected {classes} classes, got {n_cls}")

    opt = make_optimizer(model, args.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=args.lr_step, gamma=0.1)
    pruner = HanPruner(model, quality=1.0, optimizer=opt, reg_strength=args.reg_strength)
    # st: everything a resumed run needs besides the tensors. phase: "dense", then "prune".
    st = {
        "phase": "dense",
        "epoch": 0,
        "epochs_run": 0,
        "step": 0,
        "round": 0,
        "round_epoch": 0,
        "pruned": False,
        "history": [],
        "dense": None,
        "sens": None,
        "keep_final": None,
        "elapsed": 0.0,
        "epoch_seconds": [],
    }
    if ck is not None:
        model.load_state_dict(ck["model"])
        st = ck["st"]
        if st["phase"] == "prune" and st["pruned"]:  # mid-round: the retraining optimizer
            lr = args.lr * args.retrain_lr_factor
            opt = make_optimizer(model, lr)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=args.retrain_epochs, gamma=1)
            pruner.optimizer = opt
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        pruner.load_state_dict(ck["pruner"])
        for n, m in model.named_modules():
            if n in ck["dropout"]:
                m.p = ck["dropout"][n]
        if len(ck["rng"]) == world:
            torch.set_rng_state(ck["rng"][rank])
            if device.type == "cuda" and ck["cuda_rng"][rank] is not None:
                torch.cuda.set_rng_state(ck["cuda_rng"][rank])
        elif main0:
            print(
                f"warning: checkpoint from {len(ck['rng'])} ranks, now {world}: data order and "
                f"dropout differ from an uninterrupted run"
            )
        if main0:
            print(
                f"resumed {ckpt_path}: phase {st['phase']}, epoch {st['epoch']}, round "
                f"{st['round']} (epoch {st['round_epoch']} of it), step {st['step']}"
            )
    elif start is not None:
        model.load_state_dict(start["model"])  # weights and masks
        st["phase"] = "prune"
    st.setdefault("commands", []).append(command)

    tb = None
    if main0:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(out / "tb"))
        except Exception:  # tensorboard not installed: JSON lines only
            tb = None

    def log(event: str, **rec):
        if not main0:
            return
        rec = {"event": event, "time": time.time(), "step": st["step"], **rec}
        with open(out / "log.jsonl", "a") as f:  # opened per event: a kill loses nothing
            f.write(json.dumps(rec, default=float) + "\n")
        if tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("time", "step"):
                    tb.add_scalar(f"{event}/{k}", v, st["step"])

    def checkpoint():
        # every rank's RNG goes into the file: a resumed rank continues its own stream
        rngs = gather_objects(torch.get_rng_state())
        cuda_rngs = gather_objects(torch.cuda.get_rng_state() if device.type == "cuda" else None)
        st["elapsed"] += time.time() - checkpoint.t
        checkpoint.t = time.time()
        if main0:
            save_ckpt(
                ckpt_path,
                {
                    "format": CKPT_FORMAT,
                    "model_name": args.model,
                    "width": args.width,
                    "num_classes": classes,
                    "args": vars(args),
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "pruner": pruner.state_dict(),
                    "dropout": dropout_ps(model),
                    "rng": rngs,
                    "cuda_rng": cuda_rngs,
                    "st": st,
                },
            )
            log("checkpoint", phase=st["phase"], round=st["round"], round_epoch=st["round_epoch"])
        barrier()  # nobody runs ahead of a checkpoint that might be needed

    checkpoint.t = t_start
    steps_per_epoch = len(loaders["train"])
    n_w, n_b = count_weights(model)
    if main0:
        print(
            f"{paper['name']} ({args.model}, width {args.width:g}): {n_w:,} weights + "
            f"{n_b:,} biases; {classes} classes, {n_train:,} train / {n_val:,} val images; "
            f"{world} rank(s) on {device.type}, {args.batch_size}/rank x {steps_per_epoch} "
            f"steps/epoch, AMP {'bf16' if amp else 'off'}"
        )
    total_epochs = args.epochs + args.rounds * args.retrain_epochs
    bar = tqdm(
        total=total_epochs * steps_per_epoch,
        initial=st["step"],
        unit="step",
        disable=args.no_progress or not main0,
        dynamic_ncols=True,
        mininterval=1.0,
    )

    def run_epoch(net, desc: str) -> float:
        t = time.time()
        sampler.set_epoch(st["epochs_run"])  # the data order: seed and epoch only
        bar.set_description(desc)
        loss = train_epoch(
            net,
            model,
            loaders["train"],
            opt,
            pruner,
            device,
            amp,
            bar if main0 else None,
            args.step_sleep,
        )
        st["epochs_run"] += 1
        st["step"] += steps_per_epoch
        st["epoch_seconds"].append(time.time() - t)
        return loss

    def wrap():  # DDP over the parameters that currently need gradients
        if not is_dist():
            return model
        # forward_sync_buffers=False: the masks are buffers, identical by construction (checked
        # after every pruning); re-broadcasting them each step would move 61M / 138M bytes
        return DDP(
            model, device_ids=[local] if device.type == "cuda" else None, forward_sync_buffers=False
        )

    # 1. dense phase ----------------------------------------------------------------------------
    if st["phase"] == "dense":
        net = wrap()
        while st["epoch"] < args.epochs:
            e = st["epoch"]
            loss = run_epoch(net, f"dense {e + 1}/{args.epochs}")
            sched.step()
            ev = evaluate(model, loaders["val"], device, amp)
            st["epoch"] += 1
            log("dense_epoch", epoch=e + 1, loss=loss, lr=opt.param_groups[0]["lr"], **ev)
            if main0:
                tqdm.write(f"dense epoch {e + 1}: loss {loss:.4f}, top-1 {ev['top1_error']:.2f}%")
            checkpoint()
        st["phase"] = "prune"
    if st["dense"] is None:  # the reference: the net pruning starts from
        st["dense"] = evaluate(model, loaders["val"], device, amp)
        log("dense", **st["dense"])
        if main0:
            print(
                f"reference (unpruned): top-1 / top-5 error {st['dense']['top1_error']:.2f}% / "
                f"{st['dense']['top5_error']:.2f}% on {n_val:,} val images (paper "
                f"{paper['top1_dense']:.2f}% / {paper['top5_dense']:.2f}%)"
            )
        checkpoint()

    # 2. sensitivity analysis and the per-layer targets ------------------------------------------
    if not pruner.original_connections:
        pruner.prepare()
    if st["sens"] is None and args.sens_images > 0 and args.rounds > 0:
        acc = lambda m: 100.0 - evaluate(m, loaders["sens"], device, amp)["top1_error"]  # noqa: E731
        res = sensitivity_analysis(model, acc, SENS_QUALITIES)
        st["sens"] = {
            "baseline": res.baseline,
            "qualities": res.qualities,
            "accuracy": res.accuracy,
            "kept": res.kept,
            "images": args.sens_images,
        }
        # --keep sens: each layer may cost max_drop x sqrt(its share of the weights) top-1
        # points (as scripts/prune_mnist.py: the budget goes where the weights are)
        st["sens"]["final_keep"] = {}
        for n, m in layers.items():
            q = choose_qualities(res, args.max_drop * math.sqrt(m.weight.numel() / n_w))[n]
            st["sens"]["final_keep"][n] = res.kept[n][res.qualities.index(q)] if q > 0 else 1.0
        log("sensitivity", **{k: v for k, v in st["sens"].items()})
        checkpoint()
    if st["keep_final"] is None and args.quality is None:
        if args.keep == "paper":
            st["keep_final"] = {names[p]: k for p, k in paper["keep"].items()}
        elif args.keep == "sens":
            if st["sens"] is None:
                raise SystemExit("--keep sens needs the sensitivity analysis: --sens-images > 0")
            st["keep_final"] = dict(st["sens"]["final_keep"])
        else:
            spec = per_layer(args.keep)
            st["keep_final"] = resolve_per_layer(layers, spec, "--keep")
    quality_fixed = per_layer(args.quality)

    # 3. prune -> retrain rounds ----------------------------------------------------------------
    lr_re = args.lr * args.retrain_lr_factor  # Han: 1/100 of the initial LR for AlexNet
    net = None
    while st["round"] < args.rounds:
        r = st["round"]
        if not st["pruned"]:
            t = time.time()
            if quality_fixed is not None:
                kept = pruner.prune(quality=quality_fixed)
                target = None
            else:  # geometric: round r of R keeps final^(r/R)
                target = {
                    n: k ** ((r + 1) / args.rounds)
                    for n, k in st["keep_final"].items()
                    if k is not None
                }
                kept = pruner.prune(density=target)
            digests = check_masks_identical(model, f"after pruning round {r + 1}")
            ev = evaluate(model, loaders["val"], device, amp)
            rec = {
                "round": r + 1,
                "target": target,
                "kept": kept,
                "pruned": ev,
                "mask_sha256": digests[0],
                "prune_seconds": time.time() - t,
            }
            st["history"].append(rec)
            opt = make_optimizer(model, lr_re)  # fresh momentum: survivors only from here
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=args.retrain_epochs, gamma=1)
            pruner.optimizer = opt
            st["pruned"], st["round_epoch"] = True, 0
            log("prune", **rec)
            if main0:
                tqdm.write(
                    f"round {r + 1}: pruned to "
                    + ", ".join(f"{label[n].split()[0]} {100 * k:.1f}%" for n, k in kept.items())
                    + f"; top-1 error {ev['top1_error']:.2f}% before retraining"
                )
            checkpoint()
        while st["round_epoch"] < args.retrain_epochs:
            e = st["round_epoch"]
            # Han: FC retrained with conv frozen, then conv with FC frozen (1 epoch: both)
            kind = "conv" if e < (args.retrain_epochs + 1) // 2 else "fc"
            kind = None if args.retrain_epochs == 1 else kind
            if kind != pruner.frozen_kind or net is None:
                net = None
                gc.collect()  # the old DDP reducer's autograd hooks go with it
                if kind:
                    pruner.freeze(kind)
                else:
                    pruner.unfreeze()
                net = wrap()  # DDP reduces only the parameters that need gradients now
            loss = run_epoch(
                net,
                f"round {r + 1}/{args.rounds} retrain {e + 1}"
                f"{' (' + kind + ' frozen)' if kind else ''}",
            )
            sched.step()
            ev = evaluate(model, loaders["val"], device, amp)
            st["round_epoch"] += 1
            st["history"][-1].setdefault("epochs", []).append({"loss": loss, "frozen": kind, **ev})
            log("retrain_epoch", round=r + 1, epoch=e + 1, frozen=kind, loss=loss, **ev)
            if st["round_epoch"] == args.retrain_epochs:  # the round is complete
                pruner.unfreeze()
                net = None
                st["history"][-1]["retrained"] = ev
                st["round"] += 1
                st["pruned"] = False
                kept_w = sum(int(m.mask.sum()) for m in layers.values())
                if main0:
                    tqdm.write(
                        f"round {r + 1}: {100 * kept_w / n_w:.2f}% of weights kept "
                        f"({n_w / kept_w:.1f}x), top-1 / top-5 error "
                        f"{ev['top1_error']:.2f}% / {ev['top5_error']:.2f}%"
                    )
            checkpoint()
        if args.retrain_epochs == 0:  # prune-only rounds
            st["round"] += 1
            st["pruned"] = False
            checkpoint()
    bar.close()
    pruner.unfreeze()

    # 4. results --------------------------------------------------------------------------------
    fin = pruner.finalize()
    final = evaluate(model, loaders["val"], device, amp)
    digests = check_masks_identical(model, "at the end")
    if args.save_rank_masks:  # each rank its own masks: the tests compare them independently
        masks = {n: m.mask.cpu() for n, m in layers.items()}
        save_ckpt(out / f"masks_rank{rank}.pt", masks)
    if not main0:  # the last collective was the digest check: rank 0 alone writes the results
        dist.destroy_process_group()  # (no barrier: VGG-16's export takes minutes on CPU, past
        return None  # a collective's timeout)
    w_kept = sum(fin["connections"].values())
    val_set = loaders["val"].dataset  # this rank's share of the val images, eval transform
    ex = torch.stack([val_set[i][0] for i in range(min(args.report_images, len(val_set)))])
    ex = ex.to(device)  # [B, 3, res, res]: Table 4/5's activation % is measured on it
    rows = layer_report(model, ex)
    by_module = {v: k for k, v in names.items()}
    for row in rows:
        if row["layer"] in by_module:
            row["paper_name"] = by_module[row["layer"]]
            row["paper_weights_kept_pct"] = 100 * paper["keep"][by_module[row["layer"]]]
            row["layer"] = label[row["layer"]]
        row.pop("_act", None)
    model_cpu = model.to("cpu")
    comp_path = out / f"{args.model}_pruned.skr"
    comp = save_compressed(model_cpu, comp_path)
    fresh = build_imagenet_model(args.model, classes, args.width)
    reloaded = load_compressed(comp_path, fresh)
    same = all(
        torch.equal(a, b)
        for a, b in zip(model_cpu.state_dict().values(), reloaded.state_dict().values())
    )
    if not same:
        raise RuntimeError(f"{comp_path}: save_compressed round trip changed the model")
    block = export_block_sparse(
        model_cpu,
        ex.cpu(),
        args.block_size,
        out / f"{args.model}_blocksparse.pt",
        lambda: build_imagenet_model(args.model, classes, args.width),
    )
    model.to(device)

    wall = st["elapsed"] + time.time() - checkpoint.t
    params_dense, params_pruned = n_w + n_b, w_kept + n_b
    name = paper["name"]
    table1 = [
        {
            "network": f"{name} Ref (paper)",
            "top1_error": paper["top1_dense"],
            "top5_error": paper["top5_dense"],
            "parameters": paper["params_dense"],
            "compression": None,
        },
        {
            "network": f"{name} Pruned (paper)",
            "top1_error": paper["top1_pruned"],
            "top5_error": paper["top5_pruned"],
            "parameters": paper["params_pruned"],
            "compression": paper["compression"],
        },
        {
            "network": f"{name} Ref (this run)",
            "top1_error": st["dense"]["top1_error"],
            "top5_error": st["dense"]["top5_error"],
            "parameters": params_dense,
            "compression": None,
        },
        {
            "network": f"{name} Pruned (this run)",
            "top1_error": final["top1_error"],
            "top5_error": final["top5_error"],
            "parameters": params_pruned,
            "compression": params_dense / params_pruned,
        },
    ]
    summary = {
        "model": args.model,
        "network": name,
        "command": command,
        "commands": st["commands"],
        "args": vars(args),
        "world_size": world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "amp": "bf16" if amp else None,
        "synthetic": args.synthetic,
        "table1": table1,
        "dense": st["dense"],
        "pruned": final,
        "weights_dense": n_w,
        "weights_pruned": w_kept,
        "biases": n_b,
        "compression_weights": n_w / w_kept,
        "compression_params": params_dense / params_pruned,
        "kept_pct": {n: 100 * k for n, k in fin["kept"].items()} | {"total": 100 * w_kept / n_w},
        "paper_kept_pct": {names[p]: 100 * k for p, k in paper["keep"].items()},
        "layers": rows,  # Table 4 / 5 columns
        "rounds": st["history"],
        "sensitivity": st["sens"],
        "mask_sha256_per_rank": digests,
        "state_sha256": state_digest(model_cpu),  # weights + masks + biases, bit for bit
        "compressed_file": {"path": comp_path.name, **comp},
        "block_sparse": block,
        "epoch_seconds": st["epoch_seconds"],
        "wall_time_s": wall,
        "torch": torch.__version__,
        "paper": {k: v for k, v in paper.items()},
    }
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=float) + "\n")
    os.replace(tmp, out / "summary.json")
    log("done", **final, compression=n_w / w_kept)

    print(
        f"\nTable 1 (Han et al. 2015) vs this run ({final['images']:,} val images"
        f"{', synthetic data' if args.synthetic else ''})"
    )
    print(f"{'Network':<32}{'Top-1 err':>10}{'Top-5 err':>10}{'Parameters':>12}{'Compr.':>8}")
    for row in table1:
        c = f"{row['compression']:.1f}x" if row["compression"] else ""
        print(
            f"{row['network']:<32}{row['top1_error']:>9.2f}%{row['top5_error']:>9.2f}%"
            f"{row['parameters'] / 1e6:>11.2f}M{c:>8}"
        )
    print(f"(weights only: {n_w:,} -> {w_kept:,}, {n_w / w_kept:.1f}x)")
    print(
        "\nTable 4/5 columns, per layer (paper's weights kept: "
        + ", ".join(f"{p} {100 * k:.0f}%" for p, k in paper["keep"].items())
        + ")"
    )
    print(format_report(rows))
    print(
        f"\ncompressed model {comp_path}: {comp['file_bytes'] / 1e6:.2f} MB vs "
        f"{comp['dense_bytes'] / 1e6:.2f} MB dense; index overhead "
        f"{100 * comp['index_overhead']:.1f}% (paper 15.6%)"
    )
    print(f"block-sparse export: {block.get('status')}")
    print(f"wall time {wall:.0f} s; outputs in {out}/")
    if tb is not None:
        tb.close()
    if is_dist():
        dist.destroy_process_group()
    return summary


def export_block_sparse(model, example, block: int, path: Path, rebuild) -> dict:
    """`sparsekern.nn.to_inference(model, block_size=(block, block))`: the SparseLinear layers
    become BlockSparseLinear and the groups=1 SparseConv2d layers BlockSparseConv2d
    (BlockSparseMatrix weights: only blocks holding a kept weight are stored; grouped convs, as in
    Caffe's AlexNet, stay masked SparseConv2d). The state dict goes to `path` (tensors only:
    load with weights_only=True into `to_inference(rebuild())`, which takes the stored layout).
    Checked: the reloaded model gives the masked model's logits on `example` `[B, 3, H, W]`
    (fp32, eval mode; within 1e-4 relative: the same products summed in another order)."""
    model.eval()
    inf = to_inference(model, block_size=(block, block))
    torch.save(inf.state_dict(), path)
    back = to_inference(rebuild(), block_size=(block, block))
    back.load_state_dict(torch.load(path, weights_only=True))
    back.eval()
    with torch.no_grad():
        ref, got = model(example), back(example)
    diff = float((ref - got).abs().max())
    tol = 1e-4 * max(1.0, float(ref.abs().max()))
    if diff > tol:
        raise RuntimeError(
            f"block-sparse export {path}: expected logits within {tol:.2e} of the masked model, "
            f"got max |diff| {diff:.3e}"
        )
    kept = {n: float(m.density) for n, m in sparse_modules(model)}
    layers = {
        n: {"weights_kept": kept[n], "blocks_stored": float(m.density)}
        for n, m in back.named_modules()
        if isinstance(m, (BlockSparseLinear, BlockSparseConv2d))
    }
    return {
        "status": f"ok, {len(layers)} layers block-sparse, max |logit diff| {diff:.2e}",
        "path": path.name,
        "block_size": [block, block],
        "layers": layers,  # blocks_stored >= weights_kept: a block holding one kept weight stays
        "file_bytes": path.stat().st_size,
        "max_abs_diff": diff,
    }


if __name__ == "__main__":
    main()
