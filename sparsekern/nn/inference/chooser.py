"""The per-layer format choice of ``to_inference``: the candidates (dense, CSR, BSR), the static
rule, the timed calibration and :class:`LayerChoice`, the record of what was chosen and why."""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings

import torch
from torch import nn

from sparsekern._timing import interleaved_times, other_load
from sparsekern.formats.block_sparse import block_occupancy, block_size_pair
from sparsekern.nn.csr_layers import CSRConv2d, CSRLinear, check_dense_above
from sparsekern.nn.inference.block_layers import (
    DEFAULT_BLOCK,
    BlockSparseConv2d,
    BlockSparseLinear,
)
from sparsekern.nn.sparse_conv2d import symmetric_zero_padding
from sparsekern.ops.block_sparse_conv2d import conv_weight_to_gemm
from sparsekern.ops.csr_linear import KERNEL_MAX_ROWS

__all__ = [
    "BSR_MAX_BLOCK_DENSITY",
    "CALIBRATION_BUDGET_S",
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_MARGIN",
    "FORMATS",
    "STATIC_RULE",
    "LayerChoice",
    "format_choices",
    "static_limit",
]

FORMATS = ("dense", "csr", "bsr")
# Calibration batch sizes by device type (rows of x for Linear layers, images for conv layers):
# the batch 1 and 64 on the CPU; on CUDA also 8 and 32, the decode kernel's range.
DEFAULT_BATCH_SIZES = {"cpu": (1, 64), "cuda": (1, 8, 32, 64)}
# A sparse format must take at most this fraction of the dense time to be chosen at a batch size:
# the 2-core machine's repeat-to-repeat spread of a ratio is ~5% under load, so a 10% margin keeps
# a noisy tie dense.
DEFAULT_MARGIN = 0.9
# BSR is a candidate when at most this fraction of the blocks hold a kept weight (a block kept for
# one weight costs bm*bk multiply-adds).
BSR_MAX_BLOCK_DENSITY = 0.5
# A whole model's calibration stops timing after this many seconds (the rest: the static rule);
# with decisions reused across layers of one shape, torchvision resnet18 / vit_b_16 at batch 1
# take a fraction of it (the issue measured 183 s and 238 s before).
CALIBRATION_BUDGET_S = 12.0

# The static rule (``calibrate=False``, and conv layers timed without an example input): per
# (device type, layer kind, format), ``(min weights, largest kept fraction)`` rows, the first row
# whose size the layer reaches applies; for BSR the fraction is of blocks stored. A format absent
# here is never chosen by the rule. CPU rows: where CSR (MKL) still took <= 0.9 of the dense time
# at both batch 1 and 64, measured on the 2-core machine (``bench_inference.py --crossover``,
# fp32, load < 0.7): 4096 x 4096 wins up to 20% kept (1.40x at batch 64; 0.78x at 30%), 784 x 300
# up to 5% (1.48x; 1.04x at 10%: per-call overhead of ~7 us); CSR conv via unfold never won
# (0.25-0.99x on LeNet-5 conv2 and a VGG conv5 layer); torch's BSR lost to CSR on block masks too
# (4096 x 4096, 32x32 blocks: 2.0x vs 2.4x at 10% of blocks, 0.78x vs 0.96x at 25%, batch 64).
# CUDA rows: expectations from the bytes moved (no GPU measured): CSR reads itemsize + 2 bytes per
# kept bf16 weight against 2 dense, so it can win below ~50% and is taken below 25%; the block
# kernels skip whole blocks.
STATIC_RULE = {
    ("cpu", "linear", "csr"): ((1_000_000, 0.2), (0, 0.05)),
    ("cpu", "linear", "bsr"): ((1_000_000, 0.1),),
    ("cuda", "linear", "csr"): ((0, 0.25),),
    ("cuda", "linear", "bsr"): ((0, 0.5),),
    ("cuda", "conv2d", "bsr"): ((0, 0.5),),
}


