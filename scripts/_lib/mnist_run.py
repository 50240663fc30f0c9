"""One MNIST pruning run of scripts/prune_mnist.py: the data (with its validation split), the
phases of the method, each epoch checkpointed for an exact resume, and the results (Table 1 and
2, the compressed model, figures, ``summary.json``, ``inference.json``).

Validation: ``val_images`` training images (5,000 by default) are held out, fixed by
:data:`VAL_SEED`; every phase is judged on them. The test set is read once, at the end, for the
pruned net and the dense net it started from -- never, with ``no_test`` (searches).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models import DROPOUT_FEEDS, HAN_2015, build_model
from scripts._lib import figures, flops, recipes, tables
from sparsekern import pruning, training
from sparsekern.formats import QuantizedWeights, format_storage, load_compressed, save_compressed
from sparsekern.nn import sparse_modules
from sparsekern.nn.inference import format_report, inference_report
from sparsekern.training import report
from sparsekern.training.data import holdout_split, load_mnist, tensor_loader
from sparsekern.training.export import save_compressed_checked

ROOT = Path(__file__).resolve().parents[2]
VAL_SEED = 0  # the validation images: the first val_images of torch.randperm(60000), seed 0
QUALITY_GRID = [0.2 * i for i in range(1, 16)]  # 0.2 .. 3.0: the sensitivity analysis's grid
CKPT_FORMAT = "sparsekern/prune_mnist/2"
# settings a resumed run may change: they do not change the result
RESUME_FREE = {"out", "data", "resume", "overwrite", "stop_after_epochs", "no_progress"}
RESUME_FREE |= {"figures", "no_figures", "inference_budget", "preset"}


def fmt(error) -> str:
    return "-" if error is None else f"{error:.2f}%"


def load_data(args) -> dict:
    """MNIST tensors behind batch-indexing DataLoaders: ``train`` (shuffled by ``gen``), ``val``
    (the held-out training images), ``test``, ``sens`` (the sensitivity analysis's training
    images) and the tensors ``x_tr``, ``y_tr``, ``x_te``."""
    data = load_mnist(args.data)
    tr_idx, va_idx = holdout_split(len(data["y_train"]), args.val_images, VAL_SEED)
    n_tr, n_te = args.subset or len(tr_idx), args.test_subset or len(data["y_test"])
    x_tr, y_tr = data["x_train"][tr_idx[:n_tr]], data["y_train"][tr_idx[:n_tr]]
    x_te, y_te = data["x_test"][:n_te], data["y_test"][:n_te]
    gen = torch.Generator().manual_seed(args.seed)  # the data order
    d = dict(x_tr=x_tr, y_tr=y_tr, x_te=x_te, n_tr=n_tr, n_te=n_te, gen=gen)
    d["train"] = tensor_loader(x_tr, y_tr, args.batch_size, shuffle=True, generator=gen,
                               drop_last=True)  # fmt: skip
    d["val"] = tensor_loader(data["x_train"][va_idx], data["y_train"][va_idx], 2000)
    d["test"] = tensor_loader(x_te, y_te, 2000)
    d["sens"] = tensor_loader(x_tr[: args.sens_n], y_tr[: args.sens_n], 2000)
    return d


class MnistRun:
    """The run's state: model, optimizer, pruner, phases and ``st`` (what a checkpoint holds)."""

    def __init__(self, args, model, data: dict, command: str):
        self.args, self.model, self.d, self.command = args, model, data, command
        self.out, self.paper = Path(args.out), HAN_2015[args.model]
        self.layers = dict(sparse_modules(model))
        self.spe = len(data["train"])
        self.phases = recipes.plan_phases(
            args.method, lr=args.lr, steps_per_epoch=self.spe, epochs=args.epochs,
            warmup_epochs=args.warmup_epochs, rounds=args.rounds,
            retrain_epochs=args.retrain_epochs, retrain_lr_factor=args.retrain_lr_factor,
            total_epochs=args.total_epochs, prune_at=args.prune_at,
        )  # fmt: skip
        self.total_steps = sum(ph.epochs for ph in self.phases) * self.spe
        self.opt = self.make_optimizer(args.lr)
        self.pruner = recipes.build_pruner(
            args.method, model, self.opt, total_steps=self.total_steps, sparsity=args.sparsity,
            regularization=args.reg, reg_strength=args.reg_strength,
            dropout_feeds=DROPOUT_FEEDS[args.model], **recipes.pruner_options(args),
        )  # fmt: skip
        self.st = dict(phase=0, epoch=0, pruned=False, phases=[], dense=None, sens=None)
        self.st |= dict(targets=None, elapsed=0.0, commands=[], epoch_seconds=[])
        self.ckpt, self.t = self.out / "ckpt.pt", time.time()

    def make_optimizer(self, lr):  # weight_decay 0: the L1 / L2 term comes from the pruner
        return torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9, nesterov=True)

    def rebuild(self):
        return build_model(self.args.model, sparse=True, dropout=self.args.dropout)

    def val_error(self, m):
        return training.evaluate(m, self.d["val"])["top1_error"] if self.args.val_images else None

    def test_error(self, m):
        return None if self.args.no_test else training.evaluate(m, self.d["test"])["top1_error"]

    # ------------------------------------------------------------------------ checkpoints
    def restore(self) -> None:
        """``--resume``: everything a continued run needs to end bit for bit where an
        uninterrupted one does; refuses changed settings (SystemExit with the differences)."""
        args = self.args
        if args.resume and self.ckpt.exists():
            try:
                ck = training.load_run_checkpoint(
                    self.ckpt, CKPT_FORMAT, self.model, {"model_name": args.model}, vars(args),
                    RESUME_FREE,
                )  # fmt: skip
            except training.CheckpointError as e:
                raise SystemExit(f"--resume: {e}") from None
            self.st = st = ck["st"]
            if st["pruned"] and self.phases[st["phase"]].fresh_optimizer:  # its optimizer
                self.opt = self.make_optimizer(self.phases[st["phase"]].lr)
                self.pruner.set_optimizer(self.opt)
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["opt"])
            self.pruner.load_state_dict(ck["pruner"])
            training.set_rng_state(ck["rng"])
            self.d["gen"].set_state(ck["gen"])
        elif args.resume:
            print(f"--resume: no {self.ckpt} yet, starting afresh")
        self.out.mkdir(parents=True, exist_ok=True)
        self.st["commands"].append(self.command)

    def checkpoint(self) -> None:
        self.st["elapsed"] += time.time() - self.t
        self.t = time.time()
        a = self.args
        state = dict(model_name=a.model, args=vars(a), model=self.model.state_dict(), st=self.st)
        state |= dict(opt=self.opt.state_dict(), pruner=self.pruner.state_dict())
        state |= dict(rng=training.rng_state(), gen=self.d["gen"].get_state())
        training.save_checkpoint(self.ckpt, state, CKPT_FORMAT)

    # ------------------------------------------------------------------------ the phases
    def snip_closure(self):  # SNIP scores |g * w| on --snip-batches batches of its own draw
        a, x_tr, y_tr = self.args, self.d["x_tr"], self.d["y_tr"]
        perm = torch.randperm(self.d["n_tr"], generator=torch.Generator().manual_seed(a.seed + 1))
        idx = [perm[j * a.batch_size : (j + 1) * a.batch_size] for j in range(a.snip_batches)]
        return sum(F.cross_entropy(self.model(x_tr[j]), y_tr[j]) for j in idx) / len(idx)

    def finish(self, i: int) -> None:  # phase i is complete: its validation error, one line
        rec, st = self.st["phases"][i], self.st
        rec["val_error"] = self.val_error(self.model)
        rec["total_kept"] = 1 - self.pruner.current_sparsity()
        if self.phases[i].name == "dense":  # the reference net; Fig 5 and 7 use its weights
            st["dense"] = {"state": {k: v.clone() for k, v in self.model.state_dict().items()}}
            return self.bar.write(f"dense: validation error {fmt(rec['val_error'])}")
        kept = ", ".join(f"{n} {100 * k:.1f}%" for n, k in self.pruner.kept_fractions().items())
        before = f"{fmt(rec['val_error_pruned'])} pruned -> " if "val_error_pruned" in rec else ""
        self.bar.write(
            f"{self.phases[i].name}: kept {kept}, total {100 * rec['total_kept']:.2f}% "
            f"({1 / rec['total_kept']:.1f}x); validation error {before}{fmt(rec['val_error'])}"
        )

    def sensitivity(self) -> None:  # Han Fig 6, on training images
        acc = lambda m: 100 - training.evaluate(m, self.d["sens"])["top1_error"]  # noqa: E731
        res = pruning.sensitivity_analysis(self.model, acc, QUALITY_GRID)
        t = pruning.sensitivity_targets(res, self.layers, self.args.max_drop)
        self.st["sens"] = dict(baseline=res.baseline, qualities=res.qualities, kept=res.kept)
        self.st["sens"] |= dict(accuracy=res.accuracy, budget=t.budget, sparsity=t.sparsity)
        targets = ", ".join(f"{n} {100 * v:.1f}%" for n, v in t.sparsity.items())
        self.bar.write(f"sensitivity: targets {targets}")

    def prune(self, i: int) -> None:
        """The pruning that starts phase ``i``: the method's target, or this round of Han's
        geometric schedule towards the sensitivity (or paper, or given) targets."""
        args, st, ph = self.args, self.st, self.phases[i]
        rec = {"name": ph.name}
        if args.targets == "sens" and st["sens"] is None:
            self.sensitivity()
        if args.method != "han":
            kept = self.pruner.prune(closure=self.snip_closure)
        elif args.quality is not None:
            kept = self.pruner.prune(quality=args.quality)
        else:
            by_sens = st["sens"]["sparsity"] if args.targets == "sens" else None
            keep = {n: k / 100 for n, k in self.paper["kept_pct"].items() if n in self.layers}
            st["targets"] = st["targets"] or pruning.han_targets(
                self.layers, keep, sparsity=args.sparsity, sensitivity=by_sens
            )
            r = sum(p.prune for p in self.phases[: i + 1])
            rec["target"] = pruning.Geometric(st["targets"], args.schedule_rounds)(r)
            kept = self.pruner.prune(rec["target"])
        rec |= {"kept": kept, "val_error_pruned": self.val_error(self.model)}
        st["phases"].append(rec)
        if ph.fresh_optimizer:  # retraining starts without the dense phase's momentum
            self.opt = self.make_optimizer(ph.lr)
            self.pruner.set_optimizer(self.opt)
        st["pruned"] = True
        self.checkpoint()

    def train(self) -> bool:
        """Every phase, one epoch at a time, each checkpointed; False if stopped early."""
        args, st, spe = self.args, self.st, self.spe
        done = sum(ph.epochs for ph in self.phases[: st["phase"]]) + st["epoch"]
        self.bar = training.Progress(
            self.total_steps, done * spe, enabled=False if args.no_progress else None
        )
        self.bar.write(
            f"{self.paper['name']}, --method {args.method}: train {self.d['n_tr']:,}, validation "
            f"{args.val_images:,}, test {0 if args.no_test else self.d['n_te']:,} images; phases "
            f"{', '.join(f'{ph.name} ({ph.epochs} ep)' for ph in self.phases)}; "
            f"{torch.get_num_threads()} thread(s)" + (f"; resumed at epoch {done}" if done else "")
        )
        while st["phase"] < len(self.phases):
            i, ph = st["phase"], self.phases[st["phase"]]
            if ph.prune and not st["pruned"]:
                self.prune(i)
            elif len(st["phases"]) <= i:
                st["phases"].append({"name": ph.name})
            lr = training.WarmupCosine(ph.lr, max(1, ph.epochs * spe), ph.warmup)
            while st["epoch"] < ph.epochs:
                self.train_epoch(i, lr)
                done += 1
                if args.stop_after_epochs is not None and done >= args.stop_after_epochs:
                    self.bar.close()
                    print(f"stopped after {done} epochs (--stop-after-epochs); --resume goes on")
                    return False
            if ph.epochs == 0:
                self.finish(i)
            st["phase"], st["epoch"], st["pruned"] = i + 1, 0, False
            self.checkpoint()
        self.bar.close()
        return True

    def train_epoch(self, i: int, lr) -> None:
        args, st, ph, bar = self.args, self.st, self.phases[i], self.bar
        e, rec = st["epoch"], st["phases"][i]
        alternate = args.freeze_alternate and ph.prune
        if alternate:  # Han: FC with conv frozen, then the reverse
            self.pruner.freeze("conv" if e < ph.epochs / 2 else "fc")
        bar.describe(f"{ph.name} {e + 1}/{ph.epochs}")
        ep = training.train_epoch(
            self.model, self.d["train"], self.opt, self.pruner, lr=lr, step0=e * self.spe,
            progress=bar,
        )  # fmt: skip
        if alternate:
            self.pruner.unfreeze()
        if args.method == "earlycrop" and self.pruner.epoch_end(self.snip_closure):
            ep["mask_changes"] += 1  # pruned at this epoch's end (scored on the SNIP batch)
            bar.write(f"earlycrop: pruned at the end of epoch {e + 1} (step {(e + 1) * self.spe})")
        rec["losses"] = rec.get("losses", []) + [ep["loss"]]
        rec["mask_changes"] = rec.get("mask_changes", 0) + ep["mask_changes"]
        st["epoch_seconds"].append(ep["seconds"])
        st["epoch"] += 1
        bar.postfix(loss=f"{ep['loss']:.4f}")
        bar.note(f"{ph.name} {e + 1}/{ph.epochs}: loss {ep['loss']:.4f}, {ep['seconds']:.1f} s")
        if st["epoch"] == ph.epochs:
            self.finish(i)
        self.checkpoint()

    # ------------------------------------------------------------------------ results
    def deep_compression(self) -> dict:
        """Deep Compression's storage of the pruned net (Han, Mao, Dally 2016): a copy quantised
        (k-means, linear init: 5 bits FC, 8 conv), its centroids fine-tuned for ``dc_epochs``
        epochs at the retraining LR by the summed gradients of their weights, then saved with
        Huffman-coded indices, reloaded and evaluated (validation; test unless ``no_test``)."""
        args, d = self.args, self.d
        net = self.rebuild()
        net.load_state_dict(self.model.state_dict())
        qw = QuantizedWeights(net)
        val_kmeans = self.val_error(net)
        kmeans = {n: c.detach().clone() for n, c in qw.centroids.items()}
        lr, net_train = args.lr * args.retrain_lr_factor, net.train()
        for _ in range(args.dc_epochs):
            for x, y in d["train"]:
                net_train.zero_grad()
                F.cross_entropy(net_train(x), y).backward()
                qw.step(lr)
        net.eval()
        # the summed gradients of thousands of weights can overshoot (LeNet-5's fc1: ~5,000 a
        # centroid): fine-tuning is kept only if finite and not worse on validation
        finite = all(bool(c.isfinite().all()) for c in qw.centroids.values())
        tuned = self.val_error(net) if finite else None
        kept_tuning = finite and (tuned is None or val_kmeans is None or tuned <= val_kmeans)
        if not kept_tuning:
            with torch.no_grad():
                for n, c in qw.centroids.items():
                    c.copy_(kmeans[n])
            qw.write()
        path = self.out / f"{args.model}_deep.skr"
        stats = save_compressed(net, path, quantize=qw, huffman=True)
        loaded = load_compressed(path, self.rebuild()).eval()
        out = dict(path=path.name, epochs=args.dc_epochs, lr=lr, val_error_kmeans=val_kmeans)
        out |= dict(fine_tuning_kept=kept_tuning, val_error_tuned=tuned)
        out |= dict(val_error=self.val_error(loaded), error=self.test_error(loaded), **stats)
        return out

    def fig5(self) -> tuple[dict, str]:
        """Han's Fig 5 (extra prune / retrain runs from the dense weights), on validation."""
        args, st = self.args, self.st
        bar = training.Progress(0, enabled=False if args.no_progress else None)
        iterative = [
            {"pruned": 1 - r["total_kept"], "error": r["val_error"]} for r in st["phases"][1:]
        ]
        curves = figures.fig5_curves(
            self.rebuild, lambda m, lr: torch.optim.SGD(
                m.parameters(), lr=lr, momentum=0.9, nesterov=True),
            {args.reg: st["dense"]["state"]}, self.d["train"], self.d["val"], lr=args.lr,
            epochs=args.epochs, warmup=round(args.warmup_epochs * self.spe),
            retrain_lr=args.lr * args.retrain_lr_factor,
            retrain_epochs=max(1, args.retrain_epochs // 2),
            regs={"l2": 5e-4, "l1": 1e-5} | {args.reg: args.reg_strength}, seed=args.seed,
            iterative=iterative, progress=bar,
        )  # fmt: skip
        bar.close()
        title = f"{self.paper['name']}: pruning with and without retraining"
        return curves, figures.plot_fig5(curves, self.out / "fig5_prune_retrain.png", title)

    def early_crop_record(self) -> dict:
        """Where Early-CROP pruned (epoch, step, fraction of the budget), its trigger's relative
        weight changes and threshold, and the training MACs against pruning after training
        (:mod:`scripts._lib.flops`)."""
        p, spe = self.pruner, self.spe
        epoch = p.pruned_at_epoch
        step = None if epoch is None else epoch * spe
        pos = flops.layer_positions(self.layers, self.model, self.d["x_te"][:1])
        compute = flops.early_prune_compute(
            self.layers, pos, self.args.batch_size, self.total_steps if step is None else step,
            self.total_steps,
        )  # fmt: skip
        out = dict(pruned_at_epoch=epoch, pruned_at_step=step, max_epoch=p.max_epoch)
        out |= dict(pruned_at_fraction=None if step is None else step / self.total_steps)
        out |= dict(weight_changes=list(p.changes), threshold=p.threshold, positions=pos)
        return out | compute

    def results(self) -> dict:
        """Test errors (once), Table 1 and 2, the checked compressed file, inference timing,
        figures and ``summary.json``; prints the report."""
        args, st, model, out = self.args, self.st, self.model, self.out
        self.pruner.finalize()
        err, val_err = self.test_error(model), self.val_error(model)
        dense, dense_val = None, None
        if st["dense"]:  # the net pruning started from: its errors, from its saved weights
            net = self.rebuild()
            net.load_state_dict(st["dense"]["state"])
            dense, dense_val = {"error": self.test_error(net)}, self.val_error(net)
        fig = report.model_summary(model)
        rows = pruning.layer_report(model, self.d["x_te"][:1000])
        comp = save_compressed_checked(model, out / f"{args.model}_pruned.skr", self.rebuild)
        deep = self.deep_compression() if args.dc_epochs is not None else None
        inference = None
        if args.inference_budget > 0:  # the exported model's CPU time vs dense
            x1 = self.d["x_te"][:1]
            inference = inference_report(model, x1, (1, 64), budget_s=args.inference_budget)
            inference = {"command": self.command, "run": report.run_info(ROOT), **inference}
            report.write_json(out / "inference.json", inference)
        figs, fig5 = [], None
        if args.method == "han" and not args.no_figures:  # Fig 4, 6, 7
            figs = figures.han_figures(model, st["dense"]["state"], st["sens"], out,
                                       self.paper["name"], args.sens_n)  # fmt: skip
        if args.figures and args.method == "han":
            fig5, name = self.fig5()
            figs.append(name)
        wall = st["elapsed"] + time.time() - self.t
        params = (fig["weights_dense"] + fig["biases"], fig["weights_kept"] + fig["biases"])
        table1 = tables.table1_rows(self.paper, dense, {"error": err}, *params)
        s = dict(model=args.model, network=self.paper["name"], method=args.method)
        s |= dict(command=self.command, commands=st["commands"], args=vars(args))
        s |= dict(run=report.run_info(ROOT), table1=table1)
        s |= dict(error_dense_pct=dense and dense["error"], error_pct=err, **fig)
        s |= dict(epochs=sum(ph.epochs for ph in self.phases), steps=self.total_steps)
        s |= dict(plan=[ph.as_dict() for ph in self.phases], phases=st["phases"])
        s |= dict(pruner=self.pruner.config(), prunes=self.pruner.history, sensitivity=st["sens"])
        s |= dict(targets=st["targets"], layer_report=rows, compressed_file=comp)
        s |= dict(dead_neurons=pruning.count_dead_neurons(model), figures=figs, fig5=fig5)
        s |= dict(paper=self.paper, wall_time_s=wall, epoch_seconds=st["epoch_seconds"])
        s |= dict(train_images=self.d["n_tr"], test_images=0 if args.no_test else self.d["n_te"])
        s |= dict(val_images=args.val_images, val_seed=VAL_SEED, val_error_pct=val_err)
        s |= dict(val_error_dense_pct=dense_val, deep_compression=deep)
        if args.method == "earlycrop":
            s["early_crop"] = self.early_crop_record()
        report.write_json(out / "summary.json", s)
        ratio = fig["compression_weights"]
        print(f"\nvalidation error ({args.val_images:,} held-out training images): dense "
              f"{fmt(dense_val)}, pruned {fmt(val_err)} at {ratio:.1f}x")  # fmt: skip
        if not args.no_test:
            what = f"{self.d['n_te']:,} test images"
            print(tables.format_results(table1, rows, self.paper["kept_pct"], comp, fig, what))
        if deep:
            kept_b = 8 * deep["file_bytes"] / fig["weights_kept"]
            tuning = "kept" if deep["fine_tuning_kept"] else "rejected: k-means only"
            print(f"\nDeep Compression storage ({deep['path']}: pruned, quantised, Huffman-coded; "
                  f"centroids fine-tuned {deep['epochs']} epoch(s), {tuning}):\n"
                  f"{format_storage(deep)}\n"
                  f"storage: {deep['file_bytes'] / 1e3:.1f} KB vs {deep['dense_bytes'] / 1e6:.2f} "
                  f"MB dense = {deep['compression_ratio']:.1f}x ({kept_b:.2f} bits / kept weight), "
                  f"test error {fmt(deep['error'])}, validation {fmt(deep['val_error'])} "
                  f"(paper: LeNet-300-100 40x at 1.58%, LeNet-5 39x at 0.74%)")  # fmt: skip
        if inference:
            print(f"inference export ({inference['threads']} thread(s)):\n"
                  f"{format_report(inference)}")  # fmt: skip
        files = ["summary.json", comp["path"], *figs] + ["inference.json"] * bool(inference)
        files = ", ".join(files)
        print(f"wall time {wall:.0f} s; outputs in {out}/: {files}")
        return s
