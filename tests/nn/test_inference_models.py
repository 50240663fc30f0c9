"""The models users bring export (issue 24, item 8): attention (nn.MultiheadAttention in a ViT,
nn.TransformerEncoderLayer's fused path), GPT-2's HF Conv1D, resized token embeddings. Tiny
configs built here, no downloads."""

import warnings

import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern.nn import CSRLinear, inference_choices, to_inference


def _prune(model, density=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _, m in sk.sparse_modules(model):
        sk.set_mask(m, torch.rand(m.weight.shape, generator=gen) < density)
    return model.eval()


def _sparse(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sk.sparsify(model)


@pytest.mark.parametrize("fmt", ["csr", "bsr", "auto"])
def test_transformer_encoder_layer_exports_and_matches(fmt, tmp_path):
    torch.manual_seed(0)

    def build():
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
        enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        return _sparse(nn.Sequential(enc, nn.Linear(32, 5)))

    model = _prune(build())
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        ref = model(x)
        exported = to_inference(model, format=fmt, calibrate=False)
        torch.testing.assert_close(exported(x), ref, rtol=1e-4, atol=1e-5)
    enc0 = exported[0].layers[0]
    assert type(enc0.self_attn) is nn.MultiheadAttention
    choice = inference_choices(exported)["0.layers.0.self_attn"]
    assert choice.kind == "attention" and "stay dense" in choice.reason
    if fmt == "csr":
        assert isinstance(enc0.linear1, CSRLinear) and isinstance(exported[1], CSRLinear)
    sk.save_inference(exported, tmp_path / "t.skinf")
    back = sk.load_inference(tmp_path / "t.skinf", build())
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref, rtol=1e-4, atol=1e-5)


def test_vit_exports_and_matches():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=7,
    )  # fmt: skip
    model = _prune(_sparse(vit))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        exported = to_inference(model, format="csr")
        torch.testing.assert_close(exported(x), ref, rtol=1e-4, atol=1e-5)
    assert isinstance(exported.encoder.layers[0].mlp[0], CSRLinear)


def _gpt2(vocab=50):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def test_gpt2_conv1d_exports_like_linear(tmp_path):
    model = _prune(_sparse(_gpt2()))
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        exported = to_inference(model, format="csr")
        torch.testing.assert_close(exported(ids).logits, ref, rtol=1e-4, atol=1e-5)
    block = exported.transformer.h[0]
    for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
        assert isinstance(layer, CSRLinear)
    assert block.attn.c_attn.out_features == 96  # Conv1D(nf=96, nx=32): weight transposed
    sk.save_inference(exported, tmp_path / "g.skinf")
    back = sk.load_inference(tmp_path / "g.skinf", _sparse(_gpt2()))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref, rtol=1e-4, atol=1e-5)
    dense = to_inference(model, format="dense")  # a Conv1D as dense: nn.Linear, W^T
    assert type(dense.transformer.h[0].mlp.c_fc) is nn.Linear


def _llama(vocab=50):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("build", [_llama, _gpt2])
def test_resize_token_embeddings_keeps_the_mask(build):
    model = _prune(_sparse(build()))
    old = model.get_output_embeddings().mask.clone()
    model.resize_token_embeddings(60)
    head = model.get_output_embeddings()
    assert isinstance(head, sk.SparseLinear) and head.weight.shape[0] == 60
    assert torch.equal(head.mask[:50], old) and bool(head.mask[50:].all())
    assert sk.check_masks(model) == []
    assert bool((head.weight[:50][~old] == 0).all())
    ids = torch.randint(0, 60, (2, 5))
    assert model(ids).logits.shape == (2, 5, 60)


def test_check_masks_names_a_mask_of_another_shape():
    model = _sparse(nn.Sequential(nn.Linear(4, 3)))
    model[0]._buffers["mask"] = torch.ones(2, 4, dtype=torch.bool)
    assert sk.nn.mask_problems(model) == {
        "0": ["mask shape: expected the weight's [3, 4], got [2, 4]"]
    }
