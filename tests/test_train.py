"""Training end to end on the smoke config, determinism, masking, and the compiled steps."""

import functools
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (REPO, assert_states_close, assert_trees_equal, checkpoint_trees, needs_deterministic_runs,
                      smoke_config, write_signs_h5)
from resnet_flax import config as config_lib
from resnet_flax import conv, input_pipeline, models, program_cache, runtime, train
from resnet_flax.errors import UserError


@pytest.fixture(scope="module")
def smoke_runs(smoke_run, tmp_path_factory):
    """configs/smoke.py trained twice from scratch in separate workdirs."""
    workdir = tmp_path_factory.mktemp("second")
    return [smoke_run, (workdir, train.train_and_evaluate(smoke_config(), workdir))]


def test_smoke_run_writes_every_output(smoke_runs):
    workdir, summary = smoke_runs[0]
    config = smoke_config()
    assert json.loads((workdir / "config.json").read_text())["model"] == "resnet_tiny"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, config.num_epochs + 1))
    for record in records:
        assert set(record) == {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                               "seconds", "images_per_second"}
        assert 0 <= record["train_accuracy"] <= 1 and np.isfinite(record["train_loss"])
    saved = json.loads((workdir / "summary.json").read_text())
    assert saved == summary
    assert saved["steps"] == config.num_epochs * 17  # 1080 = 16 x 64 + 56: the partial batch counts
    assert saved["test_accuracy"] == records[-1]["test_accuracy"]
    # BatchNorm re-estimation (configured in smoke.py) is reported beside the plain result.
    assert saved["bn_recalibration_batches"] == 17
    assert 0 <= saved["recalibrated_test_accuracy"] <= 1 and saved["recalibrated_test_loss"] != saved["test_loss"]
    assert saved["train_loss"] == records[-1]["train_loss"]
    assert len(saved["epoch_seconds"]) == config.num_epochs and saved["compile_seconds"] > 0
    assert saved["backend"] == jax.default_backend() and saved["device_count"] == jax.device_count()
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    # Each test example is counted exactly once: accuracy is a multiple of 1/120.
    assert abs(saved["test_accuracy"] * 120 - round(saved["test_accuracy"] * 120)) < 1e-9


@needs_deterministic_runs
def test_same_config_and_seed_give_identical_metrics(smoke_runs):
    (dir_a, a), (dir_b, b) = smoke_runs
    timing = {"epoch_seconds", "compile_seconds", "images_per_second"}
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_second")}
                          for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert strip(dir_a) == strip(dir_b)
    assert_trees_equal(checkpoint_trees(dir_a), checkpoint_trees(dir_b))  # bitwise on one machine


# ---------------------------------------------------------------------------------------------
# The steps, on a tiny model and a handful of real images


@pytest.fixture(scope="module")
def tiny_setup(signs_dir):
    config = smoke_config(batch_size=8)
    split = input_pipeline.load_h5_split(signs_dir / "train_signs.h5", "train", 6)
    model = models.create_model(config.model, num_classes=6, conv_impl="xla")
    state = train.create_train_state(config, model, steps_per_epoch=10)
    return config, state, split.images[:40], split.labels[:40]


def batch_of(images, labels, indices, mask=None):
    mask = np.ones(len(indices), bool) if mask is None else mask
    return {"image": jnp.asarray(images[indices]), "label": jnp.asarray(labels[indices]),
            "mask": jnp.asarray(mask)}


def test_loss_goes_down_on_a_fixed_batch(tiny_setup):
    config, state, images, labels = tiny_setup
    step = jax.jit(lambda s, b: train.train_step(s, b, jax.random.key(0), num_classes=6))
    batch = batch_of(images, labels, np.arange(16))
    losses = []
    for _ in range(15):
        state, sums = step(state, batch)
        losses.append(float(sums["loss_sum"] / sums["count"]))
    assert losses[-1] < 0.5 * losses[0], losses


