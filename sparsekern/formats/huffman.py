"""Canonical, length-limited Huffman coding of small-alphabet symbol streams: the last stage of
Deep Compression (Han, Mao, Dally 2016, Sec. 4), which codes a pruned, quantised layer's weight
indices and relative-index gaps with variable-length codes.

A code is described by its code lengths alone (one per symbol, 0 for a symbol that never occurs);
the codes themselves are canonical (shorter codes first, ties by symbol), so a file stores the
lengths, 4 bits per symbol (lengths are limited to :data:`MAX_LENGTH` = 15), and nothing else.
Bits are packed MSB first; the last byte is zero-padded.

Length limiting deviates from optimal Huffman only when an optimal code would need a code longer
than 15 bits (symbol probabilities below about 1/1000 in a skewed stream): the counts are then
halved (keeping every used symbol at 1 or more) until the code fits, zlib's approach, which costs
a fraction of a percent of the stream at most.
"""

from __future__ import annotations

import heapq

import numpy as np

__all__ = [
    "MAX_LENGTH",
    "HuffmanError",
    "code_lengths",
    "decode",
    "encode",
    "pack_lengths",
    "unpack_lengths",
]

MAX_LENGTH = 15


class HuffmanError(ValueError):
    """A code-length table or bit stream that cannot be decoded (corrupted data)."""


