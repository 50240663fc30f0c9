"""No silent wrong result and no lost file in the inference export (issue 24, item 7): each bug
the adversarial pass found, pinned."""

import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern.nn import to_inference


def _pruned_mlp(seed=0):
    torch.manual_seed(seed)
    model = sk.sparsify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)))
    for m in model.modules():
        if isinstance(m, sk.SparseLinear):
            sk.set_mask(m, torch.rand(m.weight.shape) < 0.3)
    return model.eval()


def test_to_inference_refuses_nonzero_pruned_weights_naming_layers():
    model = _pruned_mlp()
    model[2].weight.data[~model[2].mask] = 0.5  # a .data write past the mask invariant
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for fmt in ("csr", "auto", "bsr", "dense"):
        with pytest.raises(ValueError, match=r"non-zero pruned weights in 1 layer\(s\): '2' \("):
            to_inference(model, format=fmt, calibrate=False)
    with pytest.raises(ValueError, match=r"'2'"):
        to_inference(model, format="csr", inplace=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # a layer left as it is keeps its weights: nothing dropped, nothing refused
    to_inference(model, format={"0": "csr"})
    sk.nn.mask_problems(model, fix=True)
    exported = to_inference(model, format="csr")
    x = torch.randn(3, 16)
    torch.testing.assert_close(exported(x), model(x))


def test_to_inference_refuses_unknown_format_keys():
    model = _pruned_mlp()
    with pytest.raises(ValueError, match=r"not convertible layers of the model: \['typo'\]"):
        to_inference(model, format={"typo": "csr"})
    with pytest.raises(ValueError, match=r"\['1'\]; expected names among \['0', '2'\]"):
        to_inference(model, format={"0": "csr", "1": "csr"})


def test_set_mask_checks_optimizer_before_installing():
    layer = sk.SparseLinear(8, 8)
    w = layer.weight.detach().clone()
    with pytest.raises(TypeError, match=r"expected optimizer as None or a torch.optim.Optimizer, "
                       r"got str"):  # fmt: skip
        sk.set_mask(layer, torch.rand(8, 8) > 0.5, optimizer="sgd")
    assert bool(layer.mask.all()) and torch.equal(layer.weight.detach(), w)
    with pytest.raises(TypeError, match=r"apply_masks: expected optimizer"):
        sk.apply_masks(nn.Sequential(layer), {"0": torch.rand(8, 8) > 0.5}, optimizer=3)
    assert bool(layer.mask.all())
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    sk.set_mask(layer, torch.rand(8, 8) > 0.5, optimizer=opt)  # a real one still works


def test_sparsify_none_and_lazy_are_clear():
    with pytest.raises(TypeError, match=r"sparsify: expected an nn.Module, got NoneType"):
        sk.sparsify(None)
    lazy = nn.Sequential(nn.LazyLinear(4))
    with pytest.raises(ValueError, match=r"uninitialised \(lazy\) modules \['0'\]"):
        sk.sparsify(lazy)
    with pytest.raises(TypeError, match=r"to_inference: expected an nn.Module, got int"):
        to_inference(3)


def test_float_mask_buffer_is_a_clear_error():
    layer = sk.SparseLinear(8, 4)
    layer.mask = layer.mask.float()
    with pytest.raises(TypeError, match=r"the mask buffer as torch.bool, got torch.float32"):
        layer(torch.randn(2, 8))
    with pytest.raises(TypeError, match=r"its mask buffer as torch.bool, got torch.float32"):
        to_inference(layer, format="csr")


def _exported():
    model = _pruned_mlp()
    return model, to_inference(model, format={"0": "csr", "2": "bsr"})


def test_save_load_inference_round_trip(tmp_path):
    model, exported = _exported()
    path = tmp_path / "m.skinf"
    info = sk.save_inference(exported, path)
    assert info["file_bytes"] == path.stat().st_size and info["layers"] == {"0": "csr", "2": "bsr"}
    sd = sk.load_inference(path)
    assert sd.keys() == exported.state_dict().keys()
    back = sk.load_inference(path, _pruned_mlp(seed=1))
    x = torch.randn(4, 16)
    torch.testing.assert_close(back(x), model(x))
    assert type(back[0]).__name__ == "CSRLinear" and type(back[2]).__name__ == "BlockSparseLinear"


def test_load_inference_refuses_every_byte_flip_and_truncation(tmp_path):
    _, exported = _exported()
    path = tmp_path / "m.skinf"
    sk.save_inference(exported, path)
    data = path.read_bytes()
    bad = tmp_path / "bad.skinf"
    gen = torch.Generator().manual_seed(0)
    spots = torch.randint(0, len(data), (40,), generator=gen).tolist() + [0, len(data) - 1]
    for i in spots:
        flipped = bytearray(data)
        flipped[i] ^= 1 << int(torch.randint(0, 8, (1,), generator=gen))
        bad.write_bytes(bytes(flipped))
        with pytest.raises(sk.nn.inference.InferenceFileError, match=str(bad)):
            sk.load_inference(bad, _pruned_mlp())
    for n in (0, 10, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:n])
        with pytest.raises(ValueError, match=r"bad.skinf.*(truncated|checksum)"):
            sk.load_inference(bad)
    with pytest.raises(ValueError, match=r"missing.skinf: expected a save_inference file, could "):
        sk.load_inference(tmp_path / "missing.skinf")
    torch.save(exported.state_dict(), bad)  # a plain torch.save file is not ours
    with pytest.raises(ValueError, match=r"expected a file starting with"):
        sk.load_inference(bad)


