"""The training machinery the experiment scripts share: loops over DataLoaders, learning-rate
schedules, atomic checkpoints with exact resume, distributed helpers, JSON-lines logging, a
progress bar that does not collide with printed lines, reports (Table 1, ``summary.json``, the
methods table), checked exports, the MNIST recipes and Han's figures. See ``docs/training.md``.
"""

from sparsekern.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_run_checkpoint,
    resume_differences,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_dict_problems,
)
from sparsekern.training.distributed import (
    DistEnv,
    all_sum,
    barrier,
    check_masks_identical,
    gather_objects,
    is_dist,
    mask_digest,
    setup_distributed,
    shutdown,
    state_digest,
)
from sparsekern.training.jsonlog import JsonLog
from sparsekern.training.loops import evaluate, train_epoch
from sparsekern.training.lr import Constant, StepDecay, WarmupCosine, set_lr
from sparsekern.training.progress import Progress
from sparsekern.training.recipes import METHODS, Phase, build_pruner, nm_for_sparsity, plan_phases
from sparsekern.training.report import (
    command_line,
    format_table1,
    git_commit,
    methods_table,
    run_info,
    table1_rows,
    write_json,
)

__all__ = [
    "METHODS",
    "CheckpointError",
    "Constant",
    "DistEnv",
    "JsonLog",
    "Phase",
    "Progress",
    "StepDecay",
    "WarmupCosine",
    "all_sum",
    "barrier",
    "build_pruner",
    "check_masks_identical",
    "command_line",
    "evaluate",
    "format_table1",
    "gather_objects",
    "git_commit",
    "is_dist",
    "load_checkpoint",
    "load_run_checkpoint",
    "mask_digest",
    "methods_table",
    "nm_for_sparsity",
    "plan_phases",
    "resume_differences",
    "rng_state",
    "run_info",
    "save_checkpoint",
    "set_lr",
    "set_rng_state",
    "setup_distributed",
    "shutdown",
    "state_dict_problems",
    "state_digest",
    "table1_rows",
    "train_epoch",
    "write_json",
]
