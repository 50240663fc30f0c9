"""train_epoch / evaluate over DataLoaders, with a pruner and an LR schedule; tensor_loader's
order is a function of its generator's state (what exact resume needs)."""

import pytest
import torch

from sparsekern.nn import sparsify
from sparsekern.pruning import GlobalMagnitudePruner, OneShot, RigLPruner
from sparsekern.training import WarmupCosine, evaluate, train_epoch
from sparsekern.training.data import tensor_loader
from tests.helpers import TinyNet

pytestmark = pytest.mark.usefixtures("reference_path")


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_tensor_loader_order_depends_only_on_the_generator():
    x, y = _data(40)
    gen = torch.Generator().manual_seed(5)
    loader = tensor_loader(x, y, 16, shuffle=True, generator=gen, drop_last=True)
    assert len(loader) == 2
    first = [b[1].clone() for b in loader]
    state = gen.get_state()
    second = [b[1].clone() for b in loader]
    gen.set_state(state)
    again = [b[1].clone() for b in loader]  # a resumed epoch replays the same batches
    assert all(torch.equal(a, b) for a, b in zip(second, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
    xb, yb = next(iter(tensor_loader(x, y, 16)))
    assert xb.shape == (16, 1, 6, 6) and torch.equal(yb, y[:16])


def test_train_epoch_steps_the_lr_schedule_and_the_pruner():
    model = sparsify(TinyNet())
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    pruner = GlobalMagnitudePruner(model, opt, schedule=OneShot(0.5, at=3))
    x, y = _data()
    loader = tensor_loader(x, y, 16, shuffle=True, generator=torch.Generator().manual_seed(0))
    lrs = []
    sched = WarmupCosine(0.1, total=8, warmup=2)
    orig = opt.step

    def spy(*a, **k):
        lrs.append(opt.param_groups[0]["lr"])
        return orig(*a, **k)

    opt.step = spy
    ep = train_epoch(model, loader, opt, pruner, lr=sched, step0=4)
    assert ep["steps"] == 4 and ep["mask_changes"] == 1 and ep["loss"] > 0
    assert lrs == pytest.approx([sched(t) for t in (4, 5, 6, 7)])
    assert pruner.current_sparsity() == pytest.approx(0.5, abs=1e-3)
    for m in pruner.layers.values():
        assert torch.all(m.weight[~m.mask] == 0)


def test_closure_reaches_pruners_that_need_it():
    model = sparsify(TinyNet())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLPruner(model, opt, sparsity=0.8, total_steps=8, delta=2)
    pruner.prune()
    x, y = _data()
    ep = train_epoch(model, tensor_loader(x, y, 8), opt, pruner)  # 8 steps: updates at 2, 4
    assert ep["mask_changes"] == 2 and pruner.last_update["step"] == 4


def test_evaluate_counts_top_k():
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):  # logits ranking the classes 0 > 1 > 2 > ... for every image
            return torch.arange(10.0, 0, -1).expand(len(x), 10) + 0 * self.p

    x = torch.zeros(6, 1)
    y = torch.tensor([0, 1, 4, 5, 9, 0])
    ev = evaluate(Fixed(), tensor_loader(x, y, 4), topk=(1, 5))
    assert ev == {"top1_error": 100 * 4 / 6, "top1_wrong": 4, "top5_error": 100 * 2 / 6,
                  "top5_wrong": 2, "images": 6}  # fmt: skip
