"""The evaluation program: padding counted out, inference kernels derived up front, its own XLA
options, its scratch buffer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax import checkpoints, evaluation, input_pipeline, models, program_cache, runtime, steps
from resnet_flax.ops import conv


def test_evaluation_of_a_partial_last_batch_equals_unpadded(tiny_setup):
    config, state, images, labels = tiny_setup
    evaluate = evaluation.Evaluator(state.apply_fn, num_classes=6)
    variables = checkpoints.split_state(state)[0]
    # 30 examples in batches of 8: the last of four batches holds 6 real examples and 2 padding.
    mesh = runtime.make_mesh()
    indices, mask = input_pipeline.batch_indices(np.arange(30), 8)
    padded = evaluate(variables, runtime.gather_batches(images, labels, indices, mask, mesh))
    indices, mask = input_pipeline.batch_indices(np.arange(30), 10)  # 3 full batches, no padding
    assert mask.all()
    unpadded = evaluate(variables, runtime.gather_batches(images, labels, indices, mask, mesh))
    assert padded["count"] == unpadded["count"] == 30
    assert padded["accuracy"] == unpadded["accuracy"]
    np.testing.assert_allclose(padded["loss"], unpadded["loss"], rtol=1e-6)


def tiny_variables(model, image_size: int):
    return jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False))()


@pytest.fixture(scope="module")
def tiny_products_and_batches(signs_dir):
    """resnet_tiny with its convolutions as matrix products ('auto': winograd on CPU), its
    variables, and 3 test batches of 8."""
    split = input_pipeline.load_h5_split(signs_dir / "test_signs.h5", "test", 6)
    model = models.create_model("resnet_tiny", num_classes=6, conv_impl="auto")
    variables = tiny_variables(model, 64)
    indices, mask = input_pipeline.batch_indices(np.arange(24), 8)
    batches = runtime.gather_batches(split.images, split.labels, indices, mask, runtime.make_mesh())
    return model, variables, batches


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU options")
def test_evaluation_is_compiled_with_its_own_xla_options(tiny_products_and_batches, tmp_path):
    """On CPU the evaluation program keeps its products off YNNPACK (runtime.py says why), both as
    ``evaluation_program`` compiles it and as a run compiles it from its exported form, and its sums
    equal batch-by-batch evaluation compiled with XLA's defaults up to rounding."""
    model, variables, batches = tiny_products_and_batches
    assert runtime.evaluation_compiler_options() == {"xla_cpu_experimental_ynn_fusion_type": ""}
    direct = evaluation.evaluation_program(model.apply, 6).lower(variables, batches).compile()
    programs = program_cache.ProgramCache(tmp_path, "key")
    exported = programs.compile("evaluate", evaluation.evaluate_batches(model.apply, 6), variables, batches,
                                compiler_options=runtime.evaluation_compiler_options())
    defaults = jax.jit(functools.partial(steps.eval_step, model.apply, num_classes=6))
    assert "ynn_fusion" in defaults.lower(variables, jax.tree.map(lambda a: a[0], batches)).compile().as_text()
    for program in (direct, exported):
        assert "ynn_fusion" not in program.as_text()
    by_batch = [defaults(variables, jax.tree.map(lambda a, i=i: a[i], batches)) for i in range(3)]
    expected = jax.tree.map(lambda *sums: sum(float(s) for s in sums), *by_batch)
    for program in (direct, exported):
        sums = jax.device_get(program(variables, batches)[0])
        assert sums["count"] == expected["count"] == 24 and sums["correct"] == expected["correct"]
        np.testing.assert_allclose(sums["loss_sum"], expected["loss_sum"], rtol=1e-5)


def test_evaluation_derives_inference_kernels_up_front_with_the_layers_results(tiny_products_and_batches):
    """On 16x16 images resnet_tiny's 3x3 convolutions see 3x3 and 2x2 maps: the evaluation program
    derives their per-tap kernels up front, returns them, and its sums equal those of the layers'
    own convolutions (im2col there), batch by batch."""
    model, _, batches = tiny_products_and_batches
    batches = {**batches, "image": batches["image"][:, :, :16, :16]}
    variables = tiny_variables(model, 16)
    sums, kernels = jax.device_get(evaluation.evaluation_program(model.apply, 6)(variables, batches))
    derived = kernels[conv.INFERENCE_KERNELS]
    assert {name: len(layer[next(iter(layer))]["kernel"]) for name, layer in derived.items()} == {
        "block2a": 9, "block3a": 9}  # the 3x3 'same' layers, as taps; the rest derive nothing

    eval_step = jax.jit(functools.partial(steps.eval_step, model.apply, num_classes=6))
    by_batch = [eval_step(variables, jax.tree.map(lambda a, i=i: a[i], batches)) for i in range(3)]
    expected = jax.tree.map(lambda *sums: sum(float(s) for s in sums), *by_batch)
    assert sums["count"] == expected["count"] == 24 and sums["correct"] == expected["correct"]
    np.testing.assert_allclose(sums["loss_sum"], expected["loss_sum"], rtol=1e-5)


@pytest.mark.slow
def test_evaluation_keeps_winograd_kernels_out_of_its_scratch_buffer(tiny_products_and_batches):
    """The scratch buffer XLA allocates per call of the evaluation is smaller by at least the
    Winograd kernels' size than that of the same evaluation deriving them in its loop over batches
    (from which XLA hoists them into that buffer)."""
    model, variables, batches = tiny_products_and_batches
    program_fn = evaluation.evaluation_program(model.apply, 6)
    program = program_fn.lower(variables, batches).compile()
    derived = jax.eval_shape(program_fn, variables, batches)[1][conv.INFERENCE_KERNELS]
    assert set(derived) == {"block2a", "block3a"}  # 15x15 and 8x8 maps: F(4x4, 3x3) kernels
    in_loop = jax.jit(lambda v, b: steps.scan_batches(
        lambda v, b: (v, steps.eval_step(model.apply, v, b, num_classes=6)), v, b)[1],
        compiler_options=runtime.evaluation_compiler_options())
    saved = in_loop.lower(variables, batches).compile().memory_analysis().temp_size_in_bytes - (
        program.memory_analysis().temp_size_in_bytes)
    assert saved >= sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(derived)) > 0


def test_evaluation_compiles_with_defaults_where_xla_rejects_its_options(tiny_products_and_batches, monkeypatch):
    model, variables, batches = tiny_products_and_batches
    monkeypatch.setattr(runtime, "_CPU_EVALUATION_OPTIONS", {"xla_cpu_no_such_option": True})
    runtime.evaluation_compiler_options.cache_clear()
    try:
        assert runtime.evaluation_compiler_options() is None
        sums = evaluation.Evaluator(model.apply, 6)(variables, batches)
        assert sums["count"] == 24 and np.isfinite(sums["loss"])
    finally:
        runtime.evaluation_compiler_options.cache_clear()
