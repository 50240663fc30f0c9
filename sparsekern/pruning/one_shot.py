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
``"block"`` or ``"magnitude"``) and ``heldout_errors`` (``{candidate: held-out error}``).

SparseGPT's mask selection (``selection``), per layer:

* ``"auto"`` (default): the candidate with the lowest reconstruction error on *held-out*
  calibration tokens, two-fold (the hook splits the layer's input tokens into alternate halves
  ``G_0``, ``G_1``; each candidate is solved on one half and measured on the other, and back),
  among SparseGPT with ``"row"`` and with ``"block"`` selection (N:M: the one N:M solver) and the
  magnitude mask without an update; the chosen SparseGPT variant is then solved on all tokens.
  Deviation from the paper, and why: neither selection wins everywhere (MNIST LeNet-300-100,
  90%: ``"block"`` 9.6% vs ``"row"`` 15.5% test error; Adam-trained MLPs the reverse), and where
  the calibration has few tokens for the layer's width the OBS update fits noise, so SparseGPT
  lost to magnitude pruning (LeNet-300-100 on 10k images, 256 calibration images: ``"row"``
  20.2%, magnitude 11.4%, ``"auto"`` 10.5%). In-sample the update always looks better, hence
  held out. Cost: four solves on half the tokens and one on all (``"row"`` / ``"block"``: one).
* ``"row"``: the same count pruned in every row of each 128-column block;
* ``"block"``: one threshold over the ``[rows, 128]`` block, as the reference code does.

Exact densities: SparseGPT ``"row"`` and Wanda prune exactly ``round(sparsity * cols)`` weights
of every row; magnitude and SparseGPT ``"block"`` prune exactly ``round(sparsity * numel)``
weights of each layer (SparseGPT: the block thresholds add up to it by cumulative rounding; rows
may differ); ``"auto"`` one of these per layer; N:M keeps N of every M consecutive inputs of a
row (a last, shorter group of ``r`` keeps ``min(N, r)``).

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
def _dry_run(model: nn.Module, batches: list) -> None:
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
    finally:
        model.train(was)


