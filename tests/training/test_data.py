"""MNIST from the shipped files; the synthetic ImageFolder and its loaders."""

import pytest
import torch

from sparsekern.training.data import imagefolder_loaders, load_mnist, make_synthetic_imagefolder
from tests.helpers import ROOT


def test_mnist_shapes_and_normalisation():
    d = load_mnist(ROOT / "data" / "mnist")
    assert d["x_train"].shape == (60000, 1, 28, 28) and d["y_test"].shape == (10000,)
    assert abs(float(d["x_train"].mean())) < 0.01 and abs(float(d["x_train"].std()) - 1) < 0.01
    assert d["y_train"].dtype == torch.int64 and set(d["y_test"].unique().tolist()) == set(
        range(10)
    )


def test_mnist_missing_files_say_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected MNIST's four"):
        load_mnist(tmp_path)


def test_synthetic_imagefolder_loaders_shard_without_overlap(tmp_path):
    make_synthetic_imagefolder(tmp_path, classes=3, n_train=4, n_val=3, res=32, seed=0)
    assert (tmp_path / "DONE").exists() and len(list((tmp_path / "val").rglob("*.png"))) == 9
    seen = []
    for rank in range(2):
        loaders, sampler, classes, n_train, n_val = imagefolder_loaders(
            tmp_path, 32, batch_size=2, workers=0, seed=0, rank=rank, world=2, sens_images=4
        )
        assert classes == ["class_0", "class_1", "class_2"] and (n_train, n_val) == (12, 9)
        seen += list(loaders["val"].dataset.indices)
        x, y = next(iter(loaders["train"]))
        assert x.shape == (2, 3, 32, 32)
    assert sorted(seen) == list(range(9))  # every val image on exactly one rank


def test_holdout_split_is_fixed_by_seed_disjoint_and_ordered():
    import pytest
    import torch

    from sparsekern.training.data import holdout_split

    keep, held = holdout_split(100, 10, seed=0)
    assert len(keep) == 90 and len(held) == 10
    assert sorted(keep.tolist() + held.tolist()) == list(range(100))  # disjoint, complete
    assert torch.equal(keep, keep.sort().values) and torch.equal(held, held.sort().values)
    assert torch.equal(holdout_split(100, 10, seed=0)[1], held)  # fixed by the seed
    assert not torch.equal(holdout_split(100, 10, seed=1)[1], held)
    assert len(holdout_split(100, 0)[0]) == 100
    with pytest.raises(ValueError, match="expected 0 <= n_holdout < n"):
        holdout_split(100, 100)
