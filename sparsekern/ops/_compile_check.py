"""Compile every Triton kernel config for real GPU targets, on a machine without a GPU.

    python -m sparsekern.ops._compile_check                  # sm_90 (H100/H200) and sm_80 (A100)
    python -m sparsekern.ops._compile_check --arch 90 --json out.json

Triton ships ptxas, so a kernel can be lowered to PTX and assembled to a cubin with no driver.
This catches what the interpreter accepts and the compiler refuses (dot shapes under 16, dtype
mixes, bad layouts) and reports each config's shared memory against the target's limit, so configs
that can never launch are visible before a GPU is lent. Must run with TRITON_INTERPRET unset (the
interpreter replaces @triton.jit functions)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

# Shared memory per block (bytes) that a kernel may use, by compute capability.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
OP_MODULES = [
    "sparsekern.ops.masked_linear",
    "sparsekern.ops.masked_conv2d",
    "sparsekern.ops.block_sparse_linear",
    "sparsekern.ops.block_sparse_conv2d",
]


def _sample(specs: list[tuple]) -> list[tuple]:
    """First and last config of each (kernel, dtype) group: the largest and smallest tiles."""
    groups: dict[str, list[tuple]] = {}
    for spec in specs:
        groups.setdefault(spec[0].split(",")[0], []).append(spec)
    return [s for g in groups.values() for s in (g if len(g) < 3 else [g[0], g[-1]])]


def check(archs: list[int], only: str | None = None, sample: bool = False) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile check needs TRITON_INTERPRET unset (the interpreter is on)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for modname in OP_MODULES:
        specs = list(importlib.import_module(modname).compile_specs())
        for name, fn, sig, consts, warps, stages in _sample(specs) if sample else specs:
            if only and only not in name:
                continue
            for arch in archs:
                t0 = time.perf_counter()
                row = {"kernel": name, "arch": arch, "num_warps": warps, "num_stages": stages}
                src = ASTSource(
                    fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts
                )
                try:
                    k = triton.compile(
                        src,
                        target=GPUTarget("cuda", arch, 32),
                        options={"num_warps": warps, "num_stages": stages},
                    )
                    smem = int(k.metadata.shared)
                    row |= {
                        "ok": True,
                        "shared_bytes": smem,
                        "fits_smem": smem <= SMEM_LIMIT.get(arch, 101376),
                        "wgmma": "wgmma" in k.asm.get("ptx", ""),
                        "cubin": "cubin" in k.asm,
                    }
                except Exception as e:  # report every failure, not only the first
                    row |= {"ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}"}
                row["seconds"] = round(time.perf_counter() - t0, 2)
                rows.append(row)
                status = "ok" if row["ok"] else "FAIL " + row["error"]
                extra = (
                    f" smem={row['shared_bytes']}{'' if row['fits_smem'] else ' (too big)'}"
                    f"{' wgmma' if row['wgmma'] else ''}"
                    if row["ok"]
                    else ""
                )
                print(f"sm_{arch} {name}: {status}{extra}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90")
    ap.add_argument("--only", help="substring of the kernel names to check")
    ap.add_argument("--sample", action="store_true", help="largest and smallest config only")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    rows = check(args.arch or [90, 80], args.only, args.sample)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} compiled, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
