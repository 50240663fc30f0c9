"""Pruning methods. Every method is a :class:`BasePruner`: it produces masks on the sparse modules
(``sparsekern.nn``), the kernels consume them. The guide, with the lifecycle, every method and
how it compares with ``torch.ao.pruning`` and Torch-Pruning, is ``docs/pruning.md``.

One lifecycle for all of them::

    model = sparsify(MyNet())                                   # masks all True
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = GlobalMagnitudePruner(model, opt, sparsity=0.9)    # the target is a sparsity
    for x, y in loader:
        closure = lambda: F.cross_entropy(model(x), y)
        loss = closure() + pruner.regularization_loss()
        opt.zero_grad(); loss.backward(); opt.step()
        pruner.step(closure)                                    # True when a mask changed
    kept = pruner.prune()                                       # {layer: kept fraction}
    summary = pruner.finalize()

Pruners: :class:`HanPruner` (Han et al. 2015: quality x std threshold, iterative, L1/L2,
dropout rule, freezing), :class:`GlobalMagnitudePruner`, :class:`GradualPruner` (Zhu and Gupta),
:class:`SNIPPruner`, :class:`RigLPruner`, :class:`NMPruner`, :class:`BlockPruner`,
:class:`ImportancePruner` (any :class:`Importance`: :class:`MagnitudeImportance`,
:class:`TaylorImportance`, :class:`RandomImportance`; :func:`score_masks`),
:class:`OneShotPruner` (:func:`one_shot`: SparseGPT, Wanda, magnitude from calibration inputs,
no retraining; ``docs/one_shot.md``).
Schedules (:mod:`sparsekern.pruning.schedules`): :class:`OneShot`, :class:`Geometric` (Han's
rounds), :class:`Cubic` (Zhu and Gupta), :class:`CosineDecay` (RigL's update fraction).
Targets: :func:`sensitivity_targets` (Han Fig. 6), :func:`proportional_targets`.
Structured (physical channel removal, a smaller dense model): :func:`prune_channels`,
:class:`StructuredPruner` (``sparsekern.pruning.structured``, ``docs/structured.md``).
Many tasks, sizes, clients (``docs/methods_many_tasks.md``): :class:`PackNet` (Mallya and
Lazebnik), :class:`MultiTaskPruner` (element- or rank-wise, one budget), :class:`OmniSparsity`
(Yang et al.), :class:`FederatedPruning` (FedAvg + server pruning; :func:`split_clients`).
Tools: :func:`sensitivity_analysis`, :func:`layer_report` / :func:`format_report` (Han's Table 2
columns), :func:`remove_dead_neurons`, :func:`adjusted_dropout`, :func:`export_semi_structured`.
"""

from sparsekern.pruning._layers import layer_kind, resolve_per_layer, sparse_layers
from sparsekern.pruning.base import BasePruner
from sparsekern.pruning.block import (
    BlockPruner,
    block_magnitude_mask,
    block_masks,
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
from sparsekern.pruning.early_crop import EarlyCROPPruner
from sparsekern.pruning.federated import FederatedPruning, split_clients
from sparsekern.pruning.gap import GaPPruner
from sparsekern.pruning.gibbs import GibbsPruner
from sparsekern.pruning.global_magnitude import (
    AUTO_MIN_DENSITY,
    GlobalMagnitudePruner,
    global_magnitude_masks,
)
from sparsekern.pruning.gradual import GradualPruner
from sparsekern.pruning.han import FREEZE_KINDS, HanPruner
from sparsekern.pruning.importance import (
    Importance,
    ImportancePruner,
    MagnitudeImportance,
    RandomImportance,
    TaylorImportance,
    score_masks,
)
from sparsekern.pruning.magnitude import (
    han_threshold,
    keep_at_least,
    magnitude_mask,
    magnitude_prune_,
    prune_model_,
    quality_for_density,
)
from sparsekern.pruning.multitask import LowRankLinear, MultiTaskImportance, MultiTaskPruner
from sparsekern.pruning.nm import (
    NMPruner,
    SemiStructuredUnsupported,
    check_nm,
    export_semi_structured,
    nm_mask,
    semi_structured_support,
)
from sparsekern.pruning.nm_decay import NMDecayPruner
from sparsekern.pruning.omni import OmniSparsity, nested_magnitude_masks
from sparsekern.pruning.one_shot import OneShotPruner, format_one_shot_report, one_shot
from sparsekern.pruning.packnet import PackNet
from sparsekern.pruning.regularization import regularization_loss
from sparsekern.pruning.report import format_report, layer_report
from sparsekern.pruning.rigl import RigLPruner, erk_densities, layer_densities
from sparsekern.pruning.schedules import CosineDecay, Cubic, Geometric, OneShot, Schedule
from sparsekern.pruning.scl import SCLPruner
from sparsekern.pruning.sensitivity import (
    SensitivityResult,
    choose_qualities,
    sensitivity_analysis,
)
from sparsekern.pruning.snip import SNIPPruner, snip_masks, snip_scores
from sparsekern.pruning.srste import SRSTEPruner
from sparsekern.pruning.structured import StructuredPruner, prune_channels
from sparsekern.pruning.targets import (
    SensitivityTargets,
    han_targets,
    proportional_targets,
    sensitivity_targets,
)

__all__ = [
    "AUTO_MIN_DENSITY",
    "adjusted_dropout",
    "apply_dropout_adjustment",
    "BasePruner",
    "block_magnitude_mask",
    "block_masks",
    "block_scores",
    "BlockPruner",
    "check_nm",
    "choose_qualities",
    "CosineDecay",
    "count_dead_neurons",
    "Cubic",
    "erk_densities",
    "expand_block_mask",
    "export_semi_structured",
    "find_dropout_feeds",
    "format_report",
    "FREEZE_KINDS",
    "Geometric",
    "global_magnitude_masks",
    "GlobalMagnitudePruner",
    "GradualPruner",
    "han_targets",
    "han_threshold",
    "HanPruner",
    "Importance",
    "ImportancePruner",
    "keep_at_least",
    "layer_densities",
    "layer_kind",
    "layer_report",
    "magnitude_mask",
    "magnitude_prune_",
    "MagnitudeImportance",
    "nm_mask",
    "NMPruner",
    "OneShot",
    "one_shot",
    "OneShotPruner",
    "format_one_shot_report",
    "proportional_targets",
    "prune_blocks_",
    "prune_model_",
    "quality_for_density",
    "RandomImportance",
    "regularization_loss",
    "remove_dead_neurons",
    "resolve_per_layer",
    "RigLPruner",
    "Schedule",
    "semi_structured_support",
    "SemiStructuredUnsupported",
    "sensitivity_analysis",
    "sensitivity_targets",
    "SensitivityResult",
    "SensitivityTargets",
    "score_masks",
    "snip_masks",
    "snip_scores",
    "SNIPPruner",
    "sparse_layers",
    "StructuredPruner",
    "TaylorImportance",
    "prune_channels",
    "EarlyCROPPruner",
    "GaPPruner",
    "GibbsPruner",
    "NMDecayPruner",
    "SCLPruner",
    "SRSTEPruner",
    "FederatedPruning",
    "split_clients",
    "LowRankLinear",
    "MultiTaskImportance",
    "MultiTaskPruner",
    "OmniSparsity",
    "nested_magnitude_masks",
    "PackNet",
]
