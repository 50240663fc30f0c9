"""One-shot pruning (SparseGPT, Wanda, magnitude): sparsekern.pruning.one_shot."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern import check_masks
from sparsekern.nn import SparseConv1D, SparseConv2d, SparseLinear
from sparsekern.pruning import (
    BasePruner,
    OneShotPruner,
    SemiStructuredUnsupported,
    check_nm,
    export_semi_structured,
    format_one_shot_report,
    one_shot,
    semi_structured_support,
)
from sparsekern.pruning._sparsegpt import sparsegpt_prune
from tests.pruning._auto_replay import check_guard, distortion, replay

METHODS = ("sparsegpt", "wanda", "magnitude")


def correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated features and uneven scales (what makes OBS pay)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scale = torch.rand(d, generator=g) * 2 + 0.1
    return (torch.randn(n, d, generator=g) @ mix + 0.2 * torch.randn(n, d, generator=g)) * scale


def linear_model(d_in=64, d_out=48, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out))


def calib(d_in=64, batches=4, n=128, seed=1):
    x = correlated(batches * n, d_in, seed)
    return list(x.split(n))


# ---------------------------------------------------------------------------- the OBS reference
def obs_reference(W, H, sparsity, n_m, block_size, percdamp=0.01, selection="row"):
    """SparseGPT written the slow, obvious way in float64: column by column, the explicit inverse
    of the Hessian of the columns not yet processed (``inv(H[j:, j:])``) and the OBS update
    ``W[:, j:] -= (w_j - q_j) / Finv_00 * Finv_0,:``; masks chosen at each block (group) start with
    scores ``w_c^2 / inv(H[c:, c:])_00`` (what the Cholesky factor's squared diagonal is)."""
    W = W.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    dead = torch.diagonal(H) == 0
    for i in torch.nonzero(dead).flatten().tolist():
        H[i, i] = 1
    W[:, dead] = 0
    H += percdamp * torch.diagonal(H).mean() * torch.eye(cols, dtype=H.dtype)
    d = torch.tensor([torch.linalg.inv(H[c:, c:])[0, 0].item() for c in range(cols)], dtype=H.dtype)
    prune = torch.zeros(rows, cols, dtype=torch.bool)
    for j in range(cols):
        if n_m is None and j % block_size == 0 and selection == "block":
            j2 = min(j + block_size, cols)
            k = round(sparsity * rows * j2) - round(sparsity * rows * j)
            score = (W[:, j:j2] ** 2 / d[j:j2]).flatten().tolist()
            order = sorted(range(len(score)), key=lambda i: score[i])
            for i in order[:k]:
                prune[i // (j2 - j), j + i % (j2 - j)] = True
        if n_m is None and j % block_size == 0 and selection == "row":
            j2 = min(j + block_size, cols)
            k = round(sparsity * j2) - round(sparsity * j)
            score = W[:, j:j2] ** 2 / d[j:j2]
            for r in range(rows):
                order = sorted(range(j2 - j), key=lambda c, r=r: score[r, c].item())
                for c in order[:k]:
                    prune[r, j + c] = True
        if n_m is not None and j % n_m[1] == 0:
            n, m = n_m
            j2 = min(j + m, cols)
            drop = (j2 - j) - min(n, j2 - j)
            score = W[:, j:j2] ** 2 / d[j:j2]
            for r in range(rows):
                order = sorted(range(j2 - j), key=lambda c, r=r: score[r, c].item())
                for c in order[:drop]:
                    prune[r, j + c] = True
        Finv = torch.linalg.inv(H[j:, j:])
        q = torch.where(prune[:, j], torch.zeros_like(W[:, j]), W[:, j])
        W[:, j:] -= ((W[:, j] - q) / Finv[0, 0]).unsqueeze(1) * Finv[0].unsqueeze(0)
    W[prune] = 0
    return W, ~prune


@pytest.mark.parametrize("n_m,selection", [(None, "block"), (None, "row"), ((2, 4), "block")])
def test_sparsegpt_equals_slow_obs_reference(n_m, selection):
    torch.manual_seed(0)
    rows, cols = 12, 72
    X = correlated(400, cols, seed=3)
    X[:, 5] = 0  # a dead input
    H = 2 * X.double().t() @ X.double() / X.shape[0]
    W = torch.randn(rows, cols, dtype=torch.float64)
    s = 0.6 if n_m is None else 0.5
    ref_W, ref_keep = obs_reference(W, H, s, n_m, block_size=32, selection=selection)
    got_W, got_keep = sparsegpt_prune(W, H, s, n_m, block_size=32, selection=selection)
    assert torch.equal(got_keep, ref_keep)
    torch.testing.assert_close(got_W, ref_W, rtol=1e-9, atol=1e-9)
    assert not got_keep[:, 5].all()  # the dead column's weights score 0: pruned first


def test_sparsegpt_without_update_keeps_weights():
    W = torch.randn(8, 40, dtype=torch.float64)
    X = correlated(200, 40)
    H = 2 * X.double().t() @ X.double() / 200
    W2, keep = sparsegpt_prune(W, H, 0.5, compensate=False)
    torch.testing.assert_close(W2, W * keep)


# ---------------------------------------------------------------------------- quality
@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_sparsegpt_reconstructs_best(n_m):
    errs = {}
    for method in METHODS:
        model = linear_model()
        rep = one_shot(model, calib(), method=method, n_m=n_m)
        errs[method] = rep[0]["rel_error"]
    assert errs["sparsegpt"] < errs["wanda"]
    assert errs["sparsegpt"] < errs["magnitude"]
    assert errs["sparsegpt"] < 0.9 * min(errs["wanda"], errs["magnitude"]), errs


def test_rel_error_matches_direct_computation():
    model = linear_model()
    dense = copy.deepcopy(model)
    cal = calib()
    rep = one_shot(model, cal, method="sparsegpt", sparsity=0.5)
    x = torch.cat(cal)
    ref = x @ dense[0].weight.t()
    got = x @ model[0].weight.t()
    direct = float(((ref - got) ** 2).sum().detach() / (ref**2).sum().detach())
    assert rep[0]["rel_error"] == pytest.approx(direct, rel=1e-4)


# ---------------------------------------------------------------------------- masks and densities
@pytest.mark.parametrize("method", [*METHODS, "sparsegpt-block"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_unstructured_exact_counts(method, sparsity):
    model = linear_model(d_in=170, d_out=21)  # two blocks of 128, the second one short
    selection = "block" if method.endswith("-block") else "row"
    rep = one_shot(
        model, calib(170), method=method.split("-")[0], sparsity=sparsity, selection=selection
    )
    layer = model[0]
    assert isinstance(layer, SparseLinear)
    assert check_masks(model) == []
    mask = layer.mask
    if method in ("magnitude", "sparsegpt-block"):  # per layer
        assert int(mask.sum()) == mask.numel() - round(sparsity * mask.numel())
    else:  # per output row
        assert (mask.sum(1) == 170 - round(sparsity * 170)).all()
    assert rep[0]["density"] == pytest.approx(float(mask.float().mean()))
    assert (layer.weight[~mask] == 0).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_m", [(2, 4), (1, 4), (4, 8)])
def test_nm_exact_pattern(method, n_m):
    model = linear_model(d_in=66, d_out=16)  # 66 % 4 = 2, 66 % 8 = 2: a short last group
    one_shot(model, calib(66), method=method, n_m=n_m)
    mask = model[0].mask
    assert check_nm(mask, n_m)
    assert check_masks(model) == []


@pytest.mark.parametrize("method", METHODS)
def test_sparsity_zero_changes_nothing(method):
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8))
    dense = copy.deepcopy(model)
    cal = calib(32)
    rep = one_shot(model, cal, method=method, sparsity=0.0)
    x = torch.cat(cal)
    torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)
    assert all(r["density"] == 1.0 for r in rep)


# ---------------------------------------------------------------------------- layer kinds
def test_conv2d_unfold_path():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, dilation=1),
        nn.ReLU(), nn.Conv2d(6, 6, 3, groups=2), nn.Flatten(), nn.LazyLinear(5),
    )  # fmt: skip
    cal = [torch.randn(4, 3, 12, 12) for _ in range(3)]
    model(cal[0])  # materialise the lazy layer
    dense = copy.deepcopy(model)
    rep = one_shot(model, cal, method="sparsegpt", n_m=(2, 4))
    by = {r["name"]: r for r in rep}
    assert isinstance(model[0], SparseConv2d) and isinstance(model[2], SparseConv2d)
    assert "groups=2" in by["4"]["skipped"] and not isinstance(model[4], SparseConv2d)
    assert check_nm(model[0].mask, (2, 4)) and check_nm(model[2].mask, (2, 4))
    assert by["0"]["shape"] == [8, 27]
    assert check_masks(model) == []
    # the first layer's report equals the error measured with F.conv2d on the calibration set
    x = torch.cat(cal)
    ref = F.conv2d(x, dense[0].weight, None, 1, 1)
    got = F.conv2d(x, model[0].weight, None, 1, 1)
    direct = float(((ref - got) ** 2).sum().detach() / (ref**2).sum().detach())
    assert by["0"]["rel_error"] == pytest.approx(direct, rel=1e-4)


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("method", METHODS)
def test_hf_gpt2_conv1d(method):
    model = tiny_gpt2()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (8, 16), generator=g)
    cal = [{"input_ids": ids[i : i + 4]} for i in (0, 4)]
    rep = one_shot(model, cal, method=method, n_m=(2, 4))
    by = {r["name"]: r for r in rep}
    assert by["lm_head"]["skipped"].startswith("the LM head")
    pruned = [r for r in rep if "skipped" not in r]
    assert len(pruned) == 8 and all(r["kind"] == "conv1d" for r in pruned)
    # forward order: c_attn, c_proj (attention), c_fc, c_proj (MLP), per block
    assert [r["name"] for r in pruned[:4]] == [
        "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
    ]  # fmt: skip
    conv = model.transformer.h[0].mlp.c_fc
    assert isinstance(conv, SparseConv1D)
    assert by["transformer.h.0.mlp.c_fc"]["shape"] == [
        128,
        32,
    ]  # [out, in]: the weight is [in, out]
    assert check_nm(conv.mask.t(), (2, 4))  # groups along the input dimension
    assert check_masks(model) == []
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_hf_gpt2_explicit_layers_and_unknown_name():
    model = tiny_gpt2()
    ids = torch.randint(0, 64, (4, 16))
    rep = one_shot(model, [{"input_ids": ids}], layers=["transformer.h.1.mlp.c_fc"])
    assert [r["name"] for r in rep] == ["transformer.h.1.mlp.c_fc"]
    with pytest.raises(KeyError, match=r"expected layer names.*transformer.h.0.attn.c_attn.*got"):
        one_shot(tiny_gpt2(), [{"input_ids": ids}], layers=["transformer.h.0.attn.nope"])


