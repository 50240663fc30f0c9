"""Deep Compression's trained quantisation (Han, Mao, Dally 2016, Sec. 3): the kept weights of each
pruned layer share a few values (a per-layer codebook found by k-means), and training fine-tunes
the shared values by the summed gradients of the weights that use them.

* :func:`kmeans_1d`: k-means over a layer's kept weights, with the paper's best initialisation,
  *linear* (centroids evenly spaced between the smallest and largest weight: it keeps centroids
  at the rare large weights, which matter most, where density-based or random initialisation
  crowds them around zero; the paper's Fig. 4 and Table 7).
* :class:`QuantizedWeights`: quantises a model's sparse layers in place and, once per training
  step after ``backward``, moves each centroid by ``-lr *`` the sum of the gradients of its
  members (the paper's Eq. 3 and Fig. 3), then rewrites the weights from the codebook.

Bits: ``b`` bits per weight index, 8 for conv layers and 5 for FC layers by default (the paper's
Table 1 setting). One of the ``2^b`` index values is reserved for the zero that pads a long gap in
the relative-index stream (Han 2016 Sec. 2, "filler zero"), so a layer has at most ``2^b - 1``
shared weights: 31 for FC, 255 for conv. Only kept weights are clustered; pruned weights stay
exactly zero (the mask invariant).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DEFAULT_QUANT_BITS", "QuantizedWeights", "kmeans_1d", "layer_codebook", "sparse_layers"]

DEFAULT_QUANT_BITS = {"fc": 5, "conv": 8}


def sparse_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` for modules with a ``weight`` and a bool ``mask`` buffer of its shape
    (SparseLinear, SparseConv2d, ...), in ``named_modules`` order."""
    out = {}
    for name, m in model.named_modules():
        mask, weight = m._buffers.get("mask"), getattr(m, "weight", None)
        if (
            isinstance(mask, torch.Tensor)
            and isinstance(weight, torch.Tensor)
            and mask.dtype == torch.bool
            and mask.shape == weight.shape
        ):
            out[name] = m
    return out


def layer_kind(weight: torch.Tensor) -> str:
    """``"conv"`` for a weight of more than 2 dims, else ``"fc"``."""
    return "conv" if weight.dim() > 2 else "fc"


