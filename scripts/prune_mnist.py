"""Han et al. 2015 on MNIST: train LeNet-300-100 or LeNet-5, prune, retrain; or another method.

    python scripts/prune_mnist.py --preset lenet300           # Table 1 row (results/lenet300)
    python scripts/prune_mnist.py --preset lenet300 --figures # + Fig 5 (extra runs)
    python scripts/prune_mnist.py --preset lenet5             # ~25 min on 2 cores
    python scripts/prune_mnist.py --preset lenet300 --quick   # smoke run (runs/lenet300-quick)
    python scripts/prune_mnist.py --preset lenet300 --resume  # continue <out>/ckpt.pt exactly
    python scripts/prune_mnist.py --model lenet300 --method rigl --sparsity 0.95  # or global,
        # gradual, snip, nm, han (Han's Table 2 proportions scaled to the sparsity), scl, gap,
        # gibbs, earlycrop; the N:M family nm, nmdecay, nmstruct, srste: 1:M, or --nm 2:4

Presets: scripts/config/<name>.py (nanoGPT style: module-level names are this script's argument
names; a flag overrides them); --model alone uses the preset of that name. The knobs marked
"searched" in a preset were chosen on 5,000 held-out training images by scripts/search_mnist.py
(results/search/); every phase reports validation error, and the test set is read once, at the
end (--no-test: never).

Han (the default method): dense training (SGD, Nesterov 0.9, warm-up + cosine, L2 5e-4 on the
weights), then --rounds rounds of prune -> retrain at --retrain-lr-factor x the LR, the
survivors never re-initialised. Each layer's target sparsity comes from --sparsity, --quality
(Han's threshold, quality x std, fixed), --targets paper (Han's Table 2) or, by default, a
sensitivity analysis of the dense net on training images (Han Fig 6: each layer may cost
--max-drop x sqrt(its share of the weights) accuracy points), reached geometrically over
--schedule-rounds rounds. The other methods share one budget, --total-epochs (phases:
scripts/_lib/recipes.py); scripts/methods_table.py runs and tabulates them. Every epoch is
checkpointed atomically; --resume continues bit for bit and refuses changed settings. Outputs:
summary.json (command, arguments, git commit, Table 1 and 2, every phase), the pruned model in
Han's relative-index format, Fig 4 / 6 / 7 (+ 5), inference.json (the exported model timed
against dense; scripts/export_mnist.py RUN_DIR writes it again for a finished run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout: `models` and `scripts._lib` are not installed

from models import build_model  # noqa: E402
from scripts._lib import checks, presets, recipes  # noqa: E402
from scripts._lib.mnist_run import MnistRun, load_data  # noqa: E402
from sparsekern.nn import sparse_modules  # noqa: E402

QUICK = {  # --quick: every stage, in well under a minute (fills what no flag set)
    "lenet300": dict(epochs=3, rounds=2, retrain_epochs=1, sens_n=2000, total_epochs=1),
    "lenet5": dict(epochs=1, rounds=1, retrain_epochs=1, sens_n=1000, subset=12000),
}
MODELS = sorted(QUICK)


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(
        description=doc[0], epilog=doc[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    pos_int, nonneg_int = checks.number(int, 1), checks.number(int, 0)
    pos_float, nonneg_float = checks.number(float, 0, lo_open=True), checks.number(float, 0)
    a = p.add_argument
    a("--preset", help=f"scripts/config/<name>.py or a .py path; {presets.preset_names()}")
    a("--model", choices=MODELS, help="default: the preset's, else lenet300")
    a("--method", choices=recipes.METHODS, default="han")
    a("--sparsity", type=checks.per_layer(checks.fraction(hi_open=True), "sparsity"),
      help="pruned fraction: '0.95' (all weights; han: in Han's per-layer proportions) or, han, "
           "per layer 'fc1=0.95,fc2=0.9'")  # fmt: skip
    a("--targets", choices=["sens", "paper"], help="han: sensitivity analysis (default), Table 2")
    a("--quality", type=checks.per_layer(nonneg_float, "q"), help="han: fixed quality per round")
    a("--max-drop", type=pos_float, help="han: sensitivity budget, accuracy points")
    a("--sens-n", type=pos_int, help="han: training images the sensitivity analysis uses")
    a("--rounds", type=pos_int, help="han: prune -> retrain rounds")
    a("--schedule-rounds", type=pos_int, help="han: rounds the targets are spread over")
    a("--epochs", type=pos_int, help="han: dense epochs")
    a("--retrain-epochs", type=nonneg_int, help="han: retraining epochs per round")
    a("--warmup-epochs", type=nonneg_float, default=1.0, help="han: dense warm-up, epochs")
    a("--freeze-alternate", action="store_true", help="han: retrain FC, conv frozen, then conv")
    a("--total-epochs", type=pos_int, help="other methods: the training budget")
    a("--lr", type=pos_float, help="peak learning rate")
    a("--retrain-lr-factor", type=pos_float, help="retraining LR / --lr")
    a("--batch-size", type=pos_int, default=128)
    a("--reg", choices=["l2", "l1"], default="l2", help="regulariser (Han: L2)")
    a("--reg-strength", type=nonneg_float, help="default 5e-4 (l2), 1e-5 (l1)")
    a("--dropout", type=checks.fraction(hi_open=True), default=0.0, help="on hidden FC inputs")
    recipes.add_method_arguments(p)
    a("--subset", type=nonneg_int, help="train on the first N images (0: all)")
    a("--test-subset", type=nonneg_int, default=0, help="test on the first N images (0: all)")
    a(
        "--val-images",
        type=checks.number(int, 0, 20000),
        default=5000,
        help="training images held out (fixed by seed 0) to validate every phase; 0: none",
    )
    a("--no-test", action="store_true", help="never read the test set (validation searches)")
    a("--seed", type=nonneg_int, default=0)
    # 1 thread: on 2 shared cores, 2 threads ran LeNet-5 at 3 steps/s, 1 thread at 11
    a("--threads", type=nonneg_int, default=1, help="torch threads (0: torch's default)")
    a("--data", default=str(ROOT / "data" / "mnist"))
    a("--out", help="output folder (default results/<model>, runs/<model>-quick, runs/methods)")
    a("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    a("--overwrite", action="store_true", help="start afresh over an existing <out>/ckpt.pt")
    a("--stop-after-epochs", type=nonneg_int, help="exit after N epochs' checkpoint (tests)")
    a("--quick", action="store_true", help="tiny schedule (QUICK)")
    a("--figures", action="store_true", help="han: also Fig 5 (extra prune / retrain runs)")
    a("--no-figures", action="store_true", help="no figures at all")
    a("--no-progress", action="store_true", help="no progress bar")
    a("--dc-epochs", type=nonneg_int, default=1,
      help="Deep Compression: centroid fine-tuning epochs (0: k-means only)")  # fmt: skip
    a("--no-deep-compression", dest="dc_epochs", action="store_const", const=None)
    a("--inference-budget", type=nonneg_float, default=5.0,
      help="inference.json: seconds per batch size timing export vs dense (0: skip)")  # fmt: skip
    return p


def apply_preset(p, args) -> None:
    """Fill what no flag set: --quick's values, then the preset's (--preset, else --model's)."""
    name = args.preset or args.model or "lenet300"
    try:
        preset = presets.run_settings(presets.load_preset(name))
    except ValueError as e:
        p.error(f"argument --preset: {e}")
    if args.model is None:
        args.model = preset.get("model", "lenet300")
    if preset.get("model", args.model) != args.model:
        p.error(f"argument --model: expected {preset['model']} (preset {name}), got {args.model}")
    if unknown := sorted(set(preset) - set(vars(args))):
        p.error(f"argument --preset: {name} sets unknown arguments {unknown}")
    for k, v in (preset | (QUICK[args.model] if args.quick else {})).items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def check(p, args) -> None:
    """How the arguments combine: ``p.error`` (exit 2) before any work."""
    han, sp = args.method == "han", args.sparsity
    recipes.check_method_arguments(p, args)
    if not han and isinstance(sp, dict):
        p.error(f"--sparsity: expected one value for --method {args.method}, got {sp}")
    if not han and args.given & {"targets", "quality", "schedule_rounds"}:
        p.error(f"--targets, --quality, --schedule-rounds: han only, not {args.method}")
    if han and sum(x is not None for x in (sp, args.quality, args.targets)) > 1:
        p.error("--sparsity, --quality, --targets: expected one of them")
    if args.schedule_rounds < args.rounds:
        got = args.schedule_rounds
        p.error(f"--schedule-rounds: expected >= --rounds {args.rounds}, got {got}")
    if args.warmup_epochs > args.epochs:
        p.error(f"--warmup-epochs: expected <= --epochs {args.epochs}, got {args.warmup_epochs}")
    n_train = min(args.subset or 60000 - args.val_images, 60000 - args.val_images)
    if args.batch_size > n_train:
        p.error(f"--batch-size: expected <= the {n_train} training images, got {args.batch_size}")
    if args.method == "snip" and (most := n_train // args.batch_size) < args.snip_batches:
        p.error(f"--snip-batches: expected <= {most} batches of the data, got {args.snip_batches}")
    if args.targets == "sens" and args.sens_n > n_train:
        p.error(f"--sens-n: expected <= the {n_train} training images, got {args.sens_n}")
    checks.check_data_dir(p, "--data", args.data)
    checks.check_out_dir(p, "--out", args.out)
    if (Path(args.out) / "ckpt.pt").exists() and not (args.resume or args.overwrite):
        p.error(f"{args.out}/ckpt.pt exists: expected --resume (continue it) or --overwrite")


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.given = {k for k, v in vars(args).items() if v is not None}
    apply_preset(p, args)
    args.subset = args.subset or 0
    han, sp = args.method == "han", args.sparsity
    if han and sp is None and args.quality is None:
        args.targets = args.targets or "sens"
    args.schedule_rounds = args.schedule_rounds or args.rounds
    if args.reg_strength is None:
        args.reg_strength = 5e-4 if args.reg == "l2" else 1e-5
    if args.out is None and (not han or sp is not None):
        tag = f"s{round(100 * sp)}" if isinstance(sp, float) else "layers" if sp else "nm"
        tag = f"{args.nm[0]}of{args.nm[1]}" if args.nm and sp is None else tag
        args.out = str(ROOT / "runs" / "methods" / f"{args.model}_{args.method}_{tag}")
    elif args.out is None:
        quick = ROOT / "runs" / f"{args.model}-quick"
        args.out = str(quick if args.quick else ROOT / "results" / args.model)
    check(p, args)
    del args.given
    return args, p


def main(argv=None):
    args, parser = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    command = "python scripts/prune_mnist.py " + " ".join(sys.argv[1:] if argv is None else argv)
    model = build_model(args.model, sparse=True, dropout=args.dropout)
    layers = dict(sparse_modules(model))
    for flag, spec in (("--sparsity", args.sparsity), ("--quality", args.quality)):
        if bad := checks.unknown_layer_keys(spec, layers):  # a typo must not start a run
            parser.error(f"{flag}: expected layers among {list(layers)}, conv, fc; got {bad}")
    run = MnistRun(args, model, load_data(args), command)
    run.restore()
    if not run.train():
        return None
    return run.results()


if __name__ == "__main__":
    main()
