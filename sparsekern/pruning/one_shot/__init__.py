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

from sparsekern.pruning.one_shot.pruner import (
    METHODS,
    OneShotPruner,
    format_one_shot_report,
    one_shot,
)

__all__ = ["METHODS", "OneShotPruner", "format_one_shot_report", "one_shot"]
