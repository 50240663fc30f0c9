"""The table and the figure of scripts/prune_structured.py's LeNet-5 summary."""

from __future__ import annotations

from scripts._lib.figures import save_figure
from sparsekern.formats._files import atomic_write


def write_table(summary, path):
    """The markdown table of a prune_structured.py summary, written atomically."""
    base = next(r for r in summary["results"] if r["method"] == "dense")
    # the "weights" control removes weights, not channels: its row's amount names the channel row
    # whose parameter count it matches
    removed = "removed" + " (weights: same params as)" * any(
        r["method"] == "weights" for r in summary["results"]
    )
    lines = [
        f"# LeNet-5 (+BN) on MNIST: structured pruning\n\n`{summary['command']}` at "
        f"`{summary['git_commit']}`, {summary['seconds']:.0f} s. Dense: {base['error']:.2f}% "
        f"error, {base['macs']:,} MACs, {base['params']:,} params.\n",
        f"| method | {removed} | error % | MACs | FLOP reduction | params "
        "| widths conv1/conv2/fc1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["results"]:
        w = r["widths"]
        red = base["macs"] / r["macs"]
        kept_macs = (
            f" ({r['kept_weight_macs']:,} at kept weights)" if "kept_weight_macs" in r else ""
        )
        lines.append(
            f"| {r['method']} | {r['amount']:.0%} | {r['error']:.2f} | {r['macs']:,}{kept_macs} | "
            f"{red:.2f}x | {r['params']:,} | {w['conv1']}/{w['conv2']}/{w['fc1']} |"
        )
    atomic_write(path, ("\n".join(lines) + "\n").encode())  # a reader never sees half a table


def plot(summary, path, methods):
    """Test error against kept MACs, one line per method of ``methods``, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in summary["results"] if r["method"] == "dense")
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        rs = sorted(
            (r for r in summary["results"] if r["method"] == method), key=lambda r: r["macs"]
        )
        if rs:
            ax.plot(
                [r["macs"] / base["macs"] for r in rs], [r["error"] for r in rs], "o-", label=method
            )
    ax.axhline(base["error"], color="k", ls=":", label="dense")
    ax.axhline(1.0, color="r", ls="--", lw=0.8, label="1% target")
    ax.axvline(1 / 3, color="gray", ls="--", lw=0.8, label="3x fewer FLOPs")
    ax.set_xlabel("kept FLOPs (MACs, fraction of dense)")
    ax.set_ylabel("test error %")
    ax.set_title("LeNet-5 (+BN), MNIST: channel / neuron removal")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)  # atomic, as the table
