"""One keyword vocabulary: the old names warn (DeprecationWarning) and do what the new ones do;
both at once is an error; every pruner forwards the shared keywords the same way; scoring is
pluggable; docs/pruning.md's table is the code's."""

import inspect
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.nn import sparsify
from sparsekern.pruning import (
    BasePruner,
    BlockPruner,
    GlobalMagnitudePruner,
    GradualPruner,
    HanPruner,
    ImportancePruner,
    MagnitudeImportance,
    NMPruner,
    RandomImportance,
    RigLPruner,
    SNIPPruner,
    TaylorImportance,
    check_nm,
    global_magnitude_masks,
    nm_mask,
    one_shot,
    prune_blocks_,
    sparse_layers,
)
from sparsekern.pruning._vocab import RENAMED, VOCABULARY
from tests.helpers import ROOT
from tests.helpers import TinyNet as Net

pytestmark = pytest.mark.usefixtures("reference_path")


def _masks(model):
    return {n: m.mask.clone() for n, m in sparse_layers(model).items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


# ------------------------------------------------------------------ one test per old name
def test_old_blocksize_warns_and_means_block_size():
    x = [torch.randn(32, 16)]
    new, old = _mlp(), _mlp()
    one_shot(new, x, "sparsegpt", 0.5, block_size=8)
    with pytest.warns(DeprecationWarning, match=r"blocksize= is deprecated.*block_size=8"):
        one_shot(old, x, "sparsegpt", 0.5, blocksize=8)
    a, b = new.state_dict(), old.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TypeError, match="block_size= or the deprecated blocksize="):
        one_shot(_mlp(), x, blocksize=8, block_size=8)


def test_old_n_m_keywords_warn_and_mean_n_m():
    new, old = sparsify(Net()), sparsify(Net())
    old.load_state_dict(new.state_dict())
    NMPruner(new, n_m=(1, 4)).prune()
    with pytest.warns(DeprecationWarning, match=r"n=, m= is deprecated.*n_m=\(1, 4\)"):
        pruner = NMPruner(old, n=1, m=4)
    pruner.prune()
    assert _same(_masks(new), _masks(old)) and pruner.n_m == (1, 4)
    with pytest.raises(TypeError, match="got both"):
        NMPruner(sparsify(Net()), n=1, n_m=(1, 4))


def test_old_positional_n_m_of_the_mask_functions_warn():
    w = torch.randn(6, 12)
    with pytest.warns(DeprecationWarning, match=r"nm_mask\(x, n, m\) is deprecated"):
        old = nm_mask(w, 1, 4)
    assert torch.equal(old, nm_mask(w, (1, 4)))
    with pytest.warns(DeprecationWarning, match=r"check_nm\(x, n, m\) is deprecated"):
        assert check_nm(old, 1, 4)
    with pytest.warns(DeprecationWarning, match="n=, m= is deprecated"):
        assert torch.equal(nm_mask(w, n=1, m=4), old)
    with pytest.warns(DeprecationWarning):  # the warning points at the caller's line
        nm_mask(w, 1, 4)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        nm_mask(w, 1, 4)
        check_nm(old, 1, 4)
    assert [r.filename for r in rec] == [__file__, __file__]


def test_old_global_pruning_warns_and_means_scope():
    model = sparsify(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), block_size=16)
    with torch.no_grad():
        model[0].weight.mul_(100.0)
    ref = sparsify(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), block_size=16)
    ref.load_state_dict(model.state_dict())
    prune_blocks_(ref, density=0.5, scope="global")
    with pytest.warns(DeprecationWarning, match=r"global_pruning= is deprecated.*'global'"):
        prune_blocks_(model, density=0.5, global_pruning=True)
    assert _same(_masks(model), _masks(ref))
    with pytest.warns(DeprecationWarning, match="global_pruning="):
        p = GradualPruner(
            sparsify(Net()), sparsity=0.5, begin_step=1, end_step=2, frequency=1,
            global_pruning=False,
        )  # fmt: skip
    assert p.scope == "layer"
    with pytest.warns(DeprecationWarning, match="global_pruning="):
        b = BlockPruner(sparsify(Net()), sparsity=0.5, block_size=16, global_pruning=True)
    assert b.scope == "global"


def test_old_seed_warns_and_means_a_seeded_generator():
    a, b = sparsify(Net()), sparsify(Net())
    b.load_state_dict(a.state_dict())
    RigLPruner(a, sparsity=0.8, total_steps=8, generator=torch.Generator().manual_seed(3)).prune()
    with pytest.warns(DeprecationWarning, match="seed= is deprecated"):
        RigLPruner(b, sparsity=0.8, total_steps=8, seed=3).prune()
    assert _same(_masks(a), _masks(b))


