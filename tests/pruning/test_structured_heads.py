"""Attention-head pruning (``heads=``) of prune_channels / StructuredPruner: the pruned attention
computes exactly what the original computes with the removed heads' out-projection columns
zeroed (float64), parameters and MACs drop by the exact count, head scores follow their
definitions, and what cannot be done is refused before anything changes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.vision_transformer import VisionTransformer

from sparsekern.nn import sparsify
from sparsekern.pruning.structured import (
    StructuredPruner,
    count_macs,
    count_params,
    prune_channels,
    pruning_plan,
)
from sparsekern.pruning.structured_attention import PrunedMultiheadAttention
from sparsekern.pruning.structured_heads import attentions, head_importance

E, H, D = 16, 4, 4  # embed_dim, heads, head_dim


def _vit():
    """vit_b_16's layout (torchvision's own classes) at small dims, float64."""
    torch.manual_seed(0)
    m = VisionTransformer(32, 16, num_layers=2, num_heads=H, hidden_dim=E, mlp_dim=24,
                          num_classes=5)  # fmt: skip
    nn.init.normal_(m.heads.head.weight)  # torchvision's zero head would zero every gradient
    return m.double().eval()


@torch.no_grad()
def _zeroed(model, keep_heads, keep_mlp=None):
    """The reference: the original model with each removed head's out-projection columns (and
    removed MLP hidden units' fc1 rows and biases) set to zero."""
    ref = copy.deepcopy(model)
    for n, k in keep_heads.items():
        a = ref.get_submodule(n)
        a.out_proj.weight.view(a.embed_dim, a.num_heads, a.head_dim)[:, ~k] = 0
    for n, k in (keep_mlp or {}).items():
        fc1 = ref.get_submodule(n)
        fc1.weight[~k] = 0
        fc1.bias[~k] = 0
    return ref


def _mha(batch_first=True, dropout=0.0):
    torch.manual_seed(1)
    return nn.MultiheadAttention(E, H, dropout=dropout, batch_first=batch_first).double().eval()


@pytest.mark.parametrize("batch_first", [True, False])
def test_all_heads_kept_computes_what_multihead_attention_computes(batch_first):
    mha = _mha(batch_first, dropout=0.3)
    full = PrunedMultiheadAttention.from_attention(mha, torch.ones(H, dtype=torch.bool))
    b, lq, lk = 3, 5, 6
    q = torch.randn(b, lq, E, dtype=torch.float64)
    kv = torch.randn(b, lk, E, dtype=torch.float64)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    pad = torch.zeros(b, lk, dtype=torch.bool)
    pad[1, -2:] = True
    per_head = torch.randn(b * H, lq, lk, dtype=torch.float64)
    cases = [
        {},
        {"key_padding_mask": pad},
        {"attn_mask": torch.rand(lq, lk) > 0.7, "key_padding_mask": pad},
        {"attn_mask": per_head},
        {"attn_mask": per_head, "need_weights": True, "average_attn_weights": False},
        {"need_weights": True},
    ]
    with torch.no_grad():
        for kw in cases:
            kw = {"need_weights": False, **kw}
            out, w = full(q, kv, kv, **kw)
            ref, rw = mha(q, kv, kv, **kw)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
            if kw["need_weights"]:
                torch.testing.assert_close(w, rw, rtol=0, atol=1e-12)
        # unbatched [L, E]
        x = torch.randn(lq, E, dtype=torch.float64)
        torch.testing.assert_close(full(x, x, x)[0], mha(x, x, x)[0], rtol=0, atol=1e-12)


def test_removed_heads_equal_zeroed_out_projection_columns_even_with_per_head_masks():
    mha = _mha()
    keep = torch.tensor([True, False, True, False])
    small = PrunedMultiheadAttention.from_attention(mha, keep)
    assert small.num_heads == 2 and small.kept_heads.tolist() == [0, 2]
    ref = _zeroed(nn.ModuleDict({"a": mha}), {"a": keep})["a"]
    x = torch.randn(2, 5, E, dtype=torch.float64)
    mask = torch.randn(2 * H, 5, 5, dtype=torch.float64)  # in the original head numbering
    with torch.no_grad():
        for kw in ({}, {"attn_mask": mask}, {"is_causal": True, "attn_mask": None}):
            if kw.get("is_causal"):
                kw = {"attn_mask": nn.Transformer.generate_square_subsequent_mask(5).double(),
                      "is_causal": True}  # fmt: skip
            out = small(x, x, x, need_weights=False, **kw)[0]
            torch.testing.assert_close(out, ref(x, x, x, need_weights=False, **kw)[0],
                                       rtol=0, atol=1e-10)  # fmt: skip


def test_vit_no_heads_removed_is_bitwise_the_original():
    model = _vit()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    same = prune_channels(model, x[:1], amount=0.0, heads=0.0)
    assert not any(isinstance(m, PrunedMultiheadAttention) for m in same.modules())
    with torch.no_grad():
        assert torch.equal(same(x), model(x))


