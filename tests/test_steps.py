"""The compiled steps: one training step, masked padding, chunks of steps, kernels updated in place."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_states_close, batch_of, smoke_config
from resnet_flax import input_pipeline, models, runtime, steps


def test_loss_goes_down_on_a_fixed_batch(tiny_setup):
    config, state, images, labels = tiny_setup
    step = jax.jit(lambda s, b: steps.train_step(s, b, jax.random.key(0), num_classes=6))
    batch = batch_of(images, labels, np.arange(16))
    losses = []
    for _ in range(15):
        state, sums = step(state, batch)
        losses.append(float(sums["loss_sum"] / sums["count"]))
    assert losses[-1] < 0.5 * losses[0], losses


def test_padded_batch_trains_exactly_like_the_real_examples_alone(tiny_setup):
    _, state, images, labels = tiny_setup
    step = jax.jit(lambda s, b: steps.train_step(s, b, jax.random.key(0), num_classes=6))
    real = np.arange(6)
    padded = np.concatenate([real, [30, 31]])  # two real-looking padding examples
    mask = np.array([True] * 6 + [False] * 2)
    state_real, sums_real = step(state, batch_of(images, labels, real))
    state_padded, sums_padded = step(state, batch_of(images, labels, padded, mask))
    assert float(sums_padded["count"]) == 6
    np.testing.assert_allclose(sums_padded["loss_sum"], sums_real["loss_sum"], rtol=1e-5)
    assert_states_close(state_real, state_padded)


@pytest.mark.slow
@pytest.mark.parametrize("conv_impl", ["gemm", "winograd"])
def test_training_step_updates_conv_kernels_in_place(conv_impl):
    """XLA must not copy the donated kernels each step (conv.patches_times_kernel and
    winograd.conv3x3_same order the input gradient's read of a kernel before the optimizer
    overwrites it)."""
    config = smoke_config(batch_size=4)
    model = models.create_model(config.model, num_classes=6, conv_impl=conv_impl)
    state = steps.create_train_state(config, model, steps_per_epoch=10)
    batch = {"image": jnp.zeros((4, 64, 64, 3), jnp.uint8), "label": jnp.zeros((4,), jnp.int32),
             "mask": jnp.ones((4,), bool)}
    step = jax.jit(lambda s, b: steps.train_step(s, b, jax.random.key(0), num_classes=6), donate_argnums=0)
    hlo = step.lower(state, batch).compile().as_text()
    kernel_shapes = {",".join(map(str, k.shape)) for k in jax.tree.leaves(state.params) if k.ndim == 4}
    copied = set(re.findall(r"= f32\[([\d,]+)\]\S* copy\(", hlo))
    assert len(kernel_shapes) >= 4
    assert not copied & kernel_shapes, f"kernels copied each step: {sorted(copied & kernel_shapes)}"


def test_chunk_equals_the_per_step_loop(tiny_setup):
    config, state, images, labels = tiny_setup
    indices, mask = input_pipeline.batch_indices(input_pipeline.epoch_order(0, 1, 36), 8)  # 4 + 4/8
    rng = jax.random.key(0)
    step = jax.jit(lambda s, b: steps.train_step(s, b, rng, num_classes=6))
    looped, loop_sums = state, []
    for idx, m in zip(indices, mask):
        looped, sums = step(looped, batch_of(images, labels, idx, m))
        loop_sums.append(sums)
    chunk = steps.make_train_chunk(config)
    batches = runtime.gather_batches(images, labels, indices, mask, runtime.make_mesh())
    scanned, scan_sums = chunk(jax.tree.map(jnp.copy, state), batches)
    assert int(scanned.step) == int(looped.step) == 5
    # Five Adam steps move weights by up to 5e-3; rounding differences of the two programs show
    # up at 1e-5 in weights whose gradient is near zero (Adam divides by its size).
    assert_states_close(looped, scanned, atol=5e-5)
    total = {k: sum(float(s[k]) for s in loop_sums) for k in loop_sums[0]}
    np.testing.assert_allclose([float(np.sum(scan_sums[k])) for k in total], list(total.values()), rtol=1e-5)
    # The chunk's sums are per step: each one that of its step in the loop.
    np.testing.assert_allclose(scan_sums["loss_sum"], [float(s["loss_sum"]) for s in loop_sums], rtol=1e-5)


def test_a_short_chunk_runs_only_its_steps(tiny_setup):
    """One compiled chunk of 5 batches, told to run 2: the state and sums of those 2 steps alone
    (the 3 batches after them hold other examples, which would change both)."""
    config, state, images, labels = tiny_setup
    indices, mask = input_pipeline.batch_indices(input_pipeline.epoch_order(0, 1, 36), 8)
    mesh = runtime.make_mesh()
    chunk = steps.make_train_chunk(config)
    whole = runtime.gather_batches(images, labels, indices, mask, mesh)
    first_two = runtime.gather_batches(images, labels, indices[:2], mask[:2], mesh)
    short, short_sums = chunk(jax.tree.map(jnp.copy, state), whole, np.int32(2))
    alone, alone_sums = chunk(jax.tree.map(jnp.copy, state), first_two)
    assert int(short.step) == int(alone.step) == 2
    assert_states_close(alone, short, atol=1e-6)
    np.testing.assert_array_equal(short_sums["count"], [8, 8, 0, 0, 0])  # the steps after 2 never ran
    np.testing.assert_allclose(short_sums["loss_sum"][:2], alone_sums["loss_sum"], rtol=1e-6)
