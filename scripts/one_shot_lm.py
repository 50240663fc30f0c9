"""One-shot pruning of a small byte-level causal LM (HF GPT-2 architecture, so its projections are
transformers' Conv1D) trained here on the Python documentation that ships with CPython
(``pydoc_data.topics``, ~466 KB of English text): validation perplexity dense vs one-shot
SparseGPT / Wanda / magnitude at 50% and 2:4 (and SparseGPT without its update, an ablation).

    PYTHONPATH=. nice python scripts/one_shot_lm.py                 # trains (~10 min, 1 thread)
    PYTHONPATH=. nice python scripts/one_shot_lm.py --steps 50 --out runs/lm-quick   # smoke run

The trained model is cached in --ckpt (runs/one_shot_lm/dense.pt; re-used unless --retrain).
The text is split 90/10 (train / validation, in order). Calibration: --calib random train
windows of --ctx bytes (the paper: 128 x 2048 tokens). The LM head is tied to the embedding
and stays dense (as in the paper); every Conv1D of the blocks is pruned. Writes <out>/lm.json.
"""

from __future__ import annotations

import argparse
import copy
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's sparsekern, not an installed one

from scripts._lib import checks  # noqa: E402
from scripts._lib.figures import save_figure  # noqa: E402
from sparsekern import training  # noqa: E402
from sparsekern.formats._files import atomic_write  # noqa: E402
from sparsekern.pruning import one_shot  # noqa: E402
from sparsekern.training.report import write_json  # noqa: E402

DENSE_FORMAT = "sparsekern/one_shot_lm/dense/1"
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
LABELS = tuple(VARIANTS)


