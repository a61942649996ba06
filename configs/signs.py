"""The assignment, section 4: ResNet-50 on SIGNS, Adam (lr 1e-3), batch 32, 2 epochs, seed 0.

Run it:   python -m resnet_flax.main --config=configs/signs.py --workdir=runs/signs
Time:     TODO(measure) on a 2-core x86-64 CPU.
Expect:   after 2 epochs a training accuracy well above chance, but a test accuracy near 0.17-0.4:
          BatchNorm's moving averages (momentum 0.99) have seen only 68 updates, as the assignment
          notes ("you can see it performs poorly"). Train ~20 epochs (--config.num_epochs=20) for
          a good model.
"""

from resnet_flax.config import default_config


def get_config():
    config = default_config()
    config.bn_recalibration_batches = 34  # also report test accuracy with re-estimated BatchNorm
    return config