def test_a_pruner_that_declares_an_old_name_keeps_it():
    class Seeded(BasePruner):
        def __init__(self, model, optimizer=None, *, seed=0, **base):
            super().__init__(model, optimizer, **base)
            self.seed = seed

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Seeded(sparsify(Net()), seed=5).seed == 5


def test_the_renamed_table_is_what_the_docs_list():
    doc = (ROOT / "docs" / "pruning.md").read_text()
    for old, (new, _, _) in RENAMED.items():
        assert re.search(rf"`{old}`.*`{new}`", doc), f"docs/pruning.md: {old} -> {new} missing"


def test_docs_vocabulary_table_is_the_code_s():
    doc = (ROOT / "docs" / "pruning.md").read_text()
    for name, meaning, default in VOCABULARY:
        row = f"| `{name}` | {meaning} | {default} |"
        assert row in doc, f"docs/pruning.md lacks the vocabulary row {row!r}"


# ------------------------------------------------------------------ one way to forward
PRUNERS = {
    HanPruner: {},
    GlobalMagnitudePruner: {"sparsity": 0.5},
    GradualPruner: {"sparsity": 0.5, "begin_step": 1, "end_step": 2, "frequency": 1},
    SNIPPruner: {"sparsity": 0.5},
    RigLPruner: {"sparsity": 0.5, "total_steps": 8},
    NMPruner: {},
    BlockPruner: {"sparsity": 0.5, "block_size": 16},
    ImportancePruner: {"sparsity": 0.5},
}


@pytest.mark.parametrize("cls", list(PRUNERS), ids=lambda c: c.__name__)
def test_every_pruner_forwards_the_shared_keywords(cls):
    model = sparsify(Net())
    p = cls(model, None, layers=["fc1"], regularization="l1", reg_strength=1e-3, **PRUNERS[cls])
    assert list(p.layers) == ["fc1"] and p.regularization == "l1" and p.reg_strength == 1e-3
    with pytest.raises(TypeError, match="unexpected keyword"):
        cls(model, None, no_such_keyword=1, **PRUNERS[cls])
    sig = inspect.signature(cls.__init__)
    assert list(sig.parameters)[:3] == ["self", "model", "optimizer"]
    assert sig.parameters["optimizer"].default is None
    assert inspect.signature(cls.compute_masks).parameters["closure"].default is None
    if "min_density" in sig.parameters:  # one default
        assert sig.parameters["min_density"].default is None


# ------------------------------------------------------------------ pluggable scoring
def test_gradual_and_global_magnitude_share_one_selection():
    model = sparsify(Net())
    g = GradualPruner(
        model, sparsity=0.8, begin_step=1, end_step=2, frequency=1, scope="global"
    ).compute_masks(0.8)
    assert _same(g, GlobalMagnitudePruner(model, sparsity=0.8).compute_masks(0.8))
    assert _same(g, global_magnitude_masks(sparse_layers(model), 0.8))
    # per layer: each layer's own top |w|
    per = GradualPruner(model, sparsity=0.8, begin_step=1, end_step=2, frequency=1).compute_masks(
        0.8
    )
    for n, m in sparse_layers(model).items():
        w = m.weight.detach().abs()
        assert int(per[n].sum()) == round(0.2 * w.numel())
        assert w[per[n]].min() >= w[~per[n]].max()


def test_importance_is_pluggable():
    model = sparsify(Net())
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 4, (8,))

    def closure():
        return F.cross_entropy(model(x), y)

    snip = SNIPPruner(model, sparsity=0.9).compute_masks(0.9, closure)
    taylor = ImportancePruner(model, sparsity=0.9, importance=TaylorImportance())
    assert _same(snip, taylor.compute_masks(0.9, closure))
    with pytest.raises(ValueError, match="needs a closure"):
        taylor.prune()
    a = ImportancePruner(model, importance=RandomImportance(torch.Generator().manual_seed(1)))
    b = ImportancePruner(model, importance=RandomImportance(torch.Generator().manual_seed(1)))
    assert _same(a.compute_masks(0.5), b.compute_masks(0.5))
    mag = ImportancePruner(model, importance=MagnitudeImportance(p=2), scope="layer")
    assert mag.config()["importance"] == {"type": "MagnitudeImportance", "p": 2}
    with pytest.raises(TypeError, match="expected an Importance"):
        ImportancePruner(model, importance="l1")
