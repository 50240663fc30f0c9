"""N:M sparsity: in every group of M consecutive weights along the input dimension, keep the N
with the largest |w|. 2:4 is the pattern NVIDIA's sparse tensor cores (Ampere and later)
accelerate; general N:M (1:4, 4:8, 1:10, ...) is supported for masks.

Layout: a Linear weight ``[out, in]`` is grouped along ``in``; a conv weight
``[out, in/g, kh, kw]`` along the flattened ``in/g * kh * kw`` (the GEMM's reduction dimension,
which is how im2col convolutions feed sparse tensor cores). When that dimension is not a multiple
of M, the last group is shorter (``r < M`` weights) and keeps ``min(N, r)``.

Export: :func:`export_semi_structured` turns 2:4-pruned Linear layers into
``torch.sparse.to_sparse_semi_structured`` weights for inference, on GPUs that support it (compute
capability 8.0+); elsewhere it raises :class:`SemiStructuredUnsupported` with the reason.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sparsekern.pruning._vocab import n_m_pair, n_m_positional, renamed_keywords
from sparsekern.pruning.base import BasePruner, Closure
from sparsekern.pruning.importance import check_finite

__all__ = [
    "NMPruner",
    "SemiStructuredUnsupported",
    "check_nm",
    "export_semi_structured",
    "nm_mask",
    "semi_structured_support",
]


def _groups(t: torch.Tensor, m: int, fill: float) -> tuple[torch.Tensor, int]:
    """``t`` ``[out, ...]`` -> ``[out, G, m]`` along the flattened trailing dims, padded with
    ``fill`` to a multiple of ``m``; returns it and the unpadded width."""
    flat = t.reshape(t.shape[0], -1)
    k = flat.shape[1]
    pad = (-k) % m
    if pad:
        flat = torch.cat([flat, flat.new_full((flat.shape[0], pad), fill)], dim=1)
    return flat.view(flat.shape[0], -1, m), k


@renamed_keywords
def nm_mask(weight: torch.Tensor, n_m: tuple[int, int] = (2, 4), *deprecated_m) -> torch.Tensor:
    """The N:M mask of ``weight`` by magnitude: in every group of ``m`` consecutive weights along
    the input dimension, the ``n`` largest ``|w|`` (ties: the first by ``torch.topk``).

    Args:
        weight: ``[out, in]`` (Linear) or ``[out, in/g, kh, kw]`` (conv; grouped along the
            flattened ``in/g * kh * kw``).
        n_m: ``(n, m)``: keep N of every M, ``1 <= n <= m`` (the old ``nm_mask(w, n, m)``
            still works, with a DeprecationWarning).

    Returns:
        bool, the weight's shape: exactly ``n`` True in every full group of ``m``; a last, shorter
        group of ``r`` weights keeps ``min(n, r)``.
    """
    n, m = n_m_positional(n_m, deprecated_m, "nm_mask")
    if weight.dim() < 2:
        raise ValueError(f"nm_mask: expected a weight of 2 or more dims, got {list(weight.shape)}")
    check_finite(weight, "weight", "nm_mask")
    with torch.no_grad():
        # padding scores -1 < 0 <= |w|: a padded slot is chosen only when the short group has < n
        score, k = _groups(weight.detach().abs().double(), m, -1.0)
        idx = torch.topk(score, n, dim=-1).indices
        keep = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, True)
        return keep.view(weight.shape[0], -1)[:, :k].reshape(weight.shape)


@renamed_keywords
def check_nm(mask: torch.Tensor, n_m: tuple[int, int] = (2, 4), *deprecated_m) -> bool:
    """True iff ``mask`` (bool, a weight's shape) keeps exactly ``n`` of every full group of ``m``
    along the input dimension, and ``min(n, r)`` of a last short group of ``r``
    (``n_m = (n, m)``; the old ``check_nm(mask, n, m)`` warns).

    Raises:
        TypeError: ``mask`` is not a bool tensor (counting a float tensor would sum its values).
    """
    n, m = n_m_positional(n_m, deprecated_m, "check_nm")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(
            f"check_nm: expected a torch.bool mask, got {got} (for a weight: check_nm(w != 0, n_m))"
        )
    groups, k = _groups(mask.to(torch.int32), m, 0)
    counts = groups.sum(-1)
    full = k // m
    ok = bool((counts[:, :full] == n).all())
    if k % m:
        ok = ok and bool((counts[:, full] == min(n, k % m)).all())
    return ok


class NMPruner(BasePruner):
    """N:M magnitude pruning: N of every M consecutive weights along the input dimension.

    Lifecycle::

        pruner = NMPruner(model, opt, n_m=(2, 4))              # every sparse layer
        ... train dense: opt.step(); pruner.step()
        kept = pruner.prune()                                  # one shot: 2 of every 4 kept
        ... fine-tune: opt.step(); pruner.step()               # the pattern stays fixed
        fast, report = export_semi_structured(model)           # 2:4 Linear -> sparse tensor cores

    The target sparsity is the pattern's, ``1 - n / m`` (a ragged last group keeps
    ``min(n, r)``, so a layer whose input size is not a multiple of ``m`` lands slightly
    above). ``prune(sparsity)`` accepts only that value.

    Args:
        model, optimizer, layers, regularization, reg_strength: see :class:`BasePruner`.
        n_m: ``(n, m)``: keep N of every M (``1 <= n <= m``); the old ``n=, m=`` warn.

    Attributes:
        n, m: the pattern.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        n_m: tuple[int, int] = (2, 4),
        **base,
    ) -> None:
        n, m = n_m_pair(n_m, "NMPruner")
        if "sparsity" in base or "schedule" in base:
            raise TypeError("NMPruner: the sparsity is the pattern's, 1 - n/m; pass n_m only")
        super().__init__(model, optimizer, sparsity=1.0 - n / m, **base)
        self.n, self.m = n, m
        self.n_m = (n, m)

    @torch.no_grad()
    def compute_masks(self, sparsity: float, closure: Closure | None = None) -> dict:
        """The N:M mask of each layer's current weights (by magnitude, regardless of the old
        mask: a weight pruned before can be kept, at zero)."""
        if abs(sparsity - self.sparsity) > 1e-12:
            raise ValueError(
                f"NMPruner.prune: expected the sparsity of {self.n}:{self.m}, "
                f"{self.sparsity:.4g}, got {sparsity}"
            )
        masks = {}
        for name, mod in self.layers.items():
            check_finite(mod.weight, name, "NMPruner")
            if getattr(mod, "weight_layout", "out_in") == "in_out":
                # HF Conv1D stores [in, out]: the groups run along the input (reduction) dim,
                # the one sparse tensor cores compress, so group the transpose
                masks[name] = nm_mask(mod.weight.t(), self.n_m).t().contiguous()
            else:
                masks[name] = nm_mask(mod.weight, self.n_m)
        return masks

    def _config(self) -> dict:
        return {"n": self.n, "m": self.m}


