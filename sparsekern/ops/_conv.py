"""Conv argument handling shared by the conv ops: int-or-pair arguments, padding forms
(``'same'`` / ``'valid'``), output sizes, with errors naming expected vs got."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["conv_out_size", "conv_pair", "resolve_padding"]


def conv_pair(value, name: str, minimum: int, who: str = "masked_conv2d") -> tuple[int, int]:
    """``value`` (an int or a pair of ints) as a pair of ints >= ``minimum``."""
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{who}: expected {name} as an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{who}: expected {name} >= {minimum}, got {value!r}")
    return pair


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """Output length of a convolution along one dimension (symmetric padding ``p``)."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def resolve_padding(
    padding, weight: torch.Tensor, stride: tuple[int, int], dilation: tuple[int, int],
    who: str = "masked_conv2d",
) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:  # fmt: skip
    """Turn ``padding`` (int, pair, 'valid' or 'same') into symmetric ``(pH, pW)`` plus, for an
    asymmetric 'same', the extra ``F.pad`` amounts ``(left, right, top, bottom)`` to apply first.

    'same' pads ``dilation * (k - 1)`` in total per dimension, the smaller half before and the
    larger after, exactly as ``F.conv2d`` does.
    """
    if not isinstance(padding, str):
        return conv_pair(padding, "padding", 0, who), None
    if padding == "valid":
        return (0, 0), None
    if padding != "same":
        raise ValueError(
            f"{who}: expected padding as an int, a pair of ints, 'valid' or 'same', got {padding!r}"
        )
    if stride != (1, 1):
        raise ValueError(
            f"{who}: padding='same' needs stride 1 (as in F.conv2d), got stride={stride}"
        )
    totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    before = [t // 2 for t in totals]
    after = [t - b for t, b in zip(totals, before)]
    if before == after:
        return (before[0], before[1]), None
    extra_h, extra_w = after[0] - before[0], after[1] - before[1]
    return (before[0], before[1]), (0, extra_w, 0, extra_h)
