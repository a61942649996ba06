"""Measured convolution kernels (resnet_flax/autotune.py): every candidate computes XLA's
convolution, a plan's kernels are the ones that run, the cache is trusted only when it is sound,
and a run keeps its kernels so that a resume is bit-identical."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_equal, checkpoint_trees, smoke_config, write_signs_h5
from resnet_flax import autotune, evaluation, models, train
from resnet_flax.ops import conv
from resnet_flax.ops.conv_plan import ConvPlan, ConvSpec, layer_spec

# Every convolution shape class of the family's layouts: (input NHWC, kernel HWIO, strides, padding).
SHAPE_CLASSES = {
    "1x1/1": ((2, 6, 6, 8), (1, 1, 8, 12), (1, 1), "VALID"),
    "1x1/2 (assignment's downsampling)": ((2, 7, 7, 8), (1, 1, 8, 12), (2, 2), "VALID"),
    "3x3/1 same on 15x15": ((2, 15, 15, 8), (3, 3, 8, 8), (1, 1), "SAME"),
    "3x3/1 same on 8x8": ((2, 8, 8, 8), (3, 3, 8, 8), (1, 1), "SAME"),
    "3x3/1 same on 7x7": ((2, 7, 7, 8), (3, 3, 8, 8), (1, 1), "SAME"),
    "3x3/1 same on 4x4": ((2, 4, 4, 8), (3, 3, 8, 8), (1, 1), "SAME"),
    "3x3/1 same on 2x2": ((2, 2, 2, 8), (3, 3, 8, 8), (1, 1), "SAME"),
    "3x3/1 same on 1x1": ((2, 1, 1, 8), (3, 3, 8, 8), (1, 1), "SAME"),
    "3x3/1 padding 1 (PyTorch's)": ((2, 8, 8, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1))),
    "3x3/2 padding 1 (torchvision's downsampling)": ((2, 8, 8, 8), (3, 3, 8, 12), (2, 2), ((1, 1), (1, 1))),
    "7x7/2 valid (assignment's stem)": ((2, 22, 22, 3), (7, 7, 3, 8), (2, 2), "VALID"),
    "7x7/2 padding 3 (torchvision's stem)": ((2, 16, 16, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3))),
}
# Error bounds relative to the output's (or gradient's) largest magnitude: F(4x4, 3x3) rounds about
# ten times worse than a direct sum (experiments/winograd_accuracy.md), every other kernel as one.
RELATIVE_ERROR = {"winograd4": 1e-5}
DIRECT_SUM_ERROR = 2e-6


def _cases():
    for name, (x_shape, k_shape, strides, padding) in SHAPE_CLASSES.items():
        pads = conv.explicit_padding(x_shape[1:3], k_shape[:2], strides, padding)
        for kernel in conv.kernel_candidates(k_shape, strides, pads):
            yield pytest.param(x_shape, k_shape, strides, padding, kernel, id=f"{name}-{kernel}")


def _operands(x_shape, k_shape, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32))
    k = jnp.asarray(rng.standard_normal(k_shape, np.float32) / np.sqrt(np.prod(k_shape[:3])))
    return x, k


def _assert_close(actual, expected, bound, what):
    scale = float(jnp.max(jnp.abs(expected)))
    error = float(jnp.max(jnp.abs(actual - expected)))
    assert error <= bound * scale, f"{what}: max error {error:.3g} > {bound} x scale {scale:.3g}"


def test_the_candidates_are_what_each_shape_can_run():
    assert conv.kernel_candidates((3, 3, 8, 8), (1, 1), ((1, 1), (1, 1))) == conv.KERNELS
    for strides, pads in (((2, 2), ((1, 1), (1, 1))), ((1, 1), ((0, 0), (0, 0)))):
        assert conv.kernel_candidates((3, 3, 8, 8), strides, pads) == ("xla", "gemm")
    assert conv.kernel_candidates((1, 1, 8, 8), (1, 1), ((0, 0), (0, 0))) == ("xla", "gemm")
    with pytest.raises(ValueError, match="cannot compute"):
        conv.conv2d(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 1, 2, 2)), (1, 1), "VALID", "winograd4")


@pytest.mark.parametrize("x_shape,k_shape,strides,padding,kernel", list(_cases()))
def test_every_candidate_gives_xlas_outputs_and_gradients(x_shape, k_shape, strides, padding, kernel):
    x, k = _operands(x_shape, k_shape)
    pads = conv.explicit_padding(x_shape[1:3], k_shape[:2], strides, padding)
    bound = RELATIVE_ERROR.get(kernel, DIRECT_SUM_ERROR)

    def loss(convolve):
        dy = jnp.asarray(np.random.default_rng(1).standard_normal(convolve(x, k).shape, np.float32))
        return lambda x, k: jnp.vdot(convolve(x, k), dy)

    def reference(x, k):
        return conv.conv_xla(x, k, strides, pads, "highest")

    def candidate(x, k):
        return conv.conv2d(x, k, strides, padding, kernel, "highest")

    _assert_close(jax.jit(candidate)(x, k), reference(x, k), bound, "output")
    d_candidate = jax.jit(jax.grad(loss(candidate), argnums=(0, 1)))(x, k)
    d_reference = jax.grad(loss(reference), argnums=(0, 1))(x, k)
    _assert_close(d_candidate[0], d_reference[0], bound, "input gradient")
    _assert_close(d_candidate[1], d_reference[1], bound, "kernel gradient")

    # Evaluation's path: the kernel derived once (Winograd's tiles, the taps), then the convolution from it.
    derived = conv.inference_kernel(k, x_shape[1:3], strides, pads, kernel)
    assert (derived is None) == (kernel in ("xla", "gemm"))
    if derived is not None:
        _assert_close(jax.jit(conv.conv2d_inference)(x, derived), reference(x, k), bound, "evaluation output")


def test_spec_keys_round_trip_and_reject_other_text():
    spec = layer_spec("eval", (40, 15, 15, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1)), jnp.float32)
    assert ConvSpec.from_key(spec.key) == spec
    assert spec.static_kernel() == "winograd4"
    for text in ("", "train x1,2,3 k1,1,1,1 s1,1 p0,0,0,0 float32", spec.key + " extra", 7):
        with pytest.raises(ValueError):
            ConvSpec.from_key(text)


@pytest.fixture(scope="module")
def tiny():
    """configs/smoke.py's model and the shapes a run of it trains and evaluates on."""
    config = smoke_config()
    model = models.model_from_config(config)
    return config, model, autotune.run_specs(config, model)


