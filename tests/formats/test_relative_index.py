"""Han's relative-index storage: bit-exact round trips, fillers, sizes, corrupted files."""

import math
import os

import pytest
import torch
from torch import nn

from sparsekern.formats.relative_index import (
    MAGIC,
    CompressedFormatError,
    decode_relative,
    encode_relative,
    format_storage,
    load_compressed,
    save_compressed,
)
from sparsekern.nn import set_mask, sparsify


def _mask_from_gaps(numel, gaps):
    """A flat bool mask whose kept positions have the given gaps (skipped positions) in front."""
    mask = torch.zeros(numel, dtype=torch.bool)
    pos = -1
    for g in gaps:
        pos += g + 1
        mask[pos] = True
    return mask


@pytest.mark.parametrize(
    "bits, gaps, fillers",
    [
        (5, [0, 31, 32, 63, 64, 100, 5], [0, 0, 1, 1, 2, 3, 0]),  # FC: codes cover gaps 0..31
        (8, [255, 256, 600, 0, 511, 512], [0, 1, 2, 0, 1, 2]),  # conv: 0..255
        (5, [40], [1]),  # the first gap counts from position -1
    ],
)
def test_encode_fillers_and_decode(bits, gaps, fillers):
    numel = sum(g + 1 for g in gaps) + 7
    mask = _mask_from_gaps(numel, gaps)
    weight = torch.randn(numel) * mask
    codes, values, info = encode_relative(weight, mask, bits)
    assert info["kept"] == len(gaps) and info["fillers"] == sum(fillers)
    assert info["entries"] == len(gaps) + sum(fillers) == codes.numel() == values.numel()
    assert int(codes.max()) <= 2**bits - 1 and int(codes.min()) >= 0
    # fillers carry the largest code and a zero value
    real = torch.cumsum(torch.tensor(fillers) + 1, 0) - 1
    is_filler = torch.ones(codes.numel(), dtype=torch.bool)
    is_filler[real] = False
    assert (codes[is_filler] == 2**bits - 1).all() and (values[is_filler] == 0).all()
    w2, m2 = decode_relative(codes, values, bits, (numel,), info["not_fillers"])
    assert torch.equal(m2, mask) and torch.equal(w2, weight)


def test_kept_zero_at_the_largest_gap_is_not_a_filler():
    # kept weights: +0.0 after a gap of 31 (looks exactly like a filler), -0.0 after 31, and a
    # +0.0 after a gap of 3
    mask = _mask_from_gaps(120, [31, 31, 3, 31])
    weight = torch.zeros(120)
    pos = mask.nonzero().flatten()
    weight[pos[1]] = -0.0
    weight[pos[3]] = 2.5
    codes, values, info = encode_relative(weight, mask, 5)
    assert info["fillers"] == 0 and info["not_fillers"] == [0]
    w2, m2 = decode_relative(codes, values, 5, (120,), info["not_fillers"])
    assert torch.equal(m2, mask)
    assert torch.equal(w2.view(torch.int32), weight.view(torch.int32))  # -0.0 kept bit-exact


def test_decode_rejects_positions_past_the_end():
    with pytest.raises(CompressedFormatError, match="expected < 10"):
        decode_relative(torch.tensor([3, 31]), torch.ones(2), 5, (10,))


