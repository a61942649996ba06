"""Shared fixtures: the real SIGNS data next to the repository, small configs, and h5 writers."""

import os
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax import input_pipeline
from resnet_flax.config import default_config, load_config_file

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (compiled-program checks, the real ResNet-50); "
                          ".ci/run does")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` are deselected unless ``--run-slow`` is given."""
    if config.getoption("--run-slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(scope="session")
def signs_dir() -> Path:
    """The SIGNS h5 files as a fresh clone finds them (../shared/data/signs)."""
    return input_pipeline.find_data_dir(str(input_pipeline.DEFAULT_SEARCH_PATH[-1]))


@pytest.fixture(scope="session")
def signs_jpg_dir(signs_dir) -> Path:
    return signs_dir.parent / "signs_jpg"


def smoke_config(**overrides):
    """configs/smoke.py with overrides: the tiny ResNet the training tests run."""
    config = load_config_file(REPO / "configs" / "smoke.py")
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def write_signs_h5(directory: Path, num_train=48, num_test=12, size=64, seed=0, **tamper):
    """A small SIGNS-layout pair of h5 files; ``tamper`` replaces or drops datasets by key."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", num_train), ("test", num_test)):
        data = {
            f"{split}_set_x": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            f"{split}_set_y": rng.integers(0, 6, n).astype(np.int64),
            "list_classes": np.arange(6),
        }
        for key, value in tamper.items():
            if key in data:
                data[key] = value
        with h5py.File(directory / f"{split}_signs.h5", "w") as f:
            for key, value in data.items():
                if value is not None:
                    f[key] = value
    return directory


@pytest.fixture
def config():
    return default_config()


def assert_states_close(a, b, rtol=1e-4, atol=1e-6):
    """Params and batch statistics of two train states agree, conv biases included: BatchNorm
    takes them in with an exactly zero gradient (resnet_flax/ops/batchnorm.py), so they stay equal."""

    def leaves(state):
        flat = jax.tree_util.tree_leaves_with_path({"params": state.params, "batch_stats": state.batch_stats})
        return {jax.tree_util.keystr(path): leaf for path, leaf in flat}

    leaves_a, leaves_b = leaves(a), leaves(b)
    assert leaves_a.keys() == leaves_b.keys() and len(leaves_a) > 20
    for name in leaves_a:
        np.testing.assert_allclose(leaves_a[name], leaves_b[name], rtol=rtol, atol=atol, err_msg=name)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """configs/smoke.py trained once for the session: (workdir, summary). Tests must not modify
    the workdir; copy it first."""
    from resnet_flax import train

    workdir = tmp_path_factory.mktemp("smoke_run")
    return workdir, train.train_and_evaluate(smoke_config(), workdir)


def checkpoint_trees(workdir, epoch=None):
    """(variables, optimizer) of a checkpoint as NumPy trees, restored without a model onto this
    process's first device, whatever devices wrote it."""
    import orbax.checkpoint as ocp

    from resnet_flax import checkpoints

    root = checkpoints.checkpoint_root(workdir)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with checkpoints._manager(root, read_only=True) as manager:
        epoch = manager.latest_step() if epoch is None else epoch
        metadata = manager.item_metadata(epoch)
        target = {item: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                     dict(metadata[item]))
                  for item in ("variables", "optimizer")}
        restored = manager.restore(epoch, args=ocp.args.Composite(
            **{item: ocp.args.StandardRestore(tree) for item, tree in target.items()}))
    return jax.tree.map(np.asarray, dict(restored["variables"])), jax.tree.map(np.asarray, dict(restored["optimizer"]))


def assert_trees_equal(a, b):
    """Bitwise: same structure, same values."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def _gpu_runs_are_deterministic() -> bool:
    """On an H200 two runs agreed only with both flags (experiments/gpu/determinism_h200.txt)."""
    flags = os.environ.get("XLA_FLAGS", "")
    return "--xla_gpu_autotune_level=0" in flags and (
        "--xla_gpu_deterministic_ops=true" in flags or "--xla_gpu_exclude_nondeterministic_ops=true" in flags)


# For tests that compare two computations bit for bit.
needs_deterministic_runs = pytest.mark.skipif(
    jax.default_backend() == "gpu" and not _gpu_runs_are_deterministic(),
    reason="XLA's GPU kernels are not run-to-run deterministic by default; set XLA_FLAGS="
           "'--xla_gpu_deterministic_ops=true --xla_gpu_autotune_level=0' (README, 'On a GPU')")


@pytest.fixture(scope="session")
def tiny_setup(signs_dir):
    """(config, train state, images, labels): resnet_tiny with XLA's convolutions and 40 SIGNS
    training images, for the tests of single steps. Shared: tests must not donate the state."""
    from resnet_flax import models, steps

    config = smoke_config(batch_size=8)
    split = input_pipeline.load_h5_split(signs_dir / "train_signs.h5", "train", 6)
    model = models.create_model(config.model, num_classes=6, conv_impl="xla")
    state = steps.create_train_state(config, model, steps_per_epoch=10)
    return config, state, split.images[:40], split.labels[:40]


def random_variables(model, image_size: int, seed: int = 0, bn_scale=(0.5, 1.5)) -> dict:
    """Variables for ``model`` drawn with numpy: He-normal kernels; biases, BatchNorm scales
    (uniform in ``bn_scale``) and running statistics away from their initial 0 and 1, so that
    inference mode is exercised. In inference mode each residual block adds to its input
    unnormalised, so deep models need smaller scales to keep their outputs of order 1 (ResNet-50:
    (0.3, 0.7)). Compiling or running ``init`` op by op takes seconds per model; this takes
    milliseconds."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)),
                                               train=False))
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(shape.shape[:-1])), shape.shape).astype(np.float32)
        if name == "scale":
            return rng.uniform(*bn_scale, shape.shape).astype(np.float32)
        if name == "var":
            return rng.uniform(0.5, 1.5, shape.shape).astype(np.float32)
        return rng.normal(0.0, 0.1, shape.shape).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(draw, shapes)


def batch_of(images, labels, indices, mask=None):
    mask = np.ones(len(indices), bool) if mask is None else mask
    return {"image": jnp.asarray(images[indices]), "label": jnp.asarray(labels[indices]),
            "mask": jnp.asarray(mask)}


def write_image_folder(root: Path, classes=("a dog", "b", "c"), per_class=(6, 2), seed=0,
                       sizes=((40, 30), (23, 57), (64, 64))) -> Path:
    """An image folder (``root/train``, ``root/test``, one folder per class) of photos of mixed
    sizes and formats: RGB JPEG and PNG, greyscale PNG, RGBA PNG, BMP; ``per_class`` = (train,
    test) images per class. Each image's mean colour encodes its class, so a model can learn it."""
    rng = np.random.default_rng(seed)
    from PIL import Image

    formats = (("jpg", "RGB"), ("png", "RGB"), ("png", "L"), ("png", "RGBA"), ("bmp", "RGB"))
    for split, count in zip(("train", "test"), per_class):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                width, height = sizes[(i + label) % len(sizes)]
                base = 40 + 80 * label
                pixels = np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
                suffix, mode = formats[(i + label) % len(formats)]
                Image.fromarray(pixels).convert(mode).save(folder / f"{i:03d}.{suffix}")
    return root