class SemiStructuredUnsupported(RuntimeError):
    """Raised by :func:`export_semi_structured` where 2:4 semi-structured sparsity cannot run."""


def semi_structured_support(device: torch.device | str | None = None) -> tuple[bool, str]:
    """``(supported, reason)``: whether ``torch.sparse.to_sparse_semi_structured`` can run here
    (a CUDA GPU of compute capability 8.0+: Ampere, Hopper, ...)."""
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False, f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU: 2:4 semi-structured sparsity needs an NVIDIA GPU (sm_80+)"
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        return False, f"expected a CUDA device for 2:4 semi-structured sparsity, got {dev}"
    cap = torch.cuda.get_device_capability(dev)
    if cap < (8, 0):
        return False, f"GPU compute capability {cap[0]}.{cap[1]} < 8.0: no sparse tensor cores"
    return True, f"CUDA GPU {torch.cuda.get_device_name(dev)} (sm_{cap[0]}{cap[1]})"


def export_semi_structured(
    model: nn.Module, dtype: torch.dtype = torch.float16, device: str | torch.device = "cuda"
) -> tuple[nn.Module, dict[str, str]]:
    """A copy of ``model`` for inference where every 2:4-pruned ``SparseLinear`` (its mask passes
    :func:`check_nm` with 2:4) becomes a plain ``nn.Linear`` whose weight is
    ``torch.sparse.to_sparse_semi_structured(weight)`` in ``dtype`` on ``device``; other layers
    are copied as they are (cast to ``dtype`` and moved).

    torch's semi-structured kernels also need shapes they can tile (for float16, rows a multiple
    of 32 and columns of 64 under CUTLASS); a layer they reject stays a dense ``nn.Linear`` with
    the masked weight, and the reason is reported.

    Returns:
        ``(model, report)``: ``report`` maps each Linear's name to ``"2:4 semi-structured"`` or
        why it was not converted.

    Raises:
        SemiStructuredUnsupported: no GPU that runs 2:4 here (the message says why).
    """
    ok, reason = semi_structured_support(device)
    if not ok:
        raise SemiStructuredUnsupported(f"export_semi_structured: skipped: {reason}")
    from torch.sparse import to_sparse_semi_structured

    from sparsekern.nn import SparseLinear

    out = copy.deepcopy(model).to(device=device, dtype=dtype)
    report: dict[str, str] = {}
    for name, mod in list(out.named_modules()):
        if not isinstance(mod, SparseLinear):
            continue
        dense = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        dense = dense.to(device=device, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(mod.weight * mod.mask)
            if mod.bias is not None:
                dense.bias.copy_(mod.bias)
        if not check_nm(mod.mask, (2, 4)):
            report[name] = "not 2:4: kept dense"
        else:
            try:
                dense.weight = nn.Parameter(
                    to_sparse_semi_structured(dense.weight.detach()), requires_grad=False
                )
                report[name] = "2:4 semi-structured"
            except (RuntimeError, ValueError) as e:  # shape / dtype the kernels cannot tile
                report[name] = f"kept dense: {str(e).splitlines()[0]}"
        parent, _, leaf = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, leaf, dense)
    return out, report
