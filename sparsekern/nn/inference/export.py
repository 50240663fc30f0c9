"""``to_inference`` (a pruned model -> per layer its fastest representation), the reload of an
exported model (``inference_plan``, ``load_inference``, ``save_inference``) and the whole-model
report (``inference_report``)."""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from sparsekern._timing import interleaved_times
from sparsekern.formats._files import load_torch_checked, save_torch_checked
from sparsekern.formats.block_sparse import block_size_pair
from sparsekern.nn._checks import check_model, pruned_nonzero
from sparsekern.nn._swap import find_slots, swap_slots
from sparsekern.nn.inference import chooser
from sparsekern.nn.inference.chooser import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_MARGIN,
    FORMATS,
    LayerChoice,
    format_choices,
)
from sparsekern.nn.sparse_attention import SparseConv1D, SparseMultiheadAttention, is_hf_conv1d
from sparsekern.nn.sparse_conv2d import SparseConv2d
from sparsekern.nn.sparse_linear import SparseLinear

__all__ = [
    "InferenceFileError",
    "format_report",
    "inference_choices",
    "inference_plan",
    "inference_report",
    "load_inference",
    "save_inference",
    "to_inference",
]


def _convertible(m: nn.Module, dense_too: bool, conv: bool) -> bool:
    if isinstance(m, (SparseLinear, SparseConv1D, SparseMultiheadAttention)):
        return True
    if dense_too and (type(m) is nn.Linear or is_hf_conv1d(m)):
        return True
    convish = isinstance(m, SparseConv2d) or (dense_too and type(m) is nn.Conv2d)
    return conv and convish


