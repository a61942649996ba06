"""What the step benchmarks share: the assignment's ResNet-50 with a fresh train state, one random
SIGNS-shaped batch of 32 (uint8 images, labels, an all-true mask), and a timer."""

import time
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from resnet_flax import config as config_lib
from resnet_flax import models, runtime, steps


def resnet50_state_and_batch(conv_impl: str, batch_size: int = 32, **factories):
    """The default config's model with ``conv_impl``, its fresh train state and a random batch.

    ``factories`` (``conv``, ``norm``, ``dense``) replace those of ``models.layer_factories`` for a
    variant of the model; without them the model is ``models.model_from_config``'s."""
    config = config_lib.default_config()
    config.conv_impl = conv_impl
    layers = {**models.layer_factories(config.conv_impl, config.matmul_precision), **factories}
    model = models.ResNet(num_classes=config.num_classes, **models.MODELS[config.model], **layers)
    state = steps.create_train_state(config, model, 34, runtime.make_mesh())
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
