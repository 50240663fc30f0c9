"""The experiments' tables: Han et al.'s Table 1 next to a run, the end-of-run report (Table 1,
Table 2's per-layer columns, the compressed file) and the methods comparison table (markdown).

Table 2's per-layer columns are :func:`sparsekern.pruning.layer_report` /
:func:`sparsekern.pruning.format_report`.
"""

from __future__ import annotations

__all__ = [
    "format_results",
    "format_table1",
    "label_rows",
    "methods_table",
    "table1_rows",
]

METRIC_NAMES = {"error": "Error", "top1_error": "Top-1 err", "top5_error": "Top-5 err"}


def table1_rows(
    paper: dict, dense: dict | None, pruned: dict, params_dense: int, params_pruned: int
) -> list[dict]:
    """Han et al.'s Table 1 rows for one network, the paper's and this run's.

    Args:
        paper: ``{"name", "dense": {metric: %}, "pruned": {metric: %}, "params_dense",
            "params_pruned", "compression"}`` (``models.paper.HAN_2015``); metrics ``"error"``
            (MNIST) or ``"top1_error"`` / ``"top5_error"`` (ImageNet).
        dense: this run's metrics of the net pruning started from (None: no dense net, e.g.
            SNIP or RigL, which are sparse from the start).
        pruned: this run's metrics of the pruned net.
        params_dense, params_pruned: this run's parameters (weights + biases).
    """
    name = paper["name"]
    keys = list(paper["dense"])
    pick = lambda d: None if d is None else {k: d[k] for k in keys}  # noqa: E731
    return [
        {"network": f"{name} Ref (paper)", **pick(paper["dense"]),
         "parameters": paper["params_dense"], "compression": None},
        {"network": f"{name} Pruned (paper)", **pick(paper["pruned"]),
         "parameters": paper["params_pruned"], "compression": paper["compression"]},
        {"network": f"{name} Ref (this run)", **(pick(dense) or dict.fromkeys(keys)),
         "parameters": params_dense if dense is not None else None, "compression": None},
        {"network": f"{name} Pruned (this run)", **pick(pruned),
         "parameters": params_pruned, "compression": params_dense / params_pruned},
    ]  # fmt: skip


