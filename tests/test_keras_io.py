"""Keras interoperability: the assignment's Keras ResNet-50 (Keras 3 on JAX) against ours.

The Keras model is built once per module, exactly as in section 4 of the assignment, with random
BatchNorm statistics and biases so that every mapped number matters. It is saved in each format
:func:`load_keras_weights` reads; the imports must hold Keras's numbers bit for bit and compute
Keras's activations. Our exports must load into the same Keras model and round-trip exactly.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import functools
import json
import shutil

import h5py
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from keras.layers import Activation, Add, BatchNormalization, MaxPooling2D

from resnet_flax import keras_io, models
from resnet_flax.keras_io.assignment_model import ResNet50
from resnet_flax.errors import UserError

# Keras 3 converts its variables with np.array(x, copy=False)-style calls that numpy 2 flags.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

BLOCKS = ["2a", "2b", "2c", "3a", "3b", "3c", "3d", "4a", "4b", "4c", "4d", "4e", "4f", "5a", "5b", "5c"]
TOLERANCE = 1e-5

# The assignment's Keras model (section 4) lives in resnet_flax/keras_io/assignment_model.py.

# Our ResNet-50's passes, compiled: run op by op, one inference pass takes ~20 s on 2 cores.
OURS = models.ResNet50(num_classes=6)
ours_inference = jax.jit(functools.partial(OURS.apply, train=False))
ours_blocks = jax.jit(functools.partial(OURS.apply, train=False, capture_intermediates=True,
                                        mutable=["intermediates"]))
ours_training = jax.jit(functools.partial(OURS.apply, train=True, mutable=["batch_stats"]))


# --- helpers ----------------------------------------------------------------------------------


def weighted_layers(keras_model):
    return [layer for layer in keras_model.layers if layer.weights]


def keras_weights_by_name(keras_model):
    """{layer name: {keras weight name: array}}."""
    return {
        layer.name: {w.path.rsplit("/", 1)[-1]: np.asarray(w.numpy()) for w in layer.weights}
        for layer in weighted_layers(keras_model)
    }


def ours_as_keras(variables):
    """Our variables as {layer name: {keras weight name: array}} through the documented mapping."""
    out = {}
    for name, path in models.keras_layer_paths(variables).items():
        kind = keras_io.layer_kind(variables, path)
        out[name] = {}
        for keras_name, collection, ours in keras_io.KERAS_WEIGHTS[kind]:
            tree = variables[collection]
            for key in path:
                tree = tree[key]
            out[name][keras_name] = np.asarray(tree[ours])
    return out


def assert_same_weights(expected, actual):
    assert expected.keys() == actual.keys()
    for layer, weights in expected.items():
        assert weights.keys() == actual[layer].keys(), layer
        for name, array in weights.items():
            np.testing.assert_array_equal(actual[layer][name], array, err_msg=f"{layer}/{name}")


def assert_trees_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def max_abs_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def write_keras2_full_model(keras_model, path):
    """The file Keras 2.x's ``model.save('x.h5')`` wrote, made with h5py from ``keras_model``.

    Layout reproduced (keras/engine/saving.py of Keras 2.0-2.3; tf.keras 2.x the same):
      /                       attrs keras_version=b'2.1.6', backend=b'tensorflow',
                              model_config=<JSON bytes>, training_config=<JSON bytes>
      /model_weights          attrs layer_names=[b'input_1', ..., b'fc6'] (every layer, in model
                              order), backend, keras_version
      /model_weights/<layer>  attrs weight_names=[b'<layer>/kernel:0', b'<layer>/bias:0'] or the
                              BatchNorm's gamma, beta, moving_mean, moving_variance; empty for
                              layers without weights
      /model_weights/<layer>/<layer>/kernel:0   the arrays (h5py makes the inner group)
      /optimizer_weights      Adam's state, which an importer must ignore
    All strings are fixed-length bytes, as h5py 2 stored Keras 2's ``str.encode`` values.
    """
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.1.6"
        f.attrs["backend"] = b"tensorflow"
        # A model config that must not be read: it names no real layer class.
        f.attrs["model_config"] = json.dumps({"class_name": "NotARealModel", "config": {}}).encode()
        f.attrs["training_config"] = json.dumps({"optimizer_config": {"class_name": "Adam"}}).encode()
        group = f.create_group("model_weights")
        group.attrs["layer_names"] = np.array([layer.name.encode() for layer in keras_model.layers])
        group.attrs["backend"] = b"tensorflow"
        group.attrs["keras_version"] = b"2.1.6"
        for layer in keras_model.layers:
            layer_group = group.create_group(layer.name)
            names = [f"{layer.name}/{w.path.rsplit('/', 1)[-1]}:0".encode() for w in layer.weights]
            layer_group.attrs["weight_names"] = np.array(names) if names else np.array([])
            for name, weight in zip(names, layer.weights):
                layer_group.create_dataset(name.decode(), data=np.asarray(weight.numpy()))
        optimizer = f.create_group("optimizer_weights")
        optimizer.attrs["weight_names"] = np.array([b"Adam/iterations:0"])
        optimizer.create_dataset("Adam/iterations:0", data=np.int64(42))


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_model():
    keras.utils.set_random_seed(0)
    model = ResNet50(input_shape=(64, 64, 3), classes=6)
    rng = np.random.default_rng(0)
    for layer in weighted_layers(model):
        if isinstance(layer, BatchNormalization):
            n = layer.gamma.shape[0]
            # A smaller gamma on each block's last BatchNorm keeps the residual sums, and with them
            # float32 rounding, of order 1 (activations stay below 5) so 1e-5 is a fair bound.
            gamma = rng.uniform(0.2, 0.6, n) if layer.name.endswith("2c") else rng.uniform(0.5, 1.5, n)
            layer.set_weights([gamma, rng.normal(0.0, 0.2, n), rng.normal(0.0, 0.2, n), rng.uniform(0.5, 1.5, n)])
        else:  # Conv2D and Dense: keep the kernel, give the bias values
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0.0, 0.05, bias.shape)])
    return model


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).uniform(0.0, 1.0, (3, 64, 64, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def keras_files(keras_model, tmp_path_factory):
    """The Keras model saved in every format we read."""
    folder = tmp_path_factory.mktemp("keras")
    files = {
        "keras3_full_h5": folder / "model.h5",
        "keras3_weights_h5": folder / "model.weights.h5",
        "keras3_archive": folder / "model.keras",
        "keras2_full_h5": folder / "keras2_model.h5",
    }
    keras_model.save(files["keras3_full_h5"])
    keras_model.save_weights(files["keras3_weights_h5"])
    keras_model.save(files["keras3_archive"])
    write_keras2_full_model(keras_model, files["keras2_full_h5"])
    return files


@pytest.fixture(scope="module")
def imported(keras_files):
    return keras_io.load_keras_weights(keras_files["keras3_weights_h5"])


@pytest.fixture(scope="module")
def flax_variables():
    """ResNet-50 variables of our own, unlike the Keras model's, for the export tests: Glorot-uniform
    kernels and random biases and statistics (drawn with numpy: running ``init`` eagerly is slow)."""
    rng = np.random.default_rng(2)

    def draw(path, spec):
        name = path[-1].key
        if name == "kernel":
            fan_in, fan_out = np.prod(spec.shape[:-1]), spec.shape[-1] * np.prod(spec.shape[:-2])
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            return jnp.asarray(rng.uniform(-limit, limit, spec.shape), jnp.float32)
        if name in ("scale", "var"):
            return jnp.asarray(rng.uniform(0.5, 1.5, spec.shape), jnp.float32)
        return jnp.asarray(rng.normal(0.0, 0.1, spec.shape), jnp.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(draw, keras_io.expected_variables(6))


@pytest.fixture(scope="module")
def exported(flax_variables, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    files = {"weights_h5": folder / "ours.weights.h5", "legacy_h5": folder / "ours.h5"}
    for path in files.values():
        keras_io.save_keras_weights(flax_variables, path)
    return files


# --- import -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["keras3_weights_h5", "keras3_full_h5", "keras3_archive", "keras2_full_h5"])
def test_import_holds_every_keras_weight_exactly(keras_model, keras_files, fmt):
    variables, num_classes = keras_io.load_keras_weights(keras_files[fmt])
    assert num_classes == 6
    assert_same_weights(keras_weights_by_name(keras_model), ours_as_keras(variables))
    expected = keras_io.expected_variables(6)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), variables) == jax.tree.map(
        lambda a: (a.shape, a.dtype), expected
    )


@pytest.mark.slow
def test_keras3_weights_without_layer_names_are_matched_by_position(keras_model, keras_files, imported, tmp_path):
    # Keras 3 releases before the 'name' attribute wrote only class-and-position group names.
    path = tmp_path / "old.weights.h5"
    shutil.copy(keras_files["keras3_weights_h5"], path)
    with h5py.File(path, "r+") as f:
        f.visititems(lambda name, obj: obj.attrs.__delitem__("name") if "name" in obj.attrs else None)
    variables, num_classes = keras_io.load_keras_weights(path)
    assert num_classes == 6
    assert_trees_identical(variables, imported[0])


@pytest.mark.slow
def test_inference_matches_keras_block_by_block(keras_model, imported, images):
    variables, _ = imported
    # The Activation that ends each block is the one fed by an Add.
    ends = [
        layer.output for layer in keras_model.layers
        if isinstance(layer, Activation) and isinstance(layer.input._keras_history[0], Add)
    ]
    assert len(ends) == len(BLOCKS)
    stage1 = next(layer.output for layer in keras_model.layers if isinstance(layer, MaxPooling2D))
    probe = keras.Model(keras_model.input, [stage1, *ends, keras_model.output])
    keras_stage1, *keras_blocks, keras_probs = [np.asarray(a) for a in probe(images, training=False)]

    logits, state = ours_blocks(variables, images)
    inter = state["intermediates"]
    assert max_abs_diff(inter["stage1"][0], keras_stage1) < TOLERANCE
    for block, expected in zip(BLOCKS, keras_blocks):
        ours = inter[f"block{block}"]["__call__"][0]
        assert ours.shape == expected.shape, block
        assert max_abs_diff(ours, expected) < TOLERANCE, block
    assert max_abs_diff(jax.nn.softmax(logits), keras_probs) < TOLERANCE


@pytest.mark.slow
def test_training_forward_pass_matches_keras(keras_model, imported, images):
    variables, _ = imported
    # stateless_call: Keras's training-mode pass without changing the shared model's statistics.
    keras_probs, keras_stats = keras_model.stateless_call(
        [v.value for v in keras_model.trainable_variables],
        [v.value for v in keras_model.non_trainable_variables],
        images,
        training=True,
    )
    logits, updates = ours_training(variables, images)
    assert max_abs_diff(jax.nn.softmax(logits), keras_probs) < TOLERANCE

    # The moving statistics Keras would store after the step equal our updated batch_stats.
    paths = models.keras_layer_paths(variables)
    ours_for = {"moving_mean": "mean", "moving_variance": "var"}
    for variable, value in zip(keras_model.non_trainable_variables, keras_stats):
        layer, name = variable.path.rsplit("/", 1)
        tree = updates["batch_stats"]
        for key in paths[layer]:
            tree = tree[key]
        assert max_abs_diff(tree[ours_for[name]], value) < TOLERANCE, variable.path


# --- export -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "fmt, load_kwargs",
    [("weights_h5", {}), ("legacy_h5", {}), ("legacy_h5", {"by_name": True})],
    ids=["weights_h5", "legacy_h5", "legacy_h5_by_name"],
)
def test_export_loads_into_keras_with_the_same_predictions(
    keras_model, flax_variables, exported, images, fmt, load_kwargs
):
    saved = keras_model.get_weights()
    try:
        keras_model.load_weights(exported[fmt], **load_kwargs)
        assert_same_weights(ours_as_keras(flax_variables), keras_weights_by_name(keras_model))
        keras_probs = keras_model(images, training=False)
    finally:
        keras_model.set_weights(saved)
    logits = ours_inference(flax_variables, images)
    assert max_abs_diff(jax.nn.softmax(logits), keras_probs) < TOLERANCE


@pytest.mark.parametrize("fmt", ["weights_h5", "legacy_h5"])
def test_export_then_import_round_trips_bitwise(flax_variables, exported, fmt):
    variables, num_classes = keras_io.load_keras_weights(exported[fmt])
    assert num_classes == 6
    assert_trees_identical(variables, flax_variables)


@pytest.mark.slow
def test_layer_order_is_the_keras_models(keras_model, flax_variables):
    expected = [layer.name for layer in weighted_layers(keras_model)]
    assert keras_io.keras_layer_order(models.keras_layer_paths(flax_variables)) == expected


def test_export_rejects_an_unknown_suffix_and_foreign_variables(flax_variables, tmp_path):
    with pytest.raises(UserError, match=r"ours\.npz: expected a name ending in \.weights\.h5"):
        keras_io.save_keras_weights(flax_variables, tmp_path / "ours.npz")
    tiny_variables = jax.tree.map(
        lambda s: np.zeros(s.shape, s.dtype), keras_io.expected_variables(6, "resnet_tiny")
    )
    with pytest.raises(UserError, match="not those of resnet50 with fc6"):
        keras_io.save_keras_weights(tiny_variables, tmp_path / "tiny.weights.h5")
    assert not list(tmp_path.iterdir())


# --- bad files --------------------------------------------------------------------------------


def test_a_file_that_is_not_hdf5_is_a_user_error(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_text("not weights")
    with pytest.raises(UserError, match=r"weights\.h5: not an HDF5 file"):
        keras_io.load_keras_weights(path)
    with pytest.raises(UserError, match="no such file"):
        keras_io.load_keras_weights(tmp_path / "absent.h5")
    with h5py.File(tmp_path / "empty.h5", "w"):
        pass
    with pytest.raises(UserError, match=r"empty\.h5: no Keras weights found"):
        keras_io.load_keras_weights(tmp_path / "empty.h5")


def edited_copy(source, destination, edit):
    shutil.copy(source, destination)
    with h5py.File(destination, "r+") as f:
        edit(f)
    return destination


@pytest.mark.slow
def test_a_missing_layer_is_named(keras_files, exported, tmp_path):
    def drop_legacy(f):
        group = f["model_weights"]
        del group["res3b_branch2b"]
        names = [n for n in group.attrs["layer_names"] if n != b"res3b_branch2b"]
        group.attrs["layer_names"] = np.array(names)

    path = edited_copy(keras_files["keras2_full_h5"], tmp_path / "k2.h5", drop_legacy)
    with pytest.raises(UserError, match=r"k2\.h5: missing layers res3b_branch2b for the assignment's resnet50"):
        keras_io.load_keras_weights(path)

    def drop_keras3(f):
        name = next(k for k, g in f["layers"].items() if g["vars"].attrs.get("name") == "bn4f_branch2c")
        del f["layers"][name]

    path = edited_copy(exported["weights_h5"], tmp_path / "k3.weights.h5", drop_keras3)
    with pytest.raises(UserError, match="missing layers bn4f_branch2c"):
        keras_io.load_keras_weights(path)


def test_an_unexpected_layer_is_named(exported, tmp_path):
    def add_layer(f):
        group = f.create_group("res9z_branch2a")
        group.attrs["weight_names"] = np.array([b"res9z_branch2a/kernel:0"])
        group.create_dataset("res9z_branch2a/kernel:0", data=np.zeros((1, 1, 2, 2), np.float32))
        f.attrs["layer_names"] = np.array([*f.attrs["layer_names"], b"res9z_branch2a"])

    path = edited_copy(exported["legacy_h5"], tmp_path / "extra.h5", add_layer)
    with pytest.raises(UserError, match="unexpected layers res9z_branch2a"):
        keras_io.load_keras_weights(path)


def test_a_wrong_shape_is_named(exported, tmp_path):
    def widen_legacy(f):
        del f["res2a_branch2b/res2a_branch2b/kernel:0"]
        f["res2a_branch2b"].create_dataset("res2a_branch2b/kernel:0", data=np.zeros((3, 3, 64, 65), np.float32))

    path = edited_copy(exported["legacy_h5"], tmp_path / "wide.h5", widen_legacy)
    with pytest.raises(UserError, match=r"res2a_branch2b/kernel has shape \(3, 3, 64, 65\), expected \(3, 3, 64, 64\)"):
        keras_io.load_keras_weights(path)

    def widen_keras3(f):
        group = next(g["vars"] for g in f["layers"].values() if g["vars"].attrs.get("name") == "bn_conv1")
        del group["3"]
        group.create_dataset("3", data=np.ones(63, np.float32))

    path = edited_copy(exported["weights_h5"], tmp_path / "wide.weights.h5", widen_keras3)
    with pytest.raises(UserError, match=r"bn_conv1/moving_variance has shape \(63,\), expected \(64,\)"):
        keras_io.load_keras_weights(path)


def test_num_classes_follows_the_file(tmp_path):
    model = models.ResNet50(num_classes=10)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
    keras_io.save_keras_weights(variables, tmp_path / "ten.weights.h5")
    loaded, num_classes = keras_io.load_keras_weights(tmp_path / "ten.weights.h5")
    assert num_classes == 10
    assert loaded["params"]["fc10"]["kernel"].shape == (2048, 10)


def test_theano_era_files_are_refused(exported, tmp_path):
    # Keras 2 flipped Theano-backend kernels when loading them; we refuse rather than misread.
    def theano(f):
        f.attrs["backend"] = b"theano"

    path = edited_copy(exported["legacy_h5"], tmp_path / "theano.h5", theano)
    with pytest.raises(UserError, match=r"theano\.h5: written by Keras 2\.15\.0 with the theano backend"):
        keras_io.load_keras_weights(path)


# --- the command line: Keras file -> checkpoint -> predict/evaluate -> Keras file ---------------


@pytest.mark.slow
def test_import_command_makes_a_checkpoint_that_predicts_like_keras(keras_model, keras_files, tmp_path):
    import subprocess
    import sys

    from conftest import REPO
    from resnet_flax import pretrained
    from resnet_flax.keras_io.__main__ import export_weights

    workdir = tmp_path / "imported"
    result = subprocess.run(
        [sys.executable, "-m", "resnet_flax.keras_io", "import", str(keras_files["keras2_full_h5"]),
         f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    trained = pretrained.load(workdir)
    assert trained.epoch == 0 and trained.config.num_classes == 6
    pixels = np.random.default_rng(3).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    expected = keras_model.predict(pixels.astype(np.float32) / 255.0, verbose=0)
    np.testing.assert_allclose(trained.probabilities(pixels), expected, atol=1e-5)

    again = subprocess.run(
        [sys.executable, "-m", "resnet_flax.keras_io", "import", str(keras_files["keras2_full_h5"]),
         f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "already holds checkpoints" in again.stderr

    out = tmp_path / "back.weights.h5"
    export_weights(workdir, out)
    saved = keras_model.get_weights()
    keras_model.set_weights([np.zeros_like(w) for w in saved])  # what load_weights must overwrite
    try:
        keras_model.load_weights(out)
        again_probs = keras_model.predict(pixels.astype(np.float32) / 255.0, verbose=0)
    finally:
        keras_model.set_weights(saved)
    np.testing.assert_allclose(again_probs, expected, atol=1e-6)
