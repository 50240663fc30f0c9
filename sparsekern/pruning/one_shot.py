"""One-shot pruning from calibration inputs, without retraining: SparseGPT (Frantar & Alistarh
2023), Wanda (Sun et al. 2023) and magnitude, unstructured or N:M.

::

    report = one_shot(model, calibration, method="sparsegpt", sparsity=0.5)   # or n_m=(2, 4)
    print(format_one_shot_report(report))

``calibration`` is an iterable of batches, each passed to ``model`` as ``model(batch)`` (a
tensor), ``model(*batch)`` (a tuple or list) or ``model(**batch)`` (a dict); it is read once into a
list and traversed several times.

What happens, layer by layer in forward order (sequential, as in the paper):

1. The selected layers (``nn.Linear``, ``nn.Conv2d`` with ``groups == 1`` and zero padding, HF
   transformers' ``Conv1D``) are replaced in place by ``SparseLinear`` / ``SparseConv2d`` /
   ``SparseConv1D`` sharing their parameters (masks all True: outputs unchanged). Already sparse
   ones are used as they are (their mask is recomputed from their current weights).
2. For each layer, in the order the model's forward calls them: the model runs on the whole
   calibration set with a hook that accumulates ``G = X^T X`` (float64 on CPU, float32 on GPU) of
   the layer's inputs as a GEMM operand ``X [tokens, cols]``: a Linear's ``[..., in]`` rows, a
   conv's ``F.unfold`` patches (``cols = in * kh * kw``), a Conv1D's ``[..., nx]`` rows. The forward
   stops right after the layer (an internal exception), so later layers are not run. Since the
   earlier layers are already pruned, their errors propagate into the statistics of the later
   ones. Cost: one (partial) forward pass over the calibration set per layer, plus one to find the
   order; fine for small and medium models. (The paper's implementation caches the inputs of one
   transformer block at a time instead; that needs knowledge of the model's structure.)
3. The layer is pruned from ``G`` (see :mod:`sparsekern.pruning._sparsegpt` and
   :mod:`sparsekern.pruning._wanda`): SparseGPT rewrites the kept weights (OBS reconstruction,
   ``H = 2 G / n``), Wanda and magnitude only choose masks. The new weight is written, then the
   mask is installed with ``set_mask`` (the mask invariant holds; an optimizer's state is zeroed).

Default selection (``layers=None``): every supported layer except those named ``lm_head`` (or
ending in ``.lm_head``) and those whose weight is shared with another module (GPT-2's
``lm_head`` / ``wte`` tie): as in the SparseGPT paper, the transformer blocks' linear layers are
pruned and the embeddings and the head are left dense. ``layers=[...]`` names exactly the layers
to prune (any supported layer, the head included).

Report (a list, one dict per layer, forward order; skipped layers last): ``name``, ``kind``
(``"linear"``, ``"conv2d"``, ``"conv1d"``), ``shape`` (the GEMM view ``[rows, cols]``),
``density`` (kept fraction), ``rel_error`` (``||W X - W' X||^2 / ||W X||^2`` over the calibration
inputs, bias excluded, computed exactly from ``G``), ``tokens`` (rows of ``X``), ``seconds`` (the
solver), ``calib_seconds`` (the forward passes); a skipped layer has ``skipped`` (the reason).
SparseGPT with ``selection="auto"`` adds ``selection`` (what the layer got: ``"row"``,
``"block"`` or ``"magnitude"``), ``percdamp`` (a SparseGPT layer's dampening),
``heldout_distortion`` (where the per-layer candidate was kept: ``{layer option: distortion on
the choosing fold}``), ``guard`` (the same dict on every row: ``kept`` (``"auto"`` or
``"magnitude"``), ``candidate`` (the plan guarded: ``"row@0.01"``, ``"block@1"``,
``"per-layer@0.1"``, ...), ``percdamp`` (its dampening), ``distortion``, ``candidates``
(``{model: {"kl", "top1"}}`` or ``{"mse"}`` on the choosing fold, magnitude's included),
``auto`` and ``magnitude`` (the two compared on the guard folds), ``top1_only_flipped_by``
(``{"auto": c, "magnitude": b}``, KL only), ``heldout_batches`` (the choosing fold's batches; 0:
in-sample) and ``guard_batches`` (the guard folds'; 0: in-sample)); where the guard kept
magnitude, the rows are a magnitude pass's, with ``auto_selection`` (what auto had) added.
``rel_error`` and ``tokens`` are over all calibration batches (the kept model is solved on all).

SparseGPT's mask selection (``selection``):

* ``"auto"`` (default): a choice among whole models by their output on calibration batches that
  no solve of theirs saw, a guard against magnitude pruning on other such batches, and the kept
  model solved on every batch. The batches are split into ``K = min(4, n)`` folds, batch ``i``
  in fold ``i % K``: the last fold (every 4th batch: 3, 7, ...; with 2 or 3 batches the last
  one) chooses, the other ``K - 1`` guard; with 1 batch everything is in-sample.

  1. Distortion: the model's output against the dense model's, mean ``KL(p_dense || p)`` of the
     softmax over the output's last dimension (``distortion="kl"``, the default: the loss of a
     classifier or LM distilled from the dense model) with the fraction of top-1 predictions
     flipped, or ``||y - y_dense||^2 / ||y_dense||^2`` (``distortion="mse"``, for outputs that
     are not logits). The output is the model's tensor, an HF ``ModelOutput``'s ``logits``, or
     the first floating tensor of a tuple.
  2. The choice, each candidate a full sequential pass solved on the batches outside the last
     fold and measured on it: SparseGPT with ``"row"`` and with ``"block"`` selection everywhere
     (N:M: its solver only), at each dampening of ``percdamp`` (None: 0.01, 0.1 and 1.0; a
     number: that one), then ``"per-layer"`` at the best of those's dampening: per layer,
     SparseGPT row, block and the magnitude mask installed in turn, the earlier layers as chosen
     and the later ones dense, the lowest KL (MSE) kept. The lowest KL (MSE) is chosen (ties:
     the first in that order): a plan (each layer's selection) and a dampening.
  3. The guard, cross-fitted: for each guard fold, the plan solved on the batches outside it and
     measured on it, against the all-magnitude model (magnitude masks need no calibration) on
     the same rows, pooled over the folds. The choice's own figures never decide: picking the
     lowest of 7 makes them optimistic. The plan is kept only if its KL (MSE) is no higher and,
     for ``"kl"``, it flips significantly fewer top-1 predictions: with ``b`` rows flipped by
     magnitude only and ``c`` by the plan only, ``b > c`` and ``b - c >= 2 sqrt(b + c)``
     (``_GUARD_Z = 2`` standard errors of the paired difference, a one-sided sign test at
     p ~ 0.02). Then it is solved on every batch; otherwise a magnitude pass is installed:
     where the evidence does not favour SparseGPT, the default is magnitude pruning itself (a
     tie, never a loss on that evidence).

  Why, with the figures (LeNet-300-100, 1 thread, AMD EPYC without AVX-512, test error).
  ``tests/pruning/test_sparsegpt_vs_magnitude.py`` at the issue's size (3 epochs on 60k images,
  2,048 calibration images, 90%): dense 1.93%, magnitude 10.94%, SparseGPT at the paper's
  dampening 0.01 ``"row"`` 24.0% and ``"block"`` 12.98%; ``"block"`` at 0.1 / 0.3 / 1 / 3 / 10:
  9.49 / 7.43 / 6.91 / 9.04 / 10.28%. The dampening is what was wrong: after MNIST
  normalisation 156 of 784 pixels are one constant on the calibration images, their columns of
  ``H`` are collinear, and a 1% ridge lets the OBS update move weight onto inputs that are
  constant on the calibration images and not on the test set (the calibration ``rel_error`` is
  lowest at 0.01 and the test error highest). The default chooses ``"block"`` at 1.0, the
  guard's 1,536 cross-fitted images give ``b = 103``, ``c = 44``: 6.91%, 0.55x magnitude's
  excess error. With one held-out fold of 512 images (the previous guard) the same model gave
  ``b = 21``, ``c = 12``, not significant: it tied magnitude. CI size (10k images, 256
  calibration images: one choosing batch, one guarding): ``"block"`` at 1.0 reaches 10.08%
  against magnitude's 11.53%, but 9 against 9 flips of 128 images shows nothing: magnitude
  (a tie). Lower per-layer reconstruction error need not mean lower end-to-end error, a
  per-layer choice is greedy, and KL and top-1 can rank two models differently (at CI size
  the per-layer candidate at 0.01 had KL 0.269 against magnitude's 0.596 and 13.83% against
  11.53% test error): hence whole-model candidates, and both measures in the guard.
  ``scripts/one_shot_mnist.py`` (10 epochs, dense 1.67%): ``results/one_shot/mnist.md``.

  Cost: the dense outputs on one fold at a time, on the CPU in float32 (log-softmax for
  ``"kl"``: ``rows x outputs``), and one CPU copy of the selected layers' weights and masks;
  sequential passes: 6 for the choice at the 3 dampenings (3 for N:M; 2 with ``percdamp``
  given), the per-layer one (two or three solves and held-out forwards per layer), ``K - 1``
  guard passes and the final one (or a magnitude pass): 11 for ``K = 4``, against 1 for
  ``"row"`` / ``"block"``. An optimizer's state is zeroed where any candidate pruned.
  Deviations from the paper: it prunes with one selection and dampening everywhere, and
  neither wins everywhere (the small LM of ``docs/one_shot.md``: ``"row"`` far better there,
  ``"block"`` on the MNIST MLP).
* ``"row"``: the same count pruned in every row of each 128-column block;
* ``"block"``: one threshold over the ``[rows, 128]`` block, as the reference code does.

Exact densities: SparseGPT ``"row"`` and Wanda prune exactly ``round(sparsity * cols)`` weights
of every row; magnitude and SparseGPT ``"block"`` prune exactly ``round(sparsity * numel)``
weights of each layer (SparseGPT: the block thresholds add up to it by cumulative rounding; rows
may differ); ``"auto"`` one of these per layer (magnitude where the guard keeps it); N:M
keeps N of every M consecutive inputs of a row (a last, shorter group of ``r`` keeps ``min(N, r)``).

Calibration is checked before anything changes: a dry forward pass of the unchanged model over
every batch refuses (``ValueError`` naming the batch) NaN / inf inputs or outputs and batches the
model cannot take (width, dtype, arity); a construction that fails after converting layers puts
the dense ones back.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.nn._sparse_module import is_sparse_module
from sparsekern.nn._swap import replace_module
from sparsekern.nn.masks import set_mask, zero_optimizer_state
from sparsekern.nn.sparse_attention import SparseConv1D, is_hf_conv1d
from sparsekern.nn.sparse_conv2d import SparseConv2d, symmetric_zero_padding
from sparsekern.nn.sparse_linear import SparseLinear
from sparsekern.pruning._sparsegpt import sparsegpt_prune
from sparsekern.pruning._vocab import n_m_pair, renamed_keywords
from sparsekern.pruning._wanda import magnitude_layer_mask, wanda_mask
from sparsekern.pruning.base import BasePruner, Closure

__all__ = ["METHODS", "OneShotPruner", "format_one_shot_report", "one_shot"]

METHODS = ("sparsegpt", "wanda", "magnitude")
SELECTIONS = ("auto", "row", "block")
DISTORTIONS = ("kl", "mse")
_GUARD_Z = 2.0  # standard errors by which auto must flip fewer top-1 outputs (module docstring)
_PAPER_DAMP = 0.01  # SparseGPT's dampening, a fraction of mean(diag H)
# selection="auto"'s dampening grid (percdamp=None): the paper's 0.01 and two decades up, where
# the MNIST MLP at 90% does best ("block" at 1.0: 6.91% test error, at 0.01: 12.98%; docstring)
_AUTO_DAMPS = (0.01, 0.1, 1.0)


class _StopForward(Exception):
    """Raised by a statistics hook once its layer has seen its input: nothing after it runs."""


# ---------------------------------------------------------------------------- layer views
def _kind(module: nn.Module) -> str | None:
    if isinstance(module, SparseConv1D) or is_hf_conv1d(module):
        return "conv1d"
    if type(module) is nn.Linear or isinstance(module, SparseLinear):
        return "linear"
    if type(module) is nn.Conv2d or isinstance(module, SparseConv2d):
        return "conv2d"
    return None


def _unsupported(module: nn.Module, kind: str) -> str | None:
    """Why a layer of a supported type cannot be pruned here, or None."""
    if kind == "conv2d":
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups}): not a single GEMM"
        if symmetric_zero_padding(module) is None:
            return (
                f"padding {module.padding!r} / padding_mode {module.padding_mode!r} is not a "
                "symmetric zero padding"
            )
    if getattr(module, "block_size", None) is not None:
        return "block-sparse layer (block_size set): its mask is block-structured"
    return None


def _to_2d(module: nn.Module, kind: str) -> torch.Tensor:
    """The weight as the GEMM's ``[rows (outputs), cols (inputs)]``."""
    w = module.weight.detach()
    if kind == "conv1d":
        return w.t()
    return w.reshape(w.shape[0], -1)


