"""Han et al. 2015 on ImageNet: prune AlexNet / VGG-16 iteratively, on one or many GPUs (torchrun).

    # CPU smoke runs: a synthetic ImageFolder (4 classes), 1/16-width nets (~15 s; 2 ranks ~35 s)
    python scripts/prune_imagenet.py --model alexnet --synthetic --tiny
    torchrun --nproc_per_node 2 scripts/prune_imagenet.py --model alexnet-caffe --synthetic --tiny
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
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing: `models`, `sparsekern`

from models import HAN_2015, IMAGENET_MODELS, build_imagenet_model, paper_layer_names  # noqa: E402
from sparsekern import pruning, training  # noqa: E402
from sparsekern.nn import sparse_modules  # noqa: E402
from sparsekern.training import cli, report  # noqa: E402
from sparsekern.training import distributed as dist  # noqa: E402
from sparsekern.training.data import imagefolder_loaders, make_synthetic_imagefolder  # noqa: E402
from sparsekern.training.export import export_block_sparse, save_compressed_checked  # noqa: E402

# -------------------------------------------------------------------------------------- config
# The tiny CPU configuration: 1/16-width nets on a synthetic ImageFolder, the whole pipeline in
# seconds per rank (the CI smoke run and the resume test).
TINY = dict(width=1 / 16, classes=4, train_per_class=32, val_per_class=8, batch_size=16)
TINY |= dict(epochs=2, lr=0.02, lr_step=1, rounds=2, retrain_epochs=2, sens_images=32, workers=0)
TINY_RES = {"alexnet": 64, "alexnet-caffe": 72, "vgg16": 32}  # >= each net's smallest input
SENS_QUALITIES = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5]
CKPT_FORMAT = "sparsekern/prune_imagenet/2"
# settings a resumed run may change: they do not change the result
RESUME_FREE = {"resume", "no_progress", "workers", "threads", "save_rank_masks", "step_sleep"}


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
    args.out = args.out or str(ROOT / "runs" / (args.model + "-tiny" * args.tiny))
    return args, p


def main(argv=None):
    args, parser = parse_args(argv)
    t_start = time.time()
    env = dist.setup_distributed(args.threads)
    main0, device, amp = env.main, env.device, env.device.type == "cuda" and not args.no_amp
    out, paper, ckpt = Path(args.out), HAN_2015[args.model], Path(args.out) / "ckpt.pt"
    launch = f"torchrun --nproc_per_node {env.world}" if env.world > 1 else "python"
    command = f"{launch} scripts/prune_imagenet.py " + " ".join(argv or sys.argv[1:])

    # the model first (it needs only the class count): a bad checkpoint fails before any write
    folders = [] if args.synthetic else (Path(args.data) / "train").iterdir()
    classes = args.classes if args.synthetic else len([d for d in folders if d.is_dir()])
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = build_imagenet_model(args.model, classes, args.width, weights=args.weights).to(device)
    layers = dict(sparse_modules(model))
    names = paper_layer_names(args.model, model)  # {paper name: module name}
    label = {m: p for p, m in names.items()}
    spec = {}
    for flag, val in (("--sparsity", args.sparsity), ("--quality", args.quality)):
        spec[flag] = {names.get(k, k): v for k, v in val.items()} if isinstance(val, dict) else val
        if bad := cli.unknown_layer_keys(spec[flag], layers):  # a typo must not start a run
            parser.error(f"{flag}: expected layers among {list(names)}, conv, fc; got {bad}")
    if len(set(dist.gather_objects(ckpt.exists()))) != 1:  # multi-node: one shared --out
        raise SystemExit(f"{ckpt} exists on some ranks only: expected --out on shared storage")
    if ckpt.exists() and not args.resume:
        raise SystemExit(f"{ckpt} exists: add --resume to continue it, or choose another --out")
    expect = {"model_name": args.model, "width": args.width, "num_classes": classes}
    ck = start = None
    try:  # a resumed run must be the same run; --start needs only the same model
        if args.resume and ckpt.exists():
            ck = training.load_run_checkpoint(
                ckpt, CKPT_FORMAT, model, expect, vars(args), RESUME_FREE
            )
        if args.start:
            start = training.load_run_checkpoint(args.start, CKPT_FORMAT, model, expect)
    except training.CheckpointError as e:
        raise SystemExit(f"{'--start' if args.start else '--resume'}: {e}") from None

    # data (rank 0 writes the synthetic set, the others wait for it)
    root = out / "synthetic" if args.synthetic else Path(args.data)
    if main0:
        out.mkdir(parents=True, exist_ok=True)
        if args.synthetic:
            n = (args.train_per_class, args.val_per_class)
            make_synthetic_imagefolder(root, classes, *n, args.res, args.seed)
    dist.barrier()
    loaders, sampler, _, n_train, n_val = imagefolder_loaders(
        root, args.res, args.batch_size, args.workers, args.seed, env.rank, env.world,
        args.val_images, args.sens_images, pin_memory=device.type == "cuda",
    )  # fmt: skip
    spe = len(loaders["train"])

    def make_optimizer(lr):  # weight_decay 0: the L2 term comes from the pruner
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    opt = make_optimizer(args.lr)
    lr_dense = training.StepDecay(args.lr, every=args.lr_step * spe, gamma=0.1)
    lr_re = training.Constant(args.lr * args.retrain_lr_factor)  # Han: 1/100 for AlexNet
    pruner = pruning.HanPruner(model, opt, reg_strength=args.reg_strength)
    # st: what a resumed run needs besides the tensors; phase "dense", then "prune"
    st = dict(phase="dense", epoch=0, epochs_run=0, step=0, round=0, round_epoch=0, pruned=False)
    st |= dict(history=[], dense=None, sens=None, targets=None, elapsed=0.0, epoch_seconds=[])
    if ck is not None:
        st = ck["st"]
        if st["phase"] == "prune" and st["pruned"]:  # mid-round: the retraining optimizer
            opt = make_optimizer(lr_re.lr)
            pruner.set_optimizer(opt)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        pruner.load_state_dict(ck["pruner"])
        if len(ck["rng"]) == env.world:
            training.set_rng_state(ck["rng"][env.rank], device)
        else:
            bar_msg = f"checkpoint of {len(ck['rng'])} ranks, now {env.world}: another data order"
            print(f"warning: {bar_msg}") if main0 else None
    elif start is not None:
        model.load_state_dict(start["model"])  # weights and masks
        st["phase"] = "prune"
    st.setdefault("commands", []).append(command)
    log = training.JsonLog(out / "log.jsonl", enabled=main0, tensorboard=out / "tb")

    def checkpoint():
        rngs = dist.gather_objects(training.rng_state(device))  # each rank's own stream
        st["elapsed"] += time.time() - checkpoint.t
        checkpoint.t = time.time()
        if main0:
            state = dict(expect, args=vars(args), model=model.state_dict(), st=st, rng=rngs)
            state |= dict(opt=opt.state_dict(), pruner=pruner.state_dict())
            training.save_checkpoint(ckpt, state, CKPT_FORMAT)
            log("checkpoint", st["step"], **{k: st[k] for k in ("phase", "round", "round_epoch")})
        dist.barrier()  # nobody runs ahead of a checkpoint that might be needed

    checkpoint.t = t_start
    n_w = sum(m.weight.numel() for m in layers.values())
    total = (args.epochs + args.rounds * args.retrain_epochs) * spe
    bar = training.Progress(total, st["step"], False if args.no_progress else None, not main0)
    bar.write(
        f"{paper['name']} ({args.model}, width {args.width:g}): {n_w:,} weights; {classes} "
        f"classes, {n_train:,} train / {n_val:,} val images; {env.world} rank(s) on "
        f"{device.type}, {args.batch_size}/rank x {spe} steps/epoch, AMP {'bf16' if amp else 'off'}"
    )

    def run_epoch(net, desc, lr, step0):
        sampler.set_epoch(st["epochs_run"])  # the data order: seed and epoch only
        bar.describe(desc)
        ep = training.train_epoch(model, loaders["train"], opt, pruner, lr=lr, step0=step0,
                                  net=net, device=device, amp=amp, progress=bar,
                                  step_sleep=args.step_sleep)  # fmt: skip
        st["epochs_run"] += 1
        st["step"] += spe
        st["epoch_seconds"].append(ep["seconds"])
        return ep["loss"]

    def wrap():  # DDP over the parameters that need gradients now (rebuilt at freeze switches)
        if not dist.is_dist():
            return model
        # no buffer sync: the masks are identical by construction (checked after each pruning);
        # broadcasting them every step would move 61M / 138M bytes
        ids = [env.local_rank] if device.type == "cuda" else None
        return DDP(model, device_ids=ids, forward_sync_buffers=False)

    def evaluate(m, loader):  # top-1 / top-5 error, all ranks' counts
        return training.evaluate(m, loader, device, amp, topk=(1, 5))

    # 1. dense phase -------------------------------------------------------------------------
    if st["phase"] == "dense":
        net = wrap()
        while st["epoch"] < args.epochs:
            e = st["epoch"]
            loss = run_epoch(net, f"dense {e + 1}/{args.epochs}", lr_dense, e * spe)
            ev = evaluate(model, loaders["val"])
            st["epoch"] += 1
            log("dense_epoch", st["step"], epoch=e + 1, loss=loss, lr=lr_dense(e * spe), **ev)
            bar.write(f"dense epoch {e + 1}: loss {loss:.4f}, top-1 {ev['top1_error']:.2f}%")
            checkpoint()
        st["phase"] = "prune"
    if st["dense"] is None:  # the reference: the net pruning starts from
        st["dense"] = evaluate(model, loaders["val"])
        log("dense", st["step"], **st["dense"])
        bar.write(
            f"reference: top-1 / top-5 error {st['dense']['top1_error']:.2f}% / "
            f"{st['dense']['top5_error']:.2f}% on {n_val:,} val images (paper "
            f"{paper['dense']['top1_error']:.2f}% / {paper['dense']['top5_error']:.2f}%)"
        )
        checkpoint()

    # 2. sensitivity analysis and the per-layer targets --------------------------------------
    if st["sens"] is None and args.sens_images > 0 and args.rounds > 0:
        acc = lambda m: 100.0 - evaluate(m, loaders["sens"])["top1_error"]  # noqa: E731
        res = pruning.sensitivity_analysis(model, acc, SENS_QUALITIES)
        t = pruning.sensitivity_targets(res, layers, args.max_drop)
        st["sens"] = dict(baseline=res.baseline, qualities=res.qualities, kept=res.kept)
        st["sens"] |= dict(accuracy=res.accuracy, sparsity=t.sparsity, images=args.sens_images)
        log("sensitivity", st["step"], **st["sens"])
        checkpoint()
    if st["targets"] is None and args.quality is None:  # each layer's final sparsity
        sens = st["sens"]["sparsity"] if args.targets == "sens" else None
        keep = {names[p]: k for p, k in paper["keep"].items()}
        st["targets"] = pruning.han_targets(
            layers, keep, sparsity=spec["--sparsity"], sensitivity=sens
        )

    # 3. prune -> retrain rounds -------------------------------------------------------------
    net = None
    while st["round"] < args.rounds:
        r = st["round"]
        if not st["pruned"]:
            t = time.time()
            target = None
            if args.quality is not None:
                kept = pruner.prune(quality=spec["--quality"])
            else:  # round r + 1 of Han's geometric schedule
                target = pruning.Geometric(st["targets"], args.rounds)(r + 1)
                kept = pruner.prune(target)
            digests = dist.check_masks_identical(model, f"after pruning round {r + 1}")
            ev = evaluate(model, loaders["val"])
            rec = dict(round=r + 1, target=target, kept=kept, pruned=ev, mask_sha256=digests[0])
            st["history"].append(rec | {"prune_seconds": time.time() - t})
            opt = make_optimizer(lr_re.lr)  # fresh momentum: the survivors only, from here
            pruner.set_optimizer(opt)
            st["pruned"], st["round_epoch"] = True, 0
            log("prune", st["step"], **rec)
            kept_s = ", ".join(f"{label[n]} {100 * k:.1f}%" for n, k in kept.items())
            bar.write(f"round {r + 1}: pruned to {kept_s}; top-1 error {ev['top1_error']:.2f}%")
            checkpoint()
        while st["round_epoch"] < args.retrain_epochs:
            e = st["round_epoch"]
            # Han: FC retrained with conv frozen, then conv with FC frozen (1 epoch: both)
            kind = "conv" if e < (args.retrain_epochs + 1) // 2 else "fc"
            kind = None if args.retrain_epochs == 1 else kind
            if kind != pruner.frozen_kind or net is None:
                net = None
                gc.collect()  # the old DDP reducer's autograd hooks go with it
                pruner.freeze(kind) if kind else pruner.unfreeze()
                net = wrap()  # DDP reduces only the parameters that need gradients now
            desc = f"round {r + 1}/{args.rounds} retrain {e + 1}" + f" ({kind} frozen)" * bool(kind)
            loss = run_epoch(net, desc, lr_re, 0)
            ev = evaluate(model, loaders["val"])
            st["round_epoch"] += 1
            st["history"][-1].setdefault("epochs", []).append({"loss": loss, "frozen": kind, **ev})
            log("retrain_epoch", st["step"], round=r + 1, epoch=e + 1, frozen=kind, loss=loss, **ev)
            if st["round_epoch"] == args.retrain_epochs:  # the round is complete
                pruner.unfreeze()
                net = None
                st["history"][-1]["retrained"] = ev
                st["round"], st["pruned"] = r + 1, False
                k, e1, e5 = 1 - pruner.current_sparsity(), ev["top1_error"], ev["top5_error"]
                bar.write(
                    f"round {r + 1}: {100 * k:.2f}% kept ({1 / k:.1f}x), {e1:.2f}% / {e5:.2f}%"
                )
            checkpoint()
        if args.retrain_epochs == 0:  # prune-only rounds
            st["round"], st["pruned"] = r + 1, False
            checkpoint()
    bar.close()
    pruner.unfreeze()

    # 4. results (rank 0) --------------------------------------------------------------------
    pruner.finalize()
    final = evaluate(model, loaders["val"])
    digests = dist.check_masks_identical(model, "at the end")
    if args.save_rank_masks:  # each rank its own masks: the tests compare them independently
        masks = {n: m.mask.cpu() for n, m in layers.items()}
        torch.save(masks, out / f"masks_rank{env.rank}.pt")
    if not main0:  # the last collective was the digest check: rank 0 alone writes the results
        return dist.shutdown()  # (no barrier: VGG-16's export takes minutes on CPU)
    val_set = loaders["val"].dataset  # this rank's share of the val images, eval transform
    ex = [val_set[i][0] for i in range(min(64, len(val_set)))]
    ex = torch.stack(ex).to(device)  # [B, 3, res, res]: Table 4/5's activation % is measured on
    rows = report.label_rows(pruning.layer_report(model, ex), names, paper["keep"])
    model_cpu = model.to("cpu")
    fresh = lambda: build_imagenet_model(args.model, classes, args.width)  # noqa: E731
    comp = save_compressed_checked(model_cpu, out / f"{args.model}_pruned.skr", fresh)
    path = out / f"{args.model}_blocksparse.pt"
    block = export_block_sparse(model_cpu, ex.cpu(), args.block_size, path, fresh)
    fig = report.model_summary(model_cpu)
    model.to(device)
    wall = st["elapsed"] + time.time() - checkpoint.t
    params = (fig["weights_dense"] + fig["biases"], fig["weights_kept"] + fig["biases"])
    table1 = report.table1_rows(paper, st["dense"], final, *params)
    summary = dict(model=args.model, network=paper["name"], command=command, args=vars(args))
    summary |= dict(
        commands=st["commands"], run=report.run_info(ROOT, device), world_size=env.world
    )
    summary |= dict(amp="bf16" if amp else None, synthetic=args.synthetic, table1=table1, **fig)
    summary |= dict(dense=st["dense"], pruned=final, layers=rows, rounds=st["history"])
    summary |= dict(sensitivity=st["sens"], targets=st["targets"], pruner=pruner.config())
    summary |= dict(mask_sha256_per_rank=digests, compressed_file=comp, block_sparse=block)
    summary |= dict(epoch_seconds=st["epoch_seconds"], wall_time_s=wall, paper=paper)
    report.write_json(out / "summary.json", summary)
    log("done", st["step"], **final, compression=fig["compression_weights"])
    what = f"{final['images']:,} val images{', synthetic data' if args.synthetic else ''}"
    paper_kept = {p: 100 * k for p, k in paper["keep"].items()}
    print("\n" + report.format_results(table1, rows, paper_kept, comp, fig, what))
    print(f"block-sparse export: {block['status']}\nwall time {wall:.0f} s; outputs in {out}/")
    log.close()
    dist.shutdown()
    return summary


if __name__ == "__main__":
    main()
