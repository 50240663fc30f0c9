"""masked_weight: where(mask, weight, 0) whose gradient is masked; the masked-copy cache and what
makes it recompute; stale_tags for writes that bypass version counters."""

import pytest
import torch
import torch.nn.functional as F

from sparsekern.ops import masked_weight
from sparsekern.ops._mask_cache import drop_cache, masked_copy, stale_tags


def test_value_and_gradient(device):
    w = torch.randn(6, 5, device=device, requires_grad=True)
    mask = torch.rand(6, 5, device=device) < 0.5
    v = masked_weight(w, mask)
    assert torch.equal(v.detach(), torch.where(mask, w.detach(), 0.0))
    g = torch.randn(6, 5, device=device)
    v.backward(g)
    assert torch.equal(w.grad, torch.where(mask, g, 0.0))


def test_default_gradient_is_not_masked_in_place(device):
    """``v + other`` passes one gradient tensor to both inputs: masking it in place would corrupt
    the other input's gradient, so the public op masks out of place."""
    w = torch.randn(4, 4, device=device, requires_grad=True)
    other = torch.randn(4, 4, device=device, requires_grad=True)
    mask = torch.rand(4, 4, device=device) < 0.5
    ((masked_weight(w, mask) + other) * 3).sum().backward()
    assert torch.equal(other.grad, torch.full((4, 4), 3.0, device=device))
    assert torch.equal(w.grad, torch.where(mask, 3.0, 0.0).to(w.grad))


def test_assume_pruned_zero_returns_the_weight_itself(device):
    w = torch.randn(3, 3, device=device)
    mask = torch.ones(3, 3, dtype=torch.bool, device=device)
    assert masked_weight(w, mask, assume_pruned_zero=True) is w


def test_inference_cache_follows_versions_and_pointers(device):
    w = torch.randn(8, 8, device=device)
    mask = torch.rand(8, 8, device=device) < 0.5
    a = masked_copy(w, mask)
    assert masked_copy(w, mask) is a, "recomputed although nothing changed"
    w.mul_(2)  # in-place: version moves
    b = masked_copy(w, mask)
    assert b is not a and torch.equal(b, torch.where(mask, w, 0.0))
    mask[0] = ~mask[0]  # in-place on the mask
    c = masked_copy(w, mask)
    assert c is not b and torch.equal(c, torch.where(mask, w, 0.0))
    w2 = w.clone()  # another tensor with the same values: not the cached one
    assert masked_copy(w2, mask) is not c


def test_data_writes_are_invisible_but_found_by_stale_tags(device):
    w = torch.randn(8, 8, device=device)
    mask = torch.rand(8, 8, device=device) < 0.5
    masked_copy(w, mask)
    assert stale_tags(mask) == []
    w.data.mul_(-1)  # bypasses the version counter
    assert stale_tags(mask) == ["masked_copy"]
    drop_cache(mask)
    assert torch.equal(masked_copy(w, mask), torch.where(mask, w, 0.0))


def test_training_never_uses_the_cache(device):
    """With a weight gradient the copy is made per call: gradcheck and optimizers that write
    through .data see their writes."""
    w = torch.randn(5, 5, device=device, requires_grad=True)
    mask = torch.rand(5, 5, device=device) < 0.5
    x = torch.randn(3, 5, device=device)
    y1 = F.linear(x, masked_weight(w, mask))
    w.data.mul_(3)
    y2 = F.linear(x, masked_weight(w, mask))
    torch.testing.assert_close(y2, 3 * y1)


@pytest.mark.parametrize(
    "mask,exc,match",
    [
        (None, TypeError, r"expected mask as a torch.bool Tensor, got NoneType"),
        (torch.ones(3, 3), TypeError, r"expected mask of dtype torch.bool, got torch.float32"),
        (torch.ones(3, 2, dtype=torch.bool), ValueError, r"shape \[3, 3\], got \[3, 2\]"),
    ],
)
def test_bad_masks(mask, exc, match):
    with pytest.raises(exc, match=match):
        masked_weight(torch.randn(3, 3), mask)