@pytest.mark.parametrize("importance", ["l1", "l2", "random", "taylor", "taylor2"])
@pytest.mark.parametrize("amount", [0.0, 0.5])
def test_vit_heads_removed_equal_the_zeroed_model_and_counts_drop_exactly(importance, amount):
    model = _vit()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    kw = {}
    if importance.startswith("taylor"):
        kw = {"data": [(x, torch.tensor([0, 3]))], "loss_fn": F.cross_entropy}
    plan = pruning_plan(model, x[:1], amount=amount, importance=importance, heads=0.5, **kw)
    small = prune_channels(model, x[:1], amount=amount, importance=importance, heads=0.5, **kw)
    assert sorted(plan["heads"]) == sorted(attentions(model))
    assert all(int(k.sum()) == 2 for k in plan["heads"].values())  # floor(0.5 * 4) removed
    mlp = {n: k for n, k in plan["out"].items() if n.endswith("mlp.0")}
    with torch.no_grad():
        out, ref = small(x), _zeroed(model, plan["heads"], mlp)(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    removed_units = sum(int((~k).sum()) for k in mlp.values())  # fc1 row + bias, fc2 column
    # per head: q, k, v rows (3 d E) and biases (3 d), out-projection columns (E d)
    assert count_params(model) - count_params(small) == 4 * (4 * D * E + 3 * D) + removed_units * (
        2 * E + 1
    )
    tokens = (32 // 16) ** 2 + 1
    # per head and token: q/k/v/out projections (4 d E) and Q K^T, A V (2 tokens d)
    head_macs = 4 * tokens * (4 * D * E + 2 * tokens * D)
    assert count_macs(model, x[:1]) - count_macs(small, x[:1]) == head_macs + removed_units * (
        2 * E * tokens
    )


def test_l1_and_l2_head_scores_are_the_norms_of_the_heads_weights():
    model = nn.ModuleDict({"a": _mha()})
    with torch.no_grad():
        model["a"].in_proj_weight.view(3, H, D, E)[:, 2] *= 0.01  # head 2: the smallest
    w_in = model["a"].in_proj_weight.detach().view(3, H, D, E)
    w_out = model["a"].out_proj.weight.detach().view(E, H, D)
    att = attentions(model)
    l1 = head_importance(model, att, "l1")["a"]
    l2 = head_importance(model, att, "l2")["a"]
    for h in range(H):
        parts = torch.cat([w_in[:, h].flatten(), w_out[:, h].flatten()])
        torch.testing.assert_close(l1[h], parts.abs().sum(), rtol=1e-12, atol=0)
        torch.testing.assert_close(l2[h], parts.norm(), rtol=1e-12, atol=0)
    assert int(l1.argmin()) == 2


def test_taylor_head_score_is_michels_per_sample_gate_gradient():
    """dL_n/dxi_h (xi_h scaling head h's output) is <W_h, dL_n/dW_h> over the head's
    out-projection columns: the output is linear in them."""
    model = _vit()
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 2, 4, 1, 3, 0])
    att = attentions(model)
    data = [(x, y)]
    sc = head_importance(model, att, "taylor", data=data, loss_fn=F.cross_entropy)
    sc2 = head_importance(model, att, "taylor2", data=data, loss_fn=F.cross_entropy)
    assert all(type(m) is nn.MultiheadAttention for m in attentions(model).values())  # put back
    ws = [m.out_proj.weight for m in att.values()]
    assert all(s.min() > 0 for s in sc.values())
    ref = {n: torch.zeros(H, dtype=torch.float64) for n in att}
    ref2 = {n: torch.zeros(H, dtype=torch.float64) for n in att}
    model.train()  # the fused eval fast path has no weight gradient; dropout is 0 here
    signed = {n: torch.zeros(H, dtype=torch.float64) for n in att}
    for i in range(6):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, ws)
        for (n, _m), w, g in zip(att.items(), ws, grads):
            # / 6: the batch's loss is the mean, so sample n's gate gradient is dL_n/dxi / 6
            gh = (w.detach() * g).view(E, H, D).sum((0, 2)) / 6
            ref[n] += gh.abs()
            ref2[n] += 0.5 * gh**2
            signed[n] += gh
    # per sample, as the paper: not the batch sum's magnitude (the two differ here)
    assert any((ref[n] - signed[n].abs()).max() > 1e-3 * ref[n].max() for n in att)
    for n in att:
        torch.testing.assert_close(sc[n], ref[n], rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(sc2[n], ref2[n], rtol=1e-9, atol=1e-18)


def test_global_heads_rank_across_attentions_and_keep_one_each():
    model = _vit()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    plan = pruning_plan(model, x, amount=0.0, heads=0.75, global_pruning=True)
    kept = [int(k.sum()) for k in plan["heads"].values()]
    assert sum(kept) == 8 - 6 and min(kept) >= 1
    per = pruning_plan(model, x, amount=0.0, heads={"*": 0.5,
                       "encoder.layers.encoder_layer_1.self_attention": 0.25})  # fmt: skip
    assert [int(k.sum()) for k in per["heads"].values()] == [2, 3]


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_transformer_encoder_heads_without_tracing():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2).double().eval()  # nested-tensor fast path on
    x = torch.randn(3, 5, E, dtype=torch.float64)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[2, -2:] = True
    small = prune_channels(enc, x, amount=0.0, heads=0.5)  # fx cannot trace it: heads only
    plan = pruning_plan(enc, x, amount=0.0, heads=0.5)
    ref = _zeroed(enc, plan["heads"])
    assert ref.use_nested_tensor and not small.use_nested_tensor  # its fast path assumes E = H d
    with torch.no_grad():
        for kw in ({}, {"src_key_padding_mask": pad}):
            # padded positions: zeros on the nested path, computed on the regular one
            out, want = small(x, **kw)[~pad], ref(x, **kw)[~pad]
            torch.testing.assert_close(out, want, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="fx can trace"):
        prune_channels(enc, x, amount=0.5, heads=0.5)