def static_limit(device_type: str, kind: str, fmt: str, weights: int) -> float | None:
    """The largest kept fraction at which :data:`STATIC_RULE` takes ``fmt`` for a layer of
    ``weights`` weights (None: never)."""
    for min_weights, limit in STATIC_RULE.get((device_type, kind, fmt), ()):
        if weights >= min_weights:
            return limit
    return None


# =============================================================================================
# The per-layer choice
# =============================================================================================
@dataclasses.dataclass
class LayerChoice:
    """What ``to_inference`` chose for one layer, and why.

    ``format``: ``"dense"``, ``"csr"``, ``"bsr"`` or ``"keep"`` (left as it was); ``source``:
    ``"calibrated"`` (timed), ``"static"`` (:data:`STATIC_RULE`) or ``"forced"`` (a ``format``
    argument). ``ratios[fmt][batch]``: dense time / ``fmt`` time (> 1: faster than dense) and
    ``times_us[fmt][batch]`` the median time, for every timed candidate (dense included)."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    density: float
    format: str
    source: str
    reason: str
    block_size: tuple[int, int] | None = None
    dense_above: int | None = None
    ratios: dict = dataclasses.field(default_factory=dict)
    times_us: dict = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready (batch sizes as strings)."""
        d = dataclasses.asdict(self)
        for key in ("ratios", "times_us"):
            d[key] = {f: {str(b): v for b, v in per.items()} for f, per in d[key].items()}
        return d


def _kind(m: nn.Module) -> str:
    return "conv2d" if isinstance(m, nn.Conv2d) else "linear"


def _kept(m: nn.Module) -> torch.Tensor:
    mask = m._buffers.get("mask")
    return mask if mask is not None else m.weight.detach() != 0


def _density(m: nn.Module) -> float:
    k = _kept(m)
    return int(k.count_nonzero()) / max(k.numel(), 1)


def _dense_copy(m: nn.Module) -> nn.Module:
    """A plain ``nn.Linear`` / ``nn.Conv2d`` computing what ``m`` computes, holding its masked
    weight (a copy: the exported model shares nothing with the pruned one)."""
    w = m.weight.detach()
    mask = m._buffers.get("mask")
    if mask is not None:
        w = torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))
    kw = {"device": "meta", "dtype": w.dtype}
    if isinstance(m, nn.Conv2d):
        new = nn.Conv2d(
            m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
            dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
            padding_mode=m.padding_mode, **kw,
        )  # fmt: skip
    else:
        new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, **kw)
    new.weight = nn.Parameter(w.clone(), requires_grad=m.weight.requires_grad)
    if m.bias is not None:
        new.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
    new.train(m.training)
    return new


def _bsr_block(m: nn.Module, block_size) -> tuple[int, int]:
    return block_size_pair(block_size or getattr(m, "block_size", None) or DEFAULT_BLOCK)


def _cannot(m: nn.Module, fmt: str) -> str | None:
    """Why ``m`` cannot take ``fmt`` (None: it can)."""
    if fmt == "csr" and isinstance(m, nn.Conv2d) and m.groups != 1:
        return f"csr needs groups=1, got groups={m.groups}"
    if fmt == "bsr" and isinstance(m, nn.Conv2d):
        if m.groups != 1:
            return f"bsr needs groups=1, got groups={m.groups}"
        if symmetric_zero_padding(m) is None:
            return f"bsr needs symmetric zero padding, got {m.padding!r} ({m.padding_mode})"
    return None


