"""What the step benchmarks share: the assignment's ResNet-50 with a fresh train state, one random
SIGNS-shaped batch of 32 (uint8 images, labels, an all-true mask), and a timer."""

import time
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from resnet_flax import config as config_lib
from resnet_flax import models, runtime, train


def resnet50_state_and_batch(conv_impl: str, batch_size: int = 32):
    config = config_lib.default_config()
    config.conv_impl = conv_impl
    model = models.model_from_config(config)
    state = train.create_train_state(config, model, 34, runtime.make_mesh())
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (batch_size, 64, 64, 3), dtype=np.uint8)),
             "label": jnp.asarray(rng.integers(0, 6, batch_size).astype(np.int32)),
             "mask": jnp.ones((batch_size,), bool)}
    return model, state, batch


def best_and_median(call: Callable[[], object], reps: int) -> tuple[float, float]:
    """Seconds of ``reps`` calls of ``call()``, which must wait until its work is done."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[0], times[len(times) // 2]