def test_save_inference_killed_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    _, exported = _exported()
    path = tmp_path / "m.skinf"
    sk.save_inference(exported, path)
    before = path.read_bytes()
    import sparsekern.formats._files as files

    def killed(fd):
        raise KeyboardInterrupt  # the process dies between the write and the rename

    monkeypatch.setattr(files.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        sk.save_inference(to_inference(_pruned_mlp(seed=3), format="csr"), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.skinf"]  # no temporary left


def test_load_inference_missing_values_entry_is_named():
    _, exported = _exported()
    sd = exported.state_dict()
    del sd["0.values"]
    with pytest.raises(ValueError, match=r"layer '0': expected 0.values beside 0.row_ptr"):
        sk.load_inference(_pruned_mlp(), sd)


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_same_outputs_nonfinite_on_every_path(fmt, bad):
    """One semantics: the exported layer's non-finite outputs are the dense product's."""
    model = _pruned_mlp()
    layer = model[2]
    x = torch.randn(3, 32)
    x[1, 5] = bad
    x[2, 7] = -bad
    with torch.no_grad():
        dense = to_inference(layer, format="dense")(x)
        sparse = to_inference(layer, format=fmt)(x)
        trained = layer(x)
    assert torch.equal(torch.isfinite(sparse), torch.isfinite(dense))
    assert torch.equal(torch.isfinite(trained), torch.isfinite(dense))
    assert bool(torch.isfinite(sparse[0]).all()) and not bool(torch.isfinite(sparse[1:]).any())
    torch.testing.assert_close(sparse[0], dense[0])
    xg = x.clone().requires_grad_()  # the autograd path agrees
    assert torch.equal(torch.isfinite(to_inference(layer, format=fmt)(xg)), torch.isfinite(dense))


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_nonfinite_input_conv_matches_dense_pattern(fmt):
    torch.manual_seed(0)
    conv = sk.sparsify(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1)))[0].eval()
    sk.set_mask(conv, torch.rand(conv.weight.shape) < 0.1)
    x = torch.randn(2, 16, 6, 6)
    x[0, 3, 2, 4] = float("nan")
    with torch.no_grad():
        dense = to_inference(conv, format="dense")(x)
        sparse = to_inference(conv, format=fmt)(x)
    assert torch.equal(torch.isfinite(sparse), torch.isfinite(dense))
    assert int((~torch.isfinite(dense)).sum()) == 16 * 9  # every channel, 3x3 positions
    torch.testing.assert_close(sparse[1], dense[1])


def test_inf_at_pruned_entries_is_stored_as_zero():
    w = torch.randn(32, 32)
    mask = torch.rand(32, 32) < 0.5
    w[~mask] = float("inf")
    m = sk.BlockSparseMatrix.from_dense(w, (16, 16), mask=mask)
    assert bool(torch.isfinite(m.to_dense()).all())
    torch.testing.assert_close(m.to_dense(), torch.where(mask, w, 0))
    c = sk.CSRMatrix.from_dense(w, mask=mask)
    torch.testing.assert_close(c.to_dense(), torch.where(mask, w, 0))


def test_meta_tensor_in_from_dense_is_named():
    from sparsekern.formats import BlockSparseFormatError

    with pytest.raises(BlockSparseFormatError, match=r"got one on the meta device"):
        sk.BlockSparseMatrix.from_dense(torch.randn(32, 32, device="meta"))
    with pytest.raises(ValueError, match=r"got one on the meta device"):
        sk.CSRMatrix.from_dense(torch.randn(32, 32, device="meta"))


def test_int_input_to_csr_conv_export_is_named():
    conv = sk.sparsify(nn.Sequential(nn.Conv2d(4, 4, 3)))[0]
    exported = to_inference(conv, format="csr")
    with pytest.raises(TypeError, match=r"CSRConv2d: expected input of the weight's dtype "
                       r"torch.float32, got torch.int64"):  # fmt: skip
        exported(torch.randint(0, 5, (1, 4, 6, 6)))