def _from_2d(t: torch.Tensor, module: nn.Module, kind: str) -> torch.Tensor:
    if kind == "conv1d":
        return t.t().contiguous()
    return t.reshape(module.weight.shape).contiguous()


def _inputs_2d(module: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    """The layer's input ``x`` as the GEMM operand ``[tokens, cols]``."""
    if kind == "conv2d":
        if x.dim() == 3:
            x = x.unsqueeze(0)
        pad = symmetric_zero_padding(module)
        cols = F.unfold(x, module.kernel_size, module.dilation, pad, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def _sparse_version(module: nn.Module, kind: str) -> nn.Module:
    if is_sparse_module(module):
        return module
    if kind == "linear":
        return SparseLinear.from_dense(module)
    if kind == "conv2d":
        return SparseConv2d.from_dense(module)
    return SparseConv1D.from_dense(module)


def _tied(model: nn.Module, name: str, module: nn.Module) -> str | None:
    """The name of another module holding ``module``'s weight Parameter, or None."""
    w = module.weight
    for other_name, other in model.named_modules(remove_duplicate=False):
        if other is module:
            continue
        for p in other._parameters.values():
            if p is w:
                return other_name
    return None


def _is_head(name: str) -> bool:
    return name == "lm_head" or name.endswith(".lm_head")


# ---------------------------------------------------------------------------- calibration
def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _move(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _run(model: nn.Module, batch, device) -> None:
    if isinstance(batch, torch.Tensor):
        model(_move(batch, device))
    elif isinstance(batch, (tuple, list)):
        model(*[_move(b, device) for b in batch])
    elif isinstance(batch, dict):
        model(**{k: _move(v, device) for k, v in batch.items()})
    else:
        raise TypeError(
            f"one_shot: expected calibration batches that are tensors, tuples/lists (passed as "
            f"*args) or dicts (passed as **kwargs), got {type(batch).__name__}"
        )


def _check_calibration(calibration) -> list:
    if isinstance(calibration, torch.Tensor):
        raise TypeError(
            "one_shot: expected an iterable of batches for calibration, got a single tensor: "
            "wrap it in a list ([x]) or split it into batches"
        )
    try:
        batches = list(calibration)
    except TypeError:
        raise TypeError(
            f"one_shot: expected an iterable of batches for calibration, got "
            f"{type(calibration).__name__}"
        ) from None
    if not batches:
        raise ValueError("one_shot: expected at least one calibration batch, got none")
    for b in batches:
        if not isinstance(b, (torch.Tensor, tuple, list, dict)):
            raise TypeError(
                f"one_shot: expected calibration batches that are tensors, tuples/lists (passed "
                f"as *args) or dicts (passed as **kwargs), got {type(b).__name__}"
            )
    return batches


def _tensors(batch):
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, (tuple, list)):
        return [t for b in batch for t in _tensors(b)]
    if isinstance(batch, dict):
        return [t for b in batch.values() for t in _tensors(b)]
    return []


def _describe(batch) -> str:
    if isinstance(batch, torch.Tensor):
        return f"tensor{list(batch.shape)} {batch.dtype}"
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(_describe(b) for b in batch) + ")"
    return type(batch).__name__


@torch.no_grad()
def _dry_run(model: nn.Module, batches: list, check=None) -> None:
    """Run the unchanged model on every calibration batch and refuse (ValueError naming the
    batch) a non-finite input, a batch the model cannot take (width, dtype, arity) or a
    non-finite output, before any layer is replaced or pruned. Cost: one forward pass over the
    calibration set (the procedure itself makes one per layer)."""
    for i, b in enumerate(batches):
        for t in _tensors(b):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"one_shot: expected finite calibration inputs, got NaN/inf in batch {i} "
                    f"({_describe(b)})"
                )
    device = _device(model)
    was = model.training
    model.eval()
    try:
        for i, b in enumerate(batches):
            try:
                out = _run_out(model, b, device)
            except Exception as e:
                raise ValueError(
                    f"one_shot: expected calibration batches the model takes, got batch {i} "
                    f"({_describe(b)}) on which it fails: {type(e).__name__}: {e}"
                ) from e
            for t in _tensors(out):
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ValueError(
                        f"one_shot: expected a finite output of the dense model on the "
                        f"calibration batches, got NaN/inf on batch {i} ({_describe(b)})"
                    )
            if check is not None:
                check(out, i, b)
    finally:
        model.train(was)


def _run_out(model: nn.Module, batch, device):
    if isinstance(batch, torch.Tensor):
        return model(_move(batch, device))
    if isinstance(batch, (tuple, list)):
        return model(*[_move(b, device) for b in batch])
    return model(**{k: _move(v, device) for k, v in batch.items()})


def _folds(n_batches: int) -> list[set[int]]:
    """``selection="auto"``'s folds of the calibration batches: ``K = min(4, n)``, fold ``k``
    the batches ``i`` with ``i % K == k``. The last fold (every 4th batch: 3, 7, ...; the last
    one with 2 or 3 batches) chooses the candidate, the others guard it; one batch: one fold,
    measured in-sample."""
    k = max(1, min(4, n_batches))
    return [set(range(f, n_batches, k)) for f in range(k)]


def _output_tensor(out) -> torch.Tensor:
    """The model output the guard compares: a tensor itself, an HF ``ModelOutput``'s (or a
    dict's) ``logits``, else the first floating tensor of at least one dimension in a
    tuple / list."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor) and o.is_floating_point() and o.dim() >= 1:
                return o
    raise TypeError(
        f"expected a model output that is a tensor, has .logits, or is a tuple/list holding a "
        f"floating tensor, got {type(out).__name__}"
    )


def _guard_output_check(distortion: str):
    """A check for :func:`_dry_run`: the dense model's output fits the guard's ``distortion``."""

    def check(out, i: int, batch) -> None:
        try:
            y = _output_tensor(out)
        except TypeError as e:
            raise ValueError(
                f"one_shot: selection='auto' compares model outputs; on batch {i} "
                f"({_describe(batch)}) {e}"
            ) from None
        if not y.is_floating_point() or y.dim() < 1:
            raise ValueError(
                f"one_shot: expected a floating model output of at least one dimension for the "
                f"guard of selection='auto', got {y.dtype} of shape {list(y.shape)} on batch {i}"
            )
        if distortion == "kl" and y.shape[-1] < 2:
            raise ValueError(
                f"one_shot: expected outputs with a last dimension >= 2 (logits) for "
                f"distortion='kl', got shape {list(y.shape)} on batch {i}: pass distortion='mse'"
            )

    return check


def _rel_error(W: torch.Tensor, W_new: torch.Tensor, G: torch.Tensor) -> float:
    """``||W X - W' X||^2 / ||W X||^2`` over the calibration inputs, exactly from ``G = X^T X``."""
    D = W - W_new
    num = float(((D @ G) * D).sum())
    den = float(((W @ G) * W).sum())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _check_n_m(n_m) -> tuple[int, int] | None:
    return None if n_m is None else n_m_pair(n_m, "one_shot")


# ---------------------------------------------------------------------------- the pruner
class OneShotPruner(BasePruner):
    """One-shot pruning from calibration inputs (module docstring), under the common lifecycle::

        pruner = OneShotPruner(model, calibration=batches, method="sparsegpt", n_m=(2, 4))
        kept = pruner.prune()            # {layer: kept fraction}; pruner.report: per layer
        summary = pruner.finalize()
        fast, how = export_semi_structured(model)    # on a GPU: 2:4 SparseLinear -> cuSPARSELt

    ``step()`` only counts steps (there is no schedule: the method is one-shot); ``prune()`` may be
    called again (e.g. after more training), it re-runs the whole sequential procedure.

    Args:
        model: any ``nn.Module``; its selected layers are replaced in place by sparse ones at
            construction (a model that is itself a dense layer cannot be: wrap it in
            ``nn.Sequential``).
        optimizer: the optimizer training the model, or None (its state is zeroed where pruned).
        calibration: an iterable of batches (tensor / tuple / dict), read into a list.
        method: ``"sparsegpt"``, ``"wanda"`` or ``"magnitude"``.
        sparsity: pruned fraction in [0, 1] (default 0.5); with ``n_m`` it must be ``1 - n/m``
            or None.
        n_m: ``(n, m)``: keep N of every M consecutive inputs (2:4 for sparse tensor cores).
        layers: names of the layers to prune (default: module docstring).
        block_size: SparseGPT's lazy-update column block (128; ``blocksize=`` is the
            deprecated name).
        percdamp: SparseGPT's dampening, a fraction of ``mean(diag H)``: None (default) is the
            paper's 0.01 with ``selection="row"`` / ``"block"``, and with ``"auto"`` a choice
            among 0.01, 0.1 and 1.0 (module docstring); a number is used as given (``"auto"``
            then chooses the selection only).
        compensate: SparseGPT's error-compensation update; False is the ablation (the same mask
            selection, kept weights unchanged).
        selection: SparseGPT's mask selection: ``"auto"`` (default: the lowest held-out model
            distortion among ``"row"`` everywhere, ``"block"`` everywhere (each at every
            dampening of ``percdamp``) and a per-layer choice, then a cross-fitted guard against
            the all-magnitude model, then the kept model solved on every batch; see the module
            docstring),
            ``"row"`` (the same count in every row of a block) or ``"block"`` (one threshold
            over the whole block, as the reference code does). ``"row"`` / ``"block"`` use
            every calibration batch and have no guard. On the small GPT-2 of
            ``docs/one_shot.md`` ``"row"`` is far better, on the MNIST MLP ``"block"`` is.
        distortion: ``selection="auto"``'s measure of the model output against the dense
            model's on the held-out batches: ``"kl"`` (default; the output's last dimension
            are logits, >= 2) or ``"mse"`` (relative squared error, any floating output).
            Refused (``ValueError``) with another method or selection, which do not use it.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        calibration: Iterable,
        method: str = "sparsegpt",
        sparsity: float | None = None,
        n_m: tuple[int, int] | None = None,
        layers: Iterable[str] | None = None,
        block_size: int = 128,
        percdamp: float | None = None,
        compensate: bool = True,
        selection: str = "auto",
        distortion: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"OneShotPruner: expected an nn.Module, got {type(model).__name__}")
        if method not in METHODS:
            raise ValueError(f"one_shot: expected method in {METHODS}, got {method!r}")
        self.n_m = _check_n_m(n_m)
        if self.n_m is not None:
            nominal = 1.0 - self.n_m[0] / self.n_m[1]
            if sparsity is not None and abs(float(sparsity) - nominal) > 1e-12:
                raise ValueError(
                    f"one_shot: expected sparsity None or {nominal:.4g} (the sparsity of "
                    f"{self.n_m[0]}:{self.n_m[1]}), got {sparsity}"
                )
            sparsity = nominal
        elif sparsity is None:
            sparsity = 0.5
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
            raise TypeError(f"one_shot: expected a sparsity in [0, 1], got {sparsity!r}")
        if not 0.0 <= float(sparsity) <= 1.0:
            raise ValueError(f"one_shot: expected a sparsity in [0, 1], got {sparsity}")
        if isinstance(block_size, bool) or not (isinstance(block_size, int) and block_size >= 1):
            raise ValueError(f"one_shot: expected block_size an integer >= 1, got {block_size!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"one_shot: expected selection in {SELECTIONS}, got {selection!r}")
        if percdamp is not None and (
            isinstance(percdamp, bool)
            or not isinstance(percdamp, (int, float))
            or not (percdamp >= 0 and math.isfinite(percdamp))
        ):
            raise ValueError(f"one_shot: expected percdamp None or a number >= 0, got {percdamp!r}")
        guarded = method == "sparsegpt" and selection == "auto"
        if distortion is not None and distortion not in DISTORTIONS:
            raise ValueError(f"one_shot: expected distortion in {DISTORTIONS}, got {distortion!r}")
        if distortion is not None and not guarded:
            raise ValueError(
                f"one_shot: distortion is the measure of selection='auto''s guard (method "
                f"'sparsegpt'), got it with method={method!r}, selection={selection!r}"
            )
        self.distortion = (distortion or "kl") if guarded else None
        self.calibration = _check_calibration(calibration)
        check = _guard_output_check(self.distortion) if guarded else None
        _dry_run(model, self.calibration, check)  # a bad batch fails here, before any change
        self.method = method
        self.block_size = block_size
        self.percdamp = None if percdamp is None else float(percdamp)
        self.compensate = bool(compensate)
        self.selection = selection
        self.skipped: dict[str, tuple[str, str]] = {}  # name -> (kind, reason)
        self.kinds: dict[str, str] = {}
        self._replaced: list[tuple[nn.Module, nn.Module]] = []
        names = self._select(model, layers)
        try:
            if not names:
                raise ValueError(
                    f"one_shot: expected at least one layer to prune, got none (skipped: "
                    f"{ {n: r for n, (_, r) in self.skipped.items()} })"
                )
            super().__init__(model, optimizer, sparsity=float(sparsity), layers=names)
        except Exception:
            for old, new in self._replaced:  # leave the model as it came
                replace_module(model, new, old)
            raise
        self.report: list[dict] = []

    # ------------------------------------------------------------------ selection
    def _select(self, model: nn.Module, layers) -> list[str]:
        if _kind(model) is not None and not is_sparse_module(model):
            raise TypeError(
                f"one_shot: the model is itself a dense {type(model).__name__}, which cannot be "
                "replaced in place: wrap it, e.g. nn.Sequential(layer)"
            )
        found = {n: m for n, m in model.named_modules() if _kind(m) is not None}
        if layers is None:
            wanted = []
            for n, m in found.items():
                if _is_head(n):
                    self.skipped[n] = (_kind(m), "the LM head (left dense by default)")
                elif (other := _tied(model, n, m)) is not None:
                    self.skipped[n] = (_kind(m), f"weight tied with {other!r}")
                else:
                    wanted.append(n)
        else:
            if isinstance(layers, str):
                layers = [layers]
            wanted = list(layers)
            unknown = [n for n in wanted if n not in found]
            if unknown:
                raise KeyError(
                    f"one_shot: expected layer names among the supported layers {list(found)}, "
                    f"got unknown {unknown}"
                )
        names = []
        for n in wanted:
            m, kind = found[n], _kind(found[n])
            why = _unsupported(m, kind)
            if why is not None:
                self.skipped[n] = (kind, why)
                continue
            new = _sparse_version(m, kind)
            if new is not m:
                replace_module(model, m, new)
                self._replaced.append((m, new))
            self.kinds[n] = kind
            names.append(n)
        return names

    # ------------------------------------------------------------------ the procedure
    def compute_masks(self, sparsity, closure: Closure | None = None) -> dict:
        raise NotImplementedError(
            "OneShotPruner prunes sequentially (each layer's inputs come from the pruned layers "
            "before it), which changes the model as it goes: call prune()"
        )

    @torch.no_grad()
    def _order(self, device) -> tuple[list[str], dict[str, int]]:
        """The selected layers in the order the forward first calls them (one calibration
        batch), and how many times each is called per forward."""
        order: list[str] = []
        calls: dict[str, int] = {}
        handles = []
        for n, m in self.layers.items():

            def hook(mod, inputs, n=n):
                calls[n] = calls.get(n, 0) + 1
                if n not in order:
                    order.append(n)

            handles.append(m.register_forward_pre_hook(hook))
        try:
            _run(self.model, self.calibration[0], device)
        finally:
            for h in handles:
                h.remove()
        return order, calls

    @torch.no_grad()
    def _statistics(self, name: str, stop: bool, device, dtype, held: set[int]):
        """``G = X^T X`` of layer ``name``'s inputs with the model as it is now, over the solve
        batches and over the held-out ones (indices in ``held``; ``None`` where no token came),
        their token counts and the seconds taken."""
        module, kind = self.layers[name], self.kinds[name]
        state = {"G": [None, None], "n": [0, 0], "part": 0}  # [solve, held out]

        def hook(mod, inputs):
            x = _inputs_2d(mod, kind, inputs[0].detach()).to(dtype)
            part = state["part"]
            g = x.t() @ x
            old = state["G"][part]
            state["G"][part] = g if old is None else old + g
            state["n"][part] += x.shape[0]
            if stop:
                raise _StopForward

        t0 = time.perf_counter()
        h = module.register_forward_pre_hook(hook)
        try:
            for i, batch in enumerate(self.calibration):
                state["part"] = int(i in held)
                with contextlib.suppress(_StopForward):
                    _run(self.model, batch, device)
        finally:
            h.remove()
        return state["G"], state["n"], time.perf_counter() - t0

    @torch.no_grad()
    def _prune_layer(
        self, name: str, Gs: list, counts: list[int], sparsity, method, score, selection, damp
    ):
        """Prune layer ``name`` from ``Gs = [G_solve, G_heldout]`` (``G_heldout`` None when there
        is no held-out batch) with ``method`` (SparseGPT: ``selection`` ``"row"`` / ``"block"``
        at dampening ``damp``); ``score()``: the model's held-out distortion as it is now (the
        per-layer candidate of ``selection="auto"``: :meth:`_choose`), else None."""
        module, kind = self.layers[name], self.kinds[name]
        G_solve = Gs[0]
        G_all = G_solve if Gs[1] is None else G_solve + Gs[1]
        W = _to_2d(module, kind).to(G_solve.dtype).clone()  # a copy: candidates are written over
        t0 = time.perf_counter()
        extra = {}
        if method == "sparsegpt":
            H = G_solve * (2.0 / counts[0])
            if score is not None:
                (W_new, keep), chosen, extra["heldout_distortion"] = self._choose(
                    module, kind, W, H, sparsity, score, damp
                )
                extra["selection"] = chosen
            else:
                W_new, keep = self._sparsegpt(W, H, sparsity, selection, damp)
        else:
            if method == "wanda":
                col_norm = torch.diagonal(G_solve).clamp_min(0).sqrt()
                keep = wanda_mask(W, col_norm, sparsity, self.n_m)
            else:
                keep = magnitude_layer_mask(W, sparsity, self.n_m)
            W_new = W * keep
        seconds = time.perf_counter() - t0
        rel = _rel_error(W, W_new, G_all)
        module.weight.copy_(_from_2d(W_new, module, kind).to(module.weight.dtype))
        new_mask = _from_2d(keep, module, kind).to(module.mask.device)
        reset = ~new_mask | (new_mask != module.mask)
        set_mask(module, new_mask, self.optimizer)
        for opt in self._others:  # optimizers holding the weights' state, not passed in
            zero_optimizer_state(opt, module.weight, reset)
        return {
            "name": name,
            "kind": kind,
            "shape": list(W.shape),
            "density": float(keep.float().mean()),
            "rel_error": rel,
            "tokens": counts[0] + counts[1],
            "seconds": seconds,
            **extra,
        }

    def _sparsegpt(self, W, H, sparsity, selection, damp):
        return sparsegpt_prune(
            W, H, sparsity, self.n_m, self.block_size, damp, self.compensate, selection
        )

    def _choose(self, module, kind, W, H, sparsity, score, damp):
        """``selection="auto"``'s per-layer candidate, one layer: each option (SparseGPT with
        ``"row"`` and with ``"block"`` selection at dampening ``damp``, one N:M solver for N:M,
        and the magnitude mask without an update) is installed in turn, the earlier layers as
        chosen and the later ones still dense, and the model's distortion on the held-out
        batches measured; the lowest wins (ties: the first in that order). Returns
        ``((W', keep), chosen, {option: distortion})``."""
        cands = {"row": self._sparsegpt(W, H, sparsity, "row", damp)}
        if self.n_m is None:
            cands["block"] = self._sparsegpt(W, H, sparsity, "block", damp)
        keep_m = magnitude_layer_mask(W, sparsity, self.n_m)
        cands["magnitude"] = (W * keep_m, keep_m)
        mask0 = module.mask.clone()
        dist = {}
        for c, (W_c, keep_c) in cands.items():
            module.mask.copy_(_from_2d(keep_c, module, kind))
            module.weight.copy_(_from_2d(W_c, module, kind).to(module.weight.dtype))
            dist[c] = score()
        module.mask.copy_(mask0)  # the caller installs the winner with set_mask
        chosen = min(dist, key=dist.get)
        return cands[chosen], chosen, dist

    # ------------------------------------------------------------------ the guard
    @torch.no_grad()
    def _reference(self, held: list, device) -> list[torch.Tensor]:
        """The dense model's outputs on the held-out batches, on the CPU in float32: log-softmax
        over the last dimension (``distortion="kl"``) or as they are (``"mse"``)."""
        refs = []
        for b in held:
            y = _output_tensor(_run_out(self.model, b, device)).detach().float()
            if self.distortion == "kl":
                y = F.log_softmax(y.reshape(-1, y.shape[-1]), dim=-1)
            refs.append(y.cpu())
        return refs

    @torch.no_grad()
    def _measure(self, held: list, refs: list, device) -> dict:
        """The model's output against the dense model's on the held-out batches, as sums that
        pool over folds (:func:`_figures`): ``kl`` (sum over output rows of ``KL(p_dense ||
        p)``), ``rows``, ``flips`` (bool ``[rows]`` on the CPU, True where the argmax differs;
        empty for ``"mse"``), ``num`` / ``den`` (``||y - y_dense||^2``, ``||y_dense||^2``)."""
        m = {"kl": 0.0, "rows": 0, "num": 0.0, "den": 0.0, "flips": []}
        for b, ref in zip(held, refs):
            y = _output_tensor(_run_out(self.model, b, device)).detach().float()
            ref = ref.to(y.device)
            if self.distortion == "kl":
                logp = F.log_softmax(y.reshape(-1, y.shape[-1]), dim=-1)
                p = ref.exp()
                m["kl"] += float(torch.where(p > 0, p * (ref - logp), 0.0).sum())
                m["flips"].append((logp.argmax(-1) != ref.argmax(-1)).cpu())
                m["rows"] += ref.shape[0]
            else:
                m["num"] += float(((y - ref) ** 2).sum())
                m["den"] += float((ref**2).sum())
        m["flips"] = torch.cat(m["flips"]) if m["flips"] else torch.zeros(0, dtype=torch.bool)
        return m

    def _figures(self, parts: list[dict]) -> dict[str, float]:
        """Pooled figures of :meth:`_measure`'s sums: ``{"kl": mean KL per output row, "top1":
        the fraction of rows flipped}`` (``"kl"``) or ``{"mse": sum num / sum den}``; a
        non-finite value counts as inf."""
        if self.distortion == "kl":
            rows = sum(p["rows"] for p in parts)
            flips = sum(int(p["flips"].sum()) for p in parts)
            d = {"kl": sum(p["kl"] for p in parts) / rows, "top1": flips / rows}
        else:
            num, den = sum(p["num"] for p in parts), sum(p["den"] for p in parts)
            d = {"mse": num / den if den > 0 else (0.0 if num == 0 else math.inf)}
        return {k: v if math.isfinite(v) else math.inf for k, v in d.items()}

    @torch.no_grad()
    def _install_magnitude(self, names: list[str], sparsity: float) -> None:
        """Magnitude masks on ``names`` in place (weights and mask buffers, no optimizer reset):
        for measuring the all-magnitude model's distortion; undone by :meth:`_restore`."""
        for n in names:
            module, kind = self.layers[n], self.kinds[n]
            keep = magnitude_layer_mask(_to_2d(module, kind), sparsity, self.n_m)
            module.mask.copy_(_from_2d(keep, module, kind))
            module.weight.mul_(module.mask)

    @staticmethod
    @torch.no_grad()
    def _restore(layers: dict, saved: dict) -> None:
        for n, (w, mask) in saved.items():
            layers[n].weight.copy_(w)
            layers[n].mask.copy_(mask)

    def _pass(
        self,
        order,
        calls,
        held_idx,
        target,
        device,
        dtype,
        method,
        score=None,
        plan=None,
        damp=None,
    ) -> list[dict]:
        """The sequential layer-by-layer procedure (module docstring) with ``method``; SparseGPT
        takes each layer's selection from ``plan`` (``{layer: "row" | "block" | "magnitude"}``;
        None: the pruner's ``selection``) at dampening ``damp`` (None: the pruner's, else the
        paper's 0.01); ``score``: the per-layer candidate (:meth:`_choose`)."""
        damp = damp if damp is not None else _PAPER_DAMP if self.percdamp is None else self.percdamp
        rows = []
        for n in order:
            Gs, counts, calib_s = self._statistics(n, calls[n] == 1, device, dtype, held_idx)
            if Gs[0] is None or counts[0] == 0:
                self.skipped[n] = (self.kinds[n], "no inputs seen on the calibration set")
                continue
            sel = self.selection if plan is None else plan[n]
            how = "magnitude" if method == "sparsegpt" and sel == "magnitude" else method
            row = self._prune_layer(n, Gs, counts, target, how, score, sel, damp)
            row["calib_seconds"] = calib_s
            rows.append(row)
        return rows

    @torch.no_grad()
    def _guarded_pass(self, order, calls, target, device, dtype) -> list[dict]:
        """``selection="auto"`` (module docstring): candidates chosen on the last fold, the
        chosen one guarded against magnitude on the other folds (cross-fitted: solved without
        the fold it is measured on), then solved on every batch, or magnitude pruning where the
        guard finds no evidence for it. Every row gets ``guard``."""
        folds = _folds(len(self.calibration))
        choose_idx = folds[-1] if len(folds) > 1 else set()
        held = [self.calibration[i] for i in sorted(choose_idx)] or self.calibration
        refs = self._reference(held, device)

        def snapshot() -> dict:  # weights and masks, on the CPU: one copy of the selected layers
            return {
                n: tuple(
                    t.detach().to("cpu", copy=True)
                    for t in (self.layers[n].weight, self.layers[n].mask)
                )
                for n in order
            }

        dense = snapshot()
        self._install_magnitude(order, target)
        m_mag = self._measure(held, refs, device)
        self._restore(self.layers, dense)

        def score() -> float:  # the per-layer choice: KL (or MSE) alone, the smooth measure
            return self._figures([self._measure(held, refs, device)])[self.distortion]

        def run(plan, damp, per_layer=False) -> tuple[list[dict], dict]:
            self._restore(self.layers, dense)
            rows = self._pass(
                order,
                calls,
                choose_idx,
                target,
                device,
                dtype,
                "sparsegpt",
                score if per_layer else None,
                plan,
                damp,
            )
            return rows, self._measure(held, refs, device)

        # 1. the choice, on the last fold: row / block everywhere at each dampening, then the
        # per-layer candidate at the best one's dampening
        damps = _AUTO_DAMPS if self.percdamp is None else (self.percdamp,)
        sels = ("row", "block") if self.n_m is None else ("row",)
        figures, best = {}, None
        for d in damps:
            for sel in sels:
                rows, m = run(dict.fromkeys(order, sel), d)
                label = f"{sel}@{d:g}"
                figures[label] = self._figures([m])
                if best is None or figures[label][self.distortion] < best[2][self.distortion]:
                    best = (label, d, figures[label], m, {r["name"]: sel for r in rows}, rows)
        d = best[1]
        rows, m = run(None, d, per_layer=True)
        label = f"per-layer@{d:g}"
        figures[label] = self._figures([m])
        if figures[label][self.distortion] < best[2][self.distortion]:
            best = (label, d, figures[label], m, {r["name"]: r["selection"] for r in rows}, rows)
        cand, damp, _, m_choice, plan, choice_rows = best
        figures["magnitude"] = self._figures([m_mag])

        # 2. the guard, on the other folds: the chosen candidate solved without the fold
        guard_folds = folds[:-1]
        if guard_folds:
            parts_a, parts_m = [], []
            for f in guard_folds:
                self._restore(self.layers, dense)
                held_f = [self.calibration[i] for i in sorted(f)]
                refs_f = self._reference(held_f, device)
                self._install_magnitude(order, target)
                parts_m.append(self._measure(held_f, refs_f, device))
                self._restore(self.layers, dense)
                self._pass(order, calls, f, target, device, dtype, "sparsegpt", None, plan, damp)
                parts_a.append(self._measure(held_f, refs_f, device))
                del refs_f
        else:  # one batch: in-sample, the choice's own figures
            parts_a, parts_m = [m_choice], [m_mag]
        d_auto, d_mag = self._figures(parts_a), self._figures(parts_m)
        flips_a = torch.cat([p["flips"] for p in parts_a])
        flips_m = torch.cat([p["flips"] for p in parts_m])
        # top-1, paired over the guard's rows: b rows flipped by magnitude only, c by auto only
        b = int((flips_m & ~flips_a).sum())
        c = int((flips_a & ~flips_m).sum())
        worse = d_auto[self.distortion] > d_mag[self.distortion]
        if self.distortion == "kl" and not (b > c and b - c >= _GUARD_Z * math.sqrt(b + c)):
            worse = True  # no evidence that auto flips fewer top-1 predictions than magnitude

        # 3. the kept model, solved on every batch
        self._restore(self.layers, dense)
        if worse:
            rows = self._pass(order, calls, set(), target, device, dtype, "magnitude")
            for r in rows:  # what auto had chosen, for the record
                r["selection"] = "magnitude"
                r["auto_selection"] = plan[r["name"]]
            kept = "magnitude"
        else:
            rows = self._pass(
                order, calls, set(), target, device, dtype, "sparsegpt", None, plan, damp
            )
            choice = {r["name"]: r for r in choice_rows}
            for r in rows:
                r["selection"] = plan[r["name"]]
                if plan[r["name"]] != "magnitude":
                    r["percdamp"] = damp
                if "heldout_distortion" in choice[r["name"]]:
                    r["heldout_distortion"] = choice[r["name"]]["heldout_distortion"]
            kept = "auto"
        guard = {
            "kept": kept,
            "candidate": cand,
            "percdamp": damp,
            "distortion": self.distortion,
            "auto": d_auto,
            "magnitude": d_mag,
            "candidates": figures,
            "heldout_batches": len(choose_idx),
            "guard_batches": sum(len(f) for f in guard_folds),
        }
        if self.distortion == "kl":
            guard["top1_only_flipped_by"] = {"magnitude": b, "auto": c}
        for r in rows:
            r["guard"] = dict(guard)
        return rows

    def prune(self, sparsity: float | None = None, closure: Closure | None = None) -> dict:
        """Run the sequential procedure (module docstring) at ``sparsity`` (default: the
        constructor's); fills :attr:`report`. Returns ``{layer: kept fraction}``."""
        target = (
            self._default_target()
            if sparsity is None
            else self._check_target(sparsity, "prune(sparsity)")
        )
        if self.n_m is not None and abs(target - self.sparsity) > 1e-12:
            raise ValueError(
                f"OneShotPruner.prune: expected the sparsity of {self.n_m[0]}:{self.n_m[1]}, "
                f"{self.sparsity:.4g}, got {target}"
            )
        self._others = self._other_optimizers()
        device = _device(self.model)
        dtype = torch.float64 if device.type == "cpu" else torch.float32
        guarded = self.method == "sparsegpt" and self.selection == "auto"
        was_training = self.model.training
        self.model.eval()
        try:
            order, calls = self._order(device)
            for n in self.layers:
                if n not in order:
                    self.skipped[n] = (self.kinds[n], "not called by the forward")
            if not guarded:
                rows = self._pass(order, calls, set(), target, device, dtype, self.method)
            else:
                rows = self._guarded_pass(order, calls, target, device, dtype)
        finally:
            self.model.train(was_training)
        rows += [{"name": n, "kind": k, "skipped": why} for n, (k, why) in self.skipped.items()]
        self.report = rows
        self.rounds += 1
        self.history.append(
            {
                "step": self.steps,
                "round": self.rounds,
                "target": target,
                "sparsity": self.current_sparsity(),
                "kept": self.kept_fractions(),
                "changed": True,
            }
        )
        return self.kept_fractions()

    def _config(self) -> dict:
        return {
            "method": self.method,
            "n_m": None if self.n_m is None else list(self.n_m),
            "block_size": self.block_size,
            "percdamp": self.percdamp,
            "compensate": self.compensate,
            "selection": self.selection,
            # only where used: a state saved with row / block / Wanda / magnitude before the
            # guard existed still loads; an "auto" one (another procedure then) is refused
            **({} if self.distortion is None else {"distortion": self.distortion}),
        }

    def _extra_state(self) -> dict:
        return {"report": [dict(r) for r in self.report]}

    def _load_extra_state(self, state: dict) -> None:
        self.report = [dict(r) for r in state.get("report", [])]


@renamed_keywords
def one_shot(
    model: nn.Module,
    calibration: Iterable,
    method: str = "sparsegpt",
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    layers: Iterable[str] | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    block_size: int = 128,
    percdamp: float | None = None,
    compensate: bool = True,
    selection: str = "auto",
    distortion: str | None = None,
) -> list[dict]:
    """Prune ``model`` in place, one shot, from ``calibration`` (module docstring).

    Args:
        model: any ``nn.Module`` with ``nn.Linear`` / ``nn.Conv2d`` / HF ``Conv1D`` layers (or
            their sparse versions); they become ``SparseLinear`` / ``SparseConv2d`` /
            ``SparseConv1D`` with their masks set.
        calibration: an iterable of batches: tensors (``model(x)``), tuples/lists
            (``model(*b)``) or dicts (``model(**b)``).
        method: ``"sparsegpt"``, ``"wanda"`` or ``"magnitude"``.
        sparsity: pruned fraction in [0, 1]; default 0.5, or with ``n_m`` the pattern's
            ``1 - n/m`` (another value with ``n_m`` raises ``ValueError``).
        n_m: ``(n, m)``, e.g. ``(2, 4)``: N:M instead of unstructured.
        layers: names of the layers to prune; default every supported layer but the LM head and
            tied weights.
        optimizer: zero its state where pruned.
        block_size, percdamp, compensate, selection, distortion: SparseGPT's options (see
            :class:`OneShotPruner`).

    Returns:
        The per-layer report (module docstring); :func:`format_one_shot_report` prints it.
    """
    pruner = OneShotPruner(
        model,
        optimizer,
        calibration=calibration,
        method=method,
        sparsity=sparsity,
        n_m=n_m,
        layers=layers,
        block_size=block_size,
        percdamp=percdamp,
        compensate=compensate,
        selection=selection,
        distortion=distortion,
    )
    pruner.prune()
    return pruner.report


def format_one_shot_report(report: list[dict]) -> str:
    """The report as a markdown table (with a ``selection`` column where SparseGPT's
    ``selection="auto"`` chose: the layer's pick, and what the guard kept)."""
    auto = any("guard" in r for r in report)
    lines = [
        "| layer | kind | shape | density | rel. error | solver s | calib s |"
        + (" selection |" if auto else ""),
        "|---|---|---|---:|---:|---:|---:|" + ("---|" if auto else ""),
    ]
    for r in report:
        if "skipped" in r:
            lines.append(
                f"| {r['name']} | {r['kind']} | | | | | skipped: {r['skipped']} |"
                + (" |" if auto else "")
            )
            continue
        rows, cols = r["shape"]
        line = (
            f"| {r['name']} | {r['kind']} | {rows}x{cols} | {r['density']:.4f} | "
            f"{r['rel_error']:.4g} | {r['seconds']:.3f} | {r['calib_seconds']:.3f} |"
        )
        if auto:
            g = r.get("guard")
            if g is None:
                line += " |"
            else:
                figs = ", ".join(
                    f"{k} {g['auto'][k]:.4g} vs {g['magnitude'][k]:.4g}" for k in g["auto"]
                )
                pick = r["selection"]
                if g["distortion"] == "kl":
                    o = g["top1_only_flipped_by"]
                    figs += f"; top-1 flips by one only {o['auto']} vs {o['magnitude']}"
                line += (
                    f" {pick} (guard kept {g['kept']}, auto = {g['candidate']}: auto vs "
                    f"magnitude {figs}) |"
                )
        lines.append(line)
    return "\n".join(lines)
