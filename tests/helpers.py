"""What several test folders share: small models, and running the scripts as programs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
# the scripts as `make demo` runs them: the plain-PyTorch CPU path, one OpenMP thread
SCRIPT_ENV = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")


class TinyNet(nn.Module):
    """conv(1->4, 3x3) -> relu -> flatten -> fc1(64->hidden) -> relu -> fc2(hidden->4).
    Input ``[B, 1, 6, 6]``."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(F.relu(self.conv(x)).flatten(1))))


def run_script(script, *args, launcher=(), check=True, timeout=300):
    """Run ``python [launcher] script args`` from the repository root; returns the
    CompletedProcess (stdout / stderr as text). ``check``: assert exit status 0."""
    proc = subprocess.run(
        [sys.executable, *launcher, str(script), *map(str, args)],
        cwd=ROOT,
        env=SCRIPT_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# Runs a script's command line many times in one interpreter (one start-up instead of one per
# case): each case is the script run as __main__ with its own sys.argv, observed from outside
# only: exit status, stderr, seconds.
_DRIVER = r"""
import contextlib, io, json, runpy, sys, time
script, cases = sys.argv[1], json.loads(sys.stdin.read())
out = []
for argv in cases:
    err = io.StringIO()
    sys.argv = [script, *argv]
    t = time.time()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:  # as the interpreter reports it: a message goes to stderr
            code = e.code if isinstance(e.code, int) or e.code is None else 1
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
        except BaseException as e:
            import traceback
            traceback.print_exc(file=err)
            code = -1
    out.append([code, err.getvalue(), time.time() - t])
print(json.dumps(out))
"""


def rejected(script, cases: list[list[str]], timeout=300) -> list[tuple[int, str, float]]:
    """``(exit status, stderr, seconds)`` of ``script`` run with each argument list of
    ``cases`` (see ``_DRIVER``)."""
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(script)],
        input=json.dumps(cases),
        cwd=ROOT,
        env=SCRIPT_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [tuple(r) for r in json.loads(proc.stdout.splitlines()[-1])]