def test_a_models_shapes_are_listed_once_each_per_mode(tiny):
    config, model, specs = tiny
    assert len(specs) == len({s.key for s in specs})
    train_specs = [s for s in specs if s.mode == "train"]
    eval_specs = [s for s in specs if s.mode == "eval"]
    assert [s.input_shape[0] for s in train_specs] == [config.batch_size] * len(train_specs)
    assert [s.input_shape[0] for s in eval_specs] == [config.eval_batch_size] * len(eval_specs)
    assert {s.kernel_shape[:2] for s in specs} == {(7, 7), (1, 1), (3, 3)}
    assert all(s.static_kernel() in s.candidates for s in specs)


def _jaxpr_convolutions(model, variables, images, **apply_kwargs) -> int:
    text = str(jax.make_jaxpr(lambda v, x: model.apply(v, x, **apply_kwargs))(variables, images))
    return text.count("conv_general_dilated")


def test_a_plan_runs_the_kernels_it_names_in_training_and_evaluation(tiny):
    config, model, specs = tiny
    three_by_three = [s for s in specs if s.kernel_shape[:2] == (3, 3)]
    plan = ConvPlan.from_mapping({s.key: "xla" for s in three_by_three})
    images = jnp.zeros((config.batch_size, config.image_size, config.image_size, 3))
    # Shapes only: the jaxprs and the derived kernels' tree say which kernels run.
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images[:1], train=False))
    planned = models.model_from_config(config, conv_plan=plan)
    train_layers = sum(s.mode == "train" for s in three_by_three)
    assert _jaxpr_convolutions(model, variables, images, train=False) == 0
    assert _jaxpr_convolutions(planned, variables, images, train=False) == train_layers

    # Evaluation's model: XLA's convolution leaves those layers without derived kernels.
    eval_images = jnp.zeros((config.eval_batch_size, *images.shape[1:]))
    static = jax.eval_shape(lambda v: evaluation.inference_kernels(model.apply, v, eval_images), variables)
    eval_plan = models.model_from_config(config, conv_plan=plan.in_mode("eval"))
    derived = jax.eval_shape(lambda v: evaluation.inference_kernels(eval_plan.apply, v, eval_images), variables)
    assert len(jax.tree.leaves(derived)) < len(jax.tree.leaves(static))
    # An explicit conv_impl wins over any plan.
    explicit = models.model_from_config(_with(config, conv_impl="gemm"), conv_plan=plan)
    assert _jaxpr_convolutions(explicit, variables, images, train=False) == 0


