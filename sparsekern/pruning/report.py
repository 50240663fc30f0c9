"""Per-layer report with the columns of Han et al.'s Table 2 (and Tables 3-5): weights, FLOP,
activation %, weights kept %, FLOP kept %.

Definitions (per example, i.e. per input image):

* ``weights``: elements of the layer's weight (biases are not counted, as in the paper);
* ``flop``: ``2 x weights x output positions`` (one multiply and one add per weight per position;
  positions = ``H_out x W_out`` for a conv, 1 for an FC layer on ``[B, in]``). This is Han's count:
  AlexNet conv1 34,848 weights x 55 x 55 x 2 = 211M FLOP, Table 4;
* ``act_pct``: % of non-zero values among the activations the layer produces, measured on the
  example input in eval mode, as the next layer (in execution order) receives them, i.e. after
  ReLU / pooling; for the last layer, of its raw output. ``input_act_pct`` is the same for the
  layer's own input;
* ``weights_kept_pct``: kept weights (mask True) / weights; 100 for a dense layer;
* ``flop_kept_pct``: FLOP counting kept weights only, ``2 x kept x positions``, / ``flop``; for a
  single layer this equals ``weights_kept_pct``;
* ``flop_kept_act_pct``: also skipping zero inputs: ``flop_kept_pct x input_act_pct / 100``, which
  is how Han's FLOP% column is made (AlexNet conv2: 38% weights x 88% conv1 activations = 33%).

The total row sums weights and FLOP; its percentages are ratios of the sums (the activation % is
non-zero activations over all activations of all layers).
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekern.pruning._hooks import hooked_forward

__all__ = ["layer_report", "format_report"]


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))


@torch.no_grad()
def layer_report(model: nn.Module, example_input: torch.Tensor) -> list[dict]:
    """Measure the Table 2 columns for every Linear / Conv layer (sparse or dense) of ``model``.

    Args:
        model: any model; sparse layers count their ``mask``, dense ones are 100% kept.
        example_input: a batch ``[B, ...]`` for ``model``; its first dimension is the batch (FLOP
            and activations are reported per example). Run in eval mode (dropout off), no grad;
            the model's training mode is restored afterwards.

    Returns:
        One dict per layer in execution order, then a ``"total"`` row, with keys ``layer``,
        ``kind`` (``"conv"``/``"fc"``/``""``), ``weights``, ``weights_kept``, ``flop``,
        ``flop_kept``, ``act_pct``, ``input_act_pct``, ``weights_kept_pct``, ``flop_kept_pct``,
        ``flop_kept_act_pct`` (percentages in [0, 100]; see the module docstring).
    """
    batch = example_input.shape[0]
    stats: dict[str, dict] = {}
    order: list[str] = []

    def hook(name: str):
        def fn(module, inputs, output):
            x = inputs[0]
            s = stats.setdefault(
                name, {"positions": 0.0, "in_nz": 0, "in_n": 0, "out_nz": 0, "out_n": 0}
            )
            if name not in order:
                order.append(name)
            out_units = module.weight.shape[0]
            s["positions"] += output.numel() / (batch * out_units)
            s["in_nz"] += int(x.count_nonzero())
            s["in_n"] += x.numel()
            s["out_nz"] += int(output.count_nonzero())
            s["out_n"] += output.numel()

        return fn

    modules = dict(model.named_modules())
    hooks = [(m, hook(name)) for name, m in modules.items() if _is_layer(m)]
    hooked_forward(model, hooks, example_input)  # eval mode, no grad, training mode restored

    rows = []
    for i, name in enumerate(order):
        m, s = modules[name], stats[name]
        weights = m.weight.numel()
        mask = m._buffers.get("mask")
        kept = int(mask.count_nonzero()) if isinstance(mask, torch.Tensor) else weights
        flop = 2.0 * weights * s["positions"]
        flop_kept = 2.0 * kept * s["positions"]
        in_act = 100.0 * s["in_nz"] / max(s["in_n"], 1)
        if i + 1 < len(order):  # what the next layer receives: after ReLU / pooling
            nxt = stats[order[i + 1]]
            act_nz, act_n = nxt["in_nz"], nxt["in_n"]
        else:
            act_nz, act_n = s["out_nz"], s["out_n"]
        kept_pct = 100.0 * kept / weights if weights else 100.0
        rows.append(
            {
                "layer": name,
                "kind": "conv" if m.weight.dim() > 2 else "fc",
                "weights": weights,
                "weights_kept": kept,
                "flop": flop,
                "flop_kept": flop_kept,
                "act_pct": 100.0 * act_nz / max(act_n, 1),
                "input_act_pct": in_act,
                "weights_kept_pct": kept_pct,
                "flop_kept_pct": 100.0 * flop_kept / flop if flop else 100.0,
                "flop_kept_act_pct": kept_pct * in_act / 100.0,
                "_act": (act_nz, act_n),
            }
        )
    tw = sum(r["weights"] for r in rows)
    tk = sum(r["weights_kept"] for r in rows)
    tf = sum(r["flop"] for r in rows)
    tfk = sum(r["flop_kept"] for r in rows)
    tfa = sum(r["flop"] * r["flop_kept_act_pct"] / 100.0 for r in rows)
    a_nz = sum(r["_act"][0] for r in rows)
    a_n = sum(r["_act"][1] for r in rows)
    for r in rows:
        del r["_act"]
    rows.append(
        {
            "layer": "total",
            "kind": "",
            "weights": tw,
            "weights_kept": tk,
            "flop": tf,
            "flop_kept": tfk,
            "act_pct": 100.0 * a_nz / max(a_n, 1),
            "input_act_pct": float("nan"),
            "weights_kept_pct": 100.0 * tk / tw if tw else 100.0,
            "flop_kept_pct": 100.0 * tfk / tf if tf else 100.0,
            "flop_kept_act_pct": 100.0 * tfa / tf if tf else 100.0,
        }
    )
    return rows


def _human(x: float) -> str:
    """431080 -> '431K', 2.3e6 -> '2.3M' (Han's tables' style)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            v = x / scale
            return f"{v:.0f}{unit}" if v >= 100 else f"{v:.3g}{unit}"
    return f"{x:.0f}"


def format_report(rows: list[dict]) -> str:
    """``rows`` from :func:`layer_report` as a text table (Han's Table 2 columns, plus FLOP% that
    also skips zero input activations)."""
    head = ("Layer", "Weights", "FLOP", "Act%", "Weights%", "FLOP%", "FLOP% (x act)")
    table = [head]
    for r in rows:
        table.append(
            (
                r["layer"],
                _human(r["weights"]),
                _human(r["flop"]),
                f"{r['act_pct']:.0f}%",
                f"{r['weights_kept_pct']:.0f}%",
                f"{r['flop_kept_pct']:.0f}%",
                f"{r['flop_kept_act_pct']:.0f}%",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = []
    for k, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
        if k == 0 or (k == len(table) - 2 and rows and rows[-1]["layer"] == "total"):
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
