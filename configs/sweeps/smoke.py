"""Two settings of the tiny smoke model, one epoch each: seconds; for tests and a first look.

Run it:   python -m resnet_flax.sweep --config=configs/sweeps/smoke.py --workdir=runs/sweep_smoke
"""

from resnet_flax.config import load_config_file
from resnet_flax.sweep import product, sweep
from pathlib import Path


def get_config():
    config = load_config_file(Path(__file__).parents[1] / "smoke.py")
    config.num_epochs = 1
    return config


def get_sweep():
    return product(sweep("learning_rate", [1e-3, 3e-3]), sweep("batch_size", [64]))
