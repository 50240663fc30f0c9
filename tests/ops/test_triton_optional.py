"""triton is optional: with ``import triton`` failing (as on macOS, Windows or a CPU-only
install), ``import sparsekern`` works, the CPU path trains and prunes, and only a Triton kernel
raises, with a message that says why."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys

    sys.modules["triton"] = None  # `import triton` now raises ImportError, find_spec says None

    import torch
    import sparsekern
    from sparsekern import SparseConv2d, SparseLinear, check_masks, set_mask
    from sparsekern.ops import HAS_TRITON, TritonUnavailable, block_masked_linear
    import sparsekern.pruning  # every pruning method imports
    assert not HAS_TRITON and sys.modules["triton"] is None

    lin, conv = SparseLinear(12, 7), SparseConv2d(3, 4, 3)
    set_mask(lin, torch.rand(7, 12) < 0.5)
    set_mask(conv, torch.rand(4, 3, 3, 3) < 0.5)
    opt = torch.optim.SGD([*lin.parameters(), *conv.parameters()], lr=0.1, momentum=0.9)
    for _ in range(3):
        loss = lin(torch.randn(5, 12)).square().sum() + conv(torch.randn(2, 3, 6, 6)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert check_masks(lin) == [] and check_masks(conv) == []
    y = block_masked_linear(torch.randn(2, 12), lin.weight, lin.mask, None, 16)  # CPU: vendor
    assert y.shape == (2, 7)

    ml = __import__("importlib").import_module("sparsekern.ops.masked_linear")
    try:
        ml.masked_linear_dw_launch(torch.randn(3, 7), torch.randn(3, 12), lin.mask)
    except TritonUnavailable as e:
        assert "needs triton" in str(e) and "pip install triton" in str(e), e
    else:
        raise AssertionError("a Triton kernel ran without triton")
    print("OK")
    """
)


def test_import_and_cpu_training_without_triton(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # asks for kernels: must still not need them
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr
