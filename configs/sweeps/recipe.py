"""What each ingredient of configs/signs_best.py adds: ResNet-50, 10 epochs each, one seed.

Run it:   python -m resnet_flax.sweep --config=configs/sweeps/recipe.py --workdir=runs/recipe
Time:     about 5 x 3.3 minutes on a 2-core CPU.
Note:     experiments/sweeps/recipe/ was run while signs_best.py still used label smoothing 0.1,
          so its last row is named '004_base'; a rerun names the same setting
          '004_label_smoothing=0.1'. Label smoothing was dropped from the recipe after
          configs/sweeps/label_smoothing.py (three seeds, 27 epochs).
"""

from pathlib import Path

from resnet_flax.config import load_config_file


def get_config():
    config = load_config_file(Path(__file__).parents[1] / "signs_best.py")
    config.num_epochs = 10
    config.checkpoint_every_epochs = 4
    return config


def get_sweep():
    plain = {"augment": False, "lr_schedule": "constant", "label_smoothing": 0.0, "learning_rate": 1e-3}
    return [
        plain,  # the assignment's training, longer
        {**plain, "augment": True},
        {**plain, "lr_schedule": "cosine", "learning_rate": 2e-3},
        {**plain, "augment": True, "lr_schedule": "cosine", "learning_rate": 2e-3},
        {"label_smoothing": 0.1},  # the recipe plus label smoothing
    ]
