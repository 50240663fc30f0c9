"""argparse helpers: every value checked when the command line is parsed, so a bad one stops the
run with argparse's usual message (``error: argument --epochs: expected an integer >= 1, got
0``) before any work starts."""

from __future__ import annotations

import argparse
import math

__all__ = [
    "check_data_dir",
    "check_out_dir",
    "check_out_file",
    "choices_list",
    "fraction",
    "nm_pattern",
    "number",
    "number_list",
    "per_layer",
    "unknown_layer_keys",
]


def number(kind=int, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False):
    """An argparse ``type=``: ``kind`` (int or float) within ``[lo, hi]`` (``lo_open`` /
    ``hi_open``: the bound itself excluded); floats must be finite."""
    what = "an integer" if kind is int else "a number"
    bounds = []
    if lo is not None:
        bounds.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        bounds.append(f"{'<' if hi_open else '<='} {hi:g}")
    want = what + (" " + " and ".join(bounds) if bounds else "")

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text}")
        if hi is not None and (v > hi or (hi_open and v == hi)):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text}")
        return v

    parse.__name__ = want  # argparse names the type in some messages
    return parse


def choices_list(choices):
    """An argparse ``type=``: comma-separated names, each among ``choices``, none twice."""
    choices = tuple(choices)

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",")]
        bad = [t for t in items if t not in choices]
        if bad or not text.strip():
            raise argparse.ArgumentTypeError(
                f"expected comma-separated names among {', '.join(choices)}, got {text!r}"
            )
        if len(set(items)) != len(items):
            raise argparse.ArgumentTypeError(f"expected each name once, got {text!r}")
        return items

    parse.__name__ = "list of names"
    return parse


def number_list(value_type):
    """An argparse ``type=``: comma-separated values, each checked by ``value_type``."""

    def parse(text: str) -> list:
        try:
            return [value_type(t.strip()) for t in text.split(",")]
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e} (in {text!r})") from None

    parse.__name__ = "list of numbers"
    return parse


def fraction(lo_open: bool = False, hi_open: bool = False):
    """A float in [0, 1] (ends excluded as asked)."""
    return number(float, 0.0, 1.0, lo_open, hi_open)


def per_layer(value_type, what: str = "value"):
    """``'0.5'`` -> 0.5, ``'fc1=0.5,conv=0.3'`` -> ``{'fc1': 0.5, 'conv': 0.3}``, each value
    checked by ``value_type`` (an argparse type); layer names are checked against the model later
    (:func:`unknown_layer_keys`)."""

    def parse(text: str):
        if "=" not in text:
            return value_type(text)
        out = {}
        for item in text.split(","):
            key, sep, val = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise argparse.ArgumentTypeError(
                    f"expected '{what}' or 'layer={what},layer={what},...', got {text!r}"
                )
            if key in out:
                raise argparse.ArgumentTypeError(f"layer {key!r} given twice in {text!r}")
            try:
                out[key] = value_type(val.strip())
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"{key}: {e}") from None
        return out

    return parse


def nm_pattern(text: str) -> tuple[int, int]:
    """``'2:4'`` -> ``(2, 4)``, with integers ``1 <= N <= M``."""
    n, sep, m = text.partition(":")
    try:
        pair = (int(n), int(m)) if sep else None
    except ValueError:
        pair = None
    if pair is None or not 1 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"expected N:M with integers 1 <= N <= M, got {text!r}")
    return pair


def unknown_layer_keys(spec, layers, extra=("conv", "fc", "*")) -> list[str]:
    """The keys of a per-layer ``spec`` (from :func:`per_layer`) that name no layer of
    ``layers`` (names), no kind and not ``"*"``; ``[]`` for a plain number."""
    if not isinstance(spec, dict):
        return []
    allowed = set(layers) | set(extra)
    return [k for k in spec if k not in allowed]


def check_out_dir(parser, flag: str, path) -> None:
    """``parser.error`` unless ``path`` is a folder or can become one: not a file, and not under
    a file."""
    from pathlib import Path

    p = Path(path)
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            parser.error(f"argument {flag}: expected a folder, got {path} ({q} is a file)")


def check_out_file(parser, flag: str, path) -> None:
    """``parser.error`` if ``path`` is a folder or lies under a file."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        parser.error(f"argument {flag}: expected a file name, got the folder {path}")
    check_out_dir(parser, flag, p.parent)


def check_data_dir(parser, flag: str, path, pattern: str = "*-ubyte.gz") -> None:
    """``parser.error`` unless ``path`` is a folder holding files matching ``pattern``."""
    from pathlib import Path

    p = Path(path)
    if not p.is_dir() or not (any(p.glob(pattern)) or (p / "MNIST" / "raw").is_dir()):
        parser.error(f"argument {flag}: expected a folder holding MNIST's {pattern}, got {path}")