# ---------------------------------------------------------------------------- sequential
def test_sequential_statistics_come_from_pruned_layers():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 16))
    cal = calib(40)
    joint = copy.deepcopy(base)
    one_shot(joint, cal, method="sparsegpt", sparsity=0.6, selection="row")
    # manual two-step: prune the first layer, then the second with the first already pruned
    manual = copy.deepcopy(base)
    one_shot(manual, cal, method="sparsegpt", sparsity=0.6, layers=["0"], selection="row")
    one_shot(manual, cal, method="sparsegpt", sparsity=0.6, layers=["2"], selection="row")
    torch.testing.assert_close(joint[2].weight, manual[2].weight, rtol=0, atol=1e-12)
    torch.testing.assert_close(joint[0].weight, manual[0].weight, rtol=0, atol=0)
    # not the same as pruning the second layer from the dense first layer's outputs
    parallel = copy.deepcopy(base)
    one_shot(parallel, cal, method="sparsegpt", sparsity=0.6, layers=["2"])
    assert not torch.allclose(parallel[2].weight, joint[2].weight)


def test_calibration_tuples_and_dicts():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 8)
            self.b = nn.Linear(16, 8)

        def forward(self, x, y=None):
            return self.a(x) + (0 if y is None else self.b(y))

    torch.manual_seed(0)
    x, y = torch.randn(32, 16), torch.randn(32, 16)
    m1, m2 = Two(), Two()
    m2.load_state_dict(m1.state_dict())
    r1 = one_shot(m1, [(x, y)], method="wanda")
    one_shot(m2, [{"x": x, "y": y}], method="wanda")
    assert [r["name"] for r in r1] == ["a", "b"]
    assert torch.equal(m1.a.mask, m2.a.mask) and torch.equal(m1.b.mask, m2.b.mask)


# ---------------------------------------------------------------------------- lifecycle, errors
def test_pruner_lifecycle_and_state():
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(64, 32)
    model(x).sum().backward()
    opt.step()
    pruner = OneShotPruner(model, opt, calibration=[x], method="sparsegpt", n_m=(2, 4))
    assert isinstance(pruner, BasePruner)
    assert pruner.sparsity == 0.5
    kept = pruner.prune()
    assert kept == {"0": 0.5, "2": 0.5}
    buf = opt.state[model[0].weight]["momentum_buffer"]
    assert (buf[~model[0].mask] == 0).all()
    summary = pruner.finalize()
    assert summary["sparsity"] == pytest.approx(0.5)
    state = pruner.state_dict()
    assert state["config"]["method"] == "sparsegpt" and state["config"]["n_m"] == [2, 4]
    assert "| 0 | linear |" in format_one_shot_report(pruner.report)
    with pytest.raises(NotImplementedError, match="prune"):
        pruner.compute_masks(0.5, None)


def test_bad_inputs():
    x = torch.randn(8, 16)
    fresh = lambda: nn.Sequential(nn.Linear(16, 8))
    with pytest.raises(ValueError, match="expected method in"):
        one_shot(fresh(), [x], method="obs")
    with pytest.raises(ValueError, match=r"sparsity in \[0, 1\]"):
        one_shot(fresh(), [x], sparsity=1.5)
    with pytest.raises(ValueError, match="1 <= n <= m"):
        one_shot(fresh(), [x], n_m=(3, 2))
    with pytest.raises(ValueError, match="the sparsity of 2:4"):
        one_shot(fresh(), [x], sparsity=0.7, n_m=(2, 4))
    with pytest.raises(ValueError, match="at least one calibration batch"):
        one_shot(fresh(), [])
    with pytest.raises(TypeError, match="single tensor"):
        one_shot(fresh(), x)
    with pytest.raises(TypeError, match="got int"):
        one_shot(fresh(), [3])
    with pytest.raises(KeyError, match=r"expected layer names among the supported layers \['0'\]"):
        one_shot(fresh(), [x], layers=["fc9"])
    with pytest.raises(TypeError, match="wrap it"):
        one_shot(nn.Linear(16, 8), [x])


