"""Han et al. 2015's compressed storage of a pruned model: per sparse layer, the kept values and
*relative* indices (the gap to the previous stored entry) in a few bits each, with filler zeros
where a gap overflows; everything else stored densely.

Encoding of one sparse layer (weight flattened row-major, ``[out, in]`` or ``[out, in/g, kh, kw]``):

* the stored entries are the kept positions (``mask`` True), in order; each gets a value (the
  weight, in the weight's dtype) and a code ``gap = position - previous_position - 1`` (the number
  of skipped positions; the first entry counts from position -1), so a b-bit code covers gaps of
  0 .. 2^b - 1: 0 .. 31 for FC layers (5 bits), 0 .. 255 for conv layers (8 bits);
* a longer gap is bridged by filler entries: a zero value with the largest code 2^b - 1, which
  lands on a pruned position 2^b further on; a gap of ``g`` needs ``g // 2^b`` fillers;
* codes are bit-packed (MSB first), values stored raw. When decoding, an entry with the largest
  code and an all-zero value is a filler; the rare kept weight that is exactly +0.0 at the largest
  gap is listed in the header as not-a-filler, so masks round-trip exactly too.

File layout (little-endian)::

    [0:8]    magic  b"SKRIDX\\r\\n"
    [8:10]   u16    format version (1)
    [10:14]  u32    H, header length
    [14:22]  u64    P, payload length
    [22:22+H]       header, UTF-8 JSON: state-dict key order, per sparse layer its kind, index
                    bits, shape, dtype, entry/filler/kept counts and payload offsets; the offset
                    of the dense part
    [.. +P]         payload: per layer values then packed codes; then the dense part (the other
                    parameters and buffers: biases, dense layers, BatchNorm stats ...) as a
                    ``torch.save`` blob, read back with ``weights_only=True``
    [-32:]          SHA-256 of everything before it

Writing goes to a temporary file in the target directory, fsynced, then ``os.replace``d over the
target: a crash leaves the old file or the new one, never half of one.

Index overhead (Han: 15.6% for AlexNet) is defined here as ``index_bytes / value_bytes`` over the
sparse layers: the extra storage the indices cost relative to the values they locate (fillers
count in both). For float32 FC layers without fillers it is 5 / 32 = 15.6%, which is where Han's
figure comes from; conv layers cost 8 / 32 = 25%.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sparsekern.formats._files import atomic_write

__all__ = [
    "save_compressed",
    "load_compressed",
    "encode_relative",
    "decode_relative",
    "CompressedFormatError",
    "MAGIC",
    "VERSION",
    "DEFAULT_INDEX_BITS",
]

MAGIC = b"SKRIDX\r\n"  # \r\n: a text-mode transfer that mangles line ends is caught at once
VERSION = 1
DEFAULT_INDEX_BITS = {"fc": 5, "conv": 8}
_PREAMBLE = struct.Struct("<8sHIQ")  # magic, version, header length, payload length: 22 bytes
_DIGEST = 32  # SHA-256
_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class CompressedFormatError(ValueError):
    """A file that is not a valid sparsekern compressed model (truncated, corrupted, wrong
    version), or one that does not fit the model it is loaded into."""


# ------------------------------------------------------------------------------------------------
# One tensor: values + relative indices
# ------------------------------------------------------------------------------------------------
def _value_bits_zero(values: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: the value's bit pattern is all zeros (+0.0; -0.0 is not)."""
    return values.view(_INT_OF_SIZE[values.element_size()]) == 0


def encode_relative(
    weight: torch.Tensor, mask: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Relative-index encoding of the kept entries of one layer.

    Args:
        weight: ``[out, in]`` or ``[out, in/g, kh, kw]``, a float dtype; must be zero where
            ``mask`` is False.
        mask: bool, the weight's shape.
        bits: index width, 1 .. 16 (Han: 5 for FC, 8 for conv).

    Returns:
        ``codes`` int64 ``[n_entries]`` in ``[0, 2^bits - 1]``, ``values`` ``[n_entries]`` in the
        weight's dtype (fillers are +0.0), and info ``{"entries", "fillers", "kept",
        "not_fillers"}`` (``not_fillers``: stream indices of kept +0.0 weights at the largest code).
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"encode_relative: expected 1 <= bits <= 16, got {bits}")
    if mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"encode_relative: expected a bool mask of shape {list(weight.shape)}, got "
            f"{mask.dtype} {list(mask.shape)}"
        )
    w = weight.detach().cpu().contiguous().reshape(-1)
    m = mask.detach().cpu().reshape(-1)
    stray = int(((w != 0) & ~m).sum())
    if stray:
        raise ValueError(
            f"encode_relative: expected zeros at pruned positions, got {stray} non-zero weights "
            "where the mask is False (install masks with sparsekern.nn.set_mask)"
        )
    span = 1 << bits  # a code covers gaps 0 .. span - 1
    pos = torch.nonzero(m).flatten()
    prev = torch.cat([pos.new_full((1,), -1), pos[:-1]])
    gaps = pos - prev - 1
    n_fill = gaps // span  # fillers in front of each kept entry
    last = torch.cumsum(n_fill + 1, 0) - 1  # stream index of each kept entry
    total = int(last[-1]) + 1 if pos.numel() else 0
    codes = torch.full((total,), span - 1, dtype=torch.int64)
    codes[last] = gaps - n_fill * span
    values = torch.zeros(total, dtype=w.dtype)
    kept_values = w[pos]
    values[last] = kept_values
    ambiguous = (codes[last] == span - 1) & _value_bits_zero(kept_values)
    info = {
        "entries": total,
        "fillers": total - pos.numel(),
        "kept": pos.numel(),
        "not_fillers": last[ambiguous].tolist(),
    }
    return codes, values, info


