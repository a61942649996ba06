"""Learning rate x batch size for the signs_best recipe: ResNet-50, 6 epochs each.

Run it:   python -m resnet_flax.sweep --config=configs/sweeps/lr_batch.py --workdir=runs/lr_batch
Time:     about 6 x 2 minutes on a 2-core CPU.
"""

from pathlib import Path

from resnet_flax.config import load_config_file
from resnet_flax.sweep import product, sweep


def get_config():
    config = load_config_file(Path(__file__).parents[1] / "signs_best.py")
    config.num_epochs = 6
    config.checkpoint_every_epochs = 4
    return config


def get_sweep():
    return product(sweep("learning_rate", [5e-4, 2e-3, 5e-3]), sweep("batch_size", [32, 64]))
