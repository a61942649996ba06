"""The assignment, section 4: ResNet-50 on SIGNS, Adam (lr 1e-3), batch 32, 2 epochs, seed 0.

Run it:   python -m resnet_flax.main --config=configs/signs.py --workdir=runs/signs
Time:     about 50 s on a 2-core x86-64 CPU (compile about 14 s, then 10-11 s per epoch).
Expect:   training accuracy 0.780, Test Accuracy 0.1667 (every image gets one class), as the
          assignment notes ("you can see it performs poorly"): BatchNorm's moving averages
          (momentum 0.99) have seen only 68 updates. With BatchNorm statistics re-estimated over
          the training set the same weights reach 0.850 (also printed). configs/signs_best.py
          trains a good model.
"""

from resnet_flax.config import default_config


def get_config():
    config = default_config()
    config.bn_recalibration_batches = 34  # also report test accuracy with re-estimated BatchNorm
    return config
