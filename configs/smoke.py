"""A tiny ResNet (2 stages, 8-16 channels) for 2 epochs on SIGNS: seconds, for tests and a first look.

Run it:   python -m resnet_flax.main --config=configs/smoke.py --workdir=runs/smoke
Time:     about 10 s on a 2-core x86-64 CPU, most of it start-up and compiling.
Expect:   the same output files as a real run; Test Accuracy 0.175, 0.508 with BatchNorm
          re-estimated.
"""

from resnet_flax.config import default_config


def get_config():
    config = default_config()
    config.model = "resnet_tiny"
    config.num_epochs = 2
    config.batch_size = 64
    config.eval_batch_size = 60
    config.steps_per_chunk = 17
    config.bn_recalibration_batches = 17  # also report test accuracy with re-estimated BatchNorm
    return config