# ---------------------------------------------------------------------------- 2:4 export
def test_two_four_masks_feed_export_semi_structured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    one_shot(model, [torch.randn(64, 128)], method="sparsegpt", n_m=(2, 4))
    assert all(check_nm(m.mask, (2, 4)) for m in (model[0], model[2]))
    ok, reason = semi_structured_support()
    if not ok:
        with pytest.raises(SemiStructuredUnsupported, match="skipped"):
            export_semi_structured(model)
        return
    fast, report = export_semi_structured(model)  # pragma: no cover (GPU)
    assert report == {"0": "2:4 semi-structured", "2": "2:4 semi-structured"}
    x = torch.randn(8, 128)
    ref = model(x)
    got = fast(x.to("cuda", torch.float16)).float().cpu()
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------- real models
def test_lenet5_conv_and_fc():
    from models.lenet import LeNet5

    torch.manual_seed(0)
    model = LeNet5().eval()
    cal = [torch.randn(16, 1, 28, 28) for _ in range(2)]
    rep = one_shot(model, cal, method="sparsegpt", sparsity=0.8)
    assert [(r["name"], r["kind"]) for r in rep] == [
        ("conv1", "conv2d"), ("conv2", "conv2d"), ("fc1", "linear"), ("fc2", "linear"),
    ]  # fmt: skip
    assert all(r["density"] == pytest.approx(0.2, abs=0.01) for r in rep)
    assert check_masks(model) == []


