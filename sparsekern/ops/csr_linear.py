"""csr_linear: ``y = x W^T + b`` for an unstructured sparse W held as a :class:`CSRMatrix`.

Where it runs:

* decode-sized batches (1..:data:`KERNEL_MAX_ROWS` rows of x) on CUDA (and on the CPU under
  ``TRITON_INTERPRET=1``): ``_csr_rows_kernel`` (Triton). One program per output row ``n``: it
  streams row ``n``'s values and int16 column indices (4 bytes per bf16 entry, against 2 bytes per
  weight for the dense matrix: at 10% density 5x fewer bytes than cuBLAS reads), gathers the
  matching entries of x and reduces them in fp32. x is read as ``xt [K, BLOCK_B]`` (x transposed,
  zero-padded to a power of two of rows), so the gather of one column index fetches the whole
  batch as one vector; at one row x itself is that layout (no copy).
* everything else (more rows, float64, CPU without the interpreter, triton missing): the vendor
  sparse product on torch's CSR (MKL on the CPU, cuSPARSE on CUDA), with int32 indices cached per
  weight. MKL takes float32/float64 only; other CPU dtypes are computed in float32 and cast back.
  Which batch sizes pay for which representation is the exporter's business
  (``sparsekern.nn.inference``: dense cuBLAS above the crossover).

Row starts are arbitrary, so the kernel splits each row into a masked head group, an aligned body
and a masked tail group of :data:`ALIGN` entries: the body's loads of values and indices are
16-byte vectors (``LDG.E.128``), which the static contract checks ("memory" kind).

Layers: ``@triton.jit`` kernel -> ``csr_linear_launch`` (check, allocate, launch; ``out=``) ->
``sparsekern::csr_linear_fwd`` custom op (what ``torch.compile`` sees) -> ``_CSRLinearFunction``
(autograd: gradients to x, the stored values and the bias) -> ``csr_linear`` (public). The
reference twin is ``csr_linear_reference``: ``F.linear(x, weight.to_dense(), bias)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsekern.formats.csr import CSRMatrix
from sparsekern.ops._dispatch import interpreter_enabled, use_kernels
from sparsekern.ops._launch import (
    KERNEL_DTYPES,
    as_rows,
    autocast_to,
    check_linear_inputs,
    out_tensor,
    twin_vjp,
)
from sparsekern.ops._mask_cache import cached_on_mask, tensor_key
from sparsekern.ops._triton import require_triton, tl, triton

__all__ = [
    "ALIGN",
    "KERNEL_MAX_ROWS",
    "compile_specs",
    "csr_linear",
    "csr_linear_launch",
    "csr_linear_reference",
    "csr_linear_vendor",
    "torch_csr",
    "torch_csr_product",
]

# The kernel serves decode-sized batches. Above 32 rows its x gathers (one BLOCK_B-wide vector
# per stored entry) cost more L1 traffic per entry than the 4 bytes of the entry itself, and the
# dense GEMM starts to reuse each weight across rows; cuBLAS takes over there (the exporter keeps
# a dense weight for it). No GPU has measured this yet: benchmarks/bench_inference.py --gpu does.
KERNEL_MAX_ROWS = 32
# Entries per aligned group: 8 x int16 = 16 bytes (one LDG.E.128), 8 x bf16 = 16 bytes.
ALIGN = 8
# MKL's CSR product takes these; other CPU dtypes are computed in float32.
_MKL_DTYPES = (torch.float32, torch.float64)

# ---------------------------------------------------------------------------------------------
# Autotune configs (data): (BLOCK_K entries per step, num_warps) -> the batch tiles BLOCK_B it
# serves. Up to 8 rows the values / index loads must be 16-byte vectors: 8 entries a thread,
# BLOCK_K = 256 x num_warps. From 16 rows the x gathers are the wide loads (16 x bf16 = 32 bytes
# an entry) and the [BLOCK_K, BLOCK_B] fp32 accumulator bounds the step: 64 elements a thread
# (64 registers). The autotuner keys on N, the bucketed mean row length ROW_NNZ and BLOCK_B.
# ---------------------------------------------------------------------------------------------
_GPU_CONFIGS = {
    (256, 1): (1, 2, 4, 8),
    (512, 2): (1, 2, 4, 8),
    (1024, 4): (1, 2, 4, 8),
    (2048, 8): (1, 2, 4, 8),
    (64, 1): (16, 32),
    (128, 2): (16, 32),
    (256, 4): (16, 32),
    (512, 8): (16, 32),
}
_INTERPRETER_CONFIG = (64, 1)


def _configs() -> list:
    rows = [_INTERPRETER_CONFIG] if interpreter_enabled() else list(_GPU_CONFIGS)
    return [triton.Config({"BLOCK_K": k}, num_warps=w, num_stages=1) for k, w in rows]


def _prune_tiles(configs, named_args, **kwargs):
    """Keep the configs that serve this BLOCK_B (all of them under the interpreter)."""
    bb = kwargs.get("BLOCK_B", 1)
    kept = [c for c in configs if bb in _GPU_CONFIGS.get((c.kwargs["BLOCK_K"], c.num_warps), ())]
    return kept or configs[:1]


@triton.jit
def _gather_group(acc, x_ptr, values_ptr, col_ptr, offs, ok, offs_b, BLOCK_B: tl.constexpr):
    """``acc [len(offs), BLOCK_B] += xt[col[offs], :] * values[offs]`` where ``ok``."""
    v = tl.load(values_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(col_ptr + offs, mask=ok, other=0).to(tl.int64)  # int16 -> int64 offsets
    xg = tl.load(x_ptr + c[:, None] * BLOCK_B + offs_b[None, :])  # c = 0 where not ok: valid
    return acc + xg.to(tl.float32) * v[:, None]


@triton.autotune(
    configs=_configs(),
    key=["N", "ROW_NNZ", "BLOCK_B"],
    prune_configs_by={"early_config_prune": _prune_tiles},
)
@triton.jit
def _csr_rows_kernel(
    x_ptr, values_ptr, col_ptr, row_ptr_ptr, bias_ptr, y_ptr,
    M, N, ROW_NNZ,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, ALIGN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``y[b, n] = sum_j values[j] * xt[col[j], b] (+ bias[n])`` over row n's entries j, for
    ``b < M``; ``xt [K, BLOCK_B]`` contiguous, zero beyond column M. ROW_NNZ only keys the
    autotuner (the bucketed mean row length)."""
    n = tl.program_id(0)
    start = tl.load(row_ptr_ptr + n)
    end = tl.load(row_ptr_ptr + n + 1)
    offs_b = tl.arange(0, BLOCK_B)
    offs_g = tl.arange(0, ALIGN)
    # Groups of ALIGN entries: g0 holds `start`, g1 holds `end`. The head group [g0, g0+ALIGN)
    # and the tail group [g1, g1+ALIGN) are masked (scalar loads); the body [g0+ALIGN, g1) is
    # aligned, so its loads are vectors.
    g0 = start - start % ALIGN
    g1 = end - end % ALIGN
    edge = tl.zeros((ALIGN, BLOCK_B), dtype=tl.float32)
    head = g0 + offs_g
    edge = _gather_group(
        edge, x_ptr, values_ptr, col_ptr, head, (head >= start) & (head < end), offs_b, BLOCK_B
    )
    if g1 > g0:
        tail = g1 + offs_g
        edge = _gather_group(edge, x_ptr, values_ptr, col_ptr, tail, tail < end, offs_b, BLOCK_B)
    lo = tl.multiple_of(g0 + ALIGN, ALIGN)
    hi = tl.multiple_of(g1, ALIGN)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_K, BLOCK_B), dtype=tl.float32)
    for i in range(0, tl.cdiv(hi - lo, BLOCK_K)):
        body = lo + i * BLOCK_K + offs_k
        acc = _gather_group(acc, x_ptr, values_ptr, col_ptr, body, body < hi, offs_b, BLOCK_B)
    out = tl.sum(acc, axis=0) + tl.sum(edge, axis=0)  # [BLOCK_B]
    if HAS_BIAS:
        out += tl.load(bias_ptr + n).to(tl.float32)
    y_ptrs = y_ptr + offs_b.to(tl.int64) * stride_ym + n.to(tl.int64) * stride_yn
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=offs_b < M)