def _optimal_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code lengths of the symbols with ``counts > 0`` (others 0), unlimited."""
    lengths = np.zeros(len(counts), dtype=np.int64)
    used = np.flatnonzero(counts)
    if len(used) == 1:  # one symbol still needs one bit per occurrence
        lengths[used] = 1
        return lengths
    # heap of (count, tie-breaker, symbols below this node): merging adds a bit to each
    heap = [(int(counts[s]), int(s), [int(s)]) for s in used]
    heapq.heapify(heap)
    while len(heap) > 1:
        c1, t1, s1 = heapq.heappop(heap)
        c2, t2, s2 = heapq.heappop(heap)
        lengths[s1] += 1
        lengths[s2] += 1
        heapq.heappush(heap, (c1 + c2, min(t1, t2), s1 + s2))
    return lengths


def code_lengths(counts, max_length: int = MAX_LENGTH) -> np.ndarray:
    """Code lengths ``uint8 [n_symbols]`` of a Huffman code for ``counts`` (occurrences per
    symbol), at most ``max_length`` bits each; 0 for symbols that never occur."""
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any():
        raise ValueError("code_lengths: expected non-negative counts, got a negative one")
    if len(np.flatnonzero(counts)) > 1 << max_length:
        raise ValueError(
            f"code_lengths: expected at most 2^{max_length} used symbols, got "
            f"{len(np.flatnonzero(counts))}"
        )
    c = counts.copy()
    while True:
        lengths = _optimal_lengths(c)
        if lengths.max(initial=0) <= max_length:
            return lengths.astype(np.uint8)
        c = np.where(c > 0, np.maximum(c >> 1, 1), 0)


def _canonical(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes ``int64 [n_symbols]`` for ``lengths`` (shorter first, ties by symbol)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.int64)
    order = np.lexsort((np.arange(len(lengths)), lengths))
    code, prev = 0, 0
    for s in order:
        n = lengths[s]
        if n == 0:
            continue
        code <<= n - prev
        codes[s] = code
        code += 1
        prev = n
    if prev and code > 1 << prev:
        raise HuffmanError("code lengths do not describe a prefix code (Kraft sum above 1)")
    return codes


_CHUNK = 1 << 20  # symbols (encode) or bits (decode) per vectorised step: bounded memory


def encode(symbols: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    """``(stream, n_bits)``: ``symbols`` (ints in ``[0, len(lengths))``, each with a non-zero
    length) coded MSB first, zero-padded to whole bytes."""
    symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
    lengths = np.asarray(lengths, dtype=np.int64)
    if symbols.size == 0:
        return b"", 0
    if symbols.min() < 0 or symbols.max() >= len(lengths) or (lengths[symbols] == 0).any():
        raise ValueError("encode: expected symbols that the code lengths give a code, got others")
    codes = _canonical(lengths)
    parts = []
    for i in range(0, len(symbols), _CHUNK):
        sym = symbols[i : i + _CHUNK]
        sym_len = lengths[sym]
        which = np.repeat(np.arange(len(sym)), sym_len)  # the symbol each output bit belongs to
        within = np.arange(len(which)) - (np.cumsum(sym_len) - sym_len)[which]
        parts.append(((codes[sym][which] >> (sym_len[which] - 1 - within)) & 1).astype(np.uint8))
    bits = np.concatenate(parts)
    return np.packbits(bits).tobytes(), len(bits)


def decode(stream: bytes, lengths: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`encode`: ``int64 [n]`` symbols. The stream must be exactly the bytes
    :func:`encode` wrote: every bit used but the zero padding of the last byte.

    Raises:
        HuffmanError: a bit pattern that is no code, a stream too short or too long, or non-zero
            padding (corrupted data).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if n == 0:
        if len(stream):
            raise HuffmanError(f"expected an empty stream for 0 symbols, found {len(stream)} bytes")
        return np.zeros(0, dtype=np.int64)
    width = int(lengths.max(initial=0))
    if width == 0:
        raise HuffmanError(f"expected code lengths for {n} symbols, found an empty code")
    codes = _canonical(lengths)
    # table over every width-bit window: the symbol whose code prefixes it, and that code's length
    table_sym = np.full(1 << width, -1, dtype=np.int64)
    table_len = np.zeros(1 << width, dtype=np.int64)
    for s in np.flatnonzero(lengths):
        lo = codes[s] << (width - lengths[s])
        hi = (codes[s] + 1) << (width - lengths[s])
        table_sym[lo:hi] = s
        table_len[lo:hi] = lengths[s]
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8))
    total = len(bits)
    padded = np.concatenate([bits, np.zeros(width, dtype=np.uint8)])
    out = np.empty(n, dtype=np.int64)
    pos, i = 0, 0
    for start in range(0, total, _CHUNK):
        end = min(start + _CHUNK, total)
        window = np.zeros(end - start, dtype=np.int64)  # the width bits starting at each position
        for j in range(width):
            window = (window << 1) | padded[start + j : end + j]
        sym, step = table_sym[window], table_len[window]
        nxt = (np.arange(start, end) + step).tolist()
        visited = []
        while pos < end and i + len(visited) < n:  # pointer chasing, ~0.1 us per symbol
            visited.append(pos - start)
            pos = nxt[pos - start]
        if (step[visited] == 0).any():  # a window that starts no code (stuck until n visits)
            raise HuffmanError(f"expected {n} symbols in {total} bits, found an invalid code")
        out[i : i + len(visited)] = sym[visited]
        i += len(visited)
        if i == n:
            break
    if i < n or pos > total:
        raise HuffmanError(f"expected {n} symbols in {total} bits, found the stream truncated")
    if (total - pos) >= 8 or bits[pos:].any():
        raise HuffmanError(
            f"expected {n} symbols to end within the last byte ({total} bits) with zero padding, "
            f"found them ending at bit {pos}"
        )
    return out


def pack_lengths(lengths: np.ndarray) -> bytes:
    """Code lengths (each <= 15) as 4-bit nibbles, two per byte (high nibble first)."""
    lengths = np.asarray(lengths, dtype=np.uint8)
    if lengths.size and lengths.max() > MAX_LENGTH:
        raise ValueError(f"pack_lengths: expected lengths <= {MAX_LENGTH}, got {lengths.max()}")
    if len(lengths) % 2:
        lengths = np.concatenate([lengths, np.zeros(1, dtype=np.uint8)])
    return ((lengths[0::2] << 4) | lengths[1::2]).astype(np.uint8).tobytes()


def unpack_lengths(data: bytes, n_symbols: int) -> np.ndarray:
    """Inverse of :func:`pack_lengths`."""
    if len(data) != (n_symbols + 1) // 2:
        raise HuffmanError(
            f"expected {(n_symbols + 1) // 2} bytes of code lengths for {n_symbols} symbols, "
            f"found {len(data)}"
        )
    raw = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(2 * len(raw), dtype=np.uint8)
    out[0::2], out[1::2] = raw >> 4, raw & 15
    if n_symbols % 2 and out[-1]:
        raise HuffmanError("expected zero padding after the last code length, found non-zero")
    return out[:n_symbols]
