"""Inference export: ``to_inference`` turns a pruned model into one whose every layer holds the
representation that is fastest on its device (the rule: sparsity never costs).

Per layer (``SparseLinear`` / ``SparseConv2d``; with ``dense_too`` also plain ``nn.Linear`` /
``nn.Conv2d``) it picks one of:

* ``"dense"``: a plain ``nn.Linear`` / ``nn.Conv2d`` holding the masked weight (what runs when the
  density is too high for a sparse format to win: the vendor GEMM, exactly);
* ``"csr"``: :class:`~sparsekern.nn.csr_layers.CSRLinear` / ``CSRConv2d``, the kept weights as
  CSR with int16 column indices (unstructured masks, Han et al.'s): torch's CSR product (MKL on
  the CPU, cuSPARSE) and the Triton decode kernel on CUDA for 1..32 rows;
* ``"bsr"``: :class:`BlockSparseLinear` / :class:`BlockSparseConv2d`, the kept blocks (block
  masks): the block-sparse Triton kernels on CUDA, torch's BSR product (MKL) on the CPU.

How it picks (``format="auto"``, the default): the candidates are dense, CSR (anything pruned)
and BSR (at most :data:`BSR_MAX_BLOCK_DENSITY` of the blocks hold a kept weight: an unstructured
10% mask fills every 32x32 block, a block mask does not). With ``calibrate=True`` each candidate
is built and timed on the layer's device, interleaved with the dense layer (medians of per-repeat
ratios), at each of ``batch_sizes`` (default :data:`DEFAULT_BATCH_SIZES`: 1 and 64 rows on the
CPU; 1, 8, 32 and 64 on CUDA). A sparse format wins a batch size when it takes at most ``margin``
(0.9) of the dense time there; the layer takes the format that wins the most consecutive batch
sizes from the smallest (then the best geometric-mean speedup); if it stops winning at a larger
one, the layer runs dense above the last batch it won (``dense_above``). No win: dense. Conv
layers need ``example_input`` to be timed (their input size is not in the layer); without it,
and with ``calibrate=False``, the static rule :data:`STATIC_RULE` decides (the kept-fraction
crossovers measured by ``benchmarks/bench_inference.py``).

Every converted layer carries its :class:`LayerChoice` (``inference_choices(model)``): the
format, why, and the measured ratios. ``inference_report`` times a whole model, exported against
dense, at batch sizes (what the main job prints). The exported model saves and reloads through its
``state_dict`` (tensors and plain extra state only: ``torch.load(weights_only=True)`` reads it);
``load_inference(fresh_model, state_dict)`` rebuilds the layers the state dict names and loads it
(the model passed in is not touched, so a refused load leaves it as it was).
"""

from sparsekern._timing import interleaved_times
from sparsekern.nn.inference.block_layers import DEFAULT_BLOCK, BlockSparseConv2d, BlockSparseLinear
from sparsekern.nn.inference.chooser import (
    BSR_MAX_BLOCK_DENSITY,
    CALIBRATION_BUDGET_S,
    DEFAULT_BATCH_SIZES,
    DEFAULT_MARGIN,
    FORMATS,
    STATIC_RULE,
    LayerChoice,
    format_choices,
    static_limit,
)
from sparsekern.nn.inference.export import (
    InferenceFileError,
    format_report,
    inference_choices,
    inference_plan,
    inference_report,
    load_inference,
    save_inference,
    to_inference,
)

__all__ = [
    "BSR_MAX_BLOCK_DENSITY",
    "CALIBRATION_BUDGET_S",
    "BlockSparseConv2d",
    "BlockSparseLinear",
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_BLOCK",
    "DEFAULT_MARGIN",
    "FORMATS",
    "InferenceFileError",
    "STATIC_RULE",
    "LayerChoice",
    "format_choices",
    "format_report",
    "static_limit",
    "inference_choices",
    "inference_plan",
    "inference_report",
    "interleaved_times",
    "load_inference",
    "save_inference",
    "to_inference",
]
