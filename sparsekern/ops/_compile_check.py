"""The static performance contract: compile every Triton kernel for real GPU targets, on a machine
without a GPU, exactly as the JIT would specialise it at its benchmark shape, and read the
compiler's output.

    python -m sparsekern.ops._compile_check                      # every spec, sm_90 and sm_80
    python -m sparsekern.ops._compile_check --arch 90 --hot      # the hot bf16 specs (CI)
    python -m sparsekern.ops._compile_check --only masked_linear --json out.json

Specs come from each op module's ``compile_specs()`` (see ``shared/API.md``): the jit function, its
signature, constexprs, warps and stages, and ``values``, the value of every integer argument at
the op's benchmark shape. Specialisation follows the JIT (``triton.runtime.jit``): an integer
argument equal to 1 becomes a constexpr, one divisible by 16 gets ``tt.divisibility = 16``, and so
does every pointer (torch allocations are 256-byte aligned). Compiling with unspecialised
arguments instead reports a different kernel than the one that runs (49 KB of shared memory for
a config the JIT builds at 147 KB, and a wgmma that waits at every K step).

Per kernel it reports: registers, spill stores (``STL`` in SASS) and local memory, shared memory
(and whether it fits the target), wgmma present (``HGMMA`` in SASS), vector loads
(``LDG.E.64/128``), wgmma overlapped with the loads (a ``warp_group_dot_wait`` with
``pendings >= 1`` in TTGIR: the next K step's wgmma is issued before the previous one is waited
for), and async loads (``cp.async``: ``LDGSTS`` in SASS; TMA: ``UTMALDG``).

:func:`contract_failures` is what CI enforces for the hot specs (bf16 configs the autotuner may
pick at the benchmark shape) of :data:`CONTRACT_OPS`: no spill, wgmma present, overlapped, async
loads. Triton ships ptxas and cuobjdump, so no CUDA toolkit or driver is needed. Must run with
``TRITON_INTERPRET`` unset (the interpreter replaces ``@triton.jit`` functions).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# Shared memory per block (bytes) that a kernel may use, by compute capability.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
OP_MODULES = [
    "sparsekern.ops.masked_linear",
    "sparsekern.ops.block_sparse_linear",
    "sparsekern.ops.block_sparse_conv2d",
    "sparsekern.ops.csr_linear",
    "sparsekern.ops.sparse_train.triton_spmm",
    "sparsekern.ops.sparse_train.triton_sddmm",
]
# The ops whose hot specs CI holds to the contract.
CONTRACT_OPS = (
    "masked_linear",
    "block_sparse_linear",
    "block_sparse_conv2d",
    "csr_linear",
    "sparse_spmm",
    "sparse_sddmm",
)


def _bindir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def specialise(spec: dict) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` for ``triton.compiler.ASTSource``, specialised at
    ``spec["values"]`` the way the JIT does."""
    fn = spec["fn"]
    sig, consts, attrs = {}, dict(spec["constexprs"]), {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        kind = spec["signature"][name]
        if kind.startswith("*"):
            sig[name] = kind
            attrs[(i,)] = [["tt.divisibility", 16]]
            continue
        value = int(spec["values"][name])
        if value == 1:
            sig[name] = "constexpr"
            consts[name] = 1
            continue
        sig[name] = "i64" if abs(value) >= 2**31 else kind
        if value % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _sass_figures(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = os.path.join(_bindir(), "cuobjdump")
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", res))
    return {
        "registers": int(usage.get("REG", -1)),
        "stack_bytes": int(usage.get("STACK", 0)),
        "local_bytes": int(usage.get("LOCAL", 0)),
        "spill_stores": len(re.findall(r"\bSTL(\.\w+)*\b", sass)),
        "spill_loads": len(re.findall(r"\bLDL(\.\w+)*\b", sass)),
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "cp_async": len(re.findall(r"\bLDGSTS\b", sass)),
        "vector_loads": len(re.findall(r"\bLDG\.E(\.\w+)*\.(64|128)\b", sass)),
        "tma_loads": len(re.findall(r"\bUTMALDG\b", sass)),
        "sass_lines": sass.count("\n"),
    }


def compile_spec(spec: dict, arch: int) -> dict:
    """Compile one spec for ``sm_<arch>``; the report row (``ok`` False with ``error`` on a
    compiler failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {
        "kernel": spec["name"], "arch": arch, "hot": bool(spec.get("hot")),
        "contract": spec.get("contract", "gemm"),
        "num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
    }  # fmt: skip
    t0 = time.perf_counter()
    try:
        sig, consts, attrs = specialise(spec)
        src = ASTSource(fn=spec["fn"], signature=sig, constexprs=consts, attrs=attrs)
        k = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]},
        )
        ttgir = k.asm.get("ttgir", "")
        pendings = [int(p) for p in re.findall(r"warp_group_dot_wait[^\n]*pendings = (\d+)", ttgir)]
        smem = int(k.metadata.shared)
        row |= {
            "ok": True,
            "shared_bytes": smem,
            "fits_smem": smem <= SMEM_LIMIT.get(arch, 101376),
            "wgmma": "wgmma" in k.asm.get("ptx", ""),
            "overlapped": bool(pendings) and max(pendings) >= 1,
            "dot_wait_pendings": pendings,
            "async_ttgir": ("async_copy_global_to_local" in ttgir) or ("tma" in ttgir.lower()),
        }
        row |= _sass_figures(k.asm["cubin"])
        row["async_loads"] = row["cp_async"] + row["tma_loads"] > 0
    except Exception as e:  # report every failure, not only the first
        row |= {"ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}"}
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def op_of(name: str) -> str:
    """``"masked_linear.dw[bf16,...]" -> "masked_linear"``."""
    return name.split(".")[0]


def contract_failures(row: dict) -> list[str]:
    """What a hot kernel's row breaks of the contract (empty: it holds). A spec's ``contract``:
    ``"gemm"`` (the default: no spills, wgmma overlapped with the loads on sm_90, async loads) or
    ``"memory"`` for a bandwidth-bound kernel with no matrix product (no spills, 64/128-bit vector
    loads)."""
    if not row["ok"]:
        return [f"does not compile: {row['error']}"]
    bad = []
    if not row["fits_smem"]:
        bad.append(f"shared memory {row['shared_bytes']} B over the sm_{row['arch']} limit")
    if row["spill_stores"] or row["local_bytes"]:
        bad.append(f"spills: {row['spill_stores']} STL, {row['local_bytes']} B local memory")
    if row.get("contract", "gemm") == "memory":
        if not row["vector_loads"]:
            bad.append("no 64/128-bit vector loads (LDG.E.64 / LDG.E.128) in SASS")
        return bad
    if row["arch"] >= 90:
        if not (row["wgmma"] and row["hgmma"]):
            bad.append("no wgmma (HGMMA) in SASS")
        elif not row["overlapped"]:
            bad.append(f"wgmma not overlapped with loads: pendings {row['dot_wait_pendings']}")
    if not row["async_loads"]:
        bad.append("no async loads (cp.async / TMA)")
    return bad


def all_specs(only: str | None = None, hot: bool = False) -> list[dict]:
    specs = []
    for modname in OP_MODULES:
        for spec in importlib.import_module(modname).compile_specs():
            if only and only not in spec["name"]:
                continue
            if hot and not spec.get("hot"):
                continue
            specs.append(spec)
    return specs


def _compile_indexed(job: tuple[int, int, str | None, bool]) -> dict:
    """Worker: compile spec number ``i`` of ``all_specs(only, hot)`` (specs hold jit functions,
    which do not pickle: each worker builds the list itself)."""
    i, arch, only, hot = job
    return compile_spec(all_specs(only, hot)[i], arch)


def _rows(archs: list[int], only: str | None, hot: bool, jobs: int):
    n = len(all_specs(only, hot))
    work = [(i, arch, only, hot) for i in range(n) for arch in archs]
    if jobs <= 1:
        yield from map(_compile_indexed, work)
        return
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        yield from pool.imap(_compile_indexed, work)


def check(archs: list[int], only: str | None = None, hot: bool = False, jobs: int = 1) -> list:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile check needs TRITON_INTERPRET unset (the interpreter is on)")
    rows = []
    for row in _rows(archs, only, hot, jobs):
        rows.append(row)
        if row["ok"]:
            figures = (
                f"regs={row['registers']} stl={row['spill_stores']} "
                f"smem={row['shared_bytes']}{'' if row['fits_smem'] else '(too big)'} "
                f"wgmma={'y' if row['wgmma'] else 'n'} "
                f"overlap={'y' if row['overlapped'] else 'n'}{row['dot_wait_pendings']} "
                f"async={'y' if row['async_loads'] else 'n'}"
            )
        else:
            figures = "FAIL " + row["error"]
        hot_mark = " [hot]" if row["hot"] else ""
        print(
            f"sm_{row['arch']} {row['kernel']}{hot_mark}: {figures} ({row['seconds']}s)", flush=True
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90")
    ap.add_argument("--only", help="substring of the kernel names to check")
    ap.add_argument("--hot", action="store_true", help="only the hot specs")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = ap.parse_args(argv)
    rows = check(args.arch or [90, 80], args.only, args.hot, args.jobs)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    failed = [r for r in rows if not r["ok"]]
    broken = [
        (r["kernel"], r["arch"], contract_failures(r))
        for r in rows
        if r["hot"] and op_of(r["kernel"]) in CONTRACT_OPS and contract_failures(r)
    ]
    for name, arch, why in broken:
        print(f"CONTRACT sm_{arch} {name}: {'; '.join(why)}")
    summary = f"{len(rows) - len(failed)} compiled, {len(failed)} failed"
    print(f"{summary}, {len(broken)} break the contract")
    return 1 if failed or broken else 0


if __name__ == "__main__":
    sys.exit(main())
