"""Pruning methods. Every method produces masks on the sparse modules (``sparsekern.nn``); the
kernels consume them.

Han et al. 2015, "Learning both Weights and Connections for Efficient Neural Networks"
------------------------------------------------------------------------------------
Train -> prune -> retrain, optionally repeated (iterative pruning):

* **Threshold** (:func:`han_threshold`): ``quality x std`` of the layer's *surviving* weights
  (population std, float64). New mask = old mask AND ``|w| > threshold``: monotone, so every round
  prunes further and nothing returns. :func:`magnitude_prune_` prunes one layer,
  :func:`prune_model_` a whole model, :func:`quality_for_density` inverts the rule for a target
  kept fraction.
* **Lifecycle** (:class:`HanPruner`): ``prepare()``, ``prune()`` (one round, per-layer qualities,
  optimizer state zeroed through ``set_mask``, dropout adjusted), ``regularization_loss()`` (L2 or
  L1, Caffe weight-decay scaling), ``freeze("conv" | "fc")`` / ``unfreeze()``, ``step()``,
  ``finalize()``; ``schedule=`` or :func:`density_schedule` for iterative pruning.
* **Dropout** (:func:`adjusted_dropout`): ``D_r = D_o sqrt(C_ir / C_io)`` applied to the
  ``nn.Dropout`` modules feeding each layer (:func:`find_dropout_feeds` traces the model).
* **Sensitivity** (:func:`sensitivity_analysis`, :func:`choose_qualities`): one layer at a time
  over a range of qualities; the largest quality per layer within an accuracy budget.
* **Dead neurons** (:func:`remove_dead_neurons`, :func:`count_dead_neurons`): neurons with no
  inputs or no outputs left are removed and the layers shrink; outputs unchanged (constant
  outputs of input-less neurons are folded into the next bias).
* **Report** (:func:`layer_report`, :func:`format_report`): Han's Table 2 columns per layer.
* **Storage**: ``sparsekern.formats.relative_index.save_compressed`` / ``load_compressed``.

Use from any training loop::

    import torch, torch.nn.functional as F
    from sparsekern.nn import sparsify
    from sparsekern.pruning import HanPruner, format_report, layer_report

    model = sparsify(MyNet())                       # masks all True
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pruner = HanPruner(model, quality={"conv": 0.5, "fc": 1.0}, optimizer=opt,
                       regularization="l2", reg_strength=5e-4)

    def train(epochs):
        for _ in range(epochs):
            for x, y in loader:
                loss = F.cross_entropy(model(x), y) + pruner.regularization_loss()
                opt.zero_grad()
                loss.backward()
                opt.step()
                pruner.step()

    train(10)                                       # 1. learn which connections matter
    pruner.prepare()                                # record C_io, dropout p
    for group in opt.param_groups:                  # Han: retrain at 1/10 of the LR (LeNet)
        group["lr"] /= 10
    for _ in range(3):                              # iterative pruning
        kept = pruner.prune()                       # 2. prune: {layer: kept fraction}
        pruner.freeze("conv")                       # 3. retrain FC with conv frozen ...
        train(2)
        pruner.freeze("fc")                         #    ... and conv with FC frozen
        train(2)
        pruner.unfreeze()
    summary = pruner.finalize()                     # {"kept", "total_kept", "compression", ...}
    print(format_report(layer_report(model, example_batch)))
    save_compressed(model, "pruned.skr")            # sparsekern.formats.relative_index

Per-layer qualities from a sensitivity analysis (``evaluate``: model -> validation accuracy)::

    result = sensitivity_analysis(model, evaluate, qualities=[0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
    pruner = HanPruner(model, quality=choose_qualities(result, max_drop=0.005), optimizer=opt)

Hitting Han's kept fractions directly (LeNet-300-100: 8%, 9%, 26%), in three rounds::

    for targets in density_schedule({"fc1": 0.08, "fc2": 0.09, "fc3": 0.26}, rounds=3):
        pruner.prune(density=targets)
        train(2)

Dead neurons, once pruning is done (rebuild the optimizer afterwards)::

    model, removed = remove_dead_neurons(model, example_input=example_batch, return_removed=True)

After Han: global and gradual magnitude, SNIP, RigL, N:M
-------------------------------------------------------
Same lifecycle: construct on a sparsified model with its optimizer, call ``step()`` after every
``opt.step()``; masks change only through ``set_mask`` (pruned and regrown weights and their
optimizer state zeroed). Every pruner has ``kept_fractions()``, ``density()``, ``finalize()``.

**Global magnitude** (Gupta et al. 2022, :class:`GlobalMagnitudePruner`,
:func:`global_magnitude_masks`): all layers ranked together by |w|, exactly
``round((1 - sparsity) N)`` kept, with a per-layer floor ``min_density``::

    pruner = GlobalMagnitudePruner(model, sparsity=0.95, optimizer=opt, min_density=0.01)
    train(epochs=9); pruner.prune(); train(epochs=6)          # prune once, then fine-tune

**Gradual magnitude** (Zhu and Gupta 2017, :class:`GradualPruner`, :func:`cubic_sparsity`):
``s_t = s_f + (s_i - s_f)(1 - (t - t0) / (n dt))^3`` every ``dt`` steps from ``t0`` to
``t0 + n dt``, per layer (``scope="layer"``) or global::

    pruner = GradualPruner(model, final_sparsity=0.9, begin_step=500, end_step=4500,
                           frequency=100, optimizer=opt, scope="layer")
    train(epochs=15)                                          # step() prunes on schedule

**SNIP** (Lee et al. 2019, :class:`SNIPPruner`, :func:`snip_scores`, :func:`snip_masks`): one
shot at initialisation, the largest ``|g * w|`` (dense gradient, one or a few batches) kept
over all layers::

    pruner = SNIPPruner(model, sparsity=0.98, optimizer=opt)
    pruner.prune(lambda b: F.cross_entropy(model(b[0]), b[1]), [next(iter(loader))])
    train(epochs=15)

**RigL** (Evci et al. 2020, :class:`RigLPruner`, :func:`layer_densities` / :func:`erk_densities`):
sparse from step 0 (random masks at exact ERK or uniform densities); every ``delta`` steps
before ``t_end`` drop ``alpha (1 + cos(pi t / t_end)) / 2`` of each layer's smallest |w| and grow
as many where the dense gradient is largest (grown at zero, zeroed optimizer state). ``step``
takes a closure that recomputes the loss on the current batch: it runs (one extra forward +
backward with all-True masks, for the dense gradient) only on update steps::

    pruner = RigLPruner(model, density=0.05, optimizer=opt, total_steps=epochs * len(loader))
    for x, y in loader:
        loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
        pruner.step(lambda: F.cross_entropy(model(x), y))

**N:M** (:class:`NMPruner`, :func:`nm_mask`, :func:`check_nm`): N of every M consecutive weights
along the input dimension (conv: the flattened ``in/g * kh * kw``); 2:4 Linear layers export to
``torch.sparse.to_sparse_semi_structured`` on sm_80+ GPUs (:func:`export_semi_structured`;
raises :class:`SemiStructuredUnsupported` with the reason elsewhere)::

    pruner = NMPruner(model, n=2, m=4, optimizer=opt)
    train(epochs=9); pruner.prune(); train(epochs=6)
    fast, report = export_semi_structured(model.eval())       # fp16, CUDA
"""

