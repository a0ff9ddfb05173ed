"""Training engine: optimizer groups, pure LR schedules, the loop, its record, checkpoints and
resume."""

from strsparse.training.build import build_model, resolve_budget, restore_model
from strsparse.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from strsparse.training.distributed import DistributedEnv, setup_distributed
from strsparse.training.loop import TrainingDiverged, TrainResult, evaluate, run_dir_of, train
from strsparse.training.optim import build_optimizer, parameter_groups
from strsparse.training.schedules import learning_rate

__all__ = [
    "CheckpointError",
    "DistributedEnv",
    "TrainResult",
    "TrainingDiverged",
    "build_model",
    "build_optimizer",
    "evaluate",
    "learning_rate",
    "load_checkpoint",
    "parameter_groups",
    "resolve_budget",
    "restore_model",
    "run_dir_of",
    "save_checkpoint",
    "setup_distributed",
    "train",
]