def text_bytes() -> torch.Tensor:
    import pydoc_data.topics as topics

    text = "".join(topics.topics[k] for k in sorted(topics.topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def build(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=256, n_positions=args.ctx, n_embd=args.d, n_layer=args.layers,
        n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


def windows(data: torch.Tensor, ctx: int, idx: torch.Tensor) -> torch.Tensor:
    return torch.stack([data[i : i + ctx] for i in idx.tolist()])


@torch.no_grad()
def perplexity(model, val: torch.Tensor, ctx: int, batch: int = 32) -> float:
    model.eval()
    n = (len(val) - 1) // ctx
    x = val[: n * ctx].view(n, ctx)
    y = val[1 : n * ctx + 1].view(n, ctx)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        logits = model(input_ids=x[i : i + batch]).logits
        total += float(
            F.cross_entropy(logits.flatten(0, 1), y[i : i + batch].flatten(), reduction="sum")
        )
        count += y[i : i + batch].numel()
    return math.exp(total / count)


def train(model, train_data: torch.Tensor, args) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        lr = (
            args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        )
        for grp in opt.param_groups:
            grp["lr"] = lr
        idx = torch.randint(0, len(train_data) - args.ctx - 1, (args.batch,), generator=g)
        x = windows(train_data, args.ctx + 1, idx)
        out = model(input_ids=x[:, :-1], labels=None).logits
        loss = F.cross_entropy(out.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 200 == 0 or step == args.steps - 1:
            print(
                f"step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True
            )
    return {"train_seconds": time.perf_counter() - t0, "final_train_loss": loss.item()}


def parse_args(argv=None):
    """The command line, checked: a nonsense value exits 2 before any work."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "results" / "one_shot"))
    pos_int = checks.number(int, 1)
    p.add_argument("--layers", type=pos_int, default=2)
    p.add_argument("--d", type=pos_int, default=128)
    p.add_argument("--heads", type=pos_int, default=4)
    p.add_argument("--ctx", type=pos_int, default=128)
    p.add_argument("--steps", type=pos_int, default=2000)
    p.add_argument("--batch", type=pos_int, default=32)
    p.add_argument("--lr", type=checks.number(float, 0, lo_open=True), default=3e-3)
    p.add_argument("--calib", type=pos_int, default=128, help="calibration windows of --ctx bytes")
    p.add_argument("--seed", type=checks.number(int, 0), default=0)
    p.add_argument("--ckpt", default=str(ROOT / "runs" / "one_shot_lm" / "dense.pt"))
    p.add_argument("--retrain", action="store_true")
    args = p.parse_args(argv)
    if args.d % args.heads:
        p.error(f"argument --heads: expected a divisor of --d {args.d}, got {args.heads}")
    checks.check_out_dir(p, "--out", args.out)  # exit 2 before any work
    return args, p


def main(argv=None):
    args, p = parse_args(argv)  # p: a --ckpt that does not match is argparse's exit 2 too
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = text_bytes()
    cut = int(0.9 * len(data))
    train_data, val = data[:cut], data[cut:]
    model = build(args)
    ckpt = Path(args.ckpt)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    info = {}
    keys = ("layers", "d", "heads", "ctx", "steps", "batch", "lr", "seed")
    config = {k: getattr(args, k) for k in keys}  # what trains dense.pt
    if ckpt.exists() and not args.retrain:  # checksummed; refused unless trained with this config
        try:
            saved = training.load_checkpoint(ckpt, DENSE_FORMAT, expect={"config": config})
        except training.CheckpointError as e:
            p.error(f"--ckpt: {e} (or pass --retrain)")
        model.load_state_dict(saved["model"])
        info = saved["info"]
    else:
        info = train(model, train_data, args)
        state = {"model": model.state_dict(), "info": info, "config": config}
        training.save_checkpoint(ckpt, state, DENSE_FORMAT)  # atomic
    g = torch.Generator().manual_seed(args.seed + 1)
    idx = torch.randint(0, len(train_data) - args.ctx, (args.calib,), generator=g)
    calib_x = windows(train_data, args.ctx, idx)
    calibration = [{"input_ids": calib_x[i : i + 16]} for i in range(0, args.calib, 16)]
    dense_ppl = perplexity(model, val, args.ctx)
    print(f"dense perplexity {dense_ppl:.3f}", flush=True)
    runs = []
    configs = [
        (label, s, nm) for s, nm in ((0.5, None), (None, (2, 4)), (0.7, None)) for label in LABELS
    ]
    for label, sparsity, n_m in configs:
        method, kw = VARIANTS[label]
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        report = one_shot(m, calibration, method=method, sparsity=sparsity, n_m=n_m, **kw)
        secs = time.perf_counter() - t0
        ppl = perplexity(m, val, args.ctx)
        pattern = "2:4" if n_m else f"{sparsity:.0%}"
        pruned = [r for r in report if "skipped" not in r]
        runs.append({
            "method": label, "pattern": pattern, "perplexity": ppl,
            "increase": ppl - dense_ppl, "seconds": secs,
            "mean_rel_error": sum(r["rel_error"] for r in pruned) / len(pruned),
            "report": report,
        })  # fmt: skip
        print(f"{label:20s} {pattern:4s} ppl {ppl:.3f} (+{ppl - dense_ppl:.3f}) {secs:.1f} s",
              flush=True)  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    cli = sys.argv[1:] if argv is None else argv
    result = {
        "command": "python scripts/one_shot_lm.py " + " ".join(cli),
        "git_commit": commit, "torch": torch.__version__, "threads": 1,
        "config": vars(args), "text_bytes": len(data), "train_bytes": cut, "val_bytes": len(val),
        "params": sum(p.numel() for p in model.parameters()), "dense_perplexity": dense_ppl,
        **info, "runs": runs,
    }  # fmt: skip
    write_json(out / "lm.json", result)  # atomic, strict JSON
    write_table(result, out / "lm.md")
    plot(result, out / "lm.png")
    print(f"wrote {out / 'lm.json'}, lm.md, lm.png")


def write_table(result: dict, path: Path) -> None:
    get = {(r["method"], r["pattern"]): r for r in result["runs"]}
    pats = list(dict.fromkeys(r["pattern"] for r in result["runs"]))
    c = result["config"]
    lines = [
        f"# Byte-level GPT-2 ({c['layers']} layers, d {c['d']}, context {c['ctx']}) on "
        f"pydoc_data.topics: validation perplexity, one-shot "
        f"(dense {result['dense_perplexity']:.3f})",
        "",
        f"Command: `{result['command']}` at commit `{result['git_commit']}`, torch "
        f"{result['torch']}, 1 CPU thread; {result['params']} parameters, trained "
        f"{c['steps']} steps in {result['train_seconds']:.0f} s; calibration {c['calib']} x "
        f"{c['ctx']} bytes. Every Conv1D of the blocks pruned; embeddings and the tied head dense. "
        "Perplexity per byte (increase over dense in parentheses).",
        "",
        "| pattern | "
        + " | ".join(LABELS)
        + " | SparseGPT (auto) / magnitude increase | SparseGPT-block / magnitude |",
        "|---|" + "---:|" * (len(LABELS) + 2),
    ]
    for pat in pats:
        cells = [
            f"{get[(m, pat)]['perplexity']:.3f} (+{get[(m, pat)]['increase']:.3f})" for m in LABELS
        ]
        mag = get[("magnitude", pat)]["increase"]
        ratio = get[("sparsegpt", pat)]["increase"] / mag if mag > 0 else float("nan")
        row = get[("sparsegpt-block", pat)]["increase"] / mag if mag > 0 else float("nan")
        lines.append(f"| {pat} | " + " | ".join(cells) + f" | {ratio:.2f} | {row:.2f} |")
    atomic_write(path, ("\n".join(lines) + "\n").encode())  # a reader never sees half a table


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    get = {(r["method"], r["pattern"]): r for r in result["runs"]}
    pats = list(dict.fromkeys(r["pattern"] for r in result["runs"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    w = 0.8 / len(LABELS)
    for i, m in enumerate(LABELS):
        xs = [j + (i - (len(LABELS) - 1) / 2) * w for j in range(len(pats))]
        ax.bar(xs, [get[(m, p)]["perplexity"] for p in pats], w, label=m)
    ax.axhline(result["dense_perplexity"], color="k", ls=":", label="dense")
    ax.set_xticks(range(len(pats)), pats)
    ax.set_yscale("log")
    ax.set_ylabel("validation perplexity per byte (log)")
    ax.set_title("Byte-level GPT-2 on pydoc_data.topics, one-shot")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)  # atomic, as the table


if __name__ == "__main__":
    main()