def _masked_parts(m: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(relative name, module)`` of the masks ``m`` carries: itself, or an attention's
    projection masks."""
    if isinstance(m, SparseMultiheadAttention):
        return [(n, c) for n, c in m.named_children() if "mask" in c._buffers]
    return [("", m)]


def _skip_fused(module, args):  # a forward pre-hook: see _no_fused_encoder_path
    return None


def _no_fused_encoder_path(model: nn.Module) -> None:
    """``nn.TransformerEncoderLayer``'s eval fast path hands ``linear1.weight`` /
    ``linear2.weight`` as tensors to one fused op; an exported (CSR / BSR) feed-forward layer has
    none. torch takes its regular path when a submodule has a forward hook: register a no-op one
    on each exported feed-forward layer (about 1 us a call)."""
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer):
            for lin in (m.linear1, m.linear2):
                if not isinstance(lin, nn.Linear) and _skip_fused not in (
                    lin._forward_pre_hooks.values()
                ):
                    lin.register_forward_pre_hook(_skip_fused)


def _check_batch_sizes(batch_sizes) -> tuple[int, ...]:
    try:
        bs = tuple(sorted({int(b) for b in batch_sizes}))
        ok = (
            bs
            and all(b >= 1 for b in bs)
            and all(isinstance(b, int) and not isinstance(b, bool) for b in batch_sizes)
        )
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"batch_sizes: expected a non-empty list of ints >= 1, got {batch_sizes!r}"
        )
    return bs


def to_inference(
    model: nn.Module,
    format="auto",
    *,
    batch_sizes=None,
    example_input=None,
    calibrate: bool = True,
    margin: float = DEFAULT_MARGIN,
    block_size=None,
    inplace: bool = False,
    dense_too: bool = False,
    conv: bool = True,
    verbose: bool = False,
) -> nn.Module:
    """A model for inference whose every sparse layer holds the representation that is fastest
    on its device: dense, CSR or BSR (module docstring: how it picks). Outputs equal the masked
    model's (the same weights, summed in another order: within float tolerance).

    Args:
        model: a model with sparse layers (``SparseLinear`` / ``SparseConv2d``, e.g. after
            ``sparsify`` and pruning), or one such layer.
        format: ``"auto"`` (choose per layer), ``"dense"``, ``"csr"``, ``"bsr"``, or a dict
            ``{layer name: format}`` (names as in ``model.named_modules()``; ``"keep"`` and
            unlisted layers stay as they are). A layer that cannot take a forced format (BSR for
            a grouped conv) stays as it is.
        batch_sizes: calibration batch sizes (rows of x for Linear layers, images for conv
            layers); default: the batch size of ``example_input`` when it is given (time at the
            batch the model will see), else :data:`DEFAULT_BATCH_SIZES` for the layer's device.
        example_input: a batch (or a tuple of arguments) the model runs on, so that conv layers
            can be timed at their real input size (one forward pass, eval mode).
        calibrate: time the candidates (default); False: :data:`STATIC_RULE`. Timing is
            refused on a loaded machine (other processes keep busy the cores torch's threads
            need; this process's own load does not count): a warning, then the static rule for
            every layer. Layers of one shape, input and kept fraction share one timed decision,
            and the whole model's timing stops after :data:`CALIBRATION_BUDGET_S` seconds (the
            remaining layers: the static rule, said in their reason).
        margin: a sparse format must take at most this fraction of the dense time to win a
            batch size (default 0.9).
        block_size: the BSR block ``(bm, bk)``; default each layer's own block size in block
            mode, else :data:`DEFAULT_BLOCK`. Given with ``format="auto"`` it means ``"bsr"``
            for every convertible layer, as this function did before it chose per layer.
        inplace: convert ``model`` itself instead of a deep copy.
        dense_too: also convert plain ``nn.Linear`` / ``nn.Conv2d`` layers (their zeros count as
            pruned).
        conv: convert conv layers (False: only Linear layers).
        verbose: print one line per layer (:func:`format_choices`).
    Returns:
        The converted model (``model`` itself when ``inplace``; if ``model`` is a single layer,
        the new layer). Each converted layer has an ``inference_choice`` (:class:`LayerChoice`);
        :func:`inference_choices` collects them.
    """
    return _convert(
        model, format, batch_sizes=batch_sizes, example_input=example_input, calibrate=calibrate,
        margin=margin, block_size=block_size, inplace=inplace, dense_too=dense_too, conv=conv,
        verbose=verbose,
    )  # fmt: skip


def _convert(
    model: nn.Module,
    format="auto",
    *,
    batch_sizes=None,
    example_input=None,
    calibrate: bool = True,
    margin: float = DEFAULT_MARGIN,
    block_size=None,
    inplace: bool = False,
    dense_too: bool = False,
    conv: bool = True,
    verbose: bool = False,
    empty: bool = False,
    blocks: dict | None = None,
    known_names_only: bool = True,
) -> nn.Module:
    """:func:`to_inference`'s body. ``empty``: build the layers with nothing stored (what a
    state-dict load fills: :func:`load_inference`); ``blocks``: per-layer BSR block sizes;
    ``known_names_only``: refuse ``format`` dict keys that name no convertible layer."""
    check_model(model, "to_inference")
    if block_size is not None:
        block_size = block_size_pair(block_size)  # fail before anything is converted
    allowed = ("auto", "keep", *FORMATS)
    if isinstance(format, str):
        if format not in allowed:
            raise ValueError(
                f"to_inference: expected format in {allowed} or a dict, got {format!r}"
            )
        if format == "auto" and block_size is not None:
            format = "bsr"
    elif isinstance(format, dict):
        bad = {k: v for k, v in format.items() if v not in allowed}
        if bad:
            raise ValueError(f"to_inference: expected formats in {allowed}, got {bad}")
    else:
        raise TypeError(f"to_inference: expected format as a str or a dict, got {format!r}")
    if not (isinstance(margin, (int, float)) and 0 < margin <= 1):
        raise ValueError(f"margin: expected a number in (0, 1], got {margin!r}")
    fixed_sizes = None if batch_sizes is None else _check_batch_sizes(batch_sizes)
    if example_input is not None and batch_sizes is None:  # time at the batch the user passes
        first = example_input[0] if isinstance(example_input, tuple) else example_input
        if isinstance(first, torch.Tensor) and first.dim() >= 1:
            fixed_sizes = (max(1, int(first.shape[0])),)
    cal = chooser.start_calibration(format, calibrate)

    target = model if inplace else copy.deepcopy(model)
    found = find_slots(target, lambda m: _convertible(m, dense_too, conv))
    first_name: dict[int, str] = {}
    for _, _, name, child in found:
        first_name.setdefault(id(child), name)
    names = [n for _, _, n, _ in found]

    def fmt_of(name: str, child: nn.Module) -> str:
        if isinstance(format, str):
            return format
        if isinstance(child, SparseMultiheadAttention) and name not in format:
            # an exported attention's state dict names its out_proj (a dense Linear)
            return "dense" if f"{name}.out_proj" in format else "keep"
        return format.get(name, "keep")

    if isinstance(format, dict) and known_names_only:
        unknown = sorted(k for k in format if k not in set(names))
        if unknown:
            raise ValueError(
                f"to_inference: format names layers that are not convertible layers of the "
                f"model: {unknown}; expected names among {names}"
            )
    if not empty:  # the mask invariant: an export drops pruned weights, so they must be zero
        converted = [
            (f"{n}.{sub}" if n and sub else n or sub, layer)
            for _, _, n, c in found
            if fmt_of(n, c) != "keep"
            for sub, layer in _masked_parts(c)
        ]
        bad = pruned_nonzero(converted)
        if bad:
            raise ValueError(
                f"to_inference: expected pruned weights exactly zero (the mask invariant), got "
                f"non-zero pruned weights in {len(bad)} layer(s): "
                + ", ".join(f"{n or '<model>'!r} ({k} weights)" for n, k in bad.items())
                + "; the export would drop them silently. Repair with "
                "sparsekern.nn.mask_problems(model, fix=True) or set_mask"
            )
    shapes = {}
    needs_shapes = format == "auto" or (isinstance(format, dict) and "auto" in format.values())
    if example_input is not None and needs_shapes and calibrate:
        shapes = chooser.input_shapes(target, example_input, first_name)
    cal.undecided = len({
        (type(c).__name__, tuple(c.weight.shape), shapes.get(n)) for _, _, n, c in found
        if fmt_of(n, c) == "auto" and not isinstance(c, SparseMultiheadAttention)
    })  # fmt: skip

    def new_of(name: str, child: nn.Module) -> nn.Module:
        fmt = fmt_of(name, child)
        if isinstance(child, SparseMultiheadAttention):
            new, choice = chooser.attention(name, child, fmt)
        else:
            if is_hf_conv1d(child) or isinstance(child, SparseConv1D):
                child = chooser.linear_view(child)  # x @ W + b is F.linear(x, W^T, b)
            if fmt == "auto":
                sizes = fixed_sizes or DEFAULT_BATCH_SIZES.get(
                    child.weight.device.type, DEFAULT_BATCH_SIZES["cpu"]
                )
                sample = shapes.get(name)
                if sample is None and not isinstance(child, nn.Conv2d):
                    sample = (child.in_features,)
                new, choice = chooser.auto(
                    name, child, block_size=block_size, batch_sizes=sizes, sample_shape=sample,
                    calibrate=calibrate, margin=margin, cal=cal,
                )  # fmt: skip
            else:
                block = (blocks or {}).get(name, block_size)
                new, choice = chooser.forced(name, child, fmt, block, empty)
        new.inference_choice = choice
        return new

    target = swap_slots(target, found, new_of)
    _no_fused_encoder_path(target)
    if verbose:
        print(format_choices(inference_choices(target)))
    return target


def inference_choices(model: nn.Module) -> dict[str, LayerChoice]:
    """``{layer name: LayerChoice}`` of the layers ``to_inference`` converted in ``model``."""
    return {
        n: m.inference_choice
        for n, m in model.named_modules()
        if isinstance(getattr(m, "inference_choice", None), LayerChoice)
    }


# =============================================================================================
# Reloading
# =============================================================================================
def inference_plan(state_dict: dict) -> dict[str, str]:
    """``{layer name: format}`` of an exported model's state dict: ``"csr"`` / ``"bsr"`` (from
    the extra state; a BSR state dict from before the per-layer choice has no format entry),
    ``"dense"`` (a weight and no mask) or ``"keep"`` (a sparse layer with its mask). A layer with
    ``row_ptr`` / ``col_idx`` but no ``values`` is refused (``ValueError`` naming the keys)."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"inference_plan: expected a state dict, got {type(state_dict).__name__}")
    plan: dict[str, str] = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        dot = f"{prefix}." if prefix else ""
        if leaf == "values":
            extra = state_dict.get(f"{dot}_extra_state")
            fmt = extra.get("format") if isinstance(extra, dict) else None
            if fmt is None:
                fmt = "bsr" if isinstance(value, torch.Tensor) and value.dim() == 3 else "csr"
            plan[prefix] = fmt
        elif leaf == "row_ptr" and f"{dot}values" not in state_dict:
            got = sorted(k for k in state_dict if k.startswith(dot) and "." not in k[len(dot) :])
            raise ValueError(
                f"inference_plan: layer {prefix!r}: expected {dot}values beside {dot}row_ptr and "
                f"{dot}col_idx (a CSR / BSR layer), got keys {got}"
            )
        elif leaf == "weight" and prefix not in plan:
            plan[prefix] = "keep" if f"{dot}mask" in state_dict else "dense"
    return plan