def _with(config, **overrides):
    config = config.copy_and_resolve_references()
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def test_the_cache_round_trips_per_machine(tmp_path, tiny):
    _, _, specs = tiny
    path = tmp_path / autotune.CACHE_FILE
    chosen = {s.key: {"kernel": s.candidates[-1], "seconds": {s.candidates[-1]: 0.001}} for s in specs}
    autotune.write_choices(path, chosen)
    autotune.write_choices(path, {specs[0].key: {"kernel": "xla", "seconds": {}}}, machine="another CPU")
    assert autotune.read_choices(path) == chosen
    assert autotune.read_choices(path, machine="another CPU") == {specs[0].key: {"kernel": "xla", "seconds": {}}}


@pytest.mark.parametrize("content,message", [
    (b"\x00\x9f garbage", "ignoring the conv kernel cache"),
    (b'{"format": "something else", "machines": {}}', "not a resnet_flax conv kernel file"),
    (b"[1, 2, 3]", "not a resnet_flax conv kernel file"),
])
def test_a_corrupt_cache_is_ignored_with_a_warning(tmp_path, capsys, content, message):
    path = tmp_path / autotune.CACHE_FILE
    path.write_bytes(content)
    assert autotune.read_choices(path) == {}
    assert message in capsys.readouterr().err


def test_a_foreign_cache_is_ignored_with_a_warning(tmp_path, capsys, tiny):
    _, _, specs = tiny
    path = tmp_path / autotune.CACHE_FILE
    autotune.write_choices(path, {specs[0].key: {"kernel": "xla"}}, machine="a CPU that is not this one")
    assert autotune.read_choices(path) == {}
    assert "other machines only" in capsys.readouterr().err


def test_entries_that_name_a_kernel_their_shape_cannot_run_are_never_used(tmp_path, capsys, tiny):
    _, _, specs = tiny
    stem, one_by_one, three_by_three = (next(s for s in specs if s.kernel_shape[0] == k) for k in (7, 1, 3))
    path = tmp_path / autotune.CACHE_FILE
    autotune.write_choices(path, {one_by_one.key: {"kernel": "winograd4"}, stem.key: {"kernel": "xla"},
                                  "not a key": {"kernel": "gemm"}, three_by_three.key: "gemm"})
    assert autotune.read_choices(path) == {stem.key: {"kernel": "xla"}}
    assert "ignoring 3 entries" in capsys.readouterr().err


def test_a_plan_comes_from_the_cache_and_a_resumed_run_keeps_its_own(tmp_path, tiny):
    config, model, specs = tiny
    cache = tmp_path / "cache"
    workdir = tmp_path / "run"
    workdir.mkdir()
    first = {s.key: {"kernel": "xla"} for s in specs}
    autotune.write_choices(autotune.cache_path(cache), first)
    plan, record = autotune.plan_for_run(config, model, workdir, False, cache)
    assert plan.as_dict() == {key: "xla" for key in first}
    assert record["source"].startswith(f"measured ({len(specs)} of {len(specs)} shapes)")
    saved = json.loads((workdir / autotune.CACHE_FILE).read_text())
    assert saved["kernels"] == record["kernels"] and saved["machine"] == autotune.machine_key()

    # Measured again in between: a resume keeps what the run began with, a fresh run takes the new.
    autotune.write_choices(autotune.cache_path(cache), {s.key: {"kernel": "gemm"} for s in specs})
    resumed, record = autotune.plan_for_run(config, model, workdir, True, cache)
    assert resumed.as_dict() == plan.as_dict() and record["source"].startswith("the run's own")
    fresh, _ = autotune.plan_for_run(config, model, tmp_path / "run", False, cache)
    assert set(fresh.as_dict().values()) == {"gemm"}

    # Without a cache, or with an explicit conv_impl: the static rule, its shapes listed when asked.
    plan, record = autotune.plan_for_run(config, model, tmp_path, False, None)
    assert len(plan) == 0 and record["kernels"] == {}
    plan, record = autotune.plan_for_run(config, model, tmp_path, False, None, list_kernels=True)
    assert len(plan) == 0 and record["kernels"] == {s.key: s.static_kernel() for s in specs}
    plan, record = autotune.plan_for_run(_with(config, conv_impl="gemm"), model, tmp_path, False, cache)
    assert plan is None and "not measured" in record["source"]