def kmeans_1d(
    x: torch.Tensor, k: int, iters: int = 100, init: str = "linear"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on scalars.

    Args:
        x: ``[n]`` values (any float dtype; computed in float64).
        k: clusters, >= 1.
        iters: at most this many assignment / update rounds (stops when no label changes).
        init: ``"linear"`` (the paper's best): ``linspace(min(x), max(x), k)``.

    Returns:
        ``centroids`` float64 ``[k]`` (ascending; an empty cluster keeps its initial value) and
        ``labels`` int64 ``[n]`` (the nearest centroid of each value).
    """
    if init != "linear":
        raise ValueError(f"kmeans_1d: expected init='linear' (the paper's best), got {init!r}")
    if k < 1:
        raise ValueError(f"kmeans_1d: expected k >= 1, got {k}")
    v = x.detach().reshape(-1).to(torch.float64).cpu()
    if v.numel() == 0:
        return torch.zeros(k, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
    if not torch.isfinite(v).all():
        raise ValueError("kmeans_1d: expected finite values, got NaN or inf")
    c = torch.linspace(float(v.min()), float(v.max()), k, dtype=torch.float64)
    labels = None
    for _ in range(iters):
        # centroids stay sorted in 1-D, so the nearest one is found by the midpoints between them
        new = torch.bucketize(v, (c[1:] + c[:-1]) / 2)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, v)
        counts = torch.bincount(labels, minlength=k).to(torch.float64)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
    return c, labels


def layer_codebook(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The codebook of one layer's kept ``values`` ``[n]`` with ``2^bits - 1`` entries at most:
    the distinct values themselves when there are few enough (lossless: an already quantised
    layer keeps its values bit for bit), else :func:`kmeans_1d` with linear initialisation.

    Returns:
        ``codebook`` ``[k]`` in ``values``' dtype and ``labels`` int64 ``[n]`` in ``[0, k)``.
    """
    if not 1 <= bits <= 15:
        raise ValueError(f"layer_codebook: expected 1 <= bits <= 15, got {bits}")
    k = (1 << bits) - 1
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()]
    distinct, labels = torch.unique(values.contiguous().view(ints), return_inverse=True)
    if distinct.numel() <= k:  # exact: bit patterns, so -0.0 stays -0.0
        return distinct.view(values.dtype), labels.reshape(-1)
    c, labels = kmeans_1d(values, k)
    return c.to(values.dtype), labels


class QuantizedWeights:
    """Trained quantisation of a model's sparse layers (weights shared within each layer).

    Construction clusters each sparse layer's kept weights (:func:`layer_codebook`) and writes
    the shared values into the weights in place. Then, in a training loop::

        qw = QuantizedWeights(model)                 # 5 bits FC, 8 bits conv
        for x, y in loader:
            model.zero_grad()
            loss_fn(model(x), y).backward()
            qw.step(lr)                              # centroids -= lr * summed member grads

    or, with any optimizer over ``qw.parameters()`` (the centroids): ``qw.gather_grads()``,
    ``optimizer.step()``, ``qw.write()``. Only the centroids train (biases and other
    parameters are left to the caller); pruned weights stay exactly zero.

    Attributes:
        centroids: ``{layer name: nn.Parameter [k]}`` (float32 for float16 / bfloat16 weights,
            else the weight's dtype).
        labels: ``{layer name: int64 [kept]}``, the centroid of each kept weight, in the order
            of ``weight[mask]``.
        bits: ``{layer name: b}``; a layer has at most ``2^b - 1`` centroids.
    """

    def __init__(self, model: nn.Module, bits: dict[str, int] | None = None) -> None:
        by_kind = dict(DEFAULT_QUANT_BITS)
        by_kind.update(bits or {})
        if unknown := set(by_kind) - {"fc", "conv"}:
            raise ValueError(f"QuantizedWeights: expected bits for 'fc' / 'conv', got {unknown}")
        self.layers = sparse_layers(model)
        if not self.layers:
            raise ValueError(
                "QuantizedWeights: expected a model with sparse layers (a bool 'mask' buffer: "
                "sparsekern.sparsify), got none"
            )
        self.centroids: dict[str, nn.Parameter] = {}
        self.labels: dict[str, torch.Tensor] = {}
        self.bits: dict[str, int] = {}
        for name, layer in self.layers.items():
            w, mask = layer.weight, layer.mask
            b = int(by_kind[layer_kind(w)])
            codebook, labels = layer_codebook(w.detach()[mask], b)
            cdtype = torch.promote_types(w.dtype, torch.float32)
            self.centroids[name] = nn.Parameter(codebook.to(cdtype).to(w.device))
            self.labels[name] = labels.to(w.device)
            self.bits[name] = b
        self.write()

    def parameters(self) -> list[nn.Parameter]:
        """The centroids, one tensor per layer (what an optimizer of the codebooks steps)."""
        return list(self.centroids.values())

    @torch.no_grad()
    def write(self) -> None:
        """Every layer's weights from its codebook: ``weight[mask] = centroids[labels]``."""
        for name, layer in self.layers.items():
            w = layer.weight
            w[layer.mask] = self.centroids[name][self.labels[name]].to(w.dtype)

    @torch.no_grad()
    def gather_grads(self) -> None:
        """``centroid.grad[c] = sum of weight.grad over the kept weights with label c`` (the
        paper's Eq. 3); a layer whose weight has no gradient gets none."""
        for name, layer in self.layers.items():
            c, g = self.centroids[name], layer.weight.grad
            if g is None:
                c.grad = None
                continue
            c.grad = torch.zeros_like(c).index_add_(0, self.labels[name], g[layer.mask].to(c.dtype))

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One fine-tuning step: :meth:`gather_grads`, ``centroid -= lr * grad``, :meth:`write`.
        Does not zero the weights' gradients (the training loop does)."""
        if not lr >= 0 or lr == float("inf"):
            raise ValueError(f"QuantizedWeights.step: expected a finite lr >= 0, got {lr}")
        self.gather_grads()
        for c in self.centroids.values():
            if c.grad is not None:
                c.sub_(lr * c.grad)
        self.write()

    def check(self) -> None:
        """Raise ``ValueError`` if a layer's kept weights are no longer its codebook's values
        (something other than :meth:`write` changed them, e.g. an optimizer over the weights)."""
        for name, layer in self.layers.items():
            want = self.centroids[name].detach()[self.labels[name]].to(layer.weight.dtype)
            got = layer.weight.detach()[layer.mask]
            if not torch.equal(want, got):
                n = int((want != got).sum())
                raise ValueError(
                    f"QuantizedWeights: layer {name!r}: expected its kept weights to be its "
                    f"codebook's values, got {n} that differ (weights trained directly?)"
                )
