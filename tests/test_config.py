"""Config values that cannot work stop with one line naming the field."""

import pytest

from resnet_flax import config as config_lib
from resnet_flax.errors import UserError


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("batch_size", 0, r"config.batch_size must be in \[1, 1080\]"),
        ("batch_size", 1081, r"config.batch_size must be in \[1, 1080\].*got 1081"),
        ("num_epochs", -1, "config.num_epochs must be >= 0, got -1"),
        ("learning_rate", 0.0, "config.learning_rate must be > 0"),
        ("lr_schedule", "linear", "config.lr_schedule must be"),
    ],
)
def test_impossible_config_values(config, field, value, message):
    config[field] = value
    with pytest.raises(UserError, match=message):
        config_lib.validate(config, num_train=1080)
