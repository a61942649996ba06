"""Does label smoothing earn its place in configs/signs_best.py? The recipe (27 epochs) with label
smoothing 0.1 and without it, three seeds each.

Run it:   python -m resnet_flax.sweep --config=configs/sweeps/label_smoothing.py --workdir=runs/label_smoothing
Time:     about 6 x 8.5 minutes on a 2-core CPU.
Result:   test accuracy 0.975 / 0.983 / 0.983 with 0.1, 0.992 / 0.992 / 0.983 without
          (experiments/sweeps/label_smoothing/), so signs_best.py dropped it. In those committed
          results the label_smoothing=0.1 rows are the workdirs of experiments/signs_best_seeds.py
          from when signs_best.py had 0.1 (the same config), copied in before the sweep ran (the
          sweep skips finished runs).
"""

from pathlib import Path

from resnet_flax.config import load_config_file
from resnet_flax.sweep import product, sweep


def get_config():
    return load_config_file(Path(__file__).parents[1] / "signs_best.py")


def get_sweep():
    return product(sweep("label_smoothing", [0.1, 0.0]), sweep("seed", [0, 1, 2]))
