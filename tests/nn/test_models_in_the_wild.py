"""Models users bring: attention, HF transformers' Conv1D and tied weights, torch.nn.utils.prune
checkpoints, shared weights, live-optimizer loads, and a sweep over real torchvision / HF models
(forward equality, the invariant through optimizer steps, state-dict round trips, export)."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.utils import prune

from sparsekern import check_masks, set_mask, sparsify
from sparsekern.nn import (
    SparseConv1D,
    SparseLinear,
    SparseMultiheadAttention,
    coverage,
    sparse_modules,
    sync_optimizer,
)
from sparsekern.pruning import GlobalMagnitudePruner

try:
    import transformers
except ImportError:  # pragma: no cover - the test extra installs it
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="transformers not installed")


def _prune_all(model, density=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _, m in sparse_modules(model):
        set_mask(m, torch.rand(m.weight.shape, generator=g) < density)


def _steps(model, inputs, loss_fn, n=3, opt_cls=torch.optim.SGD, **opt_kw):
    opt_kw = opt_kw or {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
    opt = opt_cls(model.parameters(), **opt_kw)
    for _ in range(n):
        opt.zero_grad()
        loss_fn(model(*inputs)).backward()
        opt.step()
    return opt


# --- nn.MultiheadAttention ------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kdim", [None, 6])
def test_sparse_attention_matches_and_keeps_pruned_weights_zero(batch_first, kdim):
    mha = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim, batch_first=batch_first)
    q = torch.randn(3, 5, 8)
    kv = torch.randn(3, 5, kdim or 8)
    ref = mha(q, kv, kv)[0]
    sparse = SparseMultiheadAttention.from_dense(mha)
    assert all(a is b for a, b in zip(sparse.parameters(), mha.parameters()))
    torch.testing.assert_close(sparse(q, kv, kv)[0], ref)
    names = {n for n, _ in sparse_modules(sparse)}
    expected = {"in_proj"} if kdim is None else {"q_proj", "k_proj", "v_proj"}
    assert names == expected | {"out_proj"}
    _prune_all(sparse)
    _steps(sparse, (q, kv, kv), lambda out: out[0].square().sum())
    assert check_masks(sparse) == []
    for _, m in sparse_modules(sparse):
        assert (m.weight[~m.mask] == 0).all() and (m.weight.grad[~m.mask] == 0).all()
    # eval (torch's fused fast path when it applies) equals the masked math
    sparse.eval()
    with torch.no_grad():
        out = sparse(q, kv, kv)[0]
    dense = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim, batch_first=batch_first).eval()
    dense.load_state_dict(sparse.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(out, dense(q, kv, kv)[0])


def test_sparse_attention_state_dict_copy_pickle():
    mha = nn.MultiheadAttention(8, 2)
    sd = mha.state_dict()
    sparse = SparseMultiheadAttention(8, 2)
    sparse.load_state_dict(sd)  # a dense checkpoint: masks all True
    assert all(m.mask.all() for _, m in sparse_modules(sparse))
    _prune_all(sparse)
    fresh = SparseMultiheadAttention(8, 2)
    fresh.load_state_dict(sparse.state_dict())
    for (_, a), (_, b) in zip(sparse_modules(sparse), sparse_modules(fresh)):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)
    q = torch.randn(4, 2, 8, requires_grad=True)
    for clone in (copy.deepcopy(sparse), pickle.loads(pickle.dumps(sparse))):
        clone(q, q, q)[0].sum().backward()
        assert check_masks(clone) == []
        assert all((m.weight.grad[~m.mask] == 0).all() for _, m in sparse_modules(clone))


def test_vit_is_pruned_through_its_attention():
    """ViT-B/16 "at 90%" once pruned 66.8% of its weights: the attention projections were
    skipped. Now every weight matrix but the patch embedding is prunable."""
    vit = torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    ref = vit.eval()(x)
    with pytest.warns(UserWarning, match="stay dense"):  # class token and position embedding
        sparsify(vit)
    torch.testing.assert_close(vit(x), ref)
    cov = coverage(vit)
    assert cov.sparse_fraction > 0.95, cov
    assert any("self_attention.in_proj" in n for n in cov.sparse)
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-3)
    pruner = GlobalMagnitudePruner(vit, opt, sparsity=0.9)
    pruner.prune()
    vit.train()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(vit(x), torch.tensor([1, 2])).backward()
        opt.step()
    assert check_masks(vit) == []
    kept = sum(int(m.mask.sum()) for _, m in sparse_modules(vit))
    total = sum(m.mask.numel() for _, m in sparse_modules(vit))
    assert abs(1 - kept / total - 0.9) < 0.01


def test_pruner_refuses_a_sparse_layer_read_by_a_plain_attention():
    """A SparseLinear put by hand as a plain nn.MultiheadAttention's out_proj is read directly
    by its parent: its mask would be ignored in forward and backward."""
    mha = nn.MultiheadAttention(8, 2)
    mha.out_proj = SparseLinear.from_dense(mha.out_proj)
    with pytest.raises(ValueError, match=r"read directly by its parent.*MultiheadAttention"):
        GlobalMagnitudePruner(nn.Sequential(mha), None, sparsity=0.5)


# --- tied and shared weights ----------------------------------------------------------------------
class TinyLM(nn.Module):
    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied, as GPT-2's lm_head and wte

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.emb(ids))))


def test_tied_weights_stay_pruned_on_every_gradient_path():
    """The embedding path sends dense gradients into the shared Parameter: once 1041 of 2880
    pruned weights came back after 3 SGD steps."""
    lm = TinyLM()
    with pytest.warns(UserWarning, match="tied weights"):
        sparsify(lm)
    _prune_all(lm)
    ids = torch.randint(0, 50, (4, 7))
    loss = lambda out: F.cross_entropy(out.flatten(0, 1), ids.flatten())  # noqa: E731
    _steps(lm, (ids,), loss)
    assert check_masks(lm) == []
    twin = copy.deepcopy(lm)  # tensor hooks do not survive a copy: the forward puts it back
    _steps(twin, (ids,), loss)
    assert check_masks(twin) == []


def test_shared_weight_has_one_mask():
    """Two SparseLinears over one weight: set_mask on one once zeroed weights the other used."""
    a = nn.Linear(6, 6)
    model = nn.Sequential(a, nn.ReLU(), nn.Linear(6, 6))
    model[2].weight = a.weight
    sparsify(model)
    assert model[0].mask is model[2].mask
    set_mask(model[0], torch.rand(6, 6) < 0.5)
    assert torch.equal(model[2].mask, model[0].mask)
    lone = SparseLinear.from_dense(nn.Linear(6, 6))
    other = SparseLinear.from_dense(nn.Linear(6, 6))
    other.weight = lone.weight
    from sparsekern.nn.masks import register_weight_user

    register_weight_user(other)
    with pytest.raises(ValueError, match="expected a weight with one mask"):
        set_mask(lone, torch.rand(6, 6) < 0.5)
    assert lone.mask.all(), "a refused set_mask changes nothing"


# --- torch.nn.utils.prune -------------------------------------------------------------------------
def test_sparsify_takes_over_torch_pruned_modules():
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    prune.random_unstructured(model[2], "weight", amount=0.3)
    x = torch.randn(4, 10)
    ref = model(x)
    orig = model[0].weight_orig
    mask0 = model[0].weight_mask.bool().clone()
    sparsify(model)
    assert isinstance(model[0], SparseLinear) and torch.equal(model[0].mask, mask0)
    assert model[0].weight is orig, "the same Parameter object: optimizers keep working"
    assert not model[0]._forward_pre_hooks
    torch.testing.assert_close(model(x), ref)
    assert check_masks(model) == []


def test_torch_prune_state_dict_loads_into_sparse_layers():
    lin = nn.Linear(7, 5)
    prune.l1_unstructured(lin, "weight", amount=0.6)
    sd = lin.state_dict()
    assert {"weight_orig", "weight_mask"} <= set(sd)
    sparse = SparseLinear(7, 5)
    sparse.load_state_dict(sd)  # strict
    assert torch.equal(sparse.mask, sd["weight_mask"].bool())
    torch.testing.assert_close(sparse.weight, sd["weight_orig"] * sd["weight_mask"])


# --- loading into a live model and optimizer ------------------------------------------------------
def test_checkpoint_loaded_into_a_live_training_setup_keeps_the_invariant():
    """load_state_dict zeroes pruned weights and their grads; sync_optimizer zeroes the
    optimizer state: once 71 of 71 pruned weights came back after one step."""
    model = sparsify(nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4)))
    x = torch.randn(6, 12)
    opt = _steps(model, (x,), lambda y: y.square().sum())  # dense momentum everywhere
    pruned = copy.deepcopy(model)
    _prune_all(pruned)
    model.load_state_dict(pruned.state_dict())
    assert all((m.weight.grad[~m.mask] == 0).all() for _, m in sparse_modules(model))
    assert sync_optimizer(model, opt) == ["0", "2"]
    opt.step()
    assert check_masks(model) == []


# --- real models ----------------------------------------------------------------------------------
TORCHVISION = ["resnet18", "mobilenet_v2", "efficientnet_b0", "convnext_tiny"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_models(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    sparsify(model)
    torch.testing.assert_close(model(x), ref)
    assert coverage(model).sparse_fraction == 1.0
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    GlobalMagnitudePruner(model, opt, sparsity=0.8).prune()
    model.train()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
        opt.step()
    assert check_masks(model) == []
    model.eval()
    twin = sparsify(getattr(torchvision.models, name)(weights=None, num_classes=10)).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), model(x))


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg)


@needs_hf
def test_hf_gpt2_conv1d_and_tied_head(tmp_path):
    torch.manual_seed(0)
    model = _gpt2().eval()
    ids = torch.randint(0, 97, (2, 9))
    ref = model(ids).logits
    with pytest.warns(UserWarning):
        sparsify(model)
    assert isinstance(model.transformer.h[0].attn.c_attn, SparseConv1D)
    torch.testing.assert_close(model(ids).logits, ref)
    assert coverage(model).sparse_fraction > 0.97  # position embeddings stay dense
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    GlobalMagnitudePruner(model, opt, sparsity=0.7).prune()
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    assert check_masks(model) == [], "Conv1D masks and the tied lm_head/wte must hold"
    model.eval()
    model.save_pretrained(tmp_path)
    from sparsekern.nn import hf

    back = hf.from_pretrained(transformers.GPT2LMHeadModel, tmp_path).eval()
    for (n, a), (_, b) in zip(sparse_modules(model), sparse_modules(back)):
        assert torch.equal(a.mask, b.mask), n
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits)


@needs_hf
def test_hf_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16,
    )  # fmt: skip
    model = transformers.BertForMaskedLM(cfg).eval()
    ids = torch.randint(0, 97, (2, 9))
    ref = model(ids).logits
    with pytest.warns(UserWarning):
        sparsify(model)
    torch.testing.assert_close(model(ids).logits, ref)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    GlobalMagnitudePruner(model, opt, sparsity=0.5).prune()
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    assert check_masks(model) == []


@needs_hf
def test_nm_on_hf_conv1d_groups_along_the_input_dim():
    from sparsekern.pruning import NMPruner, check_nm

    torch.manual_seed(0)
    model = _gpt2()
    with pytest.warns(UserWarning):
        sparsify(model)
    conv = model.transformer.h[0].mlp.c_fc  # weight [in=32, out=128]
    names = [n for n, m in sparse_modules(model) if isinstance(m, SparseConv1D)]
    NMPruner(model, n_m=(2, 4), layers=names).prune()
    assert conv.weight.shape == (32, 128)
    # groups of 4 along the input (dim 0 of the [in, out] weight), i.e. along rows of W^T
    assert check_nm(conv.mask.t(), (2, 4))
    assert not check_nm(conv.mask, (2, 4))
    ids = torch.randint(0, 97, (2, 9))
    model(ids, labels=ids).loss.backward()
    assert check_masks(model) == []
