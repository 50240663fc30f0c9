"""One-shot pruning of LeNet-300-100 on MNIST without retraining: test error after SparseGPT,
SparseGPT without its error-compensation update (ablation), Wanda and magnitude, at 50-95% and
2:4, all three layers pruned. Also times SparseGPT on one 4096x4096 layer (1 CPU thread).

    PYTHONPATH=. nice python scripts/one_shot_mnist.py           # ~5 min on 1 thread
    PYTHONPATH=. nice python scripts/one_shot_mnist.py --epochs 1 --out runs/mnist-quick

The dense LeNet-300-100 is trained here as scripts/prune_mnist.py trains it (SGD, Nesterov
momentum 0.9, batch 128, warm-up + cosine LR 0.15), for --epochs epochs, and cached in --ckpt.
Calibration: --calib training images (batches of 128). MNIST comes from data/mnist (offline).
Writes <out>/mnist.json, <out>/mnist.md and <out>/mnist.png.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.lenet import LeNet300100  # noqa: E402
from scripts._lib import checks  # noqa: E402
from scripts._lib.figures import save_figure  # noqa: E402
from sparsekern import training  # noqa: E402
from sparsekern.formats._files import atomic_write  # noqa: E402
from sparsekern.pruning import one_shot  # noqa: E402
from sparsekern.pruning._sparsegpt import sparsegpt_prune  # noqa: E402
from sparsekern.pruning._wanda import magnitude_layer_mask, row_keep  # noqa: E402
from sparsekern.training.data import load_mnist, tensor_loader  # noqa: E402
from sparsekern.training.report import write_json  # noqa: E402

DENSE_FORMAT = "sparsekern/one_shot_mnist/dense/1"
# label -> (method, options); "sparsegpt-block": one mask threshold per block of 128 columns, as
# the reference code (the same as sparsegpt for N:M, where selection is per group anyway)
VARIANTS = {
    "sparsegpt": ("sparsegpt", {}),  # the default: selection="auto", with its guard
    "sparsegpt-row": ("sparsegpt", {"selection": "row"}),
    "sparsegpt-block": ("sparsegpt", {"selection": "block"}),
    "sparsegpt-no-update": ("sparsegpt", {"compensate": False}),
    "wanda": ("wanda", {}),
    "magnitude": ("magnitude", {}),
}


@torch.no_grad()
def test_error(model, x, y) -> float:
    model.eval()
    wrong = sum(
        int((model(xb).argmax(1) != yb).sum()) for xb, yb in zip(x.split(1000), y.split(1000))
    )
    return 100.0 * wrong / len(y)


def train_dense(data, args) -> tuple[LeNet300100, dict]:
    torch.manual_seed(args.seed)
    model = LeNet300100()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
    g = torch.Generator().manual_seed(args.seed)
    loader = tensor_loader(data["x_train"], data["y_train"], 128, shuffle=True, generator=g)
    spe = len(loader)
    lr = training.WarmupCosine(args.lr, args.epochs * spe, spe)
    t0 = time.perf_counter()
    for e in range(args.epochs):
        training.train_epoch(model, loader, opt, lr=lr, step0=e * spe)
        err = test_error(model, data["x_test"], data["y_test"])
        print(f"epoch {e + 1}/{args.epochs}: test error {err:.2f}%", flush=True)
    return model, {"train_seconds": time.perf_counter() - t0, "epochs": args.epochs}


def wanda_diagnostic(model, calibration, xt, yt, sparsities=(0.7, 0.9)) -> dict:
    """Why Wanda loses on this MLP: swap its two ingredients (per-row comparison, the ||x||
    weighting) one at a time. Replaces the Wanda mask rule inside one_shot for the duration."""
    mod = sys.modules["sparsekern.pruning.one_shot"]
    x = torch.cat(calibration).flatten(1)
    const = x.std(0) < 1e-6
    variants = {
        "wanda: |w| ||x||, per row": mod.wanda_mask,
        "|w| ||x||, per-layer threshold": lambda W, n, s, nm: magnitude_layer_mask(
            W.abs() * n.unsqueeze(0), s, nm
        ),
        "|w|, per row": lambda W, n, s, nm: row_keep(W.abs(), s),
        "|w|, per-layer threshold (magnitude)": lambda W, n, s, nm: magnitude_layer_mask(W, s, nm),
    }
    out = {
        "constant_pixels": int(const.sum()),
        "constant_value": float(x[0, const][0]) if const.any() else None,
        "errors": {},
    }
    orig = mod.wanda_mask
    try:
        for name, rule in variants.items():
            mod.wanda_mask = rule
            for s in sparsities:
                m = copy.deepcopy(model)
                one_shot(m, calibration, "wanda", s)
                out["errors"][f"{name} @ {s:.0%}"] = test_error(m, xt, yt)
                print(f"{name:40s} {s:.0%}: {out['errors'][f'{name} @ {s:.0%}']:.2f}%", flush=True)
    finally:
        mod.wanda_mask = orig
    return out


def time_layer(n: int) -> dict:
    """SparseGPT on one random n x n layer, float64 on 1 CPU thread, 50% and 2:4."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, n, generator=g, dtype=torch.float64)
    H = 2 * x.t() @ x / x.shape[0]
    W = torch.randn(n, n, generator=g, dtype=torch.float64)
    out = {"n": n, "dtype": "float64", "threads": torch.get_num_threads()}
    for label, kw in (("50%", dict(sparsity=0.5)), ("2:4", dict(n_m=(2, 4)))):
        t0 = time.perf_counter()
        sparsegpt_prune(W, H, **kw)
        out[label] = time.perf_counter() - t0
        print(f"sparsegpt {n}x{n} {label}: {out[label]:.1f} s", flush=True)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    pos_int, nonneg_int = checks.number(int, 1), checks.number(int, 0)
    a("--out", default=str(ROOT / "results" / "one_shot"))
    a("--ckpt", default=str(ROOT / "runs" / "one_shot_mnist" / "dense.pt"),
      help="the dense net: reused while --epochs / --lr / --seed agree")  # fmt: skip
    a("--data", default=str(ROOT / "data" / "mnist"))
    a("--epochs", type=pos_int, default=10)
    a("--lr", type=checks.number(float, 0, lo_open=True), default=0.15)
    a("--calib", type=checks.number(int, 1, 60000), default=2048, help="calibration images")
    a("--sparsities", type=checks.number_list(checks.fraction(hi_open=True)),
      default=[0.5, 0.7, 0.8, 0.9, 0.95], help="comma-separated, each in [0, 1)")  # fmt: skip
    a("--time-layer", type=nonneg_int, default=4096, help="0: skip the timing")
    a("--seed", type=nonneg_int, default=0)
    args = p.parse_args(argv)
    checks.check_data_dir(p, "--data", args.data)
    checks.check_out_dir(p, "--out", args.out)
    checks.check_out_file(p, "--ckpt", args.ckpt)
    args.config = {"epochs": args.epochs, "lr": args.lr, "seed": args.seed}  # trains dense.pt
    args.saved = None
    if Path(args.ckpt).exists():  # checksummed; refused unless trained with this config
        try:
            args.saved = training.load_checkpoint(
                args.ckpt, DENSE_FORMAT, expect={"config": args.config}
            )
        except training.CheckpointError as e:
            p.error(f"--ckpt: {e}")
    return args


