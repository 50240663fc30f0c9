"""Calibration batches for one-shot pruning: running the model on one (a tensor, a tuple/list or a
dict, moved to the model's device), the dry run that refuses a bad batch before anything changes,
and the model output the guard of ``selection="auto"`` compares."""

from __future__ import annotations

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by a statistics hook once its layer has seen its input: nothing after it runs."""


# ---------------------------------------------------------------------------- layer views
def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _move(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _run(model: nn.Module, batch, device) -> None:
    if isinstance(batch, torch.Tensor):
        model(_move(batch, device))
    elif isinstance(batch, (tuple, list)):
        model(*[_move(b, device) for b in batch])
    elif isinstance(batch, dict):
        model(**{k: _move(v, device) for k, v in batch.items()})
    else:
        raise TypeError(
            f"one_shot: expected calibration batches that are tensors, tuples/lists (passed as "
            f"*args) or dicts (passed as **kwargs), got {type(batch).__name__}"
        )


def _check_calibration(calibration) -> list:
    if isinstance(calibration, torch.Tensor):
        raise TypeError(
            "one_shot: expected an iterable of batches for calibration, got a single tensor: "
            "wrap it in a list ([x]) or split it into batches"
        )
    try:
        batches = list(calibration)
    except TypeError:
        raise TypeError(
            f"one_shot: expected an iterable of batches for calibration, got "
            f"{type(calibration).__name__}"
        ) from None
    if not batches:
        raise ValueError("one_shot: expected at least one calibration batch, got none")
    for b in batches:
        if not isinstance(b, (torch.Tensor, tuple, list, dict)):
            raise TypeError(
                f"one_shot: expected calibration batches that are tensors, tuples/lists (passed "
                f"as *args) or dicts (passed as **kwargs), got {type(b).__name__}"
            )
    return batches


def _tensors(batch):
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, (tuple, list)):
        return [t for b in batch for t in _tensors(b)]
    if isinstance(batch, dict):
        return [t for b in batch.values() for t in _tensors(b)]
    return []


def _describe(batch) -> str:
    if isinstance(batch, torch.Tensor):
        return f"tensor{list(batch.shape)} {batch.dtype}"
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(_describe(b) for b in batch) + ")"
    return type(batch).__name__


@torch.no_grad()
def _dry_run(model: nn.Module, batches: list, check=None) -> None:
    """Run the unchanged model on every calibration batch and refuse (ValueError naming the
    batch) a non-finite input, a batch the model cannot take (width, dtype, arity) or a
    non-finite output, before any layer is replaced or pruned. Cost: one forward pass over the
    calibration set (the procedure itself makes one per layer)."""
    for i, b in enumerate(batches):
        for t in _tensors(b):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"one_shot: expected finite calibration inputs, got NaN/inf in batch {i} "
                    f"({_describe(b)})"
                )
    device = _device(model)
    was = model.training
    model.eval()
    try:
        for i, b in enumerate(batches):
            try:
                out = _run_out(model, b, device)
            except Exception as e:
                raise ValueError(
                    f"one_shot: expected calibration batches the model takes, got batch {i} "
                    f"({_describe(b)}) on which it fails: {type(e).__name__}: {e}"
                ) from e
            for t in _tensors(out):
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ValueError(
                        f"one_shot: expected a finite output of the dense model on the "
                        f"calibration batches, got NaN/inf on batch {i} ({_describe(b)})"
                    )
            if check is not None:
                check(out, i, b)
    finally:
        model.train(was)


def _run_out(model: nn.Module, batch, device):
    if isinstance(batch, torch.Tensor):
        return model(_move(batch, device))
    if isinstance(batch, (tuple, list)):
        return model(*[_move(b, device) for b in batch])
    return model(**{k: _move(v, device) for k, v in batch.items()})


def _output_tensor(out) -> torch.Tensor:
    """The model output the guard compares: a tensor itself, an HF ``ModelOutput``'s (or a
    dict's) ``logits``, else the first floating tensor of at least one dimension in a
    tuple / list."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor) and o.is_floating_point() and o.dim() >= 1:
                return o
    raise TypeError(
        f"expected a model output that is a tensor, has .logits, or is a tuple/list holding a "
        f"floating tensor, got {type(out).__name__}"
    )


def _guard_output_check(distortion: str):
    """A check for :func:`_dry_run`: the dense model's output fits the guard's ``distortion``."""

    def check(out, i: int, batch) -> None:
        try:
            y = _output_tensor(out)
        except TypeError as e:
            raise ValueError(
                f"one_shot: selection='auto' compares model outputs; on batch {i} "
                f"({_describe(batch)}) {e}"
            ) from None
        if not y.is_floating_point() or y.dim() < 1:
            raise ValueError(
                f"one_shot: expected a floating model output of at least one dimension for the "
                f"guard of selection='auto', got {y.dtype} of shape {list(y.shape)} on batch {i}"
            )
        if distortion == "kl" and y.shape[-1] < 2:
            raise ValueError(
                f"one_shot: expected outputs with a last dimension >= 2 (logits) for "
                f"distortion='kl', got shape {list(y.shape)} on batch {i}: pass distortion='mse'"
            )

    return check
