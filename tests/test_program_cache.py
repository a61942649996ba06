"""Exported programs on disk: found again only for the same program, equal to tracing it, and a
damaged file costs a warning, not the run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_equal, needs_deterministic_runs, smoke_config
from resnet_flax import checkpoints, input_pipeline, models, program_cache, runtime, steps, train


def affine(x, w):
    return {"y": jnp.tanh(x @ w), "sum": jnp.sum(x)}


def untraceable(*args):
    raise AssertionError("traced, although a saved program should have been used")


X = jnp.arange(12.0).reshape(3, 4)
W = jnp.ones((4, 2)) / 4


def saved_files(directory):
    return sorted(p.name for p in directory.glob("*.jaxexport"))


def test_a_saved_program_is_used_instead_of_tracing(tmp_path):
    config = smoke_config()
    first = program_cache.for_config(config, tmp_path).compile("affine", affine, X, W)(X, W)
    assert len(saved_files(tmp_path / "exported_programs")) == 1
    # A new process would build a new cache object: it must not need the Python function.
    again = program_cache.for_config(config, tmp_path).compile("affine", untraceable, X, W)(X, W)
    assert_trees_equal(first, again)
    assert_trees_equal(first, jax.jit(affine)(X, W))


@pytest.mark.parametrize("change", ["config", "host-only field", "shape", "extra"])
def test_the_key_covers_what_shapes_the_program(tmp_path, change):
    config, args, extra = smoke_config(), (X, W), None
    program_cache.for_config(config, tmp_path).exported("affine", affine, *args)
    if change == "config":
        config.learning_rate *= 2
    elif change == "host-only field":
        config.data_dir = "/somewhere/else"  # where the data is does not change the program
    elif change == "shape":
        args = (X[:2], W)
    else:
        extra = {"steps_per_epoch": 7}
    program_cache.for_config(config, tmp_path).exported("affine", affine, *args, extra=extra)
    expected = 1 if change == "host-only field" else 2
    assert len(saved_files(tmp_path / "exported_programs")) == expected


def test_a_damaged_file_is_traced_again_with_a_warning(tmp_path, capsys):
    config = smoke_config()
    program_cache.for_config(config, tmp_path).exported("affine", affine, X, W)
    (saved,) = (tmp_path / "exported_programs").glob("*.jaxexport")
    saved.write_bytes(saved.read_bytes()[:100])  # a truncated write, say
    result = program_cache.for_config(config, tmp_path).compile("affine", affine, X, W)(X, W)
    assert "cannot read the saved program" in capsys.readouterr().err
    assert_trees_equal(result, jax.jit(affine)(X, W))
    # ...and the file is whole again for the next run.
    program_cache.for_config(config, tmp_path).compile("affine", untraceable, X, W)


def test_without_a_directory_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    program_cache.for_config(smoke_config(), None).compile("affine", affine, X, W)
    assert not list(tmp_path.rglob("*.jaxexport"))


@needs_deterministic_runs
def test_a_warm_start_equals_a_traced_one_without_tracing_the_model(tmp_path, signs_dir, monkeypatch):
    """train.start_training twice on one cache: the second builds the same state and training
    chunk from the saved programs (model.init and train_step replaced by functions that fail)."""
    config = smoke_config(batch_size=8)
    mesh = runtime.make_mesh()
    split = input_pipeline.load_h5_split(signs_dir / "train_signs.h5", "train", 6)
    indices, mask = input_pipeline.batch_indices(input_pipeline.epoch_order(0, 1, 16), 8)
    batches = runtime.gather_batches(split.images, split.labels, indices, mask, mesh)

    def start_and_run(model):
        state, train_chunk, _ = train.start_training(
            config, model, 10, len(indices), mesh, program_cache.for_config(config, tmp_path))
        fresh = jax.device_get(checkpoints.split_state(state))  # the chunk donates the state's buffers
        after, sums = train_chunk(state, batches, runtime.replicated_scalar(np.int32(len(indices)), mesh))
        return fresh, (jax.device_get(checkpoints.split_state(after)), sums)

    model = models.model_from_config(config)
    cold_state, (cold_after, cold_sums) = start_and_run(model)
    assert {name.split("-")[0] for name in saved_files(tmp_path / "exported_programs")} == {
        "init_variables", "train_chunk"}

    monkeypatch.setattr(models.ResNet, "init", untraceable)
    monkeypatch.setattr(steps, "train_step", untraceable)
    warm_state, (warm_after, warm_sums) = start_and_run(models.model_from_config(config))
    assert_trees_equal(cold_state, warm_state)
    assert_trees_equal(cold_after, warm_after)
    assert_trees_equal(cold_sums, warm_sums)
    assert int(warm_after[1]["step"]) == len(indices) and np.all(np.isfinite(warm_sums["loss_sum"]))