def test_torchvision_resnet_selected_layers():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10).eval()
    names = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc"]
    cal = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    rep = one_shot(model, cal, method="wanda", n_m=(2, 4), layers=names)
    assert [r["name"] for r in rep] == names
    assert isinstance(model.conv1, SparseConv2d) and isinstance(model.fc, SparseLinear)
    assert isinstance(model.layer2[0].conv1, nn.Conv2d) and not isinstance(
        model.layer2[0].conv1, SparseConv2d
    )
    assert all(check_nm(model.get_submodule(n).mask, (2, 4)) for n in names)
    assert check_masks(model) == []


# ---------------------------------------------------------------------------- selection="auto"
def test_auto_chooses_on_one_fold_guards_on_the_others_and_solves_on_all():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)).eval()
    cal = calib(batches=8)  # folds {0, 4}, {1, 5}, {2, 6} guard; {3, 7} chooses
    model = copy.deepcopy(dense)
    rep = one_shot(model, cal, sparsity=0.5)
    guard = rep[0]["guard"]
    assert guard["heldout_batches"] == 2 and guard["guard_batches"] == 6
    assert all(r["guard"] == guard for r in rep)
    choose = [c for i, c in enumerate(cal) if i not in (3, 7)]
    held = [cal[3], cal[7]]
    # the choice: each whole-model candidate solved on the other 6 batches at its dampening,
    # measured on the 2 held out; the magnitude model on the same 2
    for sel, d in (("row", 0.01), ("block", 0.01), ("row", 0.1), ("block", 1.0)):
        m = copy.deepcopy(dense)
        one_shot(m, choose, sparsity=0.5, selection=sel, percdamp=d)
        kl, flips, n = distortion(dense, m, held)
        assert guard["candidates"][f"{sel}@{d:g}"]["kl"] == pytest.approx(kl / n, rel=1e-4)
        assert guard["candidates"][f"{sel}@{d:g}"]["top1"] == pytest.approx(float(flips.sum()) / n)
    mag = copy.deepcopy(dense)
    one_shot(mag, cal, "magnitude", 0.5)
    assert guard["candidates"]["magnitude"]["kl"] == pytest.approx(
        distortion(dense, mag, held)[0] / 256, rel=1e-4
    )
    whole = {k: v["kl"] for k, v in guard["candidates"].items() if k[:3] in ("row", "blo")}
    best = min(whole, key=whole.get)
    per_layer = f"per-layer@{best.split('@')[1]}"  # the per-layer one at the best one's damping
    assert set(guard["candidates"]) == set(whole) | {per_layer, "magnitude"} and len(whole) == 6
    kl_of = whole | {per_layer: guard["candidates"][per_layer]["kl"]}
    assert guard["candidate"] == min(kl_of, key=kl_of.get)
    damp = float(guard["candidate"].split("@")[1])
    assert guard["percdamp"] == damp
    plan = {r["name"]: r["selection"] for r in rep}
    if guard["candidate"].startswith("per-layer"):
        assert [r["selection"] for r in rep] == [
            min(r["heldout_distortion"], key=r["heldout_distortion"].get) for r in rep
        ]
    else:
        assert set(plan.values()) == {guard["candidate"].split("@")[0]}
    # the guard: the plan solved without each guard fold, measured on it (cross-fitted)
    wins = check_guard(guard, dense, cal, plan, damp, 0.5)
    assert guard["kept"] == ("auto" if wins else "magnitude") == "auto"  # OBS pays here
    # the kept model: the plan solved on every batch
    final = replay(dense, cal, plan, damp, 0.5)
    for n in plan:
        torch.testing.assert_close(model.get_submodule(n).weight, final.get_submodule(n).weight)
    assert all(r["percdamp"] == damp for r in rep if r["selection"] != "magnitude")
    assert "guard kept auto" in format_one_shot_report(rep)