def _run_out(model: nn.Module, batch, device):
    if isinstance(batch, torch.Tensor):
        return model(_move(batch, device))
    if isinstance(batch, (tuple, list)):
        return model(*[_move(b, device) for b in batch])
    return model(**{k: _move(v, device) for k, v in batch.items()})


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
        block_size, percdamp: SparseGPT's lazy-update column block (128) and dampening (0.01)
            (``blocksize=`` is the deprecated name).
        compensate: SparseGPT's error-compensation update; False is the ablation (the same mask
            selection, kept weights unchanged).
        selection: SparseGPT's mask selection: ``"auto"`` (default: per layer, the lowest
            held-out reconstruction error among ``"row"``, ``"block"`` and the magnitude mask;
            see the module docstring), ``"row"`` (the same count in every row of a block) or
            ``"block"`` (one threshold over the whole block, as the reference code does). On
            the small GPT-2 of ``docs/one_shot.md`` ``"row"`` is far better, on the MNIST MLP
            ``"block"`` is.
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
        percdamp: float = 0.01,
        compensate: bool = True,
        selection: str = "auto",
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
        if not (percdamp >= 0 and math.isfinite(percdamp)):
            raise ValueError(f"one_shot: expected percdamp >= 0, got {percdamp}")
        self.calibration = _check_calibration(calibration)
        _dry_run(model, self.calibration)  # a bad batch fails here, before any layer changes
        self.method = method
        self.block_size = block_size
        self.percdamp = float(percdamp)
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
    def _statistics(self, name: str, stop: bool, device, dtype):
        """``G = X^T X`` of layer ``name``'s inputs over the calibration set, with the model as it
        is now, as two halves (alternate tokens: ``X_0 = X[0::2]``, ``X_1 = X[1::2]``, for the
        held-out choice of ``selection="auto"``), their token counts and the seconds taken."""
        module, kind = self.layers[name], self.kinds[name]
        state = {"G": [None, None], "n": [0, 0]}

        def hook(mod, inputs):
            x = _inputs_2d(mod, kind, inputs[0].detach()).to(dtype)
            first = (state["n"][0] + state["n"][1]) % 2  # the global token index's parity
            for half, part in ((first, x[0::2]), (1 - first, x[1::2])):
                g = part.t() @ part
                old = state["G"][half]
                state["G"][half] = g if old is None else old + g
                state["n"][half] += part.shape[0]
            if stop:
                raise _StopForward

        t0 = time.perf_counter()
        h = module.register_forward_pre_hook(hook)
        try:
            for batch in self.calibration:
                with contextlib.suppress(_StopForward):
                    _run(self.model, batch, device)
        finally:
            h.remove()
        return state["G"], state["n"], time.perf_counter() - t0

    @torch.no_grad()
    def _prune_layer(self, name: str, halves: list, counts: list[int], sparsity: float):
        module, kind = self.layers[name], self.kinds[name]
        G = halves[0] if halves[1] is None else halves[0] + halves[1]
        n_tokens = sum(counts)
        W = _to_2d(module, kind).to(G.dtype)
        t0 = time.perf_counter()
        extra = {}
        if self.method == "sparsegpt":
            if self.selection == "auto":
                chosen, extra["heldout_errors"] = self._choose(W, halves, counts, sparsity)
                extra["selection"] = chosen
            else:
                chosen = "row" if self.n_m is not None else self.selection
            if chosen == "magnitude":
                keep = magnitude_layer_mask(W, sparsity, self.n_m)
                W_new = W * keep
            else:
                W_new, keep = self._sparsegpt(W, G * (2.0 / n_tokens), sparsity, chosen)
        else:
            if self.method == "wanda":
                keep = wanda_mask(W, torch.diagonal(G).clamp_min(0).sqrt(), sparsity, self.n_m)
            else:
                keep = magnitude_layer_mask(W, sparsity, self.n_m)
            W_new = W * keep
        seconds = time.perf_counter() - t0
        rel = _rel_error(W, W_new, G)
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
            "tokens": n_tokens,
            "seconds": seconds,
            **extra,
        }

    def _sparsegpt(self, W, H, sparsity, selection):
        return sparsegpt_prune(
            W,
            H,
            sparsity,
            self.n_m,
            self.block_size,
            self.percdamp,
            self.compensate,
            "row" if selection == "auto" else selection,
        )

    def _choose(self, W, halves, counts, sparsity) -> tuple[str, dict[str, float]]:
        """``selection="auto"``: the candidate with the lowest reconstruction error on held-out
        calibration tokens, two-fold (solve on one half of the tokens, measure on the other, and
        back): SparseGPT's ``"row"`` and ``"block"`` selections (one for N:M) and the magnitude
        mask (no update). Held out, because in-sample the OBS update always wins, also where it
        fits noise (few calibration tokens for the layer's width)."""
        cands = ["row", "block"] if self.n_m is None else ["row"]
        mag = W * magnitude_layer_mask(W, sparsity, self.n_m)
        if min(counts) == 0:  # one token: no held-out half; in-sample among the solvers
            G = halves[0] if halves[1] is None else halves[0] + halves[1]
            H = G * (2.0 / sum(counts))
            errs = {c: _rel_error(W, self._sparsegpt(W, H, sparsity, c)[0], G) for c in cands}
        else:
            errs = {}
            for c in cands:
                errs[c] = 0.5 * sum(
                    _rel_error(
                        W, self._sparsegpt(W, halves[a] * (2.0 / counts[a]), sparsity, c)[0],
                        halves[1 - a],
                    )
                    for a in (0, 1)
                )  # fmt: skip
            errs["magnitude"] = 0.5 * sum(_rel_error(W, mag, halves[a]) for a in (0, 1))
        return min(errs, key=errs.get), errs

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
        was_training = self.model.training
        self.model.eval()
        rows = []
        try:
            order, calls = self._order(device)
            for n in self.layers:
                if n not in order:
                    self.skipped[n] = (self.kinds[n], "not called by the forward")
            for n in order:
                halves, counts, calib_s = self._statistics(n, calls[n] == 1, device, dtype)
                if halves[0] is None or sum(counts) == 0:
                    self.skipped[n] = (self.kinds[n], "no inputs seen on the calibration set")
                    continue
                row = self._prune_layer(n, halves, counts, target)
                row["calib_seconds"] = calib_s
                rows.append(row)
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
    percdamp: float = 0.01,
    compensate: bool = True,
    selection: str = "auto",
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
        block_size, percdamp, compensate, selection: SparseGPT's options (see
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
    )
    pruner.prune()
    return pruner.report


def format_one_shot_report(report: list[dict]) -> str:
    """The report as a markdown table."""
    lines = [
        "| layer | kind | shape | density | rel. error | solver s | calib s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in report:
        if "skipped" in r:
            lines.append(f"| {r['name']} | {r['kind']} | | | | | skipped: {r['skipped']} |")
            continue
        rows, cols = r["shape"]
        lines.append(
            f"| {r['name']} | {r['kind']} | {rows}x{cols} | {r['density']:.4f} | "
            f"{r['rel_error']:.4g} | {r['seconds']:.3f} | {r['calib_seconds']:.3f} |"
        )
    return "\n".join(lines)
