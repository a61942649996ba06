"""Defaults every config starts from: the assignment's settings (ResNet-50, Adam, batch 32, 2 epochs).

Run it:   python -m resnet_flax.main --config=configs/default.py --workdir=runs/default
The same run as configs/signs.py; see there for time and results. The fields and their meaning are
in resnet_flax/config.py.
"""

from resnet_flax.config import default_config


def get_config():
    return default_config()