from sparsekern.pruning._layers import layer_kind, resolve_per_layer, sparse_layers
from sparsekern.pruning.block import (
    block_magnitude_mask,
    block_scores,
    expand_block_mask,
    prune_blocks_,
)
from sparsekern.pruning.dead_neurons import count_dead_neurons, remove_dead_neurons
from sparsekern.pruning.dropout import (
    adjusted_dropout,
    apply_dropout_adjustment,
    find_dropout_feeds,
)
from sparsekern.pruning.global_magnitude import GlobalMagnitudePruner, global_magnitude_masks
from sparsekern.pruning.gradual import GradualPruner, cubic_sparsity
from sparsekern.pruning.han import FREEZE_KINDS, HanPruner, density_schedule
from sparsekern.pruning.magnitude import (
    han_threshold,
    keep_at_least,
    magnitude_mask,
    magnitude_prune_,
    prune_model_,
    quality_for_density,
)
from sparsekern.pruning.nm import (
    NMPruner,
    SemiStructuredUnsupported,
    check_nm,
    export_semi_structured,
    nm_mask,
    semi_structured_support,
)
from sparsekern.pruning.regularization import regularization_loss
from sparsekern.pruning.report import format_report, layer_report
from sparsekern.pruning.rigl import RigLPruner, erk_densities, layer_densities
from sparsekern.pruning.sensitivity import (
    SensitivityResult,
    choose_qualities,
    sensitivity_analysis,
)
from sparsekern.pruning.snip import SNIPPruner, snip_masks, snip_scores

__all__ = [
    "block_magnitude_mask",
    "block_scores",
    "expand_block_mask",
    "prune_blocks_",
    "FREEZE_KINDS",
    "GlobalMagnitudePruner",
    "GradualPruner",
    "HanPruner",
    "NMPruner",
    "RigLPruner",
    "SNIPPruner",
    "SemiStructuredUnsupported",
    "SensitivityResult",
    "adjusted_dropout",
    "apply_dropout_adjustment",
    "check_nm",
    "choose_qualities",
    "count_dead_neurons",
    "cubic_sparsity",
    "density_schedule",
    "erk_densities",
    "export_semi_structured",
    "find_dropout_feeds",
    "format_report",
    "global_magnitude_masks",
    "han_threshold",
    "keep_at_least",
    "layer_densities",
    "layer_kind",
    "layer_report",
    "magnitude_mask",
    "magnitude_prune_",
    "nm_mask",
    "prune_model_",
    "quality_for_density",
    "regularization_loss",
    "remove_dead_neurons",
    "resolve_per_layer",
    "semi_structured_support",
    "sensitivity_analysis",
    "snip_masks",
    "snip_scores",
    "sparse_layers",
]
