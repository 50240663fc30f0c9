"""Parameters and MACs of torchvision nets (random init) after L1 channel pruning: what the channel
graph can remove from the nets users bring (ConvNeXt: the MLP hidden units; ViT: the MLP hidden
units and the attention heads, alone and together). Used by
``scripts/prune_structured.py --torchvision``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from sparsekern.formats._files import atomic_write
from sparsekern.pruning.structured import channel_groups, count_macs, count_params, prune_channels
from sparsekern.pruning.structured_heads import attentions
from sparsekern.training.report import write_json

TORCHVISION_NETS = ("convnext_tiny", "vit_b_16", "resnet18", "mobilenet_v2", "vgg16_bn")


def torchvision_rows(
    nets: list[str], amounts: list[float], image_size: int, seed: int, out: Path, commit: str
) -> dict:
    """Prune each net of ``nets`` by L1 at each of ``amounts`` on a ``[1, 3, image_size,
    image_size]`` input (channels; for nets with attention also heads alone, then both);
    writes ``torchvision_<nets>.json`` / ``.md`` under ``out``."""
    import torchvision

    t0, rows = time.time(), []
    x = torch.randn(1, 3, image_size, image_size)
    for name in nets:
        torch.manual_seed(seed)
        net = getattr(torchvision.models, name)().eval()
        groups = channel_groups(net, x)
        base = {"params": count_params(net), "macs": count_macs(net, x)}
        prunable = sum(g["channels"] for g in groups)
        heads = sum(m.num_heads for m in attentions(net).values())
        rows.append(
            {"net": name, "amount": 0.0, "heads": 0.0, **base, "groups": len(groups),
             "prunable": prunable, "attentions": len(attentions(net)), "prunable_heads": heads}
        )  # fmt: skip
        runs = [(a, 0.0) for a in amounts]
        if heads:
            runs += [(0.0, a) for a in amounts] + [(a, a) for a in amounts]
        for amount, h in runs:
            small = prune_channels(net, x, amount=amount, importance="l1", heads=h or None)
            with torch.no_grad():
                assert small(x).shape == net(x).shape
            r = {"net": name, "amount": amount, "heads": h, "params": count_params(small)}
            r["macs"] = count_macs(small, x)
            r["params_x"], r["macs_x"] = r["params"] / base["params"], r["macs"] / base["macs"]
            rows.append(r)
            print(json.dumps(r), flush=True)
    summary = {
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "git_commit": commit,
        "torch": torch.__version__,
        "image_size": image_size,
        "seconds": round(time.time() - t0, 1),
        "results": rows,
    }
    stem = "torchvision_" + "_".join(nets)
    write_json(out / f"{stem}.json", summary)
    lines = [
        f"# Structured pruning (L1, random init) of {','.join(nets)}\n\n`{summary['command']}`"
        f" at `{commit}`, input 3x{image_size}x{image_size}, {summary['seconds']:.0f}"
        " s. Removed: the fraction of each prunable group (MLP hidden units) and of each"
        " attention's heads (`heads=`, L1 of the head's q/k/v rows and out-projection columns)."
        " ConvNeXt's residual width (depthwise convs, LayerNorms over channels) is not pruned"
        " (prune_channels warns).\n",
        "| net | MLP units removed | heads removed | params | params x | MACs | MACs x |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "groups" in r:
            att = (
                f"{r['attentions']} attentions, {r['prunable_heads']} heads"
                if r["attentions"]
                else "no attention"
            )
            lines.append(
                f"| {r['net']} | dense ({r['groups']} groups, {r['prunable']:,} "
                f"prunable units) | dense ({att}) | {r['params']:,} | 1.000 | {r['macs']:,} | "
                "1.000 |"
            )
        else:
            lines.append(
                f"| {r['net']} | {r['amount']:.0%} | {r['heads']:.0%} | {r['params']:,} | "
                f"{r['params_x']:.3f} | {r['macs']:,} | {r['macs_x']:.3f} |"
            )
    atomic_write(out / f"{stem}.md", ("\n".join(lines) + "\n").encode())
    return summary