def decode_relative(
    codes: torch.Tensor,
    values: torch.Tensor,
    bits: int,
    shape: tuple[int, ...],
    not_fillers: list[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_relative`: ``(weight, mask)`` of ``shape``.

    Raises:
        CompressedFormatError: the positions run past the end of the tensor.
    """
    numel = int(np.prod(shape)) if len(shape) else 1
    span = 1 << bits
    pos = torch.cumsum(codes + 1, 0) - 1
    if pos.numel() and int(pos[-1]) >= numel:
        raise CompressedFormatError(
            f"relative indices run to position {int(pos[-1])}, expected < {numel} "
            f"(tensor of shape {list(shape)}): corrupted data"
        )
    filler = (codes == span - 1) & _value_bits_zero(values)
    if len(not_fillers):
        filler[torch.as_tensor(list(not_fillers), dtype=torch.int64)] = False
    real = ~filler
    weight = torch.zeros(numel, dtype=values.dtype)
    mask = torch.zeros(numel, dtype=torch.bool)
    weight[pos[real]] = values[real]
    mask[pos[real]] = True
    return weight.reshape(shape), mask.reshape(shape)


def _pack(codes: torch.Tensor, bits: int) -> bytes:
    """Bit-pack ``codes`` (each < 2^bits), MSB first; the last byte is zero-padded."""
    if bits == 8:
        return codes.to(torch.uint8).numpy().tobytes()
    c = codes.numpy().astype(np.uint32)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
    bit_matrix = ((c[:, None] >> shifts) & 1).astype(np.uint8)  # [n, bits]
    return np.packbits(bit_matrix.reshape(-1)).tobytes()


def _unpack(buf: bytes, n: int, bits: int) -> torch.Tensor:
    raw = np.frombuffer(buf, dtype=np.uint8)
    if bits == 8:
        return torch.from_numpy(raw.astype(np.int64))
    bit_matrix = np.unpackbits(raw, count=n * bits).reshape(n, bits).astype(np.int64)
    weights = 1 << np.arange(bits - 1, -1, -1, dtype=np.int64)
    return torch.from_numpy(bit_matrix @ weights)


def _packed_len(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


# ------------------------------------------------------------------------------------------------
# Model files
# ------------------------------------------------------------------------------------------------
def _sparse_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` for modules with a ``weight`` and a bool ``mask`` buffer of its shape
    (SparseLinear, SparseConv2d, ...), in ``named_modules`` order."""
    out = {}
    for name, m in model.named_modules():
        mask, weight = m._buffers.get("mask"), getattr(m, "weight", None)
        if (
            isinstance(mask, torch.Tensor)
            and isinstance(weight, torch.Tensor)
            and mask.dtype == torch.bool
            and mask.shape == weight.shape
        ):
            out[name] = m
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"save_compressed: expected weights in {list(_DTYPES)}, got {dtype}")
    return name


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def save_compressed(
    model: nn.Module, path: str | os.PathLike, index_bits: dict[str, int] | None = None
) -> dict:
    """Write ``model`` in Han's compressed format (see the module docstring), atomically.

    Every sparse layer (a module with a bool ``mask`` buffer: ``SparseLinear``, ``SparseConv2d``)
    stores its weight as values + relative indices (5 bits for FC, 8 for conv, by default) and
    its mask implicitly; every other entry of ``model.state_dict()`` is stored densely.

    Args:
        model: the model; its pruned weights must be exactly zero (``set_mask`` guarantees it).
        path: the file to write (replaced atomically if it exists).
        index_bits: override ``{"fc": 5, "conv": 8}``.

    Returns:
        Stats: ``file_bytes`` (the file's size), ``dense_bytes`` (all state-dict tensors except
        masks, stored densely: a plain checkpoint's payload), ``value_bytes`` and ``index_bytes``
        (sparse layers), ``other_bytes`` (the dense part's blob), ``kept``, ``entries``,
        ``fillers``, ``index_overhead`` (``index_bytes / value_bytes``), ``compression_ratio``
        (``dense_bytes / file_bytes``) and ``layers`` (the same per sparse layer).
    """
    bits_by_kind = dict(DEFAULT_INDEX_BITS)
    bits_by_kind.update(index_bits or {})
    state = model.state_dict()
    layers = _sparse_layers(model)
    payload = bytearray()
    layer_meta, layer_stats = [], []
    sparse_keys: set[str] = set()
    for name in layers:
        wkey, mkey = _prefix(name) + "weight", _prefix(name) + "mask"
        if wkey not in state or mkey not in state:
            continue  # e.g. a second name of a shared module is stored densely
        weight, mask = state[wkey], state[mkey]
        kind = "conv" if weight.dim() > 2 else "fc"
        bits = int(bits_by_kind[kind])
        try:
            codes, values, info = encode_relative(weight, mask, bits)
        except ValueError as e:
            raise ValueError(f"save_compressed: layer {name!r}: {e}") from None
        vbytes = values.contiguous().view(torch.uint8).numpy().tobytes()
        ibytes = _pack(codes, bits)
        meta = {
            "name": name,
            "weight_key": wkey,
            "mask_key": mkey,
            "kind": kind,
            "bits": bits,
            "shape": list(weight.shape),
            "dtype": _dtype_name(weight.dtype),
            **info,
            "values": [len(payload), len(vbytes)],
        }
        payload += vbytes
        meta["indices"] = [len(payload), len(ibytes)]
        payload += ibytes
        layer_meta.append(meta)
        layer_stats.append(
            {
                "name": name,
                "kind": kind,
                "bits": bits,
                "numel": weight.numel(),
                "kept": info["kept"],
                "fillers": info["fillers"],
                "value_bytes": len(vbytes),
                "index_bytes": len(ibytes),
                "dense_bytes": weight.numel() * weight.element_size(),
            }
        )
        sparse_keys |= {wkey, mkey}
    dense = OrderedDict(
        (k, v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
        for k, v in state.items()
        if k not in sparse_keys
    )
    buf = io.BytesIO()
    torch.save(dense, buf)
    dense_blob = buf.getvalue()
    dense_at = [len(payload), len(dense_blob)]
    payload += dense_blob
    header = json.dumps(
        {
            "byteorder": sys.byteorder,
            "keys": list(state.keys()),
            "layers": layer_meta,
            "dense": dense_at,
        },
        separators=(",", ":"),
    ).encode("utf-8")
    body = _PREAMBLE.pack(MAGIC, VERSION, len(header), len(payload)) + header + bytes(payload)
    data = body + hashlib.sha256(body).digest()
    atomic_write(Path(path), data)

    mask_keys = {_prefix(n) + "mask" for n in layers}
    dense_bytes = sum(
        v.numel() * v.element_size()
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and k not in mask_keys
    )
    value_bytes = sum(s["value_bytes"] for s in layer_stats)
    index_bytes = sum(s["index_bytes"] for s in layer_stats)
    return {
        "file_bytes": len(data),
        "dense_bytes": dense_bytes,
        "value_bytes": value_bytes,
        "index_bytes": index_bytes,
        "other_bytes": len(dense_blob),
        "header_bytes": _PREAMBLE.size + len(header) + _DIGEST,
        "kept": sum(s["kept"] for s in layer_stats),
        "entries": sum(s["kept"] + s["fillers"] for s in layer_stats),
        "fillers": sum(s["fillers"] for s in layer_stats),
        "index_overhead": index_bytes / value_bytes if value_bytes else 0.0,
        "compression_ratio": dense_bytes / len(data),
        "layers": layer_stats,
    }


def _fail(path, msg: str) -> CompressedFormatError:
    return CompressedFormatError(f"load_compressed({str(path)!r}): {msg}")


def _read(path: str | os.PathLike) -> OrderedDict:
    """Parse and fully verify a file; returns the state dict (CPU tensors)."""
    data = Path(path).read_bytes()
    if len(data) < _PREAMBLE.size:
        raise _fail(path, f"truncated: expected at least {_PREAMBLE.size} bytes, found {len(data)}")
    magic, version, hlen, plen = _PREAMBLE.unpack_from(data, 0)
    if magic != MAGIC:
        raise _fail(path, f"not a sparsekern compressed model: expected magic {MAGIC!r}, "
                          f"found {magic!r}")  # fmt: skip
    if version != VERSION:
        raise _fail(path, f"unsupported format version: expected {VERSION}, found {version}")
    expected = _PREAMBLE.size + hlen + plen + _DIGEST
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing data or corrupted lengths"
        raise _fail(path, f"{what}: expected {expected} bytes, found {len(data)}")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    actual = hashlib.sha256(body).digest()
    if actual != digest:
        raise _fail(
            path,
            f"checksum mismatch (corrupted file): expected SHA-256 {digest.hex()[:16]}..., "
            f"found {actual.hex()[:16]}...",
        )
    try:
        header = json.loads(body[_PREAMBLE.size : _PREAMBLE.size + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"corrupted header: expected UTF-8 JSON, found an error ({e})") from None
    if header.get("byteorder", sys.byteorder) != sys.byteorder:
        raise _fail(
            path, f"expected {sys.byteorder}-endian data, found {header['byteorder']}-endian"
        )
    payload = memoryview(body)[_PREAMBLE.size + hlen :]
    tensors: dict[str, object] = {}
    need = ("name", "dtype", "entries", "values", "indices", "bits", "shape", "not_fillers")
    for meta in header.get("layers", []):
        if not isinstance(meta, dict) or any(k not in meta for k in need):
            got = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
            raise _fail(
                path, f"corrupted header: expected layer entries with {list(need)}, got {got}"
            )
        if meta["dtype"] not in _DTYPES:
            raise _fail(
                path,
                f"layer {meta['name']!r}: expected a dtype among {sorted(_DTYPES)}, found "
                f"{meta['dtype']!r}",
            )
        dtype = _DTYPES[meta["dtype"]]
        n = meta["entries"]
        v_off, v_len = meta["values"]
        i_off, i_len = meta["indices"]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if v_len != n * itemsize or i_len != _packed_len(n, meta["bits"]):
            raise _fail(
                path,
                f"layer {meta['name']!r}: expected {n * itemsize} value bytes and "
                f"{_packed_len(n, meta['bits'])} index bytes, found {v_len} and {i_len}",
            )
        raw = bytearray(payload[v_off : v_off + v_len])
        values = (
            torch.frombuffer(raw, dtype=torch.uint8).view(dtype)
            if n
            else torch.empty(0, dtype=dtype)
        )
        codes = _unpack(bytes(payload[i_off : i_off + i_len]), n, meta["bits"])
        try:
            weight, mask = decode_relative(
                codes, values, meta["bits"], tuple(meta["shape"]), meta["not_fillers"]
            )
        except CompressedFormatError as e:
            raise _fail(path, f"layer {meta['name']!r}: {e}") from None
        kept = int(mask.sum())
        if kept != meta["kept"] or n - kept != meta["fillers"]:
            raise _fail(
                path,
                f"layer {meta['name']!r}: expected {meta['kept']} kept and {meta['fillers']} "
                f"fillers, found {kept} and {n - kept}",
            )
        tensors[meta["weight_key"]] = weight
        tensors[meta["mask_key"]] = mask
    d_off, d_len = header["dense"]
    dense = torch.load(io.BytesIO(bytes(payload[d_off : d_off + d_len])), weights_only=True)
    tensors.update(dense)
    missing = [k for k in header["keys"] if k not in tensors]
    if missing:
        raise _fail(path, f"expected entries {missing}, found none")
    return OrderedDict((k, tensors[k]) for k in header["keys"])


def _check_fits(path, model: nn.Module, state: OrderedDict) -> None:
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        raise _fail(
            path,
            f"does not fit the model: the model expects {missing} which the file lacks, the file "
            f"has {unexpected} which the model lacks",
        )
    for k, v in state.items():
        t = target[k]
        both = isinstance(t, torch.Tensor) and isinstance(v, torch.Tensor)
        if both and (t.shape != v.shape or t.dtype != v.dtype):
            raise _fail(
                path,
                f"entry {k!r}: expected {t.dtype} {list(t.shape)} (the model's), found "
                f"{v.dtype} {list(v.shape)} in the file",
            )


def load_compressed(path: str | os.PathLike, model: nn.Module | None = None):
    """Read a file written by :func:`save_compressed`.

    The whole file is read and verified (length, magic, version, SHA-256) and every layer decoded
    before anything is touched, so a truncated or corrupted file raises
    :class:`CompressedFormatError` (a ``ValueError`` naming what was expected and what was found)
    and leaves ``model`` as it was.

    Args:
        path: the file.
        model: optional; a model with the same structure, dtypes and layer sizes as the saved one
            (e.g. a freshly built ``sparsify``-ed one). Checked entry by entry (keys, shapes,
            dtypes) before loading.

    Returns:
        With ``model``: ``model`` itself, its weights, masks, biases and buffers bit-for-bit those
        that were saved. With ``model=None``: the state dict (an ``OrderedDict`` of CPU tensors in
        the original key order, masks included), ready for ``model.load_state_dict``.
    """
    state = _read(path)
    if model is None:
        return state
    _check_fits(path, model, state)
    model.load_state_dict(state, strict=True)
    return model
