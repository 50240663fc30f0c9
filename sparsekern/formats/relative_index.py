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

Version 2 (Deep Compression, Han, Mao, Dally 2016; ``save_compressed(..., quantize=...,
huffman=True)``) keeps the preamble, header and trailer and changes a layer's payload to, in order
(those that apply): ``codebook`` (the layer's shared values, weight dtype), ``value_table`` and
``values`` (per stream entry its codebook index + 1, 0 for a filler zero: Huffman code lengths
and stream, or bit-packed at the quantisation width; raw values when not quantised),
``index_table`` and ``indices`` (the relative-index codes: Huffman coded, or bit-packed). The
other state-dict tensors are stored raw, one segment each, described in the header. The header's
segments must tile the payload exactly, in this order, which the loader checks.

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

from sparsekern.formats import huffman as _huff
from sparsekern.formats._files import atomic_write
from sparsekern.formats.quantize import (
    DEFAULT_QUANT_BITS,
    QuantizedWeights,
    layer_codebook,
    layer_kind,
)
from sparsekern.formats.quantize import sparse_layers as _sparse_layers

__all__ = [
    "save_compressed",
    "load_compressed",
    "encode_relative",
    "decode_relative",
    "CompressedFormatError",
    "MAGIC",
    "VERSION",
    "DEFAULT_INDEX_BITS",
    "format_storage",
]

MAGIC = b"SKRIDX\r\n"  # \r\n: a text-mode transfer that mangles line ends is caught at once
VERSION = 1  # Han 2015's format (raw values); 2: Deep Compression (quantised and/or Huffman)
_READ_VERSIONS = (1, 2)
DEFAULT_INDEX_BITS = {"fc": 5, "conv": 8}
_PREAMBLE = struct.Struct("<8sHIQ")  # magic, version, header length, payload length: 22 bytes
_DIGEST = 32  # SHA-256
_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_RAW_DTYPES = {  # dense entries of a version-2 file, stored raw
    **_DTYPES,
    **{n: getattr(torch, n) for n in ("int8", "int16", "int32", "int64", "uint8", "bool")},
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
def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"save_compressed: expected weights in {list(_DTYPES)}, got {dtype}")
    return name


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _quant_bits(quantize, layers: dict[str, nn.Module]) -> dict[str, int] | None:
    """``{layer name: bits}`` for ``save_compressed``'s ``quantize`` argument, or None."""
    if quantize is None or quantize is False:
        return None
    if isinstance(quantize, QuantizedWeights):
        other = [n for n in layers if quantize.layers.get(n) is not layers[n]]
        if other:
            raise ValueError(
                "save_compressed: expected a QuantizedWeights made on this model, got one whose "
                f"layers {other} are not this model's"
            )
        quantize.check()
        return dict(quantize.bits)
    if quantize is True:
        by_kind = dict(DEFAULT_QUANT_BITS)
    elif isinstance(quantize, dict):
        if unknown := set(quantize) - {"fc", "conv"}:
            raise ValueError(
                f"save_compressed: expected quantize bits for 'fc' / 'conv', got {sorted(unknown)}"
            )
        by_kind = {**DEFAULT_QUANT_BITS, **quantize}
    else:
        raise TypeError(
            "save_compressed: expected quantize None, True, {'fc': b, 'conv': b} or a "
            f"QuantizedWeights, got {type(quantize).__name__}"
        )
    bad = {k: b for k, b in by_kind.items() if not (isinstance(b, int) and 1 <= b <= 15)}
    if bad:
        raise ValueError(f"save_compressed: expected quantize bits in 1 .. 15, got {bad}")
    return {n: by_kind[layer_kind(m.weight)] for n, m in layers.items()}


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _huffman_segments(symbols: torch.Tensor, n_symbols: int) -> tuple[bytes, bytes]:
    """``(packed code lengths, Huffman stream)`` of ``symbols`` in ``[0, n_symbols)``."""
    s = symbols.numpy()
    lengths = _huff.code_lengths(np.bincount(s, minlength=n_symbols))
    return _huff.pack_lengths(lengths), _huff.encode(s, lengths)[0]


def _encode_layer_v2(
    weight: torch.Tensor, mask: torch.Tensor, bits: int, qbits: int | None, use_huffman: bool
) -> tuple[dict, list[tuple[str, bytes]]]:
    """One sparse layer of a version-2 file: its header fields and its payload segments, in
    order (``codebook``, ``value_table``, ``values``, ``index_table``, ``indices``; those that
    apply)."""
    codes, values, info = encode_relative(weight, mask, bits)
    segs: list[tuple[str, bytes]] = []
    meta = {k: info[k] for k in ("entries", "fillers", "kept")}
    if qbits:
        # stream entries on kept positions are real, fillers land on pruned ones
        pos = torch.cumsum(codes + 1, 0) - 1
        real = mask.detach().cpu().reshape(-1)[pos]
        codebook, labels = layer_codebook(values[real], qbits)
        symbols = torch.zeros(codes.numel(), dtype=torch.int64)  # 0: the filler zero
        symbols[real] = labels + 1
        meta |= {"qbits": qbits, "clusters": codebook.numel()}
        segs.append(("codebook", _raw(codebook)))
        if use_huffman:
            table, stream = _huffman_segments(symbols, 1 << qbits)
            segs += [("value_table", table), ("values", stream)]
        else:
            segs.append(("values", _pack(symbols, qbits)))
    else:
        meta["not_fillers"] = info["not_fillers"]
        segs.append(("values", _raw(values)))
    if use_huffman:
        table, stream = _huffman_segments(codes, 1 << bits)
        segs += [("index_table", table), ("indices", stream)]
    else:
        segs.append(("indices", _pack(codes, bits)))
    return meta, segs


def _layer_stats(name, kind, bits, weight, info, segs: dict[str, bytes], qbits) -> dict:
    return {
        "name": name,
        "kind": kind,
        "bits": bits,
        "quant_bits": qbits,
        "numel": weight.numel(),
        "kept": info["kept"],
        "fillers": info["fillers"],
        "value_bytes": len(segs["values"]),
        "index_bytes": len(segs["indices"]),
        "codebook_bytes": len(segs.get("codebook", b"")),
        "table_bytes": len(segs.get("value_table", b"")) + len(segs.get("index_table", b"")),
        "dense_bytes": weight.numel() * weight.element_size(),
    }


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike,
    index_bits: dict[str, int] | None = None,
    *,
    quantize: bool | dict[str, int] | QuantizedWeights | None = None,
    huffman: bool = False,
) -> dict:
    """Write ``model`` in Han's compressed format (see the module docstring), atomically, with a
    SHA-256 trailer; optionally with Deep Compression's quantisation and Huffman coding.

    Every sparse layer (a module with a bool ``mask`` buffer: ``SparseLinear``, ``SparseConv2d``)
    stores its weight as values + relative indices (5 bits for FC, 8 for conv, by default) and
    its mask implicitly; every other entry of ``model.state_dict()`` is stored densely.

    With the defaults (``quantize=None, huffman=False``) this is Han et al. 2015's format
    (version 1, raw values). With either option on (version 2, Deep Compression, Han, Mao, Dally
    2016), per sparse layer:

    * ``quantize``: the kept weights are stored as indices into a per-layer codebook of at most
      ``2^b - 1`` shared values (index 0 is the filler zero): ``True`` for ``b`` = 5 (FC) / 8
      (conv), ``{"fc": b, "conv": b}`` to choose, or a :class:`QuantizedWeights` (its fine-tuned
      codebooks, bits per layer). A layer with at most ``2^b - 1`` distinct kept values (already
      quantised, e.g. by ``QuantizedWeights``) keeps them exactly; otherwise k-means with linear
      initialisation quantises the saved copy (``model`` itself is not changed: load the file
      to get the quantised model).
    * ``huffman``: the relative-index codes, and the codebook indices when quantised, are
      Huffman coded (canonical codes; tables of 4-bit code lengths).

    The other state-dict tensors (biases, BatchNorm statistics, dense layers) are stored raw.

    Args:
        model: the model; its pruned weights must be exactly zero (``set_mask`` guarantees it).
        path: the file to write (replaced atomically if it exists).
        index_bits: override ``{"fc": 5, "conv": 8}`` (relative-index code width).
        quantize: see above.
        huffman: see above.

    Returns:
        Stats: ``file_bytes`` (the file's size), ``dense_bytes`` (all state-dict tensors except
        masks, stored densely: a plain checkpoint's payload), ``value_bytes`` (raw values, or the
        codebook indices), ``index_bytes`` (relative indices), ``codebook_bytes``,
        ``table_bytes`` (Huffman code lengths), ``other_bytes`` (the dense part),
        ``header_bytes`` (preamble, header, checksum: ``file_bytes`` is the sum of these six),
        ``kept``, ``entries``, ``fillers``, ``index_overhead`` (``index_bytes / value_bytes``),
        ``compression_ratio`` (``dense_bytes / file_bytes``), ``version``, and ``layers`` (the
        same per sparse layer, with ``bits``, ``quant_bits``, ``numel``). :func:`format_storage`
        prints it as a table.
    """
    bits_by_kind = dict(DEFAULT_INDEX_BITS)
    bits_by_kind.update(index_bits or {})
    layers = _sparse_layers(model)
    qbits = _quant_bits(quantize, layers)
    version = 2 if (qbits or huffman) else VERSION
    state = model.state_dict()
    payload = bytearray()
    layer_meta, layer_stats = [], []
    sparse_keys: set[str] = set()
    for name in layers:
        wkey, mkey = _prefix(name) + "weight", _prefix(name) + "mask"
        if wkey not in state or mkey not in state:
            continue  # e.g. a second name of a shared module is stored densely
        weight, mask = state[wkey], state[mkey]
        kind = layer_kind(weight)
        bits = int(bits_by_kind[kind])
        common = {"name": name, "weight_key": wkey, "mask_key": mkey, "kind": kind, "bits": bits,
                  "shape": list(weight.shape), "dtype": _dtype_name(weight.dtype)}  # fmt: skip
        try:
            if version == 1:
                codes, values, info = encode_relative(weight, mask, bits)
                segs = [("values", _raw(values)), ("indices", _pack(codes, bits))]
                meta = {**common, **info}
            else:
                q = qbits[name] if qbits else None
                info, segs = _encode_layer_v2(weight, mask, bits, q, huffman)
                meta = {**common, **info, "huffman": bool(huffman)}
        except ValueError as e:
            raise ValueError(f"save_compressed: layer {name!r}: {e}") from None
        for seg, data in segs:
            meta[seg] = [len(payload), len(data)]
            payload += data
        layer_meta.append(meta)
        segd = dict(segs)
        layer_stats.append(_layer_stats(name, kind, bits, weight, meta, segd, meta.get("qbits")))
        sparse_keys |= {wkey, mkey}
    dense_state = OrderedDict(
        (k, v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
        for k, v in state.items()
        if k not in sparse_keys
    )
    other_start = len(payload)
    header: dict = {"byteorder": sys.byteorder, "keys": list(state.keys()), "layers": layer_meta}
    if version == 1:
        buf = io.BytesIO()
        torch.save(dense_state, buf)
        header["dense"] = [len(payload), len(buf.getvalue())]
        payload += buf.getvalue()
    else:
        raw_entries, objects = [], OrderedDict()
        for k, v in dense_state.items():
            if isinstance(v, torch.Tensor) and str(v.dtype).removeprefix("torch.") in _RAW_DTYPES:
                data = _raw(v)
                dtype = str(v.dtype).removeprefix("torch.")
                at = [len(payload), len(data)]
                raw_entries.append({"key": k, "dtype": dtype, "shape": list(v.shape), "data": at})
                payload += data
            else:
                objects[k] = v
        header["dense"] = raw_entries
        if objects:  # anything else (rare: extra state): torch.save, read with weights_only
            buf = io.BytesIO()
            torch.save(objects, buf)
            header["objects"] = [len(payload), len(buf.getvalue())]
            payload += buf.getvalue()
    other_bytes = len(payload) - other_start
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body = _PREAMBLE.pack(MAGIC, version, len(header_bytes), len(payload)) + header_bytes
    body += bytes(payload)
    data = body + hashlib.sha256(body).digest()
    atomic_write(Path(path), data)

    mask_keys = {_prefix(n) + "mask" for n in layers}
    dense_bytes = sum(
        v.numel() * v.element_size()
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and k not in mask_keys
    )
    summed = ("value_bytes", "index_bytes", "codebook_bytes", "table_bytes", "kept", "fillers")
    total = {k: sum(s[k] for s in layer_stats) for k in summed}
    return {
        "file_bytes": len(data),
        "dense_bytes": dense_bytes,
        **{k: total[k] for k in ("value_bytes", "index_bytes", "codebook_bytes", "table_bytes")},
        "other_bytes": other_bytes,
        "header_bytes": _PREAMBLE.size + len(header_bytes) + _DIGEST,
        "kept": total["kept"],
        "entries": total["kept"] + total["fillers"],
        "fillers": total["fillers"],
        "index_overhead": (
            total["index_bytes"] / total["value_bytes"] if total["value_bytes"] else 0.0
        ),
        "compression_ratio": dense_bytes / len(data),
        "version": version,
        "layers": layer_stats,
    }


def format_storage(stats: dict) -> str:
    """:func:`save_compressed`'s stats as a table: bytes per sparse layer (codebook indices or
    values, relative indices, codebook, Huffman tables), the dense part, the header, and the
    total against the dense model (bits per kept weight: everything of the layer / kept)."""
    head = (f"{'layer':<12} {'kept':>15} {'bits':>5} {'values':>8} {'indices':>8} {'codebook':>8} "
            f"{'tables':>6} {'total':>8} {'dense':>9} {'ratio':>6} {'b/kept':>6}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for s in stats["layers"]:
        total = s["value_bytes"] + s["index_bytes"] + s["codebook_bytes"] + s["table_bytes"]
        bits = f"{s['quant_bits'] or '-'}/{s['bits']}"
        lines.append(
            f"{s['name']:<12} {s['kept']:>7}/{s['numel']:<7} {bits:>5} {s['value_bytes']:>8} "
            f"{s['index_bytes']:>8} {s['codebook_bytes']:>8} {s['table_bytes']:>6} {total:>8} "
            f"{s['dense_bytes']:>9} {s['dense_bytes'] / max(total, 1):>5.1f}x "
            f"{8 * total / max(s['kept'], 1):>6.2f}"
        )
    lines.append(f"other tensors (biases, buffers, dense layers), raw: {stats['other_bytes']} B; "
                 f"header + checksum: {stats['header_bytes']} B")  # fmt: skip
    lines.append(
        f"total: {stats['file_bytes']} B against {stats['dense_bytes']} B dense: "
        f"{stats['compression_ratio']:.1f}x (bits: quantisation/index; format version "
        f"{stats.get('version', VERSION)})"
    )
    return "\n".join(lines)


def _fail(path, msg: str) -> CompressedFormatError:
    return CompressedFormatError(f"load_compressed({str(path)!r}): {msg}")


def _check_spans(path, spans: list[tuple[str, list]], payload_len: int) -> None:
    """The payload segments the header names, in the writer's order, must tile the payload
    exactly: each starts where the previous ended, the last ends at its end. A header whose
    offsets were shifted (even under a recomputed checksum) is refused here."""
    at = 0
    for what, span in spans:
        ok = isinstance(span, list) and len(span) == 2 and all(isinstance(x, int) for x in span)
        if not ok or span[0] != at or span[1] < 0:
            raise _fail(
                path,
                f"corrupted header: expected {what} at payload offset {at} with a length >= 0, "
                f"found {span!r}",
            )
        at += span[1]
    if at != payload_len:
        raise _fail(
            path, f"corrupted header: expected its segments to end at {payload_len}, found {at}"
        )


def _decode_v1_layer(path, meta: dict, payload) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = _DTYPES[meta["dtype"]]
    n = meta["entries"]
    (v_off, v_len), (i_off, i_len) = meta["values"], meta["indices"]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if v_len != n * itemsize or i_len != _packed_len(n, meta["bits"]):
        raise _fail(
            path,
            f"layer {meta['name']!r}: expected {n * itemsize} value bytes and "
            f"{_packed_len(n, meta['bits'])} index bytes, found {v_len} and {i_len}",
        )
    raw = bytearray(payload[v_off : v_off + v_len])
    values = (
        torch.frombuffer(raw, dtype=torch.uint8).view(dtype) if n else torch.empty(0, dtype=dtype)
    )
    codes = _unpack(bytes(payload[i_off : i_off + i_len]), n, meta["bits"])
    return decode_relative(codes, values, meta["bits"], tuple(meta["shape"]), meta["not_fillers"])


def _symbols(path, meta, payload, table: str | None, data: str, n: int, bits: int) -> torch.Tensor:
    """``n`` symbols of ``bits`` bits from segment ``data``: Huffman coded with the code lengths
    in segment ``table``, or bit-packed."""
    off, length = meta[data]
    seg = bytes(payload[off : off + length])
    if table is None:
        if length != _packed_len(n, bits):
            raise _fail(
                path,
                f"layer {meta['name']!r}: expected {_packed_len(n, bits)} bytes of {data}, "
                f"found {length}",
            )
        return _unpack(seg, n, bits)
    t_off, t_len = meta[table]
    try:
        lengths = _huff.unpack_lengths(bytes(payload[t_off : t_off + t_len]), 1 << bits)
        return torch.from_numpy(_huff.decode(seg, lengths, n))
    except _huff.HuffmanError as e:
        raise _fail(path, f"layer {meta['name']!r}, {data}: {e}") from None


def _decode_v2_layer(path, meta: dict, payload) -> tuple[torch.Tensor, torch.Tensor]:
    n, bits, huff = meta["entries"], meta["bits"], meta.get("huffman") is True
    shape = tuple(meta["shape"])
    codes = _symbols(path, meta, payload, "index_table" if huff else None, "indices", n, bits)
    if "qbits" not in meta:
        dtype = _DTYPES[meta["dtype"]]
        v_off, v_len = meta["values"]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if v_len != n * itemsize:
            raise _fail(path, f"layer {meta['name']!r}: expected {n * itemsize} value bytes, "
                              f"found {v_len}")  # fmt: skip
        raw = bytearray(payload[v_off : v_off + v_len])
        values = (
            torch.frombuffer(raw, dtype=torch.uint8).view(dtype)
            if n
            else torch.empty(0, dtype=dtype)
        )
        return decode_relative(codes, values, bits, shape, meta["not_fillers"])
    dtype, qbits, k = _DTYPES[meta["dtype"]], meta["qbits"], meta["clusters"]
    c_off, c_len = meta["codebook"]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if (
        not (isinstance(qbits, int) and 1 <= qbits <= 15)
        or c_len != k * itemsize
        or k >= 1 << qbits
    ):
        raise _fail(
            path,
            f"layer {meta['name']!r}: expected a codebook of at most 2^qbits - 1 values "
            f"({itemsize} bytes each), found {k} values in {c_len} bytes with qbits {qbits}",
        )
    raw = bytearray(payload[c_off : c_off + c_len])
    codebook = (
        torch.frombuffer(raw, dtype=torch.uint8).view(dtype) if k else torch.empty(0, dtype=dtype)
    )
    sym = _symbols(path, meta, payload, "value_table" if huff else None, "values", n, qbits)
    filler = sym == 0
    if (int(sym.max()) if n else 0) > k or (codes[filler] != (1 << bits) - 1).any():
        raise _fail(
            path,
            f"layer {meta['name']!r}: expected codebook indices <= {k} and fillers at the "
            f"largest gap code, found others: corrupted data",
        )
    numel = int(np.prod(shape)) if len(shape) else 1
    pos = torch.cumsum(codes + 1, 0) - 1
    if pos.numel() and int(pos[-1]) >= numel:
        raise _fail(
            path,
            f"layer {meta['name']!r}: relative indices run to position {int(pos[-1])}, "
            f"expected < {numel}: corrupted data",
        )
    weight = torch.zeros(numel, dtype=dtype)
    mask = torch.zeros(numel, dtype=torch.bool)
    real = ~filler
    weight[pos[real]] = codebook[sym[real] - 1]
    mask[pos[real]] = True
    return weight.reshape(shape), mask.reshape(shape)


def _layer_spans(meta: dict, version: int) -> list[tuple[str, list]]:
    if version == 1:
        order = ("values", "indices")
    else:
        huff, quant = meta.get("huffman") is True, "qbits" in meta
        order = (("codebook",) if quant else ()) + (("value_table",) if huff and quant else ())
        order += ("values",) + (("index_table",) if huff else ()) + ("indices",)
    return [(f"layer {meta.get('name')!r} {seg}", meta.get(seg)) for seg in order]


def _read(path: str | os.PathLike) -> OrderedDict:
    """Parse and fully verify a file; returns the state dict (CPU tensors). A header that passes
    the checksum but holds fields of the wrong type (a forged file) is refused too."""
    try:
        return _read_fields(path)
    except CompressedFormatError:
        raise
    except (TypeError, KeyError, IndexError, ValueError, RuntimeError, OverflowError) as e:
        raise _fail(path, f"corrupted header or data: {type(e).__name__}: {e}") from None


def _read_fields(path: str | os.PathLike) -> OrderedDict:
    data = Path(path).read_bytes()
    if len(data) < _PREAMBLE.size:
        raise _fail(path, f"truncated: expected at least {_PREAMBLE.size} bytes, found {len(data)}")
    magic, version, hlen, plen = _PREAMBLE.unpack_from(data, 0)
    if magic != MAGIC:
        raise _fail(path, f"not a sparsekern compressed model: expected magic {MAGIC!r}, "
                          f"found {magic!r}")  # fmt: skip
    if version not in _READ_VERSIONS:
        raise _fail(
            path, f"unsupported format version: expected one of {_READ_VERSIONS}, found {version}"
        )
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
    dense_type = list if version == 1 else (list, tuple)
    if (
        not isinstance(header, dict)
        or not {"keys", "layers", "dense"} <= set(header)
        or not isinstance(header["keys"], list)
        or not isinstance(header["layers"], list)
        or not isinstance(header["dense"], dense_type)
        or (version == 2 and not all(isinstance(e, dict) for e in header["dense"]))
    ):
        raise _fail(path, "corrupted header: expected an object with lists keys, layers, dense")
    if header.get("byteorder", sys.byteorder) != sys.byteorder:
        raise _fail(
            path, f"expected {sys.byteorder}-endian data, found {header['byteorder']}-endian"
        )
    payload = memoryview(body)[_PREAMBLE.size + hlen :]
    need = ("name", "dtype", "entries", "values", "indices", "bits", "shape", "kept", "fillers")
    need_v1 = ("not_fillers",)
    spans = []
    for meta in header["layers"]:
        want = need + (need_v1 if version == 1 or "qbits" not in meta else ())
        if not isinstance(meta, dict) or any(k not in meta for k in want):
            got = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
            raise _fail(
                path, f"corrupted header: expected layer entries with {list(want)}, got {got}"
            )
        if meta["dtype"] not in _DTYPES:
            raise _fail(
                path,
                f"layer {meta['name']!r}: expected a dtype among {sorted(_DTYPES)}, found "
                f"{meta['dtype']!r}",
            )
        spans += _layer_spans(meta, version)
    if version == 1:
        spans.append(("the dense part", header["dense"]))
    else:
        spans += [(f"dense entry {e.get('key')!r}", e.get("data")) for e in header["dense"]]
        if "objects" in header:
            spans.append(("the object part", header["objects"]))
    _check_spans(path, spans, plen)

    tensors: dict[str, object] = {}
    for meta in header["layers"]:
        try:
            decode = _decode_v1_layer if version == 1 else _decode_v2_layer
            weight, mask = decode(path, meta, payload)
        except CompressedFormatError as e:
            if str(e).startswith("load_compressed("):
                raise
            raise _fail(path, f"layer {meta['name']!r}: {e}") from None
        kept = int(mask.sum())
        n = meta["entries"]
        if kept != meta["kept"] or n - kept != meta["fillers"]:
            raise _fail(
                path,
                f"layer {meta['name']!r}: expected {meta['kept']} kept and {meta['fillers']} "
                f"fillers, found {kept} and {n - kept}",
            )
        tensors[meta["weight_key"]] = weight
        tensors[meta["mask_key"]] = mask
    if version == 1:
        d_off, d_len = header["dense"]
        blob = bytes(payload[d_off : d_off + d_len])
        tensors.update(torch.load(io.BytesIO(blob), weights_only=True))
    else:
        for e in header["dense"]:
            if e.get("dtype") not in _RAW_DTYPES or not isinstance(e.get("shape"), list):
                raise _fail(path, f"dense entry {e.get('key')!r}: expected a dtype among "
                                  f"{sorted(_RAW_DTYPES)} and a shape, found {e}")  # fmt: skip
            dtype = _RAW_DTYPES[e["dtype"]]
            numel = int(np.prod(e["shape"])) if e["shape"] else 1
            off, length = e["data"]
            itemsize = torch.empty((), dtype=dtype).element_size()
            if length != numel * itemsize:
                raise _fail(path, f"dense entry {e['key']!r}: expected {numel * itemsize} bytes "
                                  f"for {e['dtype']} {e['shape']}, found {length}")  # fmt: skip
            raw = bytearray(payload[off : off + length])
            t = (
                torch.frombuffer(raw, dtype=torch.uint8)
                if length
                else torch.empty(0, dtype=torch.uint8)
            )
            tensors[e["key"]] = t.view(dtype).reshape(e["shape"])
        if "objects" in header:
            off, length = header["objects"]
            blob = bytes(payload[off : off + length])
            tensors.update(torch.load(io.BytesIO(blob), weights_only=True))
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
    """Read a file written by :func:`save_compressed` (any version: plain or Deep Compression).

    The whole file is read and verified (length, magic, version, SHA-256, header segments that
    tile the payload exactly) and every layer decoded before anything is touched, so a truncated
    or corrupted file raises :class:`CompressedFormatError` (a ``ValueError`` naming what was
    expected and what was found) and leaves ``model`` as it was.

    Args:
        path: the file.
        model: optional; a model with the same structure, dtypes and layer sizes as the saved one
            (e.g. a freshly built ``sparsify``-ed one). Checked entry by entry (keys, shapes,
            dtypes) before loading.

    Returns:
        With ``model``: ``model`` itself, its weights, masks, biases and buffers bit-for-bit those
        that were saved (for a quantised file: the quantised weights). With ``model=None``: the
        state dict (an ``OrderedDict`` of CPU tensors in the original key order, masks
        included), ready for ``model.load_state_dict``.
    """
    state = _read(path)
    if model is None:
        return state
    _check_fits(path, model, state)
    model.load_state_dict(state, strict=True)
    return model