# ---------------------------------------------------------------------------------------------
# Launcher: check, allocate, launch. ``out`` lets tests poison the output.
# ---------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _check_launch(x, values, row_ptr, col_idx, bias, rows: int, cols: int) -> None:
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"csr_linear kernel: takes float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != cols:
        raise ValueError(f"csr_linear kernel: expected x of shape [M, {cols}], got {list(x.shape)}")
    if x.shape[0] > KERNEL_MAX_ROWS:
        raise ValueError(
            f"csr_linear kernel: serves 1..{KERNEL_MAX_ROWS} rows of x (decode sizes), got "
            f"{x.shape[0]}; larger batches take the vendor path"
        )
    for name, t in (("values", values), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"csr_linear kernel: expected {name} as {x.dtype}, got {t.dtype}")
    devices = {t.device for t in (x, values, row_ptr, col_idx, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"csr_linear kernel: expected one device, got {sorted(map(str, devices))}")


def csr_linear_launch(
    x: torch.Tensor,
    values: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    bias: torch.Tensor | None,
    rows: int,
    cols: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y [M, rows] = x [M, cols] @ W^T (+ bias [rows])`` with W the CSR matrix ``(values [nnz],
    row_ptr [rows + 1], col_idx [nnz])``, for ``M <= KERNEL_MAX_ROWS``; any strides of x."""
    require_triton("csr_linear's decode kernel")
    _check_launch(x, values, row_ptr, col_idx, bias, rows, cols)
    M = x.shape[0]
    y = out_tensor(out, (M, rows), x, x.dtype)
    if M == 0 or rows == 0:
        return y
    if values.numel() == 0:  # nothing stored (cols may be 0): the kernel's gathers need a row
        return y.copy_(torch.zeros_like(y) if bias is None else bias.expand(M, rows))
    block_b = _next_pow2(M)
    if M == 1 and x.stride(1) == 1:
        xt = x.view(cols, 1) if x.is_contiguous() else x.reshape(cols, 1)
    else:  # [K, BLOCK_B], zero beyond M: one small copy (K * BLOCK_B elements)
        xt = F.pad(x.t(), (0, block_b - M)).contiguous()
    values = values.contiguous()
    col_idx = col_idx.contiguous()
    bias = None if bias is None else bias.contiguous()
    row_nnz = _next_pow2(max(1, values.numel() // max(rows, 1)))
    _csr_rows_kernel[(rows,)](
        xt, values, col_idx, row_ptr, bias if bias is not None else values, y,
        M, rows, row_nnz,
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, ALIGN=ALIGN, BLOCK_B=block_b,
    )  # fmt: skip
    return y


# ---------------------------------------------------------------------------------------------
# Vendor path: torch's CSR (MKL / cuSPARSE), the torch tensor cached per values tensor.
# ---------------------------------------------------------------------------------------------
def torch_csr(values, row_ptr, col_idx, rows: int, cols: int) -> torch.Tensor:
    """The torch ``sparse_csr`` tensor ``[rows, cols]`` of these parts (int32 indices, values
    aliased), cached on ``values`` (``_mask_cache``) until any of them changes (object, version
    counter, data pointer). The cache holds an int32 copy of the column indices (4 bytes per
    entry)."""
    key = (values.data_ptr(), values.dtype, rows, cols) + tensor_key(row_ptr, col_idx)
    return cached_on_mask(
        values,
        "torch_csr",
        lambda v: CSRMatrix(v, row_ptr, col_idx, (rows, cols), validate=False).to_sparse_csr(),
        key,
    )


def torch_csr_product(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None):
    """``x [M, cols] @ w^T (+ bias) -> [M, rows]`` for a torch ``sparse_csr`` ``w [rows,
    cols]``, no autograd: ``addmv`` at one row (MKL's SpMV: 6.6 us against 10.9 us for its SpMM
    at one column on a 784 x 300 layer at 4% kept, 2.1x faster on 4096 x 4096 at 4%), else
    ``addmm`` of ``W @ x^T`` returned as its transpose: a column-major ``[M, rows]`` view, as
    torch's own CSR product gives it (the next GEMM reads it as it is; a contiguous copy cost
    10-15% of a 4096 x 4096 layer at 64 rows, and writing column-major into a row-major ``y``
    with ``out=`` made MKL 3.7x slower)."""
    if x.shape[0] == 1:
        v = x.view(-1) if x.is_contiguous() else x[0]
        y = torch.mv(w, v) if bias is None else torch.addmv(bias, w, v)
        return y.view(1, -1)
    if x.shape[0] == 0:
        return x.new_empty((0, w.shape[0]))
    return (torch.mm(w, x.t()) if bias is None else torch.addmm(bias[:, None], w, x.t())).t()


def csr_linear_vendor(x, values, row_ptr, col_idx, bias, rows: int, cols: int) -> torch.Tensor:
    """No autograd: ``x [M, cols] -> [M, rows]`` through torch's CSR product
    (:func:`torch_csr_product`, the torch tensor cached by :func:`torch_csr`). MKL has no 16-bit
    CSR product: other CPU dtypes are computed in float32 and cast back."""
    dtype = x.dtype
    if x.device.type == "cpu" and dtype not in _MKL_DTYPES:
        v32 = values.float()  # cast per call, not cached
        b32 = None if bias is None else bias.float()
        # autocast off: under a bf16 autocast the float32 addmm would be cast straight back to
        # bf16, which MKL's CSR product refuses ("not implemented for 'BFloat16'")
        with torch.autocast("cpu", enabled=False):
            y = csr_linear_vendor(x.float(), v32, row_ptr, col_idx, b32, rows, cols)
        return y.to(dtype)
    return torch_csr_product(torch_csr(values, row_ptr, col_idx, rows, cols), x, bias)


def _fwd_impl(x, values, row_ptr, col_idx, bias, rows: int, cols: int) -> torch.Tensor:
    if use_kernels(x) and x.dtype in KERNEL_DTYPES and x.shape[0] <= KERNEL_MAX_ROWS:
        return csr_linear_launch(x, values, row_ptr, col_idx, bias, rows, cols)
    return csr_linear_vendor(x, values, row_ptr, col_idx, bias, rows, cols)


# A custom op: opaque to torch.compile, so a compiled model runs what eager mode runs.
@torch.library.custom_op("sparsekern::csr_linear_fwd", mutates_args=())
def _fwd_op(
    x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
    bias: torch.Tensor | None, rows: int, cols: int,
) -> torch.Tensor:  # fmt: skip
    return _fwd_impl(x, values, row_ptr, col_idx, bias, rows, cols)


@_fwd_op.register_fake
def _(x, values, row_ptr, col_idx, bias, rows, cols):
    return x.new_empty((x.shape[0], rows))


def _run_fwd(*args) -> torch.Tensor:
    """The custom op under torch.compile, else the implementation directly (the dispatcher
    round trip of a custom op costs tens of microseconds, as much as a batch-1 LeNet layer)."""
    if torch.compiler.is_compiling():
        return torch.ops.sparsekern.csr_linear_fwd(*args)
    return _fwd_impl(*args)


# Entries per backward chunk: the [M, chunk] gathers stay under 2^24 elements (64 MiB in fp32).
_GRAD_CHUNK_ELEMENTS = 2**24


def _backward(dy, x, values, row_ptr, col_idx, rows: int, cols: int, need_dx: bool, need_dv: bool):
    """``dx [M, cols] = dy @ W`` and ``dvalues [nnz]``: entry j in row r, column c gets
    ``sum_b dy[b, r] * x[b, c]`` (only stored entries). Gathers in fp32, chunked over entries;
    every device and dtype (the backward is not the hot path of an inference layer); float64
    stays float64."""
    m = CSRMatrix(values, row_ptr, col_idx, (rows, cols), validate=False)
    r_all, c_all = m.row_indices().long(), col_idx.long()
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    dy32, x32, v32 = dy.to(acc), x.to(acc), values.detach().to(acc)
    M, nnz = dy.shape[0], values.numel()
    dx = torch.zeros((M, cols), dtype=acc, device=dy.device) if need_dx else None
    dv = torch.empty(nnz, dtype=acc, device=dy.device) if need_dv else None
    step = max(1, _GRAD_CHUNK_ELEMENTS // max(M, 1))
    for s in range(0, nnz, step):
        r, c = r_all[s : s + step], c_all[s : s + step]
        g = dy32[:, r]  # [M, chunk]
        if need_dx:
            dx.index_add_(1, c, g * v32[s : s + step])
        if need_dv:
            dv[s : s + step] = (g * x32[:, c]).sum(0)
    return (
        None if dx is None else dx.to(x.dtype),
        None if dv is None else dv.to(values.dtype),
    )


class _CSRLinearFunction(torch.autograd.Function):
    """Autograd over ``values`` (the stored entries), ``x`` and ``bias``."""

    @staticmethod
    def forward(ctx, x, values, bias, row_ptr, col_idx, rows, cols):
        x2 = as_rows(x)
        y = _run_fwd(x2, values, row_ptr, col_idx, bias, rows, cols)
        ctx.save_for_backward(x2, values, row_ptr, col_idx)
        ctx.dims, ctx.x_shape, ctx.has_bias = (rows, cols), x.shape, bias is not None
        return y.reshape(*x.shape[:-1], rows)

    @staticmethod
    def backward(ctx, dy):
        x2, values, row_ptr, col_idx = ctx.saved_tensors
        dy2 = as_rows(dy)
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the plain twin (the backward below is not)
            rows, cols = ctx.dims
            dx, dv = twin_vjp(
                lambda x2, v: F.linear(
                    x2, CSRMatrix(v, row_ptr, col_idx, (rows, cols), validate=False).to_dense()
                ),
                (x2, values), ctx.needs_input_grad[:2], dy2,
            )  # fmt: skip
            db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
            dx = None if dx is None else dx.reshape(ctx.x_shape)
            return dx, dv, db, None, None, None, None
        need_dx, need_dv = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = dv = db = None
        if need_dx or need_dv:
            dx, dv = _backward(dy2, x2, values, row_ptr, col_idx, *ctx.dims, need_dx, need_dv)
            dx = None if dx is None else dx.reshape(ctx.x_shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dv, db, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Reference twin and public op
# ---------------------------------------------------------------------------------------------
def csr_linear_reference(
    x: torch.Tensor, weight: CSRMatrix, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain PyTorch: ``F.linear(x, weight.to_dense(), bias)``; differentiable w.r.t. ``x``,
    ``weight.values`` (``to_dense`` scatters them) and ``bias``."""
    return F.linear(x, weight.to_dense(), bias)


def csr_linear(
    x: torch.Tensor, weight: CSRMatrix, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y = x @ weight.to_dense().T + bias``, touching only the stored entries.

    Args:
        x: ``[..., in_features]`` floating point, any strides.
        weight: :class:`CSRMatrix` of shape ``(out_features, in_features)``, x's dtype.
        bias: ``[out_features]`` or None.
    Returns:
        ``[..., out_features]``. Gradients go to ``x``, ``weight.values`` (``[nnz]``: stored
        entries only) and ``bias``. Decode-sized batches run the Triton kernel where kernels run
        (module docstring); the rest runs torch's CSR product (MKL, cuSPARSE).

    Under ``torch.autocast`` the inputs are cast to the autocast dtype, as ``F.linear`` would.
    """
    if not isinstance(weight, CSRMatrix):
        raise TypeError(f"csr_linear: expected weight as a CSRMatrix, got {type(weight).__name__}")
    values = weight.values
    x, values, bias = autocast_to(x, values, bias)
    if values is not weight.values:
        weight = CSRMatrix(values, weight.row_ptr, weight.col_idx, weight.shape, validate=False)
    check_linear_inputs("csr_linear", x, *weight.shape, weight, bias, in_name="columns")
    # rows made here, not inside the Function: what it saves is then its own input, whose
    # autograd history a second derivative (twin_vjp) needs
    y = _CSRLinearFunction.apply(
        as_rows(x), values, bias, weight.row_ptr, weight.col_idx, weight.shape[0], weight.shape[1]
    )
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------
# Static performance contract (``python -m sparsekern.ops._compile_check``)
# ---------------------------------------------------------------------------------------------
# AlexNet fc6 (9216 -> 4096) at 10% density, 8 rows of x (the GPU target: batch 1-8).
BENCH_SHAPE = {"rows_x": 8, "out": 4096, "in": 9216, "density": 0.1}


def compile_specs():
    """One spec per (config, dtype, batch tile) of ``_csr_rows_kernel`` at :data:`BENCH_SHAPE`
    (``M`` rows of x: 8, plus 1 and 32, the ends of the kernel's range; ``ROW_NNZ`` = 1024, the
    bucket of 922 entries a row). ``hot``: the bf16 configs the autotuner can pick there;
    ``contract``: "memory" (no spills, 64/128-bit vector loads)."""
    n_out, k_in = BENCH_SHAPE["out"], BENCH_SHAPE["in"]
    row_nnz = _next_pow2(int(k_in * BENCH_SHAPE["density"]))
    for dt in ("bf16", "fp16", "fp32"):
        for m in (BENCH_SHAPE["rows_x"], 1, KERNEL_MAX_ROWS):
            block_b = _next_pow2(m)
            values = {"M": m, "N": n_out, "ROW_NNZ": row_nnz, "stride_ym": n_out, "stride_yn": 1}
            signature = {
                "x_ptr": f"*{dt}", "values_ptr": f"*{dt}", "col_ptr": "*i16",
                "row_ptr_ptr": "*i32", "bias_ptr": f"*{dt}", "y_ptr": f"*{dt}",
            } | {k: "i32" for k in values}  # fmt: skip
            for (block_k, w), tiles in _GPU_CONFIGS.items():
                if block_b not in tiles:
                    continue
                yield {
                    "name": f"csr_linear.fwd[{dt},m{m},k{block_k},w{w}]",
                    "fn": _csr_rows_kernel.fn,
                    "signature": signature,
                    "constexprs": {
                        "HAS_BIAS": True,
                        "ALIGN": ALIGN,
                        "BLOCK_B": block_b,
                        "BLOCK_K": block_k,
                    },  # fmt: skip
                    "values": values,
                    "num_warps": w,
                    "num_stages": 1,
                    "hot": dt == "bf16",
                    "contract": "memory",
                }