def test_auto_percdamp_given_is_the_only_one_tried():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    rep = one_shot(model, calib(batches=4), sparsity=0.5, percdamp=0.05)
    g = rep[0]["guard"]
    assert set(g["candidates"]) == {"row@0.05", "block@0.05", "per-layer@0.05", "magnitude"}
    assert g["percdamp"] == 0.05 and g["heldout_batches"] == 1 and g["guard_batches"] == 3
    for bad in (-0.1, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="expected percdamp None or a number >= 0"):
            one_shot(nn.Sequential(nn.Linear(64, 8)), calib(batches=1), percdamp=bad)


def test_auto_mse_nm_and_in_sample():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))  # a regression output
    cal = calib(batches=1)
    with pytest.raises(ValueError, match="pass distortion='mse'"):
        one_shot(model, cal)
    assert type(model[0]) is nn.Linear  # refused before anything changed
    rep = one_shot(model, cal, n_m=(2, 4), distortion="mse")
    g = rep[0]["guard"]
    assert g["heldout_batches"] == 0 and g["guard_batches"] == 0  # one batch: in-sample
    assert set(g["auto"]) == {"mse"} and "top1_only_flipped_by" not in g
    # N:M: no block selection; the per-layer candidate at the best row's dampening
    rows = {f"row@{d}" for d in ("0.01", "0.1", "1")}
    assert set(g["candidates"]) - rows - {"magnitude"} == {f"per-layer@{g['percdamp']:g}"}
    assert rows <= set(g["candidates"])
    kept = {"auto": {"row", "magnitude"}, "magnitude": {"magnitude"}}[g["kept"]]
    assert all(r["selection"] in kept for r in rep)
    assert check_nm(model[0].mask, (2, 4))


def test_distortion_is_refused_where_unused():
    x = [torch.randn(8, 16)]
    model = nn.Sequential(nn.Linear(16, 8))
    with pytest.raises(ValueError, match="expected distortion in"):
        one_shot(model, x, distortion="l1")
    with pytest.raises(ValueError, match="selection='row'"):
        one_shot(model, x, selection="row", distortion="kl")
    with pytest.raises(ValueError, match="method='wanda'"):
        one_shot(model, x, method="wanda", distortion="mse")
    assert type(model[0]) is nn.Linear


def test_hf_gpt2_auto_guard_reads_logits():
    model = tiny_gpt2()
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    cal = [{"input_ids": ids[i : i + 2]} for i in range(0, 8, 2)]  # held out: batch 3
    rep = one_shot(model, cal, sparsity=0.5)
    g = next(r for r in rep if "guard" in r)["guard"]
    assert g["heldout_batches"] == 1 and g["kept"] in ("auto", "magnitude")
    assert set(g["auto"]) == {"kl", "top1"} and 0 <= g["magnitude"]["top1"] <= 1
