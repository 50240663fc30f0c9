"""Dead neurons (Han et al. Sec. 3.5): after pruning, a neuron whose input connections are all
pruned, or whose output connections are all pruned, can be removed with its connections.

Here a "neuron" is an output unit of a sparse layer A (a row of an FC weight, an output channel of
a conv) that feeds the next sparse layer B through a chain of element-wise, dropout, pooling and
flatten ops (see :func:`sparsekern.pruning._graph.find_chains`): LeNet-300-100's
``fc1 -> relu -> fc2``, LeNet-5's ``conv1 -> maxpool -> conv2`` and ``conv2 -> maxpool -> flatten
-> fc1``. Both layers physically shrink: A loses the row (or output channel) with its bias and mask
entries, B loses the matching input column(s) (an input channel for conv -> conv; the channel's
``H*W`` block of columns for conv -> flatten -> FC, flatten being channel-major).

Outputs are preserved (in eval mode, where dropout is the identity):

* no outputs: every weight of B reading the neuron is pruned, so its value never reaches B;
* no inputs: the neuron's pre-activation is its bias ``b_j`` at every position, so what B sees is
  the constant ``c_j = f(b_j)`` (f: the chain's element-wise ops, e.g. ReLU; pooling keeps a
  constant constant). Its contribution ``sum_k (W*M)_B[o, k] c_j`` over the neuron's inputs ``k``
  of B is folded into B's bias before removal. That needs B to have a bias, and for a conv B no
  zero padding (at the border a zero-padded constant is no longer constant); otherwise such a
  neuron is kept unless ``c_j == 0`` (e.g. ReLU of a negative bias), which needs no folding.

Removal repeats until nothing changes: removing a neuron can leave a neuron of the layer before
without outputs, or one of the layer after without inputs.

Parameters are replaced by new, smaller ``nn.Parameter`` objects: build the optimizer again after
calling :func:`remove_dead_neurons`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsekern.pruning._graph import Chain, find_chains, trace
from sparsekern.pruning._layers import layer_kind, require_sparse_layers

__all__ = ["count_dead_neurons", "remove_dead_neurons"]


def _in_alive(a: nn.Module) -> torch.Tensor:
    """``[out_A]`` bool: the neuron keeps at least one input connection."""
    return a.mask.flatten(1).any(1)


def _reads(b: nn.Module, n: int, block: int) -> torch.Tensor:
    """``[n, ...]`` view of B's masked weight per producer neuron: ``[out_B, n, block]`` for an FC
    consumer, ``[out_B, n, kh*kw]`` for a conv consumer."""
    return _per_neuron(b.weight.detach().double() * b.mask, n, block)


def _per_neuron(t: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """``[out_B, in_B(, kh, kw)] -> [out_B, n, k]``: k = block (FC) or kh*kw (conv)."""
    k = math.prod(t.shape[2:]) if t.dim() > 2 else block
    return t.reshape(t.shape[0], n, k)


def _out_alive(b: nn.Module, n: int, block: int) -> torch.Tensor:
    """``[n]`` bool: some kept weight of B reads the neuron."""
    return _per_neuron(b.mask, n, block).any(dim=2).any(dim=0)


def _can_fold_into(b: nn.Module, chain: Chain) -> bool:
    if b.bias is None or not chain.constant_safe:
        return False
    if layer_kind(b) == "conv" and getattr(b, "padding_mode", "zeros") == "zeros":
        pad = b.padding
        if isinstance(pad, str):
            return pad == "valid"
        return all(p == 0 for p in pad)
    return True


def _constants(a: nn.Module, chain: Chain, idx: torch.Tensor) -> torch.Tensor:
    """``[len(idx)]`` float64: what B sees from each input-less neuron ``idx`` of A."""
    n = a.weight.shape[0]
    bias = a.bias.detach() if a.bias is not None else a.weight.new_zeros(n)
    shape = (1, n) + (1,) * (a.weight.dim() - 2)  # conv: [1, C, 1, 1]; pooling is skipped
    c = chain.activation(bias.reshape(shape)).reshape(n)
    return c[idx].double()


@torch.no_grad()
def _analyse(a: nn.Module, b: nn.Module, chain: Chain):
    """(remove [n] bool, bias delta for B [out_B] float64 or None, no_inputs, no_outputs)."""
    n = a.weight.shape[0]
    no_in = ~_in_alive(a)
    no_out = ~_out_alive(b, n, chain.block)
    remove = no_out.clone()
    fold = torch.nonzero(no_in & ~no_out).flatten()
    contrib = None
    if fold.numel():
        c = _constants(a, chain, fold)
        contrib = _reads(b, n, chain.block)[:, fold, :].sum(dim=2) * c  # [out_B, len(fold)]
        needs = (contrib != 0).any(dim=0)
        ok = ~needs | torch.tensor(_can_fold_into(b, chain))
        remove[fold[ok]] = True
    if n and bool(remove.all()):
        # Keep one neuron: a layer of width 0 cannot run (F.conv2d refuses an empty weight).
        # Kept as it is, with its connections, it changes nothing.
        remove[0] = False
    delta = None
    if contrib is not None:
        folded = remove[fold] & (contrib != 0).any(dim=0)
        if folded.any():
            delta = contrib[:, folded].sum(dim=1)
    return remove, delta, no_in, no_out


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.clone(), requires_grad=like.requires_grad)


@torch.no_grad()
def _shrink(a: nn.Module, b: nn.Module, chain: Chain, keep: torch.Tensor, delta) -> None:
    """Drop A's outputs and B's inputs where ``keep`` is False; add ``delta`` to B's bias."""
    a.weight = _param(a.weight[keep], a.weight)
    a.mask = a.mask[keep].clone()
    if a.bias is not None:
        a.bias = _param(a.bias[keep], a.bias)
    n_keep = int(keep.sum())
    if layer_kind(a) == "conv":
        a.out_channels = n_keep
    else:
        a.out_features = n_keep
    if delta is not None:
        b.bias = _param((b.bias.double() + delta).to(b.bias.dtype), b.bias)
    if layer_kind(b) == "conv":
        b.weight = _param(b.weight[:, keep], b.weight)
        b.mask = b.mask[:, keep].clone()
        b.in_channels = n_keep
    else:
        cols = keep.repeat_interleave(chain.block)
        b.weight = _param(b.weight[:, cols], b.weight)
        b.mask = b.mask[:, cols].clone()
        b.in_features = n_keep * chain.block


