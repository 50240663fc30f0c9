"""One ImageNet pruning run of scripts/prune_imagenet.py, on one or many ranks: the model (and a
checkpoint to resume or start from), the data, the dense phase, the sensitivity analysis and the
targets, the prune -> retrain rounds, and the results (rank 0). Every epoch is checkpointed with
every rank's RNG, so ``--resume`` continues exactly."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from models import HAN_2015, build_imagenet_model, paper_layer_names
from scripts._lib import checks, tables
from sparsekern import pruning, training
from sparsekern.formats._files import save_torch_checked
from sparsekern.nn import sparse_modules
from sparsekern.nn._dtensor import unshard_mask
from sparsekern.training import distributed as dist
from sparsekern.training import report
from sparsekern.training.data import imagefolder_loaders, make_synthetic_imagefolder
from sparsekern.training.export import export_block_sparse, save_compressed_checked

ROOT = Path(__file__).resolve().parents[2]
SENS_QUALITIES = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5]
CKPT_FORMAT = "sparsekern/prune_imagenet/2"
# settings a resumed run may change: they do not change the result
RANK_MASKS_MAGIC = b"SKRMASK1"  # masks_rank<r>.pt: atomic, SHA-256 checked (load_torch_checked)
# (the engine: every engine writes the same full checkpoint, like a change of world size)
RESUME_FREE = {"resume", "no_progress", "workers", "save_rank_masks", "step_sleep"}
RESUME_FREE |= {"engine", "hsdp_replicas"}


class ImagenetRun:
    def __init__(self, args, env, command: str):
        self.args, self.env, self.command = args, env, command
        self.main0, self.device = env.main, env.device
        self.amp = env.device.type == "cuda" and not args.no_amp
        self.out, self.paper = Path(args.out), HAN_2015[args.model]
        self.ckpt, self.t = self.out / "ckpt.pt", time.time()
        # FSDP2 / HSDP: each rank a row shard of every weight, mask and momentum; the parts of
        # the run that need whole tensors (checkpoint, sensitivity analysis, exports) gather
        self.sharded = args.engine in ("fsdp", "hsdp")

    def build(self, parser) -> None:
        """The model first (it needs only the class count): a bad checkpoint fails before any
        write. Per-layer specs are renamed to module names; a typo is a usage error."""
        args = self.args
        folders = [] if args.synthetic else (Path(args.data) / "train").iterdir()
        self.classes = args.classes if args.synthetic else len([d for d in folders if d.is_dir()])
        torch.manual_seed(args.seed)  # identical initial weights on every rank
        self.model = build_imagenet_model(
            args.model, self.classes, args.width, weights=args.weights
        ).to(self.device)
        self.layers = dict(sparse_modules(self.model))
        self.names = names = paper_layer_names(args.model, self.model)  # {paper: module name}
        self.label = {m: p for p, m in names.items()}
        self.spec = {}
        for flag, val in (("--sparsity", args.sparsity), ("--quality", args.quality)):
            spec = {names.get(k, k): v for k, v in val.items()} if isinstance(val, dict) else val
            self.spec[flag] = spec
            if bad := checks.unknown_layer_keys(spec, self.layers):  # a typo must not run
                parser.error(f"{flag}: expected layers among {list(names)}, conv, fc; got {bad}")
        ckpt = self.ckpt
        if len(set(dist.gather_objects(ckpt.exists()))) != 1:  # multi-node: one shared --out
            raise SystemExit(f"{ckpt} exists on some ranks only: expected --out on shared storage")
        if ckpt.exists() and not args.resume:
            raise SystemExit(f"{ckpt} exists: add --resume to continue it, or choose another --out")
        self.expect = {"model_name": args.model, "width": args.width, "num_classes": self.classes}
        self.ck = self.start = None
        try:  # a resumed run must be the same run; --start needs only the same model
            if args.resume and ckpt.exists():
                self.ck = training.load_run_checkpoint(
                    ckpt, CKPT_FORMAT, self.model, self.expect, vars(args), RESUME_FREE
                )
            if args.start:
                self.start = training.load_run_checkpoint(
                    args.start, CKPT_FORMAT, self.model, self.expect
                )
        except training.CheckpointError as e:
            raise SystemExit(f"{'--start' if args.start else '--resume'}: {e}") from None

    def load_data(self) -> None:
        """The loaders (rank 0 writes the synthetic set, the others wait for it)."""
        args, env = self.args, self.env
        root = self.out / "synthetic" if args.synthetic else Path(args.data)
        if self.main0:
            self.out.mkdir(parents=True, exist_ok=True)
            if args.synthetic:
                n = (args.train_per_class, args.val_per_class)
                make_synthetic_imagefolder(root, self.classes, *n, args.res, args.seed)
        dist.barrier()
        self.loaders, self.sampler, _, self.n_train, self.n_val = imagefolder_loaders(
            root, args.res, args.batch_size, args.workers, args.seed, env.rank, env.world,
            args.val_images, args.sens_images, pin_memory=self.device.type == "cuda",
        )  # fmt: skip
        self.spe = len(self.loaders["train"])

    def make_optimizer(self, lr):  # weight_decay 0: the L2 term comes from the pruner
        return torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9)

    def restore(self) -> None:
        """The optimizer, pruner and ``st`` (what a resumed run needs besides the tensors):
        fresh, from ``--resume``'s checkpoint or ``--start``'s weights and masks. The weights
        load into the whole model, then it is sharded (``--engine fsdp/hsdp``), then the
        optimizer and pruner are built on its parameters."""
        args, env, ck = self.args, self.env, self.ck
        if ck is not None:
            self.model.load_state_dict(ck["model"])
        elif self.start is not None:
            self.model.load_state_dict(self.start["model"])  # weights and masks
        self.model, self.net = dist.distribute(
            self.model, "none" if args.engine == "ddp" else args.engine, env, args.hsdp_replicas
        )  # ddp: wrap() (rebuilt at each freeze)
        model = self.model
        self.opt = self.make_optimizer(args.lr)
        self.lr_dense = training.StepDecay(args.lr, every=args.lr_step * self.spe, gamma=0.1)
        self.lr_re = training.Constant(args.lr * args.retrain_lr_factor)  # Han: 1/100 AlexNet
        self.pruner = pruning.HanPruner(model, self.opt, reg_strength=args.reg_strength)
        st = dict(phase="dense", epoch=0, epochs_run=0, step=0, round=0, round_epoch=0)
        st |= dict(pruned=False, history=[], dense=None, sens=None, targets=None, elapsed=0.0)
        st |= dict(epoch_seconds=[])
        if ck is not None:
            st = ck["st"]
            if st["phase"] == "prune" and st["pruned"]:  # mid-round: the retraining optimizer
                self.opt = self.make_optimizer(self.lr_re.lr)
                self.pruner.set_optimizer(self.opt)
            self.opt.load_state_dict(ck["opt"])
            dist.shard_optimizer_state(self.opt)  # FSDP2: this rank's rows of the momentum
            self.pruner.load_state_dict(ck["pruner"])
            if len(ck["rng"]) == env.world:
                training.set_rng_state(ck["rng"][env.rank], self.device)
            elif self.main0:
                n = len(ck["rng"])
                print(f"warning: checkpoint of {n} ranks, now {env.world}: another data order")
        elif self.start is not None:
            st["phase"] = "prune"
        st.setdefault("commands", []).append(self.command)
        self.st = st
        self.log = training.JsonLog(
            self.out / "log.jsonl", enabled=self.main0, tensorboard=self.out / "tb"
        )
        n_w = sum(m.weight.numel() for m in self.layers.values())
        total = (args.epochs + args.rounds * args.retrain_epochs) * self.spe
        self.bar = training.Progress(
            total, st["step"], False if args.no_progress else None, not self.main0
        )
        self.bar.write(
            f"{self.paper['name']} ({args.model}, width {args.width:g}): {n_w:,} weights; "
            f"{self.classes} classes, {self.n_train:,} train / {self.n_val:,} val images; "
            f"{env.world} rank(s) on {self.device.type}, {args.batch_size}/rank x {self.spe} "
            f"steps/epoch, AMP {'bf16' if self.amp else 'off'}"
        )

    def checkpoint(self) -> None:
        st = self.st
        rngs = dist.gather_objects(training.rng_state(self.device))  # each rank's own stream
        st["elapsed"] += time.time() - self.t
        self.t = time.time()
        # one file, the one-process layout under every engine: sharded tensors all-gathered
        model_sd, opt_sd = dist.full_state_dict(self.model), dist.full_optimizer_state(self.opt)
        if self.main0:
            state = dict(self.expect, args=vars(self.args), model=model_sd, st=st)
            state |= dict(opt=opt_sd, pruner=self.pruner.state_dict(), rng=rngs)
            training.save_checkpoint(self.ckpt, state, CKPT_FORMAT)
            where = {k: st[k] for k in ("phase", "round", "round_epoch")}
            self.log("checkpoint", st["step"], **where)
        dist.barrier()  # nobody runs ahead of a checkpoint that might be needed

    def run_epoch(self, net, desc, lr, step0):
        st = self.st
        self.sampler.set_epoch(st["epochs_run"])  # the data order: seed and epoch only
        self.bar.describe(desc)
        ep = training.train_epoch(
            self.model, self.loaders["train"], self.opt, self.pruner, lr=lr, step0=step0,
            net=net, device=self.device, amp=self.amp, progress=self.bar,
            step_sleep=self.args.step_sleep,
        )  # fmt: skip
        st["epochs_run"] += 1
        st["step"] += self.spe
        st["epoch_seconds"].append(ep["seconds"])
        return ep["loss"]

    def wrap(self):  # DDP over the parameters that need gradients now (rebuilt at freezes)
        if self.args.engine != "ddp":  # one process, or FSDP2 (frozen: no gradient to reduce)
            return self.net
        # no buffer sync: the masks are identical by construction (checked after each pruning);
        # broadcasting them every step would move 61M / 138M bytes
        ids = [self.env.local_rank] if self.device.type == "cuda" else None
        return DDP(self.model, device_ids=ids, forward_sync_buffers=False)

    def full_model(self):
        """Every rank: an unsharded copy of the model (FSDP2: its shards all-gathered, the
        memory of one DDP rank), for what runs on whole layers; the model itself otherwise."""
        if not self.sharded:
            return self.model
        args, rng = self.args, training.rng_state(self.device)
        full = build_imagenet_model(args.model, self.classes, args.width).to(self.device)
        training.set_rng_state(rng, self.device)  # its init must not shift the data / dropout
        full.load_state_dict(dist.full_state_dict(self.model))
        return full

    def evaluate(self, m, loader):  # top-1 / top-5 error, all ranks' counts
        return training.evaluate(m, loader, self.device, self.amp, topk=(1, 5))

    # ------------------------------------------------------------------------ phases
    def dense(self) -> None:
        """The dense phase, then the reference errors of the net pruning starts from."""
        args, st, paper = self.args, self.st, self.paper
        if st["phase"] == "dense":
            net = self.wrap()
            while st["epoch"] < args.epochs:
                e = st["epoch"]
                desc = f"dense {e + 1}/{args.epochs}"
                loss = self.run_epoch(net, desc, self.lr_dense, e * self.spe)
                ev = self.evaluate(self.model, self.loaders["val"])
                st["epoch"] += 1
                lr = self.lr_dense(e * self.spe)
                self.log("dense_epoch", st["step"], epoch=e + 1, loss=loss, lr=lr, **ev)
                self.bar.write(
                    f"dense epoch {e + 1}: loss {loss:.4f}, top-1 {ev['top1_error']:.2f}%"
                )
                self.checkpoint()
            st["phase"] = "prune"
        if st["dense"] is None:
            d = st["dense"] = self.evaluate(self.model, self.loaders["val"])
            self.log("dense", st["step"], **d)
            ref = paper["dense"]
            self.bar.write(
                f"reference: top-1 / top-5 error {d['top1_error']:.2f}% / {d['top5_error']:.2f}% "
                f"on {self.n_val:,} val images (paper {ref['top1_error']:.2f}% / "
                f"{ref['top5_error']:.2f}%)"
            )
            self.checkpoint()

    def targets(self) -> None:
        """The sensitivity analysis (training images) and each layer's final sparsity."""
        args, st = self.args, self.st
        if st["sens"] is None and args.sens_images > 0 and args.rounds > 0:
            acc = lambda m: 100.0 - self.evaluate(m, self.loaders["sens"])["top1_error"]  # noqa: E731
            # FSDP2: on a whole copy (its trials swap whole layers' masks and weights; each
            # rank evaluates its share of the images on it, as under DDP)
            full = self.full_model()
            res = pruning.sensitivity_analysis(full, acc, SENS_QUALITIES)
            del full
            t = pruning.sensitivity_targets(res, self.layers, args.max_drop)
            st["sens"] = dict(baseline=res.baseline, qualities=res.qualities, kept=res.kept)
            st["sens"] |= dict(accuracy=res.accuracy, sparsity=t.sparsity, images=args.sens_images)
            self.log("sensitivity", st["step"], **st["sens"])
            self.checkpoint()
        if st["targets"] is None and args.quality is None:
            sens = st["sens"]["sparsity"] if args.targets == "sens" else None
            keep = {self.names[p]: k for p, k in self.paper["keep"].items()}
            st["targets"] = pruning.han_targets(
                self.layers, keep, sparsity=self.spec["--sparsity"], sensitivity=sens
            )

    def prune(self, r: int) -> None:
        """Round ``r + 1``'s pruning: Han's geometric schedule (or a fixed quality), masks
        checked identical on every rank, then a fresh optimizer for the survivors."""
        args, st, t = self.args, self.st, time.time()
        target = None
        if args.quality is not None:
            kept = self.pruner.prune(quality=self.spec["--quality"])
        else:
            target = pruning.Geometric(st["targets"], args.rounds)(r + 1)
            kept = self.pruner.prune(target)
        digests = dist.check_masks_identical(self.model, f"after pruning round {r + 1}")
        ev = self.evaluate(self.model, self.loaders["val"])
        rec = dict(round=r + 1, target=target, kept=kept, pruned=ev, mask_sha256=digests[0])
        st["history"].append(rec | {"prune_seconds": time.time() - t})
        self.opt = self.make_optimizer(self.lr_re.lr)  # fresh momentum: the survivors only
        self.pruner.set_optimizer(self.opt)
        st["pruned"], st["round_epoch"] = True, 0
        self.log("prune", st["step"], **rec)
        kept_s = ", ".join(f"{self.label[n]} {100 * k:.1f}%" for n, k in kept.items())
        self.bar.write(f"round {r + 1}: pruned to {kept_s}; top-1 error {ev['top1_error']:.2f}%")
        self.checkpoint()

    def rounds(self) -> None:
        """Prune -> retrain rounds; Han: FC retrained with conv frozen, then the reverse."""
        args, st, pruner = self.args, self.st, self.pruner
        net = None
        while st["round"] < args.rounds:
            r = st["round"]
            if not st["pruned"]:
                self.prune(r)
            while st["round_epoch"] < args.retrain_epochs:
                e = st["round_epoch"]
                kind = "conv" if e < (args.retrain_epochs + 1) // 2 else "fc"
                kind = None if args.retrain_epochs == 1 else kind  # 1 epoch: both
                if kind != pruner.frozen_kind or net is None:
                    net = None
                    gc.collect()  # the old DDP reducer's autograd hooks go with it
                    pruner.freeze(kind) if kind else pruner.unfreeze()
                    net = self.wrap()  # DDP reduces only the parameters needing gradients now
                desc = f"round {r + 1}/{args.rounds} retrain {e + 1}"
                loss = self.run_epoch(net, desc + f" ({kind} frozen)" * bool(kind), self.lr_re, 0)
                ev = self.evaluate(self.model, self.loaders["val"])
                st["round_epoch"] += 1
                rec = {"loss": loss, "frozen": kind, **ev}
                st["history"][-1].setdefault("epochs", []).append(rec)
                self.log("retrain_epoch", st["step"], round=r + 1, epoch=e + 1, **rec)
                if st["round_epoch"] == args.retrain_epochs:  # the round is complete
                    pruner.unfreeze()
                    net = None
                    st["history"][-1]["retrained"] = ev
                    st["round"], st["pruned"] = r + 1, False
                    k, e1, e5 = 1 - pruner.current_sparsity(), ev["top1_error"], ev["top5_error"]
                    self.bar.write(
                        f"round {r + 1}: {100 * k:.2f}% kept ({1 / k:.1f}x), {e1:.2f}% / {e5:.2f}%"
                    )
                self.checkpoint()
            if args.retrain_epochs == 0:  # prune-only rounds
                st["round"], st["pruned"] = r + 1, False
                self.checkpoint()
        self.bar.close()
        pruner.unfreeze()

    # ------------------------------------------------------------------------ results
    def results(self) -> dict | None:
        """Rank 0: Table 1 and 4/5, the checked compressed and block-sparse files,
        ``summary.json``; every rank checks its masks first."""
        args, st, model, out, paper = self.args, self.st, self.model, self.out, self.paper
        self.pruner.finalize()
        final = self.evaluate(model, self.loaders["val"])
        digests = dist.check_masks_identical(model, "at the end")
        if args.save_rank_masks:  # each rank its own (FSDP2: gathered) masks: the tests compare
            masks = {n: unshard_mask(m).cpu() for n, m in self.layers.items()}
            save_torch_checked(masks, out / f"masks_rank{self.env.rank}.pt", RANK_MASKS_MAGIC)
        if self.sharded:  # FSDP2: rank 0 reports and exports a whole copy
            model = self.full_model()
        if not self.main0:  # the last collective was the digest check: rank 0 alone writes
            return None  # (no barrier: VGG-16's export takes minutes on CPU)
        val_set = self.loaders["val"].dataset  # this rank's share, eval transform
        ex = [val_set[i][0] for i in range(min(64, len(val_set)))]
        ex = torch.stack(ex).to(self.device)  # [B, 3, res, res]: Table 4/5's activation %
        rows = tables.label_rows(pruning.layer_report(model, ex), self.names, paper["keep"])
        model_cpu = model.to("cpu")
        fresh = lambda: build_imagenet_model(args.model, self.classes, args.width)  # noqa: E731
        comp = save_compressed_checked(model_cpu, out / f"{args.model}_pruned.skr", fresh)
        path = out / f"{args.model}_blocksparse.pt"
        block = export_block_sparse(model_cpu, ex.cpu(), args.block_size, path, fresh)
        fig = report.model_summary(model_cpu)
        model.to(self.device)
        wall = st["elapsed"] + time.time() - self.t
        params = (fig["weights_dense"] + fig["biases"], fig["weights_kept"] + fig["biases"])
        table1 = tables.table1_rows(paper, st["dense"], final, *params)
        s = dict(model=args.model, network=paper["name"], command=self.command, args=vars(args))
        s |= dict(commands=st["commands"], run=report.run_info(ROOT, self.device))
        s |= dict(world_size=self.env.world, amp="bf16" if self.amp else None)
        s |= dict(synthetic=args.synthetic, table1=table1, **fig)
        s |= dict(dense=st["dense"], pruned=final, layers=rows, rounds=st["history"])
        s |= dict(sensitivity=st["sens"], targets=st["targets"], pruner=self.pruner.config())
        s |= dict(mask_sha256_per_rank=digests, compressed_file=comp, block_sparse=block)
        s |= dict(epoch_seconds=st["epoch_seconds"], wall_time_s=wall, paper=paper)
        report.write_json(out / "summary.json", s)
        self.log("done", st["step"], **final, compression=fig["compression_weights"])
        what = f"{final['images']:,} val images{', synthetic data' if args.synthetic else ''}"
        paper_kept = {p: 100 * k for p, k in paper["keep"].items()}
        print("\n" + tables.format_results(table1, rows, paper_kept, comp, fig, what))
        print(f"block-sparse export: {block['status']}\nwall time {wall:.0f} s; outputs in {out}/")
        self.log.close()
        return s