def _build(m: nn.Module, fmt: str, block_size=None, dense_above=None, empty: bool = False):
    """``m`` converted to ``fmt`` (``empty``: nothing stored, for a state-dict load)."""
    conv = isinstance(m, nn.Conv2d)
    if fmt == "dense":
        return _dense_copy(m)
    if fmt == "csr":
        cls = CSRConv2d if conv else CSRLinear
        new = cls.empty_like(m) if empty else cls.from_sparse(m)
    elif fmt == "bsr":
        cls = BlockSparseConv2d if conv else BlockSparseLinear
        block = _bsr_block(m, block_size)
        new = cls.empty_like(m, block) if empty else cls.from_sparse(m, block)
    else:
        raise ValueError(f"to_inference: expected a format in {FORMATS}, got {fmt!r}")
    new.dense_above = check_dense_above(dense_above)
    if empty:
        new.values.requires_grad_(m.weight.requires_grad)
        new.train(m.training)
    return new


def _measure(
    modules: dict[str, nn.Module], make_input, batch_sizes, device, budget_s: float = 2.0
) -> dict:
    """``{fmt: {batch: (median us, dense time / fmt time)}}`` for ``modules`` (``"dense"``
    first), timed interleaved under ``torch.no_grad`` at each batch size (about ``budget_s``
    seconds each)."""
    out: dict = {f: {} for f in modules}
    with torch.no_grad():
        for b in batch_sizes:
            x = make_input(b)
            fns = {f: (lambda m=m, x=x: m(x)) for f, m in modules.items()}
            res = interleaved_times(fns, budget_s=budget_s, device=device, min_repeats=3)
            for f, (sec, ratio) in res.items():
                out[f][b] = (sec * 1e6, ratio)
    return out


def _choose(ratios: dict, batch_sizes, margin: float):
    """``(format, dense_above, reason)`` from ``ratios[fmt][batch]`` (dense / fmt time)."""
    best = None
    for fmt, per in ratios.items():
        if fmt == "dense":
            continue
        wins = 0
        for b in batch_sizes:
            if per[b] * margin < 1.0:
                break
            wins += 1
        if wins == 0:
            continue
        gm = math.exp(sum(math.log(per[b]) for b in batch_sizes[:wins]) / wins)
        if best is None or (wins, gm) > best[:2]:
            best = (wins, gm, fmt)
    shown = "; ".join(
        f"{fmt} " + ", ".join(f"{per[b]:.2f}x" for b in batch_sizes)
        for fmt, per in ratios.items()
        if fmt != "dense"
    )
    at = "batch " + "/".join(str(b) for b in batch_sizes)
    if best is None:
        return (
            "dense",
            None,
            (
                f"dense kept: no sparse format took <= {margin:.2f} of the dense time at batch "
                f"{batch_sizes[0]} ({shown} faster than dense at {at})"
            ),
        )
    wins, _, fmt = best
    if wins == len(batch_sizes):
        return fmt, None, f"{fmt}: {shown} faster than dense at {at}"
    return (
        fmt,
        batch_sizes[wins - 1],
        (
            f"{fmt} up to batch {batch_sizes[wins - 1]}, dense above (it stops winning at batch "
            f"{batch_sizes[wins]}); {shown} faster than dense at {at}"
        ),
    )


def _static(m: nn.Module, device_type: str, density: float, block_density, why: str):
    kind = _kind(m)
    for fmt, frac in (("csr", density), ("bsr", block_density)):
        limit = static_limit(device_type, kind, fmt, m.weight.numel())
        if frac is None or limit is None or _cannot(m, fmt):
            continue
        if frac <= limit:
            dense_above = KERNEL_MAX_ROWS if (fmt, kind, device_type) == (
                "csr", "linear", "cuda") else None  # fmt: skip
            what = "kept" if fmt == "csr" else "of blocks stored"
            return (
                fmt,
                dense_above,
                (
                    f"{fmt} by the static rule ({why}): {frac:.1%} {what} <= {limit:.0%} "
                    f"({device_type} {kind})"
                ),
            )
    return (
        "dense",
        None,
        (
            f"dense by the static rule ({why}): {density:.1%} kept is above the "
            f"{device_type} {kind} crossovers"
        ),
    )


