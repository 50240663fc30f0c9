"""Training machinery for sparse models: loops over DataLoaders, learning-rate schedules, atomic
checkpoints with exact resume, distributed helpers, JSON-lines logging, a progress bar that does
not collide with printed lines, run records (``summary.json``, command, commit), checked exports
and data loaders. The experiments (MNIST recipes, Han's figures, the Table 1 and methods tables,
presets) live with the scripts, in ``scripts/_lib/``, and are not installed. See
``docs/training.md``.
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
    distribute,
    gather_objects,
    is_dist,
    load_full_into_sharded,
    load_sharded,
    mask_digest,
    save_sharded,
    setup_distributed,
    shard_model,
    shutdown,
    state_digest,
)
from sparsekern.training.jsonlog import JsonLog
from sparsekern.training.loops import evaluate, train_epoch
from sparsekern.training.lr import Constant, StepDecay, WarmupCosine, set_lr
from sparsekern.training.progress import Progress
from sparsekern.training.report import (
    command_line,
    git_commit,
    model_summary,
    run_info,
    write_json,
)

__all__ = [
    "CheckpointError",
    "Constant",
    "DistEnv",
    "JsonLog",
    "Progress",
    "StepDecay",
    "WarmupCosine",
    "all_sum",
    "barrier",
    "check_masks_identical",
    "command_line",
    "distribute",
    "evaluate",
    "gather_objects",
    "git_commit",
    "is_dist",
    "load_checkpoint",
    "load_full_into_sharded",
    "load_run_checkpoint",
    "load_sharded",
    "mask_digest",
    "model_summary",
    "resume_differences",
    "rng_state",
    "run_info",
    "save_checkpoint",
    "save_sharded",
    "set_lr",
    "set_rng_state",
    "setup_distributed",
    "shard_model",
    "shutdown",
    "state_dict_problems",
    "state_digest",
    "train_epoch",
    "write_json",
]
