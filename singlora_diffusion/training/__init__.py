"""The DreamBooth trainer, in importable phases: config -> validate -> build -> fit -> save.

The names below are the trainer's public surface: the command (train_dreambooth.py), the
web UI's job runner, the benchmarks and the experiments use these, not the modules' insides.
"""
from .build import Inputs, Trainee, build, validate
from .config import TrainConfig, load_yaml, parse_config
from .loop import FitResult, TrainingDiverged, fit
from .run import main, make_accelerator, train

__all__ = ["FitResult", "Inputs", "Trainee", "TrainConfig", "TrainingDiverged", "build", "fit", "load_yaml", "main",
           "make_accelerator", "parse_config", "train", "validate"]
