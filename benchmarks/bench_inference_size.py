"""State-dict size of a block-pruned layer exported with ``to_inference`` (CPU, ~30 s).

    python benchmarks/bench_inference_size.py            # 4096x4096 fp32, 64x64 blocks

Prints, per kept fraction of blocks, the ``torch.save`` size of the sparse module's state dict
(dense weight + mask) and of the exported ``BlockSparseLinear`` (kept blocks only), and the largest
output difference between the two models.
"""

import argparse
import io

import torch
from torch import nn

from sparsekern.nn import sparsify, to_inference
from sparsekern.pruning.block import prune_blocks_


def saved_bytes(module: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return len(buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--block", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    n = args.size
    mib = n * n * 4 / 2**20
    print(f"{n}x{n} fp32 layer, {args.block}x{args.block} blocks (dense weight {mib:.2f} MiB)")
    for d in (1.0, 0.5, 0.25, 0.1, 0.05):
        model = sparsify(nn.Sequential(nn.Linear(n, n)), block_size=args.block)
        prune_blocks_(model, density=d)
        inf = to_inference(model, format="bsr")
        x = torch.randn(8, n)
        diff = (inf(x) - model(x)).abs().max().item()
        print(
            f"blocks kept {d:<5}: SparseLinear {saved_bytes(model) / 2**20:7.2f} MiB, "
            f"to_inference {saved_bytes(inf) / 2**20:7.2f} MiB, max |diff| {diff:.1e}"
        )


if __name__ == "__main__":
    main()