def dense_model(data, args) -> tuple[LeNet300100, dict]:
    """The dense net: --ckpt's (checked by parse_args), else trained now and saved there, a
    checksummed checkpoint written atomically with its training settings."""
    if args.saved is not None:
        model = LeNet300100()
        model.load_state_dict(args.saved["model"])
        return model, args.saved["info"]
    model, info = train_dense(data, args)
    ckpt = Path(args.ckpt)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "info": info, "config": args.config}
    training.save_checkpoint(ckpt, state, DENSE_FORMAT)
    return model, info


def prune_all(model, calibration, xt, yt, dense_err, sparsities) -> list[dict]:
    """Every variant at every sparsity and 2:4, each on a fresh copy of ``model``."""
    runs = []
    for sparsity, n_m in [(s, None) for s in sparsities] + [(None, (2, 4))]:
        for label, (method, kw) in VARIANTS.items():
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            report = one_shot(m, calibration, method, sparsity, n_m, **kw)
            secs = time.perf_counter() - t0
            err = test_error(m, xt, yt)
            pattern = "2:4" if n_m else f"{sparsity:.0%}"
            runs.append({
                "method": label, "pattern": pattern, "sparsity": 0.5 if n_m else sparsity,
                "test_error": err, "excess_error": err - dense_err, "seconds": secs,
                "report": report,
            })  # fmt: skip
            print(
                f"{label:20s} {pattern:4s} error {err:6.2f}% (+{err - dense_err:.2f})", flush=True
            )
    return runs


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_mnist(args.data)
    model, info = dense_model(data, args)
    xt, yt = data["x_test"], data["y_test"]
    dense_err = test_error(model, xt, yt)
    print(f"dense test error {dense_err:.2f}%", flush=True)
    g = torch.Generator().manual_seed(args.seed + 1)
    idx = torch.randperm(len(data["x_train"]), generator=g)[: args.calib]
    calibration = list(data["x_train"][idx].split(128))
    runs = prune_all(model, calibration, xt, yt, dense_err, args.sparsities)
    diag = wanda_diagnostic(model, calibration, xt, yt)
    timing = time_layer(args.time_layer) if args.time_layer else None
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    cli = sys.argv[1:] if argv is None else argv
    result = {
        "command": "python scripts/one_shot_mnist.py " + " ".join(cli),
        "git_commit": commit, "torch": torch.__version__, "threads": 1,
        "config": {k: v for k, v in vars(args).items() if k != "saved"},
        "dense_test_error": dense_err, **info, "runs": runs, "wanda_diagnostic": diag,
        "timing_sparsegpt_layer": timing,
    }  # fmt: skip
    write_json(out / "mnist.json", result)
    write_table(result, out / "mnist.md")
    plot(result, out / "mnist.png")
    print(f"wrote {out / 'mnist.json'}, mnist.md, mnist.png")