def _block_density(m: nn.Module, block: tuple[int, int]) -> float:
    """Stored fraction of ``block`` blocks that a BSR copy of ``m`` would have."""
    kept = _kept(m)
    if isinstance(m, nn.Conv2d):
        kept = conv_weight_to_gemm(kept, block[1])
    occ = block_occupancy(kept, block)
    return int(occ.count_nonzero()) / max(occ.numel(), 1)


def _decision_key(m, dtype, sample_shape, density, block_density, candidates) -> tuple:
    """Layers with equal keys take one decision: same kind, weight shape, geometry, input,
    dtype, device, candidates and kept fractions within 1% (the crossovers are far wider)."""
    geometry = (
        (m.stride, m.padding, m.dilation, m.groups, m.padding_mode)
        if isinstance(m, nn.Conv2d)
        else ()
    )
    bd = None if block_density is None else round(block_density, 2)
    return (
        _kind(m), tuple(m.weight.shape), geometry, tuple(sample_shape), dtype,
        str(m.weight.device), round(density, 2), bd, tuple(candidates),
    )  # fmt: skip


def auto(name, m, *, block_size, batch_sizes, sample_shape, calibrate, margin, cal=None):
    """Convert ``m`` to the format chosen for it; returns ``(module, LayerChoice)``. ``cal``:
    the model's :class:`Calibration` (budget, reused decisions, load fallback)."""
    cal = Calibration() if cal is None else cal
    kind, dev = _kind(m), m.weight.device
    density = _density(m)
    choice = LayerChoice(name, kind, tuple(m.weight.shape), density, "dense", "calibrated", "")
    # candidates are built only to be timed, or once chosen (a static choice builds one)
    candidates, notes, block = ["dense"], [], None
    if density >= 1.0:
        notes.append("csr: nothing pruned")
    elif _cannot(m, "csr"):
        notes.append(_cannot(m, "csr"))
    else:
        candidates.append("csr")
    block_density = None
    if _cannot(m, "bsr"):
        notes.append(_cannot(m, "bsr"))
    else:
        block = _bsr_block(m, block_size)
        block_density = _block_density(m, block)  # from the mask: no values copied
        if block_density <= BSR_MAX_BLOCK_DENSITY:
            candidates.append("bsr")
        else:
            notes.append(
                f"bsr: {block_density:.0%} of {block[0]}x{block[1]} blocks hold a kept weight "
                f"(> {BSR_MAX_BLOCK_DENSITY:.0%})"
            )
    note = f" [{'; '.join(notes)}]" if notes else ""
    if len(candidates) == 1:
        choice.reason = "dense: no sparse candidate" + note
        choice.source = "static"
        return _dense_copy(m), choice
    why = None
    if not calibrate:
        why = "calibrate=False"
    elif sample_shape is None:
        why = "no example_input to time a conv layer"
    elif cal.static_why:
        why = cal.static_why
    key = None if why else _decision_key(
        m, m.weight.dtype, sample_shape, density, block_density, candidates
    )  # fmt: skip
    if why is None and key not in cal.decisions and cal.left() <= 0:
        why = f"calibration budget of {cal.budget_s:.0f} s spent"
    built: dict[str, nn.Module] = {}
    if why is not None:
        fmt, dense_above, reason = _static(m, dev.type, density, block_density, why)
        choice.source = "static"
    elif key in cal.decisions:
        first, fmt, dense_above, reason, ratios, times = cal.decisions[key]
        choice.ratios, choice.times_us = ratios, times
        reason = f"as timed for {first!r} (same shape, input and kept fraction): {reason}"
    else:
        built = {f: _build(m, f, block) for f in candidates}
        dtype = m.weight.dtype
        make = lambda b: torch.randn(b, *sample_shape, dtype=dtype, device=dev)  # noqa: E731
        share = cal.left() / max(cal.undecided, 1)  # the budget shared by the shapes left
        per_batch = max(0.05, min(2.0, share / (2 * len(batch_sizes))))
        cal.undecided -= 1
        measured = _measure(built, make, batch_sizes, dev, budget_s=per_batch)
        choice.times_us = {f: {b: v[0] for b, v in per.items()} for f, per in measured.items()}
        choice.ratios = {f: {b: v[1] for b, v in per.items()} for f, per in measured.items()}
        fmt, dense_above, reason = _choose(choice.ratios, batch_sizes, margin)
        cal.decisions[key] = (name, fmt, dense_above, reason, choice.ratios, choice.times_us)
    choice.format, choice.dense_above, choice.reason = fmt, dense_above, reason + note
    new = built[fmt] if fmt in built else _build(m, fmt, block)
    choice.block_size = new.block_size if fmt == "bsr" else None
    if fmt != "dense":
        new.dense_above = dense_above
    return new, choice