def test_refusals_come_before_any_change():
    model = _vit()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="with heads"):
        prune_channels(model, x, heads=0.5, importance="rls", data=[(x, None)])
    with pytest.raises(KeyError, match="attentions"):
        prune_channels(model, x, heads={"encoder.nope": 0.5})
    with pytest.raises(ValueError, match=r"heads in \[0, 1\)"):
        prune_channels(model, x, heads=1.0)
    with pytest.raises(ValueError, match="MultiheadAttention modules"):
        prune_channels(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
                       torch.randn(1, 4), heads=0.5)  # fmt: skip

    class KV(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.MultiheadAttention(E, H, kdim=8, vdim=8, batch_first=True)

        def forward(self, q, kv):
            return self.a(q, kv, kv, need_weights=False)[0]

    with pytest.raises(ValueError, match="kdim=8"):
        prune_channels(KV(), (torch.randn(1, 3, E), torch.randn(1, 3, 8)), amount=0, heads=0.5)
    with pytest.raises(ValueError, match="sparse attentions"):
        StructuredPruner(model, example_inputs=x, heads=0.5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.filterwarnings("ignore:sparsify. 0.5% of the weight-matrix")
def test_pruner_masks_heads_keeps_them_zero_through_adam_then_exports():
    torch.manual_seed(0)
    vit = VisionTransformer(32, 16, num_layers=2, num_heads=H, hidden_dim=E, mlp_dim=24,
                            num_classes=5)  # fmt: skip
    nn.init.normal_(vit.heads.head.weight)
    model = sparsify(vit)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.Adam(model.parameters(), 1e-2)

    def closure():
        return F.cross_entropy(model(x), y)

    pruner = StructuredPruner(model, opt, example_inputs=x[:1], importance="taylor", heads=0.5)
    pruner.prune(0.25, closure=closure)
    assert [len(h) for h in pruner.removed_heads.values()] == [2, 2]
    assert pruner.history[-1]["heads_removed"] == 4
    att = attentions(model)
    start = {n: a.in_proj_weight.detach().clone() for n, a in att.items()}
    model.train()
    for _ in range(3):
        opt.zero_grad()
        closure().backward()
        opt.step()
        pruner.step()
    for n, gone in pruner.removed_heads.items():
        a = att[n]
        assert not a.in_proj_weight.view(3, H, D, E)[:, gone].any()
        assert not a.out_proj.weight.view(E, H, D)[:, gone].any()
        kept = [h for h in range(H) if h not in gone]
        w = a.in_proj_weight.detach().view(3, H, D, E)
        assert not torch.equal(w[:, kept], start[n].view(3, H, D, E)[:, kept])  # it trained
    pruner.prune(0.25, closure=closure)  # removed heads stay removed, none more
    again = StructuredPruner(model, opt, example_inputs=x[:1], importance="taylor", heads=0.5)
    again.load_state_dict(pruner.state_dict())
    assert again.removed_heads == pruner.removed_heads
    small = pruner.export().eval()
    assert [m.num_heads for m in attentions(small).values()] == [2, 2]
    assert not any(hasattr(m, "mask") for m in small.modules())
    with torch.no_grad():
        torch.testing.assert_close(small(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_convnext_residual_width_is_refused_with_a_warning_naming_it():
    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 1)], num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"3 depthwise conv.*features\.1\.0\.block\.0.*LayerNorm"):
        prune_channels(model, x, amount=0.5)
    with pytest.warns(UserWarning, match="StructuredPruner: 3 depthwise"):
        StructuredPruner(sparsify(copy.deepcopy(model)), example_inputs=x)
