"""Training and fine-tuning SNAC models (``snac-stream train``); see docs/training.md.

    from snac_stream.training import TrainConfig, train
    summary = train(TrainConfig(model_config="mini", espeak=True, out="runs/mini", steps=20000))

Checkpoints are written in the official format (``config.json`` + ``pytorch_model.bin`` with weight-norm
keys), loadable by ``SNAC.from_pretrained`` and the reference ``snac`` package.
"""

from .losses import MultiScaleMelLoss, mel_filterbank
from .modeling import add_weight_norm, export_model, folded_state_dict, training_forward
from .options import CONFIG_NAMES, MINI_CONFIG, TrainConfig, TrainingError, resolve_model_config
from .trainer import Trainer, segment_samples, train

__all__ = [
    "TrainConfig", "TrainingError", "train", "Trainer", "MINI_CONFIG", "CONFIG_NAMES", "resolve_model_config",
    "segment_samples", "training_forward", "add_weight_norm", "folded_state_dict", "export_model",
    "MultiScaleMelLoss", "mel_filterbank",
]