def forced(name, m, fmt, block_size, empty):
    kind = _kind(m)
    choice = LayerChoice(name, kind, tuple(m.weight.shape), _density(m), fmt, "forced", "")
    if fmt == "keep":
        choice.reason = "kept as it is (format 'keep')"
        return m, choice
    why = _cannot(m, fmt)
    if why:
        choice.format, choice.reason = "keep", f"kept as it is: {why}"
        return m, choice
    new = _build(m, fmt, block_size, empty=empty)
    choice.reason = f"format {fmt!r} asked for"
    if fmt == "bsr":
        choice.block_size = new.block_size
    return new, choice


def input_shapes(model: nn.Module, example_input, names: dict[int, str]) -> dict[str, tuple]:
    """Per-sample input shape of the layers ``names`` (id -> name) on ``example_input`` (one
    forward in eval mode, under no_grad; training flags restored)."""
    shapes: dict[str, tuple] = {}
    hooks = []
    for mod in model.modules():
        if id(mod) in names:

            def hook(module, args, name=names[id(mod)]):  # noqa: B008 (bound per layer)
                if args and isinstance(args[0], torch.Tensor) and name not in shapes:
                    shapes[name] = tuple(args[0].shape[1:])

            hooks.append(mod.register_forward_pre_hook(hook))
    modes = {mod: mod.training for mod in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            model(*args)
    finally:
        for h in hooks:
            h.remove()
        for mod, mode in modes.items():
            mod.training = mode
    return shapes


def machine_busy() -> str | None:
    """Why a timing here would be noise (None: the machine is quiet enough): other processes keep
    busy the cores our threads need. On the 2-core machine at load 2-4, torch's 2-thread MKL
    calls stall for 8 ms and a 9216 x 4096 layer that is 3.8x faster as CSR measured 1.0x; a
    calibration under load chose formats giving 1.05x at batch 1 where the quiet figure was 3.4x.
    Other processes only (:func:`sparsekern._timing.other_load`): this process's own recent work
    does not count."""
    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    busy = other_load()
    if busy is None:
        if not hasattr(os, "getloadavg"):
            return None
        busy, what = os.getloadavg()[0], "the 1-minute load average"
    else:
        what = "other processes"
    idle = cores - busy
    if idle < threads - 0.5:
        return (
            f"{what} keep {busy:.1f} of {cores} cores busy, leaving {max(idle, 0):.1f} for "
            f"{threads} threads"
        )
    return None


@dataclasses.dataclass
class Calibration:
    """The state of one ``to_inference`` calibration: a time budget for the whole model, the
    decisions taken so far (reused for layers of the same shape, kept fraction and input), and
    why every layer takes the static rule instead (a loaded machine)."""

    budget_s: float = CALIBRATION_BUDGET_S
    static_why: str | None = None
    undecided: int = 1  # shapes still to time (the caller's estimate)
    decisions: dict = dataclasses.field(default_factory=dict)
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


def start_calibration(format, calibrate: bool, budget_s: float = None) -> Calibration:
    """A :class:`Calibration`; when the machine is loaded (:func:`machine_busy`) it warns and
    sends every layer to the static rule: a timing on a loaded machine never decides."""
    cal = Calibration(CALIBRATION_BUDGET_S if budget_s is None else budget_s)
    auto = format == "auto" or (isinstance(format, dict) and "auto" in format.values())
    if not (auto and calibrate):
        return cal
    why = machine_busy()
    if why:
        cal.static_why = f"machine loaded: {why}"
        warnings.warn(
            f"to_inference: {why}; timings would be noise, so every layer takes the static rule "
            "(STATIC_RULE). Export on a quiet machine to calibrate.",
            stacklevel=4,
        )
    return cal


def format_choices(choices: dict[str, LayerChoice]) -> str:
    """One line per layer: name, shape, kept fraction, format, reason."""
    lines = []
    for name, c in choices.items():
        shape = "x".join(str(s) for s in c.weight_shape)
        fmt = c.format + ("" if c.dense_above is None else f" (dense above {c.dense_above})")
        lines.append(f"{name or '<model>'}: {c.kind} {shape}, {c.density:.1%} kept -> {fmt}: "
                     f"{c.reason}")  # fmt: skip
    return "\n".join(lines)


def linear_view(m: nn.Module) -> nn.Linear:
    """HF ``Conv1D`` / ``SparseConv1D`` (``y = x @ W + b``, ``W [in, out]``) as the
    ``nn.Linear`` computing the same (``W^T``, a copy) with its mask transposed alike: what the
    format builders take."""
    w = m.weight.detach()
    lin = nn.Linear(w.shape[0], w.shape[1], bias=m.bias is not None, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w.t().contiguous(), requires_grad=m.weight.requires_grad)
    if m.bias is not None:
        lin.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
    mask = m._buffers.get("mask")
    if mask is not None:
        lin.register_buffer("mask", mask.t().contiguous())
    lin.train(m.training)
    return lin


_ATTENTION_WHY = (
    "attention projections stay dense: nn.MultiheadAttention's forward (and its fused fast path) "
    "reads in_proj_weight and out_proj.weight as tensors, which a CSR / BSR layer does not hold"
)


def attention(name: str, m: nn.Module, fmt: str):
    """A ``SparseMultiheadAttention`` as a plain ``nn.MultiheadAttention`` holding its masked
    projection weights (``where(mask, w, 0)``, copies) for any format but ``"keep"``; returns
    ``(module, LayerChoice)``."""
    masks = [c for c in m.children() if "mask" in c._buffers]
    kept = sum(int(c.mask.count_nonzero()) for c in masks)
    total = sum(c.mask.numel() for c in masks)
    choice = LayerChoice(
        name, "attention", (m.embed_dim, m.embed_dim), kept / max(total, 1), "dense", "forced", ""
    )
    if fmt == "keep":
        choice.format, choice.reason = "keep", "kept as it is (format 'keep')"
        return m, choice
    new = nn.MultiheadAttention.__new__(nn.MultiheadAttention)
    new.__dict__.update(m.__dict__)
    for attr in ("_parameters", "_buffers", "_modules"):
        new.__dict__[attr] = type(m.__dict__[attr])(m.__dict__[attr])
    for c in masks:
        new._modules.pop(next(k for k, v in m._modules.items() if v is c))
    zero = torch.zeros((), dtype=m.out_proj.weight.dtype, device=m.out_proj.weight.device)
    for c in masks:
        if c is m.out_proj:
            continue
        w = m._parameters[c._param_name]
        new._parameters[c._param_name] = nn.Parameter(
            torch.where(c.mask, w.detach(), zero), requires_grad=w.requires_grad
        )
    op = m.out_proj
    out = nn.modules.linear.NonDynamicallyQuantizableLinear(
        op.in_features, op.out_features, bias=op.bias is not None, device="meta",
        dtype=op.weight.dtype,
    )  # fmt: skip
    dense = _dense_copy(op)
    out.weight, out.bias = dense.weight, dense.bias
    out.train(op.training)
    new._modules["out_proj"] = out
    choice.reason = _ATTENTION_WHY
    return new, choice
