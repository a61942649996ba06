"""The assignment, section 4: ResNet-50 on SIGNS, Adam (lr 1e-3), batch 32, 2 epochs, seed 0.

Run it:   python -m resnet_flax.main --config=configs/signs.py --workdir=runs/signs
Time:     about 50 s on a 2-core Intel Xeon (compile about 14 s, then 10-11 s per epoch), about
          80 s on a 2-core AMD EPYC (AVX2 only; 20-23 s per epoch).
Expect:   Test Accuracy 0.1667 (every image gets one class), as the assignment notes ("you can
          see it performs poorly"): BatchNorm's moving averages (momentum 0.99) have seen only 68
          updates. With BatchNorm statistics re-estimated over the training set the same weights
          do far better (also printed). Training accuracy and re-estimated test accuracy: 0.780
          and 0.850 on the Xeon, 0.785 and 0.792 on the EPYC: the CPUs round differently and two
          epochs of Adam amplify it. configs/signs_best.py trains a good model.
"""

from resnet_flax.config import default_config


def get_config():
    config = default_config()
    config.bn_recalibration_batches = 34  # also report test accuracy with re-estimated BatchNorm
    return config
