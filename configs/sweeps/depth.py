"""Depth: the ResNet family at 14, 26 and 50 layers, and ResNet-50's plain twin (no shortcuts),
with the assignment's training (Adam 1e-3, batch 32) for 8 epochs, BatchNorm re-estimated.

Run it:   python -m resnet_flax.sweep --config=configs/sweeps/depth.py --workdir=runs/depth
Time:     about 1 + 1.5 + 2.5 + 2.3 minutes on a 2-core CPU.
"""

from resnet_flax.config import default_config
from resnet_flax.sweep import sweep


def get_config():
    config = default_config()
    config.num_epochs = 8
    config.bn_recalibration_batches = 34
    config.checkpoint_every_epochs = 5
    return config


def get_sweep():
    return sweep("model", ["resnet14", "resnet26", "resnet50", "plain50"])