_FILE_FORMAT = "sparsekern.inference/1"
# File layout: this magic, torch.save bytes of {"format", "state_dict"}, SHA-256 of both.
_MAGIC = b"SKINF\x01\n"


def save_inference(model: nn.Module, path: str | os.PathLike) -> dict:
    """Write an exported model (``to_inference``'s output; any model works) to ``path``:
    its state dict (tensors and plain extra state), atomically (a temporary file in the same
    folder, then a rename: a killed save leaves the previous file whole) with a SHA-256 checksum
    that :func:`load_inference` verifies before parsing.

    Returns ``{"path", "file_bytes", "layers": inference_plan(state dict)}``."""
    check_model(model, "save_inference")
    state = model.state_dict()
    plan = inference_plan(state)
    size = save_torch_checked({"format": _FILE_FORMAT, "state_dict": state}, path, _MAGIC)
    return {"path": str(path), "file_bytes": size, "layers": plan}


def _read_inference(path) -> dict:
    try:
        state = load_torch_checked(path, _MAGIC, "save_inference")
    except ValueError as e:
        raise InferenceFileError(str(e)) from e
    if not isinstance(state, dict) or state.get("format") != _FILE_FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise InferenceFileError(f"{path}: expected format {_FILE_FORMAT!r}, got {got!r}")
    sd = state.get("state_dict")
    if not isinstance(sd, dict):
        raise InferenceFileError(
            f"{path}: expected a state dict in the file, got {type(sd).__name__}"
        )
    return sd


