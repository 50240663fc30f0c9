"""Han et al. 2015 on ImageNet: prune AlexNet / VGG-16 iteratively, on one or many GPUs (torchrun).

    # CPU smoke runs: a synthetic ImageFolder (4 classes), 1/16-width nets (~15 s; 2 ranks ~35 s)
    python scripts/prune_imagenet.py --model alexnet --synthetic --tiny
    torchrun --nproc_per_node 2 scripts/prune_imagenet.py --model alexnet-caffe --synthetic --tiny
    # FSDP2 (each rank a row shard of every weight, mask and momentum): --engine fsdp (or hsdp)
    torchrun --nproc_per_node 2 scripts/prune_imagenet.py --model alexnet --synthetic --tiny \\
        --engine fsdp
    # one GPU: torchvision's pretrained AlexNet (a local file) to Han's per-layer keep rates
    python scripts/prune_imagenet.py --model alexnet --data /data/imagenet --weights W.pth
    # one node, 8 GPUs (--batch-size is per GPU: 8 x 32 = 256 images a step, Caffe's batch)
    torchrun --standalone --nproc_per_node 8 scripts/prune_imagenet.py --model vgg16 \\
        --data /data/imagenet --weights vgg16-397923af.pth --workers 12
    # two nodes x 8 GPUs: the same command on each node, NODE_RANK 0 and 1, MASTER = node 0
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint $MASTER:29500 scripts/prune_imagenet.py --model vgg16 --data DIR --weights W
    # after a crash or pre-emption: the same command + --resume (continues from <out>/ckpt.pt)
    # dense here, prune later: --rounds 0, then --start <out>/ckpt.pt; other targets:
    # --targets sens --max-drop 2, --quality conv=0.6,fc=1.2, --sparsity fc6=0.95,conv=0.6

The job (in full: docs/imagenet.md): dense phase (skipped with --weights or --start); a
sensitivity analysis on training images; --rounds rounds of prune -> retrain (Han's Table 4 / 5
targets reached geometrically, masks checked identical on every rank, retraining at 1/100 of the
LR, FC first with conv frozen, then the reverse); rank 0 writes summary.json (Table 1, Table 4/5,
every round, git commit) and the pruned model in Han's compressed format and in block-sparse form,
both checked. Every epoch is checkpointed (atomic, every rank's RNG): --resume continues exactly.
Under --engine fsdp / hsdp the run is the DDP run (same masks, weights within float rounding);
the checkpoint (one file, the one-process layout), the sensitivity analysis and the exports
all-gather the shards into a whole copy (the memory one DDP rank holds).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout: `models` and `scripts._lib` are not installed

from models import HAN_2015, IMAGENET_MODELS  # noqa: E402
from scripts._lib import checks as cli  # noqa: E402
from scripts._lib.imagenet_run import ImagenetRun  # noqa: E402
from sparsekern.training import distributed as dist  # noqa: E402

# -------------------------------------------------------------------------------------- config
# The tiny CPU configuration: 1/16-width nets on a synthetic ImageFolder, the whole pipeline in
# seconds per rank (the CI smoke run and the resume test).
TINY = dict(width=1 / 16, classes=4, train_per_class=32, val_per_class=8, batch_size=16)
TINY |= dict(epochs=2, lr=0.02, lr_step=1, rounds=2, retrain_epochs=2, sens_images=32, workers=0)
TINY_RES = {"alexnet": 64, "alexnet-caffe": 72, "vgg16": 32}  # >= each net's smallest input


def parse_args(argv=None):
    doc = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(
        description=doc[0], epilog=doc[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    pos_int, nonneg_int = cli.number(int, 1), cli.number(int, 0)
    pos_float, nonneg_float = cli.number(float, 0, lo_open=True), cli.number(float, 0)
    a = p.add_argument
    a("--model", choices=sorted(IMAGENET_MODELS), default="alexnet")
    a("--data", help="ImageFolder root with train/ and val/ (class folders)")
    a("--synthetic", action="store_true", help="a random ImageFolder in <out>/synthetic")
    a("--tiny", action="store_true", help="tiny CPU configuration (TINY)")
    a("--out", help="output folder (default runs/<model>[-tiny])")
    a("--weights", help="local state dict of the dense model (torchvision's .pth)")
    a("--start", help="a checkpoint of this script to prune further (no dense phase)")
    a("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    a("--seed", type=nonneg_int, default=0)
    a("--width", type=pos_float, help="channel width multiplier (1: the real nets)")
    a("--res", type=pos_int, help="crop size (default 224, 227 for alexnet-caffe)")
    a("--classes", type=cli.number(int, 2), help="synthetic classes (ImageNet: the folders)")
    a("--train-per-class", type=pos_int, help="synthetic train images per class (64)")
    a("--val-per-class", type=pos_int, help="synthetic val images per class (16)")
    a("--epochs", type=nonneg_int, help="dense epochs (default 90; 0 with --weights)")
    a("--lr", type=pos_float, help="initial learning rate (default 0.01)")
    a("--lr-step", type=pos_int, help="dense LR x0.1 every N epochs (default 30)")
    a("--batch-size", type=pos_int, help="per process (default 32)")
    a("--workers", type=nonneg_int, help="DataLoader workers per process (default 8)")
    a("--reg-strength", type=nonneg_float, default=5e-4, help="L2 (Caffe's weight decay)")
    a("--rounds", type=nonneg_int, help="prune -> retrain rounds (AlexNet 3, VGG-16 5)")
    a("--retrain-epochs", type=nonneg_int, help="per round (AlexNet 20, VGG-16 10)")
    a("--retrain-lr-factor", type=pos_float, default=0.01, help="Han (AlexNet): 1/100")
    a("--targets", choices=["paper", "sens"], help="per-layer targets: Han's (default), sens")
    a("--sparsity", type=cli.per_layer(cli.fraction(hi_open=True), "sparsity"),
      help="'0.9' (Han's proportions scaled to it) or per layer 'fc6=0.95,conv=0.6'")  # fmt: skip
    a("--quality", type=cli.per_layer(nonneg_float, "q"), help="fixed quality: '1.0', 'fc=1.2'")
    a("--max-drop", type=pos_float, default=2.0, help="--targets sens: top-1 points")
    a("--sens-images", type=nonneg_int, help="training images for sensitivity (0: skip)")
    a("--val-images", type=nonneg_int, default=0, help="evaluate on N val images (0: all)")
    a("--no-amp", action="store_true", help="fp32 on CUDA too")
    a("--block-size", type=int, choices=[16, 32, 64, 128], default=32, help="block export")
    a("--engine", choices=dist.ENGINES,
      help="none: one process; ddp: every rank the whole model (default under torchrun); "
      "fsdp: FSDP2, every rank a row shard of each weight, mask and momentum; hsdp: FSDP2 "
      "within groups, groups replicated (docs/distributed.md)")  # fmt: skip
    a("--hsdp-replicas", type=nonneg_int, default=0, help="--engine hsdp: replica groups (2)")
    a("--threads", type=nonneg_int, default=1, help="torch threads per process on CPU")
    a("--no-progress", action="store_true")
    a("--save-rank-masks", action="store_true", help="each rank: masks_rank<r>.pt (tests)")
    a("--step-sleep", type=nonneg_float, default=0.0, help=argparse.SUPPRESS)  # tests
    args = p.parse_args(argv)
    paper = HAN_2015[args.model]
    defaults = dict(width=1.0, epochs=0 if args.weights or args.start else 90, lr=0.01, lr_step=30)
    defaults |= dict(batch_size=32, workers=8, retrain_epochs=paper["retrain_epochs"], classes=10)
    defaults |= dict(sens_images=2000, rounds=paper["rounds"], train_per_class=64, val_per_class=16)
    if args.tiny:
        defaults |= TINY | {"res": TINY_RES[args.model]}
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    _, _, min_res, res = IMAGENET_MODELS[args.model]
    args.res = args.res or res
    if args.res < min_res:
        p.error(f"--res: expected >= {min_res} px for {args.model}, got {args.res}")
    if args.synthetic == bool(args.data):
        p.error("expected one of --data DIR (ImageFolder with train/ and val/) or --synthetic")
    if args.data and not (Path(args.data) / "train").is_dir():
        p.error(f"--data: expected a folder with train/ and val/ class folders, got {args.data}")
    for flag in ("weights", "start"):
        if getattr(args, flag) and not Path(getattr(args, flag)).is_file():
            p.error(f"--{flag}: expected a file, got {getattr(args, flag)}")
    if args.resume and args.start:
        p.error("--resume and --start: expected one of them")
    if sum(x is not None for x in (args.targets, args.sparsity, args.quality)) > 1:
        p.error("--targets, --sparsity, --quality: expected one of them")
    args.targets = args.targets or (None if args.sparsity or args.quality else "paper")
    if args.targets == "sens" and args.sens_images == 0 and args.rounds > 0:
        p.error("--targets sens: expected --sens-images > 0 (the analysis sets the targets)")
    if args.epochs == 0 and not (args.weights or args.start or args.resume):
        p.error("--epochs 0: expected --weights or --start (a dense net to prune), got neither")
    world = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1
    args.engine = args.engine or ("ddp" if world > 1 else "none")  # today's behaviour
    if args.engine == "none" and world > 1:
        p.error(f"--engine none: expected one process, got {world} (torchrun): use ddp or fsdp")
    if args.engine != "none" and "RANK" not in os.environ:
        p.error(f"--engine {args.engine}: expected a run under torchrun, got one process")
    if args.engine == "hsdp" and world % (args.hsdp_replicas or 2):
        p.error(f"--hsdp-replicas: expected a divisor of the {world} ranks, got "
                f"{args.hsdp_replicas or 2}")  # fmt: skip
    args.out = args.out or str(ROOT / "runs" / (args.model + "-tiny" * args.tiny))
    cli.check_out_dir(p, "--out", args.out)
    return args, p


def main(argv=None):
    args, parser = parse_args(argv)
    env = dist.setup_distributed(args.threads)
    launch = f"torchrun --nproc_per_node {env.world}" if env.world > 1 else "python"
    command = f"{launch} scripts/prune_imagenet.py " + " ".join(argv or sys.argv[1:])
    run = ImagenetRun(args, env, command)
    run.build(parser)
    run.load_data()
    run.restore()
    run.dense()  # 1. the dense phase and the reference errors
    run.targets()  # 2. the sensitivity analysis and the per-layer targets
    run.rounds()  # 3. prune -> retrain rounds
    summary = run.results()  # 4. results (rank 0)
    dist.shutdown()
    return summary


if __name__ == "__main__":
    main()
