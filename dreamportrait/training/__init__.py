"""SDS-on-distribution training with a GAN regulariser: config, losses, checkpoints, trainer."""

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, load_config
from .trainer import Batch, Trainer

__all__ = ["Batch", "TrainConfig", "Trainer", "latest_checkpoint", "load_checkpoint", "load_config", "save_checkpoint"]
