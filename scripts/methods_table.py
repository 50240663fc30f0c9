"""The methods after Han on MNIST at one budget per model: every method at 90 / 95 / 98% sparsity
on both LeNets (scripts/prune_mnist.py runs), then the markdown table (<results>/table.md) with
the papers' figures beside each row (SNIP: LeNet-300-100 95% 1.6%, 98% 2.4%; LeNet-5-Caffe 98%
0.8%, 99% 1.1%).

    python scripts/methods_table.py                      # the full table (hours on 2 cores)
    python scripts/methods_table.py --quick              # CI: tiny budgets, runs/methods-quick
    python scripts/methods_table.py --table results/methods   # print the table of DIR/*.json
    python scripts/methods_table.py --table results/methods --into results/methods.md  # rewrite
    python scripts/methods_table.py --models lenet300 --methods snip,rigl --dry-run
    python scripts/methods_table.py --methods nm,nmdecay,nmstruct,srste --nm-24   # + 2:4 rows

Methods: han, global, gradual, snip, rigl, nm (Han's and the first table's), and the
mask-learning ones scl, gap, gibbs, earlycrop, nmdecay (N:M pruning-mask decay), nmstruct (N:M
sparse-structure decay), srste (SR-STE), each with its paper's defaults (scripts/_lib/recipes.py).
The N:M family (nm, nmdecay, nmstruct, srste) runs 1:M at each sparsity, M = round(1 / (1 - s))
(1:10, 1:20, 1:50); --nm-24 adds a 2:4 run of each N:M method selected (<model>_<method>_2of4).
The table shows the pattern beside the method, and a line under it for each Early-CROP run: where
it pruned and the training FLOPs saved against pruning after training (scripts/_lib/flops.py).

Budgets (epochs, the same for every method of a model, Han's included): LeNet-300-100 40,
LeNet-5 2. LeNet-300-100's 40 epochs are the budget of its Han row (results/lenet300: 20 dense
epochs, whose training loss has flattened at 0.004 from epoch 17, then 5 rounds x 4 retraining
epochs); about 80 s a run on one thread. LeNet-5's 2 epochs are the short budget of the first
table, not a converged one: an epoch takes 25-30 s, so 40 epochs for 45 runs would be 15 hours on
2 cores. Han's runs spend the budget as dense + rounds x retraining (HAN_SPLIT); the others as
their recipes say (scripts/_lib/recipes.py).
Every run holds out 5,000 training images; the table reports the test error, read once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout: `models` and `scripts._lib` are not installed

from models import HAN_2015, METHOD_FIGURES  # noqa: E402
from scripts._lib import checks, recipes, tables  # noqa: E402

MODELS = ("lenet300", "lenet5")
BUDGET = {"lenet300": 40, "lenet5": 2}
HAN_SPLIT = {  # dense epochs, rounds, retraining epochs a round: dense + rounds x retrain = budget
    "lenet300": dict(epochs=20, rounds=5, retrain_epochs=4),
    "lenet5": dict(epochs=1, rounds=1, retrain_epochs=1, warmup_epochs=0.2),
}
QUICK = dict(  # CI: every method and stage in seconds (LeNet-300-100 on 1,000 images)
    budget={"lenet300": 2, "lenet5": 1},
    han={"lenet300": dict(epochs=1, rounds=1, retrain_epochs=1),
         "lenet5": dict(epochs=1, rounds=1, retrain_epochs=0)},
    flags=["--subset", "1000", "--test-subset", "500", "--val-images", "500", "--sens-n", "500"],
)  # fmt: skip
SPARSITIES = (0.9, 0.95, 0.98)
# --into: the generated block of a markdown file (results/methods.md) lies between these lines
BEGIN = "<!-- scripts/methods_table.py --table: begin -->"
END = "<!-- scripts/methods_table.py --table: end -->"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("--table", metavar="DIR", help="print the table of DIR/*.json and exit")
    a("--into", metavar="MD", help="with --table: rewrite the table between MD's markers")
    a("--models", type=checks.choices_list(MODELS), default=list(MODELS))
    a("--methods", type=checks.choices_list(recipes.METHODS), default=list(recipes.METHODS))
    a("--sparsities", type=checks.number_list(checks.fraction(lo_open=True, hi_open=True)),
      default=list(SPARSITIES), help="comma-separated, each in (0, 1)")  # fmt: skip
    a(
        "--nm-24",
        action="store_true",
        help="also a 2:4 run of each N:M method among --methods (nm, nmdecay, nmstruct, srste)",
    )
    a("--quick", action="store_true", help="CI budgets (QUICK); runs/methods-quick, no copies")
    a("--runs", help="the runs' folders (default runs/methods, runs/methods-quick)")
    a("--results", help="summaries copied here (default results/methods; --quick: none)")
    a("--overwrite", action="store_true", help="rerun runs that have a summary.json")
    a("--dry-run", action="store_true", help="print the commands and exit")
    args = p.parse_args(argv)
    if args.table is not None:
        d = Path(args.table)
        if not d.is_dir() or not any(d.glob("*.json")):
            p.error(f"argument --table: expected a folder of run summaries (*.json), got {d}")
        if args.quick or args.dry_run or args.results or args.runs:
            p.error("argument --table: prints a table only; expected no other option")
        if args.into is not None:
            md = Path(args.into)
            if (
                not md.is_file()
                or md.read_text().count(BEGIN) != 1
                or md.read_text().count(END) != 1
            ):
                p.error(f"argument --into: expected a markdown file with one {BEGIN!r} and one "
                        f"{END!r} line, got {md}")  # fmt: skip
    elif args.into is not None:
        p.error("argument --into: expected --table DIR with it")
    if args.nm_24 and not set(args.methods) & set(recipes.NM_METHODS):
        p.error(f"argument --nm-24: expected an N:M method {recipes.NM_METHODS} among --methods, "
                f"got {','.join(args.methods)}")  # fmt: skip
    args.runs = args.runs or f"runs/methods{'-quick' * args.quick}"
    checks.check_out_dir(p, "--runs", ROOT / args.runs)
    if args.results is None and not args.quick:
        args.results = "results/methods"
    if args.results:
        checks.check_out_dir(p, "--results", ROOT / args.results)
    return args


def commands(args) -> list[tuple[str, list[str]]]:
    """``(run name, prune_mnist.py argv)`` for every model x method x sparsity (and 2:4 for the
    N:M methods with ``--nm-24``)."""
    out = []
    for model in args.models:
        budget = (QUICK["budget"] if args.quick else BUDGET)[model]
        han = (QUICK["han"] if args.quick else HAN_SPLIT)[model]
        for method in args.methods:
            targets = [(f"s{round(100 * sp)}", ["--sparsity", f"{sp:g}"]) for sp in args.sparsities]
            if args.nm_24 and method in recipes.NM_METHODS:
                targets.append(("2of4", ["--nm", "2:4"]))
            for tag, target in targets:
                name = f"{model}_{method}_{tag}"
                argv = ["--model", model, "--method", method, *target]
                if method == "han":
                    argv += [
                        x for k, v in han.items() for x in (f"--{k.replace('_', '-')}", str(v))
                    ]
                else:
                    argv += ["--total-epochs", str(budget)]
                argv += QUICK["flags"] if args.quick else []
                argv += ["--no-figures", "--no-progress", "--overwrite", "--inference-budget", "0"]
                out.append((name, argv + ["--out", f"{args.runs}/{name}"]))
    return out


def print_table(folder) -> str:
    runs = [json.loads(f.read_text()) for f in sorted(Path(folder).glob("*.json"))]
    names = {k: v["name"] for k, v in HAN_2015.items()}
    commits = sorted({r["run"]["commit"][:7] for r in runs})
    dirty = sorted({bool(r["run"].get("dirty")) for r in runs})
    where = Path(folder).resolve()
    where = where.relative_to(ROOT) if where.is_relative_to(ROOT) else where
    text = f"{len(runs)} runs of `{where}`, commits {', '.join(commits)} (dirty: {dirty}).\n\n"
    text += tables.methods_table(runs, names, METHOD_FIGURES)
    print(text)
    return text


def write_into(md: Path, text: str) -> None:
    """Replace what lies between :data:`BEGIN` and :data:`END` in ``md`` by ``text`` (atomic)."""
    head, rest = md.read_text().split(BEGIN + "\n", 1)
    tail = rest.split(END, 1)[1]
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    os.replace(tmp, md)


def main(argv=None):
    args = parse_args(argv)
    if args.table is not None:
        text = print_table(args.table)
        if args.into is not None:
            write_into(Path(args.into), text)
        return text
    todo = commands(args)
    if args.dry_run:
        return print("\n".join("python scripts/prune_mnist.py " + " ".join(a) for _, a in todo))
    collected = ROOT / (args.results or f"{args.runs}/summaries")
    collected.mkdir(parents=True, exist_ok=True)
    for name, argv in todo:
        summary = ROOT / args.runs / name / "summary.json"
        if args.overwrite or not summary.exists():
            print(f"{name}: python scripts/prune_mnist.py {' '.join(argv)}", flush=True)
            script = str(ROOT / "scripts" / "prune_mnist.py")
            proc = subprocess.run([sys.executable, script, *argv], cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(f"{name}: prune_mnist.py exited {proc.returncode}")
        tmp = collected / f".{name}.json.tmp"  # atomic: a reader never sees half a file
        shutil.copyfile(summary, tmp)
        os.replace(tmp, collected / f"{name}.json")
    text = print_table(collected)
    tmp = collected / ".table.md.tmp"
    tmp.write_text(text + "\n")
    os.replace(tmp, collected / "table.md")
    return text


if __name__ == "__main__":
    main()
