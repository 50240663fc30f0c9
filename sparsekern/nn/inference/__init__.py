"""Inference export: ``to_inference`` turns a pruned model into one whose every layer holds the
representation that is fastest on its device (the rule: sparsity never costs).

Per layer (``SparseLinear`` / ``SparseConv2d`` / GPT-2's ``SparseConv1D``, exported like a Linear
with its weight transposed; with ``dense_too`` also plain ``nn.Linear`` / ``nn.Conv2d`` / HF
``Conv1D``) it picks one of the formats below. ``SparseMultiheadAttention`` becomes a plain
``nn.MultiheadAttention`` holding its masked weights: torch's attention forward (and its fused
fast path) reads the projection weights as tensors, so they stay dense.

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
ratios, ``sparsekern._timing.interleaved_times``), at the batch size of ``example_input``, or at
each of ``batch_sizes`` (default :data:`DEFAULT_BATCH_SIZES`: 1 and 64 rows on the CPU; 1, 8, 32
and 64 on CUDA). A sparse format wins a batch size when it takes at most ``margin`` (0.9) of the
dense time there; the layer takes the format that wins the most consecutive batch sizes from the
smallest (then the best geometric-mean speedup); if it stops winning at a larger one, the layer
runs dense above the last batch it won (``dense_above``). No win: dense. Layers of one shape,
input and kept fraction share one timed decision; the whole model's timing is bounded by
:data:`CALIBRATION_BUDGET_S`. The static rule :data:`STATIC_RULE` (the kept-fraction crossovers
measured by ``benchmarks/bench_inference.py``) decides instead with ``calibrate=False``, for conv
layers without ``example_input`` (their input size is not in the layer), once the budget is
spent, and for every layer when other processes keep busy the cores torch's threads need (a
warning says so; a timing on a loaded machine never decides; this process's own load does not
count).

Non-finite values (``sparsekern.ops._checks``): a pruned weight contributes nothing whatever it
holds; a non-finite input gives the same non-finite outputs on every format as the dense product
with the pruned weights at zero (the model the export came from).

Every converted layer carries its :class:`LayerChoice` (``inference_choices(model)``): the
format, why, and the measured ratios. ``inference_report`` times a whole model, exported against
dense, at batch sizes (what the main job prints). The exported model saves and reloads through its
``state_dict`` (tensors and plain extra state only: ``torch.load(weights_only=True)`` reads it),
or through a file: ``save_inference(model, path)`` writes it atomically with a SHA-256 checksum,
``load_inference(path)`` verifies it before parsing (a corrupt or truncated file is an
:class:`InferenceFileError` naming the file) and returns the state dict, and
``load_inference(path, fresh_model)`` (or ``load_inference(fresh_model, state_dict)``) rebuilds the
layers the state dict names and loads it (the model passed in is not touched, so a refused load
leaves it as it was). ``to_inference`` refuses a model whose pruned weights are not zero (the
export would drop them), naming the layers.
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