class InferenceFileError(ValueError):
    """A file given to :func:`load_inference` is missing, truncated, corrupted or foreign; the
    message names the file and what was expected vs got."""


def load_inference(path, model: nn.Module | None = None, strict: bool = True):
    """Read an exported model back.

    * ``load_inference(path)``: the state dict a :func:`save_inference` file holds (checksum
      verified before anything is parsed, then ``torch.load(weights_only=True)``); a truncated
      or corrupted file raises :class:`InferenceFileError` naming the file.
    * ``load_inference(path, model)``: the exported model rebuilt from ``model`` (the
      architecture, e.g. a freshly built sparsified model): every layer takes the format the
      file holds (:func:`inference_plan`), then the state dict is loaded.
    * ``load_inference(model, state_dict)``: the same from a state dict in memory.

    ``model`` itself is never touched, so a refused load (``RuntimeError`` naming expected vs
    got) leaves it as it was."""
    if isinstance(path, nn.Module):  # load_inference(model, state_dict)
        model, state_dict, where = path, model, "load_inference"
    else:
        state_dict, where = _read_inference(path), str(path)
        if model is None:
            return state_dict
    check_model(model, "load_inference")
    if not isinstance(state_dict, dict):
        raise TypeError(f"load_inference: expected a state dict, got {type(state_dict).__name__}")
    try:
        plan = inference_plan(state_dict)
    except ValueError as e:
        raise InferenceFileError(f"{where}: {e}") from None
    blocks = {}
    for name, fmt in plan.items():
        extra = state_dict.get(f"{name}._extra_state" if name else "_extra_state")
        if fmt == "bsr" and isinstance(extra, dict) and "block_size" in extra:
            blocks[name] = block_size_pair(tuple(extra["block_size"]))
    new = _convert(
        model, format=plan, dense_too=True, empty=True, blocks=blocks, known_names_only=False
    )
    new.load_state_dict(state_dict, strict=strict)
    return new