def _chains(model: nn.Module, who: str) -> list[Chain]:
    require_sparse_layers(model, who)
    graph = trace(model)
    if graph is None:
        raise ValueError(
            f"{who}: expected a model torch.fx can trace (to find which layer feeds which), "
            f"got a {type(model).__name__} that fx cannot trace"
        )
    return find_chains(model, graph)


@torch.no_grad()
def count_dead_neurons(model: nn.Module) -> dict[str, dict[str, int]]:
    """Count, without changing anything, the dead neurons of each chained sparse layer.

    Returns:
        ``{producer layer: {"no_inputs": n, "no_outputs": n, "removable": n}}``; ``removable``
        counts the neurons :func:`remove_dead_neurons` would take out in its first pass.
    """
    modules = dict(model.named_modules())
    out = {}
    for ch in _chains(model, "count_dead_neurons"):
        remove, _, no_in, no_out = _analyse(modules[ch.producer], modules[ch.consumer], ch)
        out[ch.producer] = {
            "no_inputs": int(no_in.sum()),
            "no_outputs": int(no_out.sum()),
            "removable": int(remove.sum()),
        }
    return out


def _snapshot(modules: list[nn.Module]) -> list[tuple[nn.Module, dict]]:
    keys = ("in_features", "out_features", "in_channels", "out_channels")
    snap = []
    for m in modules:
        state = {k: getattr(m, k) for k in keys if hasattr(m, k)}
        state.update(weight=m.weight, bias=m.bias, mask=m.mask)
        snap.append((m, state))
    return snap


def _restore(snap: list[tuple[nn.Module, dict]]) -> None:
    for m, state in snap:
        for k, v in state.items():
            setattr(m, k, v)


@torch.no_grad()
def _eval_output(model: nn.Module, example_input: torch.Tensor) -> torch.Tensor:
    """``model(example_input)`` in eval mode, the training flag restored afterwards."""
    was_training = model.training
    model.eval()
    out = model(example_input)
    model.train(was_training)
    return out


def remove_dead_neurons(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    return_removed: bool = False,
    rtol: float = 1e-4,
    atol: float = 1e-5,
):
    """Remove dead neurons from ``model`` in place (see the module docstring for what qualifies).

    Args:
        model: a model with sparse layers that torch.fx can trace.
        example_input: optional; if given, the model's eval-mode outputs on it are compared before
            and after, and on a mismatch (beyond ``rtol``/``atol``: folding biases reorders float
            sums) the model is restored and ``RuntimeError`` raised.
        return_removed: also return the counts.

    Returns:
        ``model`` (the same object, with smaller layers), or ``(model, removed)`` with
        ``return_removed``, where ``removed = {producer layer: neurons removed}`` for every
        chained producer layer (0 included). The optimizer must be rebuilt afterwards.
    """
    chains = _chains(model, "remove_dead_neurons")
    modules = dict(model.named_modules())
    involved = {n for ch in chains for n in (ch.producer, ch.consumer)}
    snap = _snapshot([modules[n] for n in involved])
    reference = _eval_output(model, example_input) if example_input is not None else None
    removed = {ch.producer: 0 for ch in chains}
    changed = True
    while changed:
        changed = False
        for ch in chains:
            a, b = modules[ch.producer], modules[ch.consumer]
            remove, delta, _, _ = _analyse(a, b, ch)
            if remove.any():
                _shrink(a, b, ch, ~remove, delta)
                removed[ch.producer] += int(remove.sum())
                changed = True
    if reference is not None:
        out = _eval_output(model, example_input)
        if out.shape != reference.shape or not torch.allclose(out, reference, rtol=rtol, atol=atol):
            err = (out - reference).abs().max().item() if out.shape == reference.shape else None
            _restore(snap)
            raise RuntimeError(
                f"remove_dead_neurons: expected unchanged outputs on example_input, got shape "
                f"{list(out.shape)} vs {list(reference.shape)}, max abs difference {err}; the "
                "model was restored"
            )
    return (model, removed) if return_removed else model