def test_padded_batch_trains_exactly_like_the_real_examples_alone(tiny_setup):
    _, state, images, labels = tiny_setup
    step = jax.jit(lambda s, b: train.train_step(s, b, jax.random.key(0), num_classes=6))
    real = np.arange(6)
    padded = np.concatenate([real, [30, 31]])  # two real-looking padding examples
    mask = np.array([True] * 6 + [False] * 2)
    state_real, sums_real = step(state, batch_of(images, labels, real))
    state_padded, sums_padded = step(state, batch_of(images, labels, padded, mask))
    assert float(sums_padded["count"]) == 6
    np.testing.assert_allclose(sums_padded["loss_sum"], sums_real["loss_sum"], rtol=1e-5)
    assert_states_close(state_real, state_padded)


def test_evaluation_of_a_partial_last_batch_equals_unpadded(tiny_setup):
    config, state, images, labels = tiny_setup
    evaluate = train.make_evaluate(state.apply_fn, num_classes=6)
    variables = train.split_state(state)[0]
    # 30 examples in batches of 8: the last of four batches holds 6 real examples and 2 padding.
    mesh = runtime.make_mesh()
    indices, mask = input_pipeline.batch_indices(np.arange(30), 8)
    padded = train.summarize(evaluate(variables, runtime.gather_batches(images, labels, indices, mask, mesh)))
    indices, mask = input_pipeline.batch_indices(np.arange(30), 10)  # 3 full batches, no padding
    assert mask.all()
    unpadded = train.summarize(evaluate(variables, runtime.gather_batches(images, labels, indices, mask, mesh)))
    assert padded["count"] == unpadded["count"] == 30
    assert padded["accuracy"] == unpadded["accuracy"]
    np.testing.assert_allclose(padded["loss"], unpadded["loss"], rtol=1e-6)


@pytest.fixture
def tiny_products_and_batches(signs_dir):
    """resnet_tiny with its convolutions as matrix products ('auto': winograd on CPU), its
    variables, and 3 test batches of 8."""
    split = input_pipeline.load_h5_split(signs_dir / "test_signs.h5", "test", 6)
    model = models.create_model("resnet_tiny", num_classes=6, conv_impl="auto")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    indices, mask = input_pipeline.batch_indices(np.arange(24), 8)
    batches = runtime.gather_batches(split.images, split.labels, indices, mask, runtime.make_mesh())
    return model, variables, batches


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU options")
def test_evaluation_is_compiled_with_its_own_xla_options(tiny_products_and_batches, tmp_path):
    """On CPU the evaluation program keeps its products off YNNPACK (runtime.py says why), both as
    ``make_evaluate`` compiles it and as a run compiles it from its exported form, and its sums
    equal batch-by-batch evaluation compiled with XLA's defaults up to rounding."""
    model, variables, batches = tiny_products_and_batches
    assert runtime.evaluation_compiler_options() == {"xla_cpu_experimental_ynn_fusion_type": ""}
    direct = train.evaluation_program(model.apply, 6).lower(variables, batches).compile()
    programs = program_cache.ProgramCache(tmp_path, "key")
    exported = programs.compile("evaluate", train.evaluate_batches(model.apply, 6), variables, batches,
                                compiler_options=runtime.evaluation_compiler_options())
    defaults = jax.jit(functools.partial(train.eval_step, model.apply, num_classes=6))
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
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
    sums, kernels = jax.device_get(train.evaluation_program(model.apply, 6)(variables, batches))
    derived = kernels[conv.INFERENCE_KERNELS]
    assert {name: len(layer[next(iter(layer))]["kernel"]) for name, layer in derived.items()} == {
        "block2a": 9, "block3a": 9}  # the 3x3 'same' layers, as taps; the rest derive nothing

    by_batch = [train.eval_step(model.apply, variables, jax.tree.map(lambda a, i=i: a[i], batches), num_classes=6)
                for i in range(3)]
    expected = jax.tree.map(lambda *sums: sum(float(s) for s in sums), *by_batch)
    assert sums["count"] == expected["count"] == 24 and sums["correct"] == expected["correct"]
    np.testing.assert_allclose(sums["loss_sum"], expected["loss_sum"], rtol=1e-5)