# =============================================================================================
# Whole-model report (the main job's "exported inference time")
# =============================================================================================
def inference_report(
    model: nn.Module,
    example_input: torch.Tensor,
    batch_sizes=(1, 64),
    exported: nn.Module | None = None,
    repeats: int = 30,
    budget_s: float = 5.0,
    **export_kwargs,
) -> dict:
    """Export ``model`` (unless ``exported`` is given) and time it against the dense model with
    the same weights (``to_inference(model, format="dense")``), interleaved in one process at
    each batch size (inputs ``randn(batch, *example_input.shape[1:])``, ``torch.no_grad``, eval
    mode). Returns a JSON-ready dict: ``layers`` (each :class:`LayerChoice` as a dict),
    ``model`` (per batch size: ``dense_ms``, ``exported_ms``, ``speedup`` = dense / exported,
    medians of per-repeat ratios), ``max_abs_diff`` of the logits, threads, device, torch
    version and the 1-minute load average when it was measured."""
    sizes = _check_batch_sizes(batch_sizes)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1:
        raise TypeError(
            f"inference_report: expected example_input as a batched tensor, got "
            f"{type(example_input).__name__}"
        )
    src = copy.deepcopy(model).eval()
    if exported is None:
        export_kwargs.setdefault("batch_sizes", sizes)
        exported = to_inference(src, example_input=example_input[:1], **export_kwargs)
    exported = exported.eval()
    dense = to_inference(src, format="dense").eval()
    device = next(src.parameters()).device
    rows, diff = [], 0.0
    with torch.no_grad():
        for b in sizes:
            x = torch.randn(b, *example_input.shape[1:], dtype=example_input.dtype,
                            device=device)  # fmt: skip
            diff = max(diff, float((exported(x) - dense(x)).abs().max()))
            res = interleaved_times(
                {"dense": lambda x=x: dense(x), "exported": lambda x=x: exported(x)},
                repeats=repeats, budget_s=budget_s, device=device,
            )  # fmt: skip
            rows.append({
                "batch": b,
                "dense_ms": res["dense"][0] * 1e3,
                "exported_ms": res["exported"][0] * 1e3,
                "speedup": res["exported"][1],
            })  # fmt: skip
    return {
        "layers": [c.as_dict() for c in inference_choices(exported).values()],
        "model": rows,
        "max_abs_diff": diff,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def format_report(report: dict) -> str:
    """The report as text: one line per layer, then one per batch size."""
    lines = []
    for c in report["layers"]:
        shape = "x".join(str(s) for s in c["weight_shape"])
        fmt = c["format"] + (
            "" if c["dense_above"] is None else f" (dense above {c['dense_above']})"
        )
        lines.append(f"  {c['name'] or '<model>'} {c['kind']} {shape}: {c['density']:.1%} kept -> "
                     f"{fmt}")  # fmt: skip
    for r in report["model"]:
        lines.append(
            f"  batch {r['batch']}: dense {r['dense_ms']:.3f} ms, exported "
            f"{r['exported_ms']:.3f} ms ({r['speedup']:.2f}x)"
        )
    load = report.get("load_average_1min")
    lines.append(f"  ({report['threads']} threads on {report['device']}, load average "
                 f"{'n/a' if load is None else f'{load:.2f}'}, max |logit diff| "
                 f"{report['max_abs_diff']:.1e})")  # fmt: skip
    return "\n".join(lines)
