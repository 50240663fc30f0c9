"""Canonical, length-limited Huffman coding: round trips, optimality, corrupted streams."""

import numpy as np
import pytest

from sparsekern.formats.huffman import (
    MAX_LENGTH,
    HuffmanError,
    code_lengths,
    decode,
    encode,
    pack_lengths,
    unpack_lengths,
)


def _entropy_bits(counts):
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


@pytest.mark.parametrize("n_symbols, n, skew", [(32, 5000, 0.3), (256, 20000, 0.05), (2, 7, 1.0)])
def test_round_trip_and_near_entropy(n_symbols, n, skew):
    rng = np.random.default_rng(n)
    symbols = np.minimum(rng.geometric(skew, n) - 1, n_symbols - 1)
    counts = np.bincount(symbols, minlength=n_symbols)
    lengths = code_lengths(counts)
    assert (lengths[counts == 0] == 0).all() and (lengths[counts > 0] > 0).all()
    assert (2.0 ** -lengths[lengths > 0].astype(float)).sum() <= 1.0  # a prefix code
    stream, n_bits = encode(symbols, lengths)
    assert len(stream) == (n_bits + 7) // 8
    assert np.array_equal(decode(stream, lengths, n), symbols)
    h = _entropy_bits(counts)
    assert h * n <= n_bits <= (h + 1) * n  # Huffman: within one bit per symbol of the entropy


def test_one_symbol_and_empty_streams():
    lengths = code_lengths(np.array([0, 9, 0]))
    assert lengths.tolist() == [0, 1, 0]
    stream, n_bits = encode(np.full(9, 1), lengths)
    assert n_bits == 9 and np.array_equal(decode(stream, lengths, 9), np.full(9, 1))
    assert encode(np.zeros(0, dtype=np.int64), lengths) == (b"", 0)
    assert decode(b"", lengths, 0).size == 0


def test_lengths_are_limited_on_a_fibonacci_distribution():
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib)
    assert _optimal_max(counts) > MAX_LENGTH  # unlimited Huffman would need 29 bits
    lengths = code_lengths(counts)
    assert lengths.max() == MAX_LENGTH and (2.0 ** -lengths.astype(float)).sum() <= 1.0
    symbols = np.repeat(np.arange(30), np.minimum(counts, 50))
    stream, _ = encode(symbols, lengths)
    assert np.array_equal(decode(stream, lengths, len(symbols)), symbols)


def _optimal_max(counts):
    from sparsekern.formats.huffman import _optimal_lengths

    return int(_optimal_lengths(counts).max())


def test_corrupted_streams_are_refused():
    rng = np.random.default_rng(0)
    symbols = rng.integers(0, 5, 1001)
    lengths = code_lengths(np.bincount(symbols, minlength=8))
    stream, n_bits = encode(symbols, lengths)
    with pytest.raises(HuffmanError, match="truncated"):
        decode(stream[: len(stream) // 2], lengths, len(symbols))
    with pytest.raises(HuffmanError, match="expected 1001 symbols to end within the last byte"):
        decode(stream + b"\0", lengths, len(symbols))
    if n_bits % 8:  # a set padding bit
        with pytest.raises(HuffmanError, match="zero padding"):
            decode(stream[:-1] + bytes([stream[-1] | 1]), lengths, len(symbols))
    bad = lengths.copy()
    bad[np.flatnonzero(bad)[:3]] = 1  # three codes of one bit: not a prefix code
    with pytest.raises(HuffmanError, match="Kraft"):
        decode(stream, bad, len(symbols))
    with pytest.raises(ValueError, match="expected symbols that the code lengths give a code"):
        encode(np.array([7]), lengths)


def test_pack_lengths_round_trip():
    lengths = np.array([3, 0, 15, 1, 7], dtype=np.uint8)
    data = pack_lengths(lengths)
    assert len(data) == 3
    assert np.array_equal(unpack_lengths(data, 5), lengths)
    with pytest.raises(HuffmanError, match="expected 3 bytes"):
        unpack_lengths(data[:2], 5)
    with pytest.raises(HuffmanError, match="zero padding"):
        unpack_lengths(data[:2] + bytes([data[2] | 1]), 5)


def test_chunked_encode_and_decode_match(monkeypatch):
    import sparsekern.formats.huffman as huffman

    rng = np.random.default_rng(3)
    symbols = np.minimum(rng.geometric(0.2, 3000) - 1, 31)
    lengths = code_lengths(np.bincount(symbols, minlength=32))
    whole = encode(symbols, lengths)
    monkeypatch.setattr(huffman, "_CHUNK", 97)  # symbols and bits per step: chunk borders inside
    assert encode(symbols, lengths) == whole
    assert np.array_equal(decode(whole[0], lengths, len(symbols)), symbols)
    incomplete = lengths.copy()
    incomplete[symbols.max()] = 0  # a code with a hole: the stream hits a window with no code
    incomplete[incomplete > 0] = np.maximum(incomplete[incomplete > 0], 1)
    with pytest.raises(HuffmanError):
        decode(whole[0], incomplete, len(symbols))
