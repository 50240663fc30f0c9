"""The validation search of a preset: every combination of its ``search`` grid, each a full run of
scripts/prune_mnist.py on the 55,000 training images that remain after the 5,000 held out, with
``--no-test`` (the test set is never read). The choice: the lowest validation error among the
runs at >= ``search_min_compression`` x (weights); ties go to the earlier grid point. The runs,
their figures and the choice go to results/search/<preset>.json with the command and commit; the
preset's values are then set to the choice (tests/scripts/test_presets.py checks they agree).

    python scripts/search_mnist.py --preset lenet300            # 8 runs, ~2-4 min each
    python scripts/search_mnist.py --preset lenet300 --jobs 2   # two at a time (1 thread each)
    python scripts/search_mnist.py --preset lenet5 --reuse      # keep finished runs that match

--reuse keeps a grid point's finished run (its summary.json) when its recorded command is this
search's command for that point and its arguments agree with the preset's fixed values; the JSON
marks it ``reused`` and keeps its own commit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts._lib import checks, presets  # noqa: E402
from sparsekern.training import report  # noqa: E402

FIXED = ["--no-test", "--no-figures", "--no-progress", "--inference-budget", "0", "--overwrite"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, help=f"one of {presets.preset_names()}")
    p.add_argument("--jobs", type=checks.number(int, 1, 8), default=1, help="runs at a time")
    p.add_argument("--runs", default="runs/search", help="the runs' folders (from the root)")
    p.add_argument("--out", help="the JSON (default results/search/<preset>.json)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("--reuse", action="store_true", help="keep finished runs that match")
    args = p.parse_args(argv)
    try:
        args.settings = presets.load_preset(args.preset)
    except ValueError as e:
        p.error(f"argument --preset: {e}")
    if not isinstance(args.settings.get("search"), dict) or not args.settings["search"]:
        p.error(f"argument --preset: expected a non-empty 'search' grid in {args.preset}")
    name = Path(args.preset).stem
    args.out = Path(args.out or ROOT / "results" / "search" / f"{name}.json")
    checks.check_out_file(p, "--out", args.out)
    checks.check_out_dir(p, "--runs", ROOT / args.runs)
    args.name = name
    return args


def grid(search: dict) -> list[dict]:
    keys = list(search)
    return [dict(zip(keys, vals)) for vals in itertools.product(*search.values())]


def command(args, point: dict) -> list[str]:
    tag = "_".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in point.items())
    out = Path(args.runs) / args.name / tag
    flags = [x for k, v in point.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    return ["scripts/prune_mnist.py", "--preset", args.preset, *flags, *FIXED, "--out", str(out)]


def reusable(cmd: list[str], fixed: dict) -> dict | None:
    """The finished run of ``cmd`` if its summary records exactly this command and the preset's
    fixed values, else None."""
    f = ROOT / cmd[cmd.index("--out") + 1] / "summary.json"
    if not f.is_file():
        return None
    s = json.loads(f.read_text())
    # a run continued with --resume (bit for bit, settings checked) counts as the same command
    plain = [x for x in cmd if x not in ("--overwrite", "--resume")]
    runs = [c.split()[1:] for c in s.get("commands", [s.get("command", "")])]
    same = bool(runs) and all([x for x in c if x not in ("--overwrite", "--resume")] == plain
                              for c in runs) and s.get("test_images") == 0  # fmt: skip
    same = same and all(s["args"].get(k) == v for k, v in fixed.items())
    return s if same else None


def run_one(cmd: list[str], fixed: dict | None = None) -> dict:
    """Run ``cmd`` (or, with ``fixed``, keep its finished run when :func:`reusable`)."""
    t = time.time()
    s = reusable(cmd, fixed) if fixed is not None else None
    reused = s is not None
    if not reused:
        # the run's output goes to a file, not a pipe: a run outlives a killed search (and can be
        # continued with --resume, then kept by --reuse)
        log = ROOT / cmd[cmd.index("--out") + 1] / "search.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=f)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read_text()[-3000:]}")
        s = json.loads((ROOT / cmd[cmd.index("--out") + 1] / "summary.json").read_text())
    assert s["test_images"] == 0  # --no-test: the search never saw the test set
    keys = ("val_error_pct", "val_error_dense_pct", "compression_weights", "kept_pct")
    out = {k: s[k] for k in keys} | {"commit": s["run"]["commit"]}
    if reused:
        return out | {"seconds": s["wall_time_s"], "reused": True}
    return out | {"seconds": time.time() - t}


def main(argv=None):
    args = parse_args(argv)
    points = grid(args.settings["search"])
    cmds = [command(args, pt) for pt in points]
    if args.dry_run:
        return print("\n".join("python " + " ".join(c) for c in cmds))
    fixed = {k: v for k, v in presets.run_settings(args.settings).items()
             if k not in args.settings["search"]} if args.reuse else None  # fmt: skip
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda c: run_one(c, fixed), cmds))
    floor = args.settings.get("search_min_compression", 1.0)
    runs = [{"settings": pt, "command": "python " + " ".join(c), **r}
            for pt, c, r in zip(points, cmds, results)]  # fmt: skip
    ok = [r for r in runs if r["compression_weights"] >= floor]
    chosen = min(ok, key=lambda r: r["val_error_pct"]) if ok else None
    out = dict(preset=args.name, command=report.command_line("scripts/search_mnist.py", argv))
    out |= dict(run=report.run_info(ROOT), rule=f"min val_error_pct at >= {floor:g}x weights")
    out |= dict(fixed=presets.run_settings(args.settings), runs=runs)
    out |= dict(chosen=chosen and chosen["settings"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report.write_json(args.out, out)
    for r in runs:
        print(f"{r['settings']}: val {r['val_error_pct']:.2f}% at {r['compression_weights']:.1f}x")
    print(f"chosen: {out['chosen']} -> {args.out}")
    return out


if __name__ == "__main__":
    main()
