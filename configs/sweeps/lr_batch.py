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
    # The recipe as it was when experiments/sweeps/lr_batch/ was run; signs_best.py has since
    # dropped label smoothing (configs/sweeps/label_smoothing.py).
    config.label_smoothing = 0.1
    return config


def get_sweep():
    return product(sweep("learning_rate", [5e-4, 2e-3, 5e-3]), sweep("batch_size", [32, 64]))
