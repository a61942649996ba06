"""He et al. (2015), Figure 4, on SIGNS: plain-18 and plain-34 against ResNet-18 and ResNet-34
(torchvision's layout, the paper's Table 1 with projection shortcuts where the shape changes),
all trained alike: Adam 1e-3 with a 1-epoch warm-up and cosine decay, batch 32, random shifts and
flips, 20 epochs, BatchNorm re-estimated at the end.

Run it:   python experiments/figure4.py            (this sweep, then the curves and the table)
          python -m resnet_flax.sweep --config=configs/sweeps/figure4.py --workdir=runs/figure4
Time:     about 20 minutes on a 2-core CPU (ResNet-34: about 17 s per epoch at 64x64).
"""

from resnet_flax.config import default_config
from resnet_flax.sweep import sweep


def get_config():
    config = default_config()
    config.variant = "torchvision"
    config.num_epochs = 20
    config.lr_schedule = "cosine"
    config.warmup_epochs = 1.0
    config.augment = True
    config.bn_recalibration_batches = 34
    config.checkpoint_every_epochs = 10
    return config


def get_sweep():
    return sweep("model", ["plain18", "plain34", "resnet18", "resnet34"])
