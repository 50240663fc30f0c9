"""Structured pruning on the models users bring: ConvNeXt's and ViT's channels-last MLP hidden
units (torchvision's own block classes, built small and without weights), and no silent no-op
on a model with nothing prunable."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.vision_transformer import VisionTransformer

from sparsekern.nn import sparsify
from sparsekern.pruning.structured import (
    StructuredPruner,
    channel_groups,
    count_params,
    prune_channels,
    pruning_plan,
)


def _convnext():
    torch.manual_seed(0)
    m = ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 1)], num_classes=5)
    with torch.no_grad():  # layer scale 1e-6 would hide any error in the MLP: make it 1
        for name, p in m.named_parameters():
            if name.endswith("layer_scale"):
                p.fill_(1.0)
    return m.eval()


def _vit():
    torch.manual_seed(0)
    m = VisionTransformer(32, 16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=24,
                          num_classes=5)  # fmt: skip
    nn.init.normal_(m.heads.head.weight)  # torchvision's zero head would zero every gradient
    return m.eval()


def _mlp_pairs(model):
    """(fc1, fc2) of every MLP: ConvNeXt's block.3 / block.5, ViT's mlp.0 / mlp.3."""
    mods = dict(model.named_modules())
    out = []
    for n in mods:
        if n.endswith("block.3"):
            out.append((n, n[: -len("3")] + "5"))
        elif n.endswith("mlp.0"):
            out.append((n, n[: -len("0")] + "3"))
    return out


@torch.no_grad()
def _zeroed(model, keep_of):
    """The model with the removed hidden units' fc1 rows and biases zeroed (GELU(0) = 0: what
    they send to fc2 is then exactly 0)."""
    import copy

    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    for fc1, _fc2 in _mlp_pairs(ref):
        keep = keep_of[fc1]
        mods[fc1].weight[~keep] = 0
        mods[fc1].bias[~keep] = 0
    return ref


# ConvNeXt's residual width is refused with a warning (test_structured_heads.py checks it)
@pytest.mark.filterwarnings("ignore:prune_channels. 3 depthwise conv")
@pytest.mark.parametrize("build, x", [(_convnext, (2, 3, 32, 32)), (_vit, (2, 3, 32, 32))])
@pytest.mark.parametrize("importance", ["l1", "taylor"])
def test_mlp_hidden_units_are_removed_and_the_output_is_the_zeroed_models(build, x, importance):
    model = build()
    x = torch.randn(*x)
    pairs = _mlp_pairs(model)
    groups = channel_groups(model, x[:1])
    # one group per MLP: its hidden units; the residual stream, the LayerNorms, the attention
    # and the classifier are not followed (they keep all their channels)
    assert sorted(p for g in groups for p in g["producers"]) == sorted(a for a, _ in pairs)
    kw = {}
    if importance == "taylor":
        kw = {"data": [(x, torch.tensor([0, 3]))], "loss_fn": F.cross_entropy}
    plan = pruning_plan(model, x[:1], amount=0.5, importance=importance, **kw)
    small = prune_channels(model, x[:1], amount=0.5, importance=importance, **kw)
    mods, smods = dict(model.named_modules()), dict(small.named_modules())
    for fc1, fc2 in pairs:
        n = mods[fc1].out_features
        assert smods[fc1].out_features == n - n // 2 == smods[fc2].in_features
        assert torch.equal(plan["in"][fc2], plan["out"][fc1])
    assert count_params(small) < count_params(model)
    with torch.no_grad():
        torch.testing.assert_close(small(x), _zeroed(model, plan["out"])(x), rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:StructuredPruner. 3 depthwise conv")
def test_pruner_masks_then_exports_convnext():
    model = sparsify(_convnext())
    x = torch.randn(2, 3, 32, 32)
    pruner = StructuredPruner(model, example_inputs=x[:1], importance="l1")
    pruner.prune(0.25)
    small = pruner.export().eval()
    mods = dict(small.named_modules())
    assert [mods[a].out_features for a, _ in _mlp_pairs(small)] == [24, 24, 48]
    with torch.no_grad():
        torch.testing.assert_close(small(x), model.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("importance", ["rls", "hessian_radius"])
def test_new_importances_run_on_channels_last_mlps(importance):
    model = _vit()
    x = torch.randn(2, 3, 32, 32)
    data = [(x, torch.tensor([1, 4]))]
    small = prune_channels(model, x[:1], amount=0.5, importance=importance, data=data,
                           loss_fn=F.cross_entropy)  # fmt: skip
    assert [dict(small.named_modules())[a].out_features for a, _ in _mlp_pairs(small)] == [12, 12]


def test_no_prunable_group_refuses_instead_of_a_silent_no_op():
    model = nn.Sequential(nn.Linear(4, 3))  # the classifier only: nothing can be removed
    x = torch.randn(1, 4)
    with pytest.raises(ValueError, match="0 in a Sequential"):
        prune_channels(model, x, amount=0.5)
    with pytest.raises(ValueError, match="0 in a Sequential"):
        prune_channels(model, x, amount={"*": 0.3})
    same = prune_channels(model, x, amount=0.0)  # nothing asked: an exact copy
    torch.testing.assert_close(same(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="prunable channels"):
        StructuredPruner(sparsify(model), example_inputs=x)


def test_count_macs_includes_multihead_attention():
    from sparsekern.pruning.structured import count_macs

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(3, 5, 8)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    # 3 batches x (5 tokens x 4 projections of 8x8 + QK^T and AV: 2 x 5 x 5 x 8)
    assert count_macs(Net(), x) == 3 * (5 * 4 * 64 + 2 * 25 * 8)
