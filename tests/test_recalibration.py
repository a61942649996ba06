"""BatchNorm re-estimation: exact batch statistics averaged over training batches."""

import jax
import numpy as np

from resnet_flax import checkpoints, input_pipeline, runtime


def test_batchnorm_recalibration_averages_exact_batch_statistics(tiny_setup):
    from resnet_flax import recalibration

    config, state, images, labels = tiny_setup
    variables = checkpoints.split_state(state)[0]
    indices, mask = input_pipeline.batch_indices(np.arange(14), 8)  # 8 and 6 real examples
    batches = runtime.gather_batches(images, labels, indices, mask, runtime.make_mesh())
    recalibrated = recalibration.make_recalibrate(state.apply_fn)(variables, batches)
    # bn_conv1 sees conv1's output: its statistics per batch, computed directly, then averaged.
    # conv1's output and bias (which BatchNorm adds), captured; their sum is what bn_conv1 sees.
    capture_conv1 = jax.jit(lambda v, x: state.apply_fn(
        v, input_pipeline.normalize(x), train=True, mutable=["batch_stats", "intermediates"],
        capture_intermediates=lambda m, _: m.name == "conv1")[1]["intermediates"]["conv1"]["__call__"][0])

    def conv1(v, x):
        out, bias = capture_conv1(v, x)
        return out + bias

    outputs = [conv1(variables, images[:8]), conv1(variables, images[8:14])]
    expected_mean = np.mean([o.mean(axis=(0, 1, 2)) for o in outputs], axis=0)
    expected_var = np.mean([o.var(axis=(0, 1, 2)) for o in outputs], axis=0)
    np.testing.assert_allclose(recalibrated["batch_stats"]["bn_conv1"]["mean"], expected_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(recalibrated["batch_stats"]["bn_conv1"]["var"], expected_var, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(recalibrated["params"]["conv1"]["kernel"], variables["params"]["conv1"]["kernel"])
