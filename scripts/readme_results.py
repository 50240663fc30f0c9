"""The README's results table (Han et al. 2015's Table 1 rows on MNIST), written from the committed
run summaries, never by hand: ``results/<model>/summary.json`` for each LeNet, Han's figures from
``models.paper``. Each row comes with the command and commit that produced it and, where the run
stored one, Deep Compression's storage line.

    python scripts/readme_results.py            # rewrite README.md between its markers
    python scripts/readme_results.py --check    # exit 1 if README.md differs from the summaries
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout: `models` is not installed

from models import HAN_2015  # noqa: E402

MODELS = ("lenet300", "lenet5")
BEGIN = "<!-- scripts/readme_results.py: begin -->"
END = "<!-- scripts/readme_results.py: end -->"
DEEP_PAPER = {"lenet300": "40x at 1.58%", "lenet5": "39x at 0.74%"}  # Han, Mao, Dally 2016


def _row(name: str, err: tuple, weights: tuple, ratio: float, kept: dict, bold: bool) -> str:
    b = "**" if bold else ""
    per = " / ".join(f"{v:g}" if isinstance(v, int) else f"{v:.1f}" for v in kept.values())
    w = " -> ".join(f"{x:,}" if isinstance(x, int) else f"{x / 1e3:.0f}K" for x in weights)
    e = f"{err[0]:.2f}% -> {err[1]:.2f}%"
    r = f"{ratio:g}" if isinstance(ratio, int) else f"{ratio:.1f}"
    return f"| {b}{name}{b} | {b}{e}{b} | {w} | {b}{r}x{b} | {per}% |"


def verdict(err: float, ratio: float, paper_err: float, paper_ratio: float) -> str:
    """Whether a row beats Han's (no more error at no less compression), and by what it misses."""
    if err <= paper_err and ratio >= paper_ratio:
        return "beats Han's row"
    return (f"misses Han's row: {err - paper_err:+.2f} points of error at "
            f"{ratio / paper_ratio:.2f}x his compression")  # fmt: skip


def searched(root: Path, s: dict) -> str | None:
    """The validation search whose choice a run without a validation split used (trained on all
    60,000 images, as Han did): its path where ``results/search/<preset>.json`` exists and every
    knob it chose is the run's, else None."""
    args = s.get("args") or {}
    f = root / "results" / "search" / f"{args.get('preset')}.json"
    if not args.get("preset") or not f.exists():
        return None
    chosen = json.loads(f.read_text())["chosen"]
    return str(f.relative_to(root)) if all(args.get(k) == v for k, v in chosen.items()) else None


def block(root: Path = ROOT) -> str:
    """The markdown between the markers: the table, then one line per run."""
    lines = ["| model | error dense -> pruned | weights dense -> pruned | compression (weights) "
             "| kept per layer |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    notes = []
    for m in MODELS:
        p = HAN_2015[m]
        kept = {k: v for k, v in p["kept_pct"].items() if k != "total"}
        paper = (p["dense"]["error"], p["pruned"]["error"])
        lines.append(_row(f"{p['name']}, Han et al.", paper,
                          (p["params_dense"], p["params_pruned"]), p["compression"], kept,
                          False))  # fmt: skip
        s = json.loads((root / "results" / m / "summary.json").read_text())
        kept = {k: v for k, v in s["kept_pct"].items() if k != "total"}
        val = s.get("val_images")
        search = None if val else searched(root, s)
        tag = "" if val or search else " (no validation split: knobs tuned by hand)"
        how = f", {val:,} held out for every choice" if val else ""
        if search:
            how = f" (all, as Han's; the knobs chosen on a validation split by `{search}`)"
        err = (s["error_dense_pct"], s["error_pct"])
        ratio = s["compression_weights"]
        beats = err[1] <= paper[1] and ratio >= p["compression"]
        lines.append(_row(f"{p['name']}, sparsekern{tag}", err,
                          (s["weights_dense"], s["weights_kept"]), s["compression_weights"], kept,
                          beats))  # fmt: skip
        note = (f"- {p['name']}: `{s['command']}` at {s['run']['commit'][:7]} (`results/{m}`), "
                f"{s['train_images']:,} training images"
                f"{how}; "
                f"{verdict(err[1], ratio, paper[1], p['compression'])}.")  # fmt: skip
        d = s.get("deep_compression")
        if d:
            note += (f" Deep Compression (`save_compressed(..., quantize=True, huffman=True)`): "
                     f"{d['file_bytes'] / 1e3:.1f} KB against {d['dense_bytes'] / 1e3:,.0f} KB "
                     f"dense, {d['compression_ratio']:.1f}x at {d['error']:.2f}% "
                     f"(paper: {DEEP_PAPER[m]}).")  # fmt: skip
        notes.append(note)
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def render(readme: str, text: str) -> str:
    if readme.count(BEGIN) != 1 or readme.count(END) != 1:
        raise ValueError(f"README.md: expected one {BEGIN!r} and one {END!r} line")
    head, rest = readme.split(BEGIN + "\n", 1)
    return f"{head}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if README.md is not up to date")
    args = p.parse_args(argv)
    path = ROOT / "README.md"
    old = path.read_text()
    try:
        new = render(old, block())
    except (ValueError, KeyError, FileNotFoundError) as e:
        p.error(str(e))
    if args.check:
        print("README.md is up to date" if new == old else "README.md differs from results/")
        return int(new != old)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
