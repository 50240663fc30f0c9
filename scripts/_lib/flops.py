"""Training compute of a run that prunes part-way (Early-CROP), against the same budget pruned
after training (dense all the way), in multiply-accumulates (MACs) of the pruned layers.

Per layer and example, the forward MACs are ``weights x positions``: a linear layer's ``in x out``
(one position), a convolution's ``out_ch x in_ch / groups x kh x kw`` at each of its ``H_out x
W_out`` output positions. A training step costs 3 forwards per layer (the forward, the input
gradient and the weight gradient, each one multiply-add per weight and position) times the batch.
After pruning a layer costs its kept weights' share, ``kept x positions`` (the sparse kernels skip
pruned weights). Not counted: biases, activations, the loss, the optimizer, and the pruning's own
scoring passes (Early-CROP's double backward on one batch per round, a few dozen batches at most
against the thousands of training steps).
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekern.pruning._hooks import hooked_forward

__all__ = ["early_prune_compute", "layer_positions"]

PASSES = 3  # forward, input gradient, weight gradient


@torch.no_grad()
def layer_positions(layers: dict[str, nn.Module], model: nn.Module, x: torch.Tensor) -> dict:
    """``{layer: output positions per example}`` (1 for a linear layer on ``[B, in]``,
    ``H_out x W_out`` for a 2-d convolution), from one forward of ``x`` (``[B, ...]``)."""
    out, hooks = {}, []
    for name, mod in layers.items():
        rows = mod.weight.shape[0]  # output features / channels ([out, in, ...] layout)

        def hook(m, inp, y, name=name, rows=rows):
            out[name] = y.numel() // (y.shape[0] * rows)

        hooks.append((mod, hook))
    hooked_forward(model, hooks, x)  # eval mode, no grad, training mode restored
    return out


def early_prune_compute(
    layers: dict[str, nn.Module], positions: dict, batch: int, steps_dense: int, steps_total: int
) -> dict:
    """Training MACs of ``steps_dense`` dense steps then ``steps_total - steps_dense`` steps at
    each layer's current mask, against ``steps_total`` dense steps (pruning after training).

    Returns:
        ``{"macs_dense_step", "macs_sparse_step", "macs_training", "macs_prune_after",
        "flops_saved"}``: per-step MACs (forward + backward, whole batch), the totals, and
        ``1 - macs_training / macs_prune_after``. FLOPs are 2 x MACs; the fraction is the same.
    """
    dense = sum(layers[n].weight.numel() * p for n, p in positions.items())
    kept = sum(int(layers[n].mask.count_nonzero()) * p for n, p in positions.items())
    per_dense, per_sparse = PASSES * batch * dense, PASSES * batch * kept
    total = steps_dense * per_dense + (steps_total - steps_dense) * per_sparse
    after = steps_total * per_dense
    return dict(macs_dense_step=per_dense, macs_sparse_step=per_sparse, macs_training=total,
                macs_prune_after=after, flops_saved=1.0 - total / after)  # fmt: skip
