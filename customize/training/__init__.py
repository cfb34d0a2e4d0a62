"""The one training engine: `train(method, model, dataset, cfg)` with the shared `TrainConfig`."""

from customize.errors import TrainingError
from customize.training.checkpoint import check_run_folder
from customize.training.config import SDTrainConfig, TrainConfig, load_config_file, parse_config
from customize.training.engine import TrainResult, train

__all__ = ["SDTrainConfig", "TrainConfig", "TrainResult", "TrainingError", "check_run_folder", "load_config_file",
           "parse_config", "train"]