class Net(nn.Module):
    """conv(3->8, 3x3) -> BN -> relu -> flatten -> fc1(8*6*6 -> 64) -> relu -> fc2(64 -> 10) ->
    head (a dense nn.Linear, not sparse). Input [B, 3, 8, 8]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 6 * 6, 64)
        self.fc2 = nn.Linear(64, 10)
        self.head = nn.Linear(10, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.head(self.fc2(torch.relu(self.fc1(x))))


def _pruned_net(dtype=torch.float32, seed=0, densities=(0.3, 0.02, 0.5)):
    torch.manual_seed(seed)
    net = Net()
    net = sparsify(net, layers=nn.Linear)  # conv, head dense for now
    net.head = nn.Linear(10, 2)  # keep one dense Linear
    sparsify(net, layers=nn.Conv2d)
    net = net.to(dtype)
    net.bn.running_mean.normal_()
    net.bn.running_var.uniform_(0.5, 2)
    net.bn.num_batches_tracked.fill_(7)
    g = torch.Generator().manual_seed(seed + 1)
    for layer, d in zip((net.conv, net.fc1, net.fc2), densities):
        set_mask(layer, torch.rand(layer.weight.shape, generator=g) < d)
    return net


def _assert_same(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        if sa[k].is_floating_point():  # bit patterns, so -0.0 and NaN payloads count too
            ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[sa[k].element_size()]
            assert torch.equal(sa[k].view(ints), sb[k].view(ints)), k
        else:
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_model_round_trip_bit_exact(tmp_path, dtype):
    net = _pruned_net(dtype)
    path = tmp_path / "net.skr"
    stats = save_compressed(net, path)
    assert stats["fillers"] > 0  # fc1 at 2% density has gaps past 31
    fresh = _pruned_net(dtype, seed=5, densities=(1.0, 1.0, 1.0))
    out = load_compressed(path, fresh)
    assert out is fresh
    _assert_same(net, fresh)
    x = torch.randn(2, 3, 8, 8).to(dtype)
    net.eval(), fresh.eval()
    if dtype == torch.float64:
        assert torch.equal(net(x), fresh(x))
    state = load_compressed(path)  # model=None: the state dict
    assert list(state) == list(net.state_dict())
    assert state["fc1.mask"].dtype == torch.bool
    assert torch.equal(state["fc1.weight"], net.fc1.weight.detach())


def test_sizes_and_overhead(tmp_path):
    # FC-only, float32, every gap <= 31 and a multiple of 8 entries: overhead exactly 5/32
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)))
    for layer, every in ((model[0], 4), (model[2], 2)):
        mask = torch.zeros(layer.weight.numel(), dtype=torch.bool)
        mask[::every] = True
        set_mask(layer, mask.view_as(layer.weight))
    stats = save_compressed(model, tmp_path / "m.skr")
    kept = 64 * 32 // 4 + 32 * 16 // 2
    assert stats["kept"] == kept and stats["fillers"] == 0
    assert stats["value_bytes"] == 4 * kept
    assert stats["index_bytes"] == 5 * kept // 8
    assert stats["index_overhead"] == 5 / 32  # Han's 15.6%
    assert stats["file_bytes"] == os.path.getsize(tmp_path / "m.skr")
    parts = ("header_bytes", "value_bytes", "index_bytes", "other_bytes")
    assert stats["file_bytes"] == sum(stats[k] for k in parts)
    assert stats["dense_bytes"] == 4 * (64 * 32 + 32 + 32 * 16 + 16)  # masks excluded
    assert stats["compression_ratio"] == stats["dense_bytes"] / stats["file_bytes"]
    # conv: 8-bit indices
    conv = sparsify(nn.Sequential(nn.Conv2d(4, 8, 3)))
    cstats = save_compressed(conv, tmp_path / "c.skr")
    assert cstats["index_overhead"] == 8 / 32 and cstats["layers"][0]["bits"] == 8
    # per layer, packed bits rounded up to bytes
    for layer in _pruned_net_stats(tmp_path)["layers"]:
        n = layer["kept"] + layer["fillers"]
        assert layer["index_bytes"] == math.ceil(n * layer["bits"] / 8)


def _pruned_net_stats(tmp_path):
    return save_compressed(_pruned_net(), tmp_path / "n.skr")


def test_truncated_and_corrupted_files_are_rejected(tmp_path):
    net = _pruned_net()
    path = tmp_path / "net.skr"
    save_compressed(net, path)
    data = path.read_bytes()
    target = _pruned_net(seed=3, densities=(1.0, 1.0, 1.0))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    bad = tmp_path / "bad.skr"
    for n in (0, 10, 21, 22, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:n])
        with pytest.raises(CompressedFormatError, match=r"truncated: expected .* found") as e:
            load_compressed(bad, target)
        assert str(len(data)) in str(e.value) or n < 22
    for offset, match in ((0, "magic"), (8, "version"), (len(data) // 2, "checksum"),
                          (len(data) - 1, "checksum")):  # fmt: skip
        corrupt = bytearray(data)
        corrupt[offset] ^= 0x5A
        bad.write_bytes(bytes(corrupt))
        with pytest.raises(CompressedFormatError, match=match):
            load_compressed(bad, target)
    bad.write_bytes(data + b"\0")
    with pytest.raises(CompressedFormatError, match="trailing"):
        load_compressed(bad, target)
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed load"
    assert data[:8] == MAGIC


def test_model_that_does_not_fit_is_left_untouched(tmp_path):
    path = tmp_path / "net.skr"
    save_compressed(_pruned_net(), path)
    other = _pruned_net(seed=2)
    other.fc2 = sparsify(nn.Sequential(nn.Linear(64, 12)))[0]  # 12 outputs instead of 10
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CompressedFormatError, match=r"fc2.weight.*\[12, 64\].*\[10, 64\]"):
        load_compressed(path, other)
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k]), k
    half = _pruned_net(dtype=torch.float16)
    with pytest.raises(CompressedFormatError, match="torch.float16"):
        load_compressed(path, half)
    with pytest.raises(CompressedFormatError, match="lacks"):
        load_compressed(path, nn.Linear(3, 3))


def test_atomic_replace_and_refusing_stray_weights(tmp_path):
    path = tmp_path / "net.skr"
    save_compressed(_pruned_net(seed=0), path)
    first = path.read_bytes()
    net = _pruned_net(seed=1)
    save_compressed(net, path)  # replaces
    assert path.read_bytes() != first
    assert sorted(os.listdir(tmp_path)) == ["net.skr"]  # no temporary file left
    with torch.no_grad():
        idx = (~net.fc1.mask).nonzero()[0]
        net.fc1.weight[idx[0], idx[1]] = 1.0  # a weight at a pruned position
    kept = path.read_bytes()
    with pytest.raises(ValueError, match=r"'fc1'.*1 non-zero"):
        save_compressed(net, path)
    assert path.read_bytes() == kept
    assert sorted(os.listdir(tmp_path)) == ["net.skr"]


def test_empty_and_fully_pruned_layers(tmp_path):
    model = sparsify(nn.Sequential(nn.Linear(40, 3), nn.Linear(3, 2)))
    set_mask(model[0], torch.zeros(3, 40, dtype=torch.bool))
    stats = save_compressed(model, tmp_path / "e.skr")
    assert stats["layers"][0]["kept"] == 0 and stats["layers"][0]["value_bytes"] == 0
    fresh = sparsify(nn.Sequential(nn.Linear(40, 3), nn.Linear(3, 2)))
    load_compressed(tmp_path / "e.skr", fresh)
    _assert_same(model, fresh)


# ------------------------------------------------------------------------------------------------
# Version 2: Deep Compression (quantised codebooks, Huffman coding)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantize, huffman", [(None, True), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_v2_round_trip_equals_the_quantised_model(tmp_path, quantize, huffman, dtype):
    from sparsekern.formats.quantize import QuantizedWeights

    net = _pruned_net(dtype)
    original = {k: v.clone() for k, v in net.state_dict().items()}
    path = tmp_path / "dc.skr"
    stats = save_compressed(net, path, quantize=quantize, huffman=huffman)
    assert stats["version"] == 2 and stats["file_bytes"] == os.path.getsize(path)
    parts = ("header_bytes", "value_bytes", "index_bytes", "codebook_bytes", "table_bytes",
             "other_bytes")  # fmt: skip
    assert stats["file_bytes"] == sum(stats[k] for k in parts)
    for k, v in net.state_dict().items():  # saving never changes the model
        assert torch.equal(v, original[k]), k
    fresh = _pruned_net(dtype, seed=5, densities=(1.0, 1.0, 1.0))
    load_compressed(path, fresh)
    if not quantize:
        _assert_same(net, fresh)
        return
    # the file holds the quantised model: the same masks, biases, buffers, and per layer at most
    # 2^b - 1 shared values (conv 8 bits, FC 5 bits)
    for name, k in (("conv", 255), ("fc1", 31), ("fc2", 31)):
        a, b = getattr(net, name), getattr(fresh, name)
        assert torch.equal(a.mask, b.mask)
        assert torch.unique(b.weight.detach()[b.mask]).numel() <= k
        assert (b.weight.detach()[~b.mask] == 0).all()
    assert torch.equal(net.bn.running_var, fresh.bn.running_var)
    # quantising the model itself (QuantizedWeights) and saving it: the file is that model exactly
    qw = QuantizedWeights(net)
    stats = save_compressed(net, path, quantize=qw, huffman=huffman)
    again = _pruned_net(dtype, seed=6, densities=(1.0, 1.0, 1.0))
    load_compressed(path, again)
    _assert_same(net, again)
    assert [s["quant_bits"] for s in stats["layers"]] == [8, 5, 5]
    with pytest.raises(ValueError, match="not this model's"):
        save_compressed(fresh, path, quantize=qw)
    with torch.no_grad():
        net.fc2.weight[net.fc2.mask] *= 1.5  # trained past the codebook
    with pytest.raises(ValueError, match="layer 'fc2'.*codebook"):
        save_compressed(net, path, quantize=qw)


def test_huffman_and_quantisation_shrink_the_file(tmp_path):
    net = _pruned_net()
    sizes = {}
    for label, kw in (("plain", {}), ("huffman", dict(huffman=True)),
                      ("quantised", dict(quantize=True)),
                      ("both", dict(quantize=True, huffman=True))):  # fmt: skip
        sizes[label] = save_compressed(net, tmp_path / f"{label}.skr", **kw)
    assert sizes["plain"]["version"] == 1
    assert sizes["both"]["file_bytes"] < sizes["quantised"]["file_bytes"]
    assert (
        sizes["both"]["file_bytes"] < sizes["huffman"]["file_bytes"] < sizes["plain"]["file_bytes"]
    )
    # quantised FC values: 5-bit codebook indices, bit-packed without Huffman
    fc1 = sizes["quantised"]["layers"][1]
    assert fc1["value_bytes"] == math.ceil((fc1["kept"] + fc1["fillers"]) * 5 / 8)
    assert fc1["codebook_bytes"] == 4 * 31 and fc1["table_bytes"] == 0
    both_fc1 = sizes["both"]["layers"][1]
    assert both_fc1["table_bytes"] == 16 + 16  # 32 code lengths of 4 bits, values and indices
    text = format_storage(sizes["both"])
    for word in ("fc1", "fc2", "conv", "codebook", "tables", f"{sizes['both']['file_bytes']} B"):
        assert word in text
    with pytest.raises(ValueError, match="quantize bits in 1 .. 15"):
        save_compressed(net, tmp_path / "x.skr", quantize={"fc": 0})
    with pytest.raises(TypeError, match="expected quantize None, True"):
        save_compressed(net, tmp_path / "x.skr", quantize="yes")


@pytest.mark.parametrize("kw", [{}, dict(quantize=True, huffman=True)])
def test_byte_flips_are_refused(tmp_path, kw):
    net = sparsify(nn.Sequential(nn.Linear(20, 6), nn.ReLU(), nn.Linear(6, 3)))
    g = torch.Generator().manual_seed(0)
    set_mask(net[0], torch.rand(6, 20, generator=g) < 0.3)
    path = tmp_path / "m.skr"
    save_compressed(net, path, **kw)
    data = path.read_bytes()
    target = sparsify(nn.Sequential(nn.Linear(20, 6), nn.ReLU(), nn.Linear(6, 3)))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    # ~250 flips spread over the file: preamble, header, every payload segment, trailer
    for i in sorted(set(range(0, len(data), max(1, len(data) // 200))) | set(range(40))):
        corrupt = bytearray(data)
        corrupt[i] ^= 1 << (i % 8)
        path.write_bytes(bytes(corrupt))
        with pytest.raises(CompressedFormatError):
            load_compressed(path, target)
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k


def _rewrite_header(data: bytes, edit) -> bytes:
    """The file with its JSON header edited by ``edit`` and lengths and SHA-256 recomputed: a
    forgery that the checksum alone cannot catch."""
    import hashlib
    import json
    import struct

    pre = struct.Struct("<8sHIQ")
    magic, version, hlen, plen = pre.unpack_from(data, 0)
    header = json.loads(data[pre.size : pre.size + hlen])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    payload = data[pre.size + hlen : -32]
    body = pre.pack(magic, version, len(new), plen) + new + payload
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize("kw", [{}, dict(quantize=True, huffman=True)])
def test_shifted_offsets_under_a_valid_checksum_are_refused(tmp_path, kw):
    net = _pruned_net()
    path = tmp_path / "net.skr"
    save_compressed(net, path, **kw)
    data = path.read_bytes()

    def shift_values(h):
        h["layers"][1]["values"][0] += 4

    def swap_layers(h):  # consistent lengths, wrong order
        a, b = h["layers"][0], h["layers"][1]
        a["values"], b["values"] = b["values"], a["values"]

    def grow_last(h):
        h["layers"][2]["indices"][1] += 1

    for edit, match in ((shift_values, "corrupted header: expected layer 'fc1' values at"),
                        (swap_layers, "corrupted header: expected layer 'conv' values at"),
                        (grow_last, "corrupted header")):  # fmt: skip
        path.write_bytes(_rewrite_header(data, edit))
        with pytest.raises(CompressedFormatError, match=match):
            load_compressed(path)

    def bad_type(h):
        h["layers"][0]["entries"] = "many"

    for edit in (lambda h: h.update(layers=3), lambda h: h.update(dense={"a": 1}), bad_type):
        path.write_bytes(_rewrite_header(data, edit))
        with pytest.raises(CompressedFormatError, match="corrupted header"):
            load_compressed(path)
    path.write_bytes(_rewrite_header(data, lambda h: None))  # the unedited rewrite still loads
    load_compressed(path)