def test_tuning_measures_each_missing_shape_once_and_keeps_the_fastest(tmp_path, monkeypatch):
    config = _with(smoke_config(), compilation_cache_dir=str(tmp_path), batch_size=8, eval_batch_size=8,
                   image_size=32)
    measured = []
    original = autotune.measure

    def counting(spec, *args, **kwargs):
        measured.append(spec.key)
        return original(spec, *args, **kwargs)

    monkeypatch.setattr(autotune, "measure", counting)
    choices = autotune.tune(config, log=lambda line: None)
    specs = autotune.run_specs(config, models.model_from_config(config))
    assert sorted(measured) == sorted(s.key for s in specs) == sorted(choices)
    for spec in specs:
        assert set(choices[spec.key]["seconds"]) == set(spec.candidates)
    # Per mode, the whole-program check keeps every proposal (the fastest alone) or none of them.
    for mode in ("train", "eval"):
        mode_specs = [s for s in specs if s.mode == mode]
        kept = [choices[s.key]["kernel"] == autotune.fastest(s, choices[s.key]["seconds"]) for s in mode_specs]
        static = [choices[s.key]["kernel"] == s.static_kernel() for s in mode_specs]
        assert all(kept) or all(static), mode
    assert autotune.read_choices(autotune.cache_path(tmp_path)) == choices
    measured.clear()
    assert autotune.tune(config, log=lambda line: None) == choices and measured == []


def test_the_static_rule_stays_unless_a_kernel_is_clearly_faster():
    spec = layer_spec("train", (32, 8, 8, 128), (3, 3, 128, 128), (1, 1), ((1, 1), (1, 1)), "float32")
    assert autotune.fastest(spec, {"winograd4": 1.0, "gemm": 0.97}) == "winograd4"
    assert autotune.fastest(spec, {"winograd4": 1.0, "gemm": 0.9}) == "gemm"


@pytest.mark.slow
def test_a_run_records_its_kernels_and_a_resume_after_retuning_is_bit_identical(tmp_path):
    """Two epochs straight, against one epoch, the cache changed, then the second epoch resumed."""
    data = write_signs_h5(tmp_path / "data")
    cache = tmp_path / "cache"
    config = smoke_config(data_dir=str(data), compilation_cache_dir=str(cache), bn_recalibration_batches=0,
                          batch_size=16, eval_batch_size=12)
    specs = autotune.run_specs(config, models.model_from_config(config))
    # Kernels other than the static rule's, so that the choice shows in the numbers.
    chosen = {s.key: {"kernel": next(k for k in s.candidates if k != s.static_kernel())} for s in specs}
    autotune.write_choices(autotune.cache_path(cache), chosen)

    straight = train.train_and_evaluate(config, tmp_path / "straight")
    assert straight["conv_kernels"]["kernels"] == {key: entry["kernel"] for key, entry in chosen.items()}
    assert straight["conv_kernels"]["source"].startswith("measured")

    train.train_and_evaluate(_with(config, num_epochs=1), tmp_path / "resumed")
    autotune.write_choices(autotune.cache_path(cache), {s.key: {"kernel": s.static_kernel()} for s in specs})
    resumed = train.train_and_evaluate(config, tmp_path / "resumed")
    assert resumed["conv_kernels"]["source"].startswith("the run's own")
    assert_trees_equal(checkpoint_trees(tmp_path / "resumed"), checkpoint_trees(tmp_path / "straight"))
    assert resumed["test_loss"] == straight["test_loss"]


def test_verbose_lists_every_layer_shape_with_its_kernel(tmp_path, tiny):
    config, model, specs = tiny
    _, record = autotune.plan_for_run(config, model, tmp_path, False, None, list_kernels=True)
    lines = autotune.describe_plan(record).splitlines()
    assert lines[0].startswith("conv kernels: static rule") and len(lines) == 1 + len(specs)
    for line, spec in zip(lines[1:], specs):
        assert spec.describe() in line and line.split()[-1] == spec.static_kernel()