def test_evaluation_keeps_winograd_kernels_out_of_its_scratch_buffer(tiny_products_and_batches):
    """The scratch buffer XLA allocates per call of the evaluation is smaller by at least the
    Winograd kernels' size than that of the same evaluation deriving them in its loop over batches
    (from which XLA hoists them into that buffer)."""
    model, variables, batches = tiny_products_and_batches
    evaluation = train.evaluation_program(model.apply, 6)
    program = evaluation.lower(variables, batches).compile()
    derived = jax.eval_shape(evaluation, variables, batches)[1][conv.INFERENCE_KERNELS]
    assert set(derived) == {"block2a", "block3a"}  # 15x15 and 8x8 maps: F(4x4, 3x3) kernels
    in_loop = jax.jit(lambda v, b: train._scan_batches(
        lambda v, b: (v, train.eval_step(model.apply, v, b, num_classes=6)), v, b)[1],
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
        sums = train.summarize(train.make_evaluate(model.apply, 6)(variables, batches))
        assert sums["count"] == 24 and np.isfinite(sums["loss"])
    finally:
        runtime.evaluation_compiler_options.cache_clear()


@pytest.mark.parametrize("conv_impl", ["gemm", "winograd"])
def test_training_step_updates_conv_kernels_in_place(conv_impl):
    """XLA must not copy the donated kernels each step (conv.patches_times_kernel and
    winograd.conv3x3_same order the input gradient's read of a kernel before the optimizer
    overwrites it)."""
    config = smoke_config(batch_size=4)
    model = models.create_model(config.model, num_classes=6, conv_impl=conv_impl)
    state = train.create_train_state(config, model, steps_per_epoch=10)
    batch = {"image": jnp.zeros((4, 64, 64, 3), jnp.uint8), "label": jnp.zeros((4,), jnp.int32),
             "mask": jnp.ones((4,), bool)}
    step = jax.jit(lambda s, b: train.train_step(s, b, jax.random.key(0), num_classes=6), donate_argnums=0)
    hlo = step.lower(state, batch).compile().as_text()
    kernel_shapes = {",".join(map(str, k.shape)) for k in jax.tree.leaves(state.params) if k.ndim == 4}
    copied = set(re.findall(r"= f32\[([\d,]+)\]\S* copy\(", hlo))
    assert len(kernel_shapes) >= 4
    assert not copied & kernel_shapes, f"kernels copied each step: {sorted(copied & kernel_shapes)}"


def test_chunk_equals_the_per_step_loop(tiny_setup):
    config, state, images, labels = tiny_setup
    indices, mask = input_pipeline.batch_indices(input_pipeline.epoch_order(0, 1, 36), 8)  # 4 + 4/8
    rng = jax.random.key(0)
    step = jax.jit(lambda s, b: train.train_step(s, b, rng, num_classes=6))
    looped, loop_sums = state, []
    for idx, m in zip(indices, mask):
        looped, sums = step(looped, batch_of(images, labels, idx, m))
        loop_sums.append(sums)
    chunk = train.make_train_chunk(config)
    batches = runtime.gather_batches(images, labels, indices, mask, runtime.make_mesh())
    scanned, scan_sums = chunk(jax.tree.map(jnp.copy, state), batches)
    assert int(scanned.step) == int(looped.step) == 5
    # Five Adam steps move weights by up to 5e-3; rounding differences of the two programs show
    # up at 1e-5 in weights whose gradient is near zero (Adam divides by its size).
    assert_states_close(looped, scanned, atol=5e-5)
    total = {k: sum(float(s[k]) for s in loop_sums) for k in scan_sums}
    np.testing.assert_allclose([float(scan_sums[k]) for k in total], list(total.values()), rtol=1e-5)


def test_a_short_chunk_runs_only_its_steps(tiny_setup):
    """One compiled chunk of 5 batches, told to run 2: the state and sums of those 2 steps alone
    (the 3 batches after them hold other examples, which would change both)."""
    config, state, images, labels = tiny_setup
    indices, mask = input_pipeline.batch_indices(input_pipeline.epoch_order(0, 1, 36), 8)
    mesh = runtime.make_mesh()
    chunk = train.make_train_chunk(config)
    whole = runtime.gather_batches(images, labels, indices, mask, mesh)
    first_two = runtime.gather_batches(images, labels, indices[:2], mask[:2], mesh)
    short, short_sums = chunk(jax.tree.map(jnp.copy, state), whole, np.int32(2))
    alone, alone_sums = chunk(jax.tree.map(jnp.copy, state), first_two)
    assert int(short.step) == int(alone.step) == 2
    assert_states_close(alone, short, atol=1e-6)
    assert float(short_sums["count"]) == 16
    np.testing.assert_allclose(float(short_sums["loss_sum"]), float(alone_sums["loss_sum"]), rtol=1e-6)


@pytest.mark.parametrize("steps, limit, first, lengths", [
    (34, 16, None, [12, 11, 11]),
    (34, 16, 1, [1, 11, 11, 11]),
    (34, 17, None, [17, 17]),
    (17, 17, 1, [1, 16]),
    (5, 1, None, [1, 1, 1, 1, 1]),
    (1, 16, 1, [1]),
])
def test_chunk_lengths_cover_the_epoch_in_near_equal_calls(steps, limit, first, lengths):
    assert train.chunk_lengths(steps, limit, first) == lengths


def test_nan_loss_stops_training(tmp_path):
    config = smoke_config(learning_rate=1e38, num_epochs=1)  # weights overflow float32
    with pytest.raises(train.TrainingDiverged, match=r"training diverged: the loss is (nan|inf) in epoch 1"):
        train.train_and_evaluate(config, tmp_path)


# ---------------------------------------------------------------------------------------------
# Bad config values and bad data stop the command line with one clear line


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


def run_main(*args, env=None):
    return subprocess.run([sys.executable, "-m", "resnet_flax.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)


def test_command_line_reports_bad_input_in_one_line(tmp_path):
    """A bad override, a missing data directory and corrupt data: one line each, exit status 1."""
    bad_h5 = write_signs_h5(tmp_path / "bad", train_set_x=np.zeros((48, 64, 64), np.uint8))
    cases = [
        (["--config.model=resnet51"], "config.model: unknown model 'resnet51'"),
        (["--config.batch_size=-4"], "config.batch_size must be in [1, 1080]"),
        ([f"--config.data_dir={tmp_path / 'missing'}"], f"config.data_dir={tmp_path / 'missing'}"),
        ([f"--config.data_dir={bad_h5}"], "train_signs.h5: images must have shape (N, 64, 64, 3)"),
    ]
    for overrides, message in cases:
        result = run_main("--config=configs/smoke.py", f"--workdir={tmp_path / 'run'}", *overrides)
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: "), result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr


def test_batchnorm_recalibration_averages_exact_batch_statistics(tiny_setup):
    from resnet_flax import recalibration

    config, state, images, labels = tiny_setup
    variables = train.split_state(state)[0]
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


def test_sweep_runs_each_setting_once_and_tabulates(tmp_path):
    from resnet_flax import sweep
    from resnet_flax.config import load_config_module

    module = load_config_module(REPO / "configs" / "sweeps" / "smoke.py")
    settings = module.get_sweep()
    assert settings == [{"learning_rate": 1e-3, "batch_size": 64}, {"learning_rate": 3e-3, "batch_size": 64}]
    logged = []
    rows = sweep.run_sweep(module.get_config(), settings, tmp_path, log=logged.append)
    sweep.write_results(rows, tmp_path, "smoke")
    assert [r["learning_rate"] for r in rows] == [1e-3, 3e-3]
    assert all(r["epochs"] == 1 and 0 <= r["test_accuracy"] <= 1 for r in rows)
    assert rows[0]["test_accuracy"] != rows[1]["test_accuracy"] or rows[0]["test_loss"] != rows[1]["test_loss"]
    table = (tmp_path / "results.md").read_text()
    assert "learning_rate" in table and table.count("\n| 00") == 2
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    # A second invocation (a restarted sweep) skips what finished and reports the same rows.
    again = sweep.run_sweep(module.get_config(), settings, tmp_path, log=logged.append)
    assert again == rows and sum("skipped" in line for line in logged) == 2
    with pytest.raises(UserError, match="'learning_rat' is not a config field"):
        sweep.run_sweep(module.get_config(), [{"learning_rat": 1.0}], tmp_path / "bad")


def test_sweep_building_blocks():
    from resnet_flax.sweep import product, sweep, zip_sweeps

    assert product(sweep("a", [1, 2]), sweep("b", [3])) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    assert zip_sweeps(sweep("a", [1, 2]), sweep("b", [3, 4])) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    with pytest.raises(UserError):
        zip_sweeps(sweep("a", [1, 2]), sweep("b", [3]))