def _params(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def format_table1(rows: list[dict]) -> str:
    """The rows of :func:`table1_rows` as a text table."""
    keys = [k for k in rows[0] if k in METRIC_NAMES]
    width = max(len(r["network"]) for r in rows) + 2
    head = f"{'Network':<{width}}" + "".join(f"{METRIC_NAMES[k]:>11}" for k in keys)
    lines = [head + f"{'Parameters':>12}{'Compression':>13}"]
    for r in rows:
        vals = "".join(f"{'-':>11}" if r[k] is None else f"{r[k]:>10.2f}%" for k in keys)
        comp = "" if r["compression"] is None else f"{r['compression']:.1f}x"
        lines.append(f"{r['network']:<{width}}{vals}{_params(r['parameters']):>12}{comp:>13}")
    return "\n".join(lines)


def methods_table(summaries: list[dict], networks: dict, paper: dict) -> str:
    """A markdown table of MNIST method runs (their ``summary.json``), sorted by model, target
    sparsity, budget and method: test error, sparsity reached, the papers' figures, wall time,
    kept % per layer. N:M runs show their pattern beside the method (``nm 1:10``, ``srste 2:4``);
    Early-CROP runs get a line under the table: where they pruned, and the training MACs against
    the same budget pruned after training (``summary["early_crop"]``).

    Args:
        summaries: the runs' summaries (``args`` with ``model``, ``method``, ``sparsity``).
        networks: ``{model: network name}``.
        paper: ``{model: {method: [(sparsity %, error %), ...]}}``.
    """
    rows, crop = [], []
    order = ("han", "global", "gradual", "snip", "rigl", "scl", "gap", "gibbs", "earlycrop", "nm",
             "nmdecay", "nmstruct", "srste")  # fmt: skip
    for s in summaries:
        a = s["args"]
        per = ", ".join(f"{n} {v:.1f}" for n, v in s["kept_pct"].items() if n != "total")
        ref = paper.get(a["model"], {}).get(a["method"], [])
        target, nm = a.get("sparsity"), _nm_pattern(a)
        if a.get("nm"):  # an N:M pattern given instead of a sparsity: its own
            target = 1 - a["nm"][0] / a["nm"][1]
        figures = "; ".join(
            f"{sp:g}% / {e:g}%"
            for sp, e in ref
            if a["method"] != "snip" or (target is not None and sp == round(100 * target))
        )
        rank = order.index(a["method"]) if a["method"] in order else len(order)
        rows.append(
            (a["model"], target or 0.0, s["epochs"], rank, nm, a["method"], s["error_pct"],
             100 * s["sparsity"], figures or "-", s["wall_time_s"], per)
        )  # fmt: skip
        if s.get("early_crop"):
            crop.append((a["model"], target or 0.0, s["epochs"], s["early_crop"]))
    rows.sort()
    out = [
        "| model | target sparsity | method | epochs | test error % | sparsity reached % "
        "| paper: sparsity / error | wall s | kept % per layer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, sp, epochs, _, nm, method, err, reached, figures, wall, per in rows:
        method = f"{method} {nm}" if nm else method
        out.append(
            f"| {networks.get(model, model)} | {100 * sp:.0f}% | {method} | {epochs} | "
            f"{err:.2f} | {reached:.2f} | {figures} | {wall:.0f} | {per} |"
        )
    for model, sp, epochs, c in sorted(crop, key=lambda r: r[:3]):
        at = "never" if c["pruned_at_epoch"] is None else (
            f"end of epoch {c['pruned_at_epoch']} (step {c['pruned_at_step']}, "
            f"{100 * c['pruned_at_fraction']:.0f}% of the budget)")  # fmt: skip
        out.append(
            f"\nearlycrop, {networks.get(model, model)} {100 * sp:.0f}%, {epochs} epochs: pruned "
            f"at the {at}; training {c['macs_training'] / 1e12:.3g} TMAC vs "
            f"{c['macs_prune_after'] / 1e12:.3g} pruning after training: "
            f"{100 * c['flops_saved']:.1f}% of the FLOPs saved"
        )
    return "\n".join(out)


def _nm_pattern(args: dict) -> str:
    """``"1:10"`` for a run of the N:M family (its ``--nm``, else 1:round(1 / (1 - s))), else
    ``""``."""
    if args.get("nm"):
        return f"{args['nm'][0]}:{args['nm'][1]}"
    if args["method"] in ("nm", "nmdecay", "nmstruct", "srste") and args.get("sparsity"):
        return f"1:{max(1, round(1 / (1 - args['sparsity'])))}"
    return ""


def format_results(
    table1: list[dict], rows: list[dict], paper_kept: dict, comp: dict, figures: dict, what: str
) -> str:
    """The end-of-run report: Table 1 (``table1_rows``) on ``what`` (e.g. "10,000 test
    images"), the weights-only compression (``figures``: :func:`model_summary`), Table 2's
    per-layer columns (``layer_report`` rows) with the paper's kept % per layer, and the
    compressed file (``save_compressed`` report)."""
    from sparsekern.pruning import format_report

    paper = ", ".join(f"{k} {v:g}%" for k, v in paper_kept.items())
    kb = comp["file_bytes"] / 1e3
    size = f"{kb / 1e3:.2f} MB" if kb >= 1e3 else f"{kb:.1f} KB"
    return "\n".join(
        [
            f"Table 1 (Han et al. 2015) vs this run ({what})",
            format_table1(table1),
            f"(weights only: {figures['weights_dense']:,} -> {figures['weights_kept']:,}, "
            f"{figures['compression_weights']:.1f}x)",
            "",
            f"Table 2 columns, per layer (paper's weights kept: {paper})",
            format_report(rows),
            "",
            f"compressed model {comp['path']}: {size} vs {comp['dense_bytes'] / 1e6:.2f} MB "
            f"dense ({comp['compression_ratio']:.1f}x); index overhead "
            f"{100 * comp['index_overhead']:.1f}% of the values (paper 15.6%)",
        ]
    )


def label_rows(rows: list[dict], names: dict[str, str], keep: dict[str, float]) -> list[dict]:
    """Put the paper's layer names on ``layer_report`` rows, in place: ``names`` is ``{paper
    name: module name}``; each matching row gets ``layer = "fc6 (classifier.1)"``,
    ``paper_name`` and ``paper_weights_kept_pct`` (from ``keep``, kept fractions)."""
    by_module = {m: p for p, m in names.items()}
    for row in rows:
        p = by_module.get(row["layer"])
        if p is not None:
            row["paper_name"], row["paper_weights_kept_pct"] = p, 100 * keep[p]
            row["layer"] = p if p == row["layer"] else f"{p} ({row['layer']})"
    return rows