def write_table(result: dict, path: Path) -> None:
    labels = list(VARIANTS)
    pats = list(dict.fromkeys(r["pattern"] for r in result["runs"]))
    get = {(r["method"], r["pattern"]): r for r in result["runs"]}
    dense = result["dense_test_error"]
    lines = [
        f"# LeNet-300-100 on MNIST, one-shot, no retraining (dense {dense:.2f}%)",
        "",
        f"Command: `{result['command']}` at commit `{result['git_commit']}`, torch "
        f"{result['torch']}, 1 CPU thread. Test error in % (excess over dense in parentheses); "
        "all three layers pruned to the pattern.",
        "",
        "| pattern | "
        + " | ".join(labels)
        + " | SparseGPT (auto) / magnitude excess | SparseGPT-block / magnitude |",
        "|---|" + "---:|" * (len(labels) + 2),
    ]
    for pat in pats:
        cells = [
            f"{get[(lab, pat)]['test_error']:.2f} (+{get[(lab, pat)]['excess_error']:.2f})"
            for lab in labels
        ]
        mag = get[("magnitude", pat)]["excess_error"]
        ratio = get[("sparsegpt", pat)]["excess_error"] / mag if mag > 0 else float("nan")
        row = get[("sparsegpt-block", pat)]["excess_error"] / mag if mag > 0 else float("nan")
        lines.append(f"| {pat} | " + " | ".join(cells) + f" | {ratio:.2f} | {row:.2f} |")
    d = result.get("wanda_diagnostic")
    if d:
        head = (
            f"Wanda diagnostic ({d['constant_pixels']}/784 calibration pixels are the constant "
            f"{d['constant_value']:.4f} after normalisation), test error %:"
        )
        lines += ["", head, ""]
        lines += [f"- {k}: {v:.2f}" for k, v in d["errors"].items()]
    t = result.get("timing_sparsegpt_layer")
    if t:
        lines += ["", f"SparseGPT on one {t['n']}x{t['n']} layer, {t['dtype']}, 1 CPU thread: "
                  f"{t['50%']:.1f} s (50%), {t['2:4']:.1f} s (2:4)."]  # fmt: skip
    atomic_write(path, ("\n".join(lines) + "\n").encode())  # a reader never sees half a table


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for lab in VARIANTS:
        rs = [r for r in result["runs"] if r["method"] == lab and r["pattern"] != "2:4"]
        (line,) = ax.plot(
            [r["sparsity"] for r in rs], [r["test_error"] for r in rs], "o-", label=lab
        )
        nm = [r for r in result["runs"] if r["method"] == lab and r["pattern"] == "2:4"]
        ax.plot([0.5], [nm[0]["test_error"]], "s", color=line.get_color(), markersize=9, mfc="none")
    ax.axhline(result["dense_test_error"], color="k", ls=":", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (squares: 2:4)")
    ax.set_ylabel("test error % (log)")
    ax.set_title("LeNet-300-100, one-shot, no retraining")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)  # atomic, as the table


if __name__ == "__main__":
    main()
