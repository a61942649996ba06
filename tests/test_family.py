"""The ResNet family in its three layouts: parameter counts, structure, and the fast CPU kernels
computing every layout as XLA's convolutions do."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_variables
from resnet_flax import models

# torchvision.models.resnet{18,34,50,101,152}(num_classes=1000): sum(p.numel() for p in parameters()).
TORCHVISION_COUNTS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                      "resnet101": 44_549_160, "resnet152": 60_192_808}
DEPTHS = ("18", "34", "50", "101", "152")


def shapes_of(name: str, variant: str, num_classes: int, size: int):
    model = models.create_model(name, num_classes=num_classes, variant=variant, conv_impl="xla")
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, size, size, 3)))


def count(tree) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


def expected_parameters(depth: str, variant: str, num_classes: int, residual: bool = True,
                        final_pixels: int = 1) -> int:
    """The parameter count of a member worked out from He et al.'s Table 1 layer by layer: each
    conv's k*k*c_in*c_out (+ c_out biases in the assignment's layout) and each BatchNorm's 2*c."""
    spec = models.ARCHITECTURES[depth]
    bias = variant == "assignment"
    conv = lambda k, c_in, c_out: k * k * c_in * c_out + (c_out if bias else 0)
    bn = lambda c: 2 * c
    total = conv(7, 3, 64) + bn(64)
    channels = 64
    for index, (blocks, filters) in enumerate(zip(spec["stage_sizes"], spec["stage_filters"])):
        for b in range(blocks):
            c_in = channels
            if len(filters) == 3:
                f1, f2, f3 = filters
                convs = [(1, c_in, f1), (3, f1, f2), (1, f2, f3)]
            else:
                f1, f2 = filters
                convs = [(3, c_in, f1), (3, f1, f2)]
            total += sum(conv(*c) for c in convs)
            if variant == "preact":  # a BatchNorm before each conv, but the network's first
                total += sum(bn(c[1]) for c in convs[int(index == 0 and b == 0):])
            else:
                total += sum(bn(c[2]) for c in convs)
            out = filters[-1]
            if variant == "assignment":
                projects = b == 0  # every stage starts with a convolutional block
            else:
                projects = (index > 0 and b == 0) or c_in != out
            if residual and projects:
                total += conv(1, c_in, out) + (bn(out) if variant != "preact" else 0)
            channels = out
    if variant == "preact":
        total += bn(channels)
    return total + channels * final_pixels * num_classes + num_classes


@pytest.mark.parametrize("name", sorted(TORCHVISION_COUNTS))
def test_torchvision_layout_counts_equal_torchvision(name):
    shapes = shapes_of(name, "torchvision", 1000, 224)
    assert count(shapes["params"]) == TORCHVISION_COUNTS[name]


@pytest.mark.parametrize("variant", models.VARIANTS)
@pytest.mark.parametrize("depth", [*DEPTHS[:3], *(pytest.param(d, marks=pytest.mark.slow) for d in DEPTHS[3:])])
def test_every_member_and_layout_has_the_parameters_of_its_architecture(depth, variant):
    # At 64x64 the assignment's 2x2 average pool leaves one pixel, as global pooling does.
    for residual, prefix in ((True, "resnet"), (False, "plain")):
        shapes = shapes_of(prefix + depth, variant, 6, 64)
        assert count(shapes["params"]) == expected_parameters(depth, variant, 6, residual), prefix + depth
        # Every BatchNorm keeps a running mean and variance of its scale's size.
        scales = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(shapes["params"])
                  if path[-1].key == "scale"]
        assert count(shapes["batch_stats"]) == 2 * count(scales)


def test_the_assignments_resnet50_is_unchanged_by_the_family():
    shapes = shapes_of("resnet50", "assignment", 6, 64)
    # Keras's model.summary(): 23,600,006 parameters, 53,120 of them BatchNorm's moving statistics.
    assert count(shapes["params"]) + count(shapes["batch_stats"]) == 23_600_006
    assert "block2a" in shapes["params"] and "fc6" in shapes["params"]


def test_resnet152_names_blocks_as_the_caffe_models():
    params = shapes_of("resnet152", "assignment", 6, 64)["params"]
    stage4 = sorted(name for name in params if name.startswith("block4"))
    assert stage4[:3] == ["block4a", "block4b1", "block4b10"] and len(stage4) == 36
    assert "block3h" in params  # stages of at most 26 blocks keep letters


def test_torchvision_layout_has_torchvisions_structure():
    shapes = shapes_of("resnet18", "torchvision", 10, 64)
    params = shapes["params"]
    assert params["conv1"]["kernel"].shape == (7, 7, 3, 64) and "bias" not in params["conv1"]
    assert "downsample_0" not in params["layer1_0"]  # 64 -> 64 at stride 1: the identity
    assert params["layer2_0"]["downsample_0"]["kernel"].shape == (1, 1, 64, 128)
    assert shapes["batch_stats"]["layer2_0"]["downsample_1"]["mean"].shape == (128,)
    assert params["fc"]["kernel"].shape == (512, 10)
    bottleneck = shapes_of("resnet50", "torchvision", 10, 64)["params"]
    # v1.5: the stride sits on the 3x3 conv; layer1's first block projects 64 -> 256.
    assert bottleneck["layer1_0"]["downsample_0"]["kernel"].shape == (1, 1, 64, 256)


def test_preact_layout_moves_batchnorm_before_the_convs():
    params = shapes_of("resnet50", "preact", 10, 64)["params"]
    assert "bn1" not in params["layer1_0"]  # the stem's output is already activated
    assert set(params["layer1_1"]) == {"bn1", "conv1", "bn2", "conv2", "bn3", "conv3"}
    assert set(params["layer2_0"]) == {"bn1", "conv1", "bn2", "conv2", "bn3", "conv3", "downsample_0"}
    assert params["post_bn"]["scale"].shape == (2048,)


@pytest.mark.parametrize("variant", models.VARIANTS)
def test_plain_twins_drop_exactly_the_shortcut_layers(variant):
    residual = jax.tree_util.tree_leaves_with_path(shapes_of("resnet18", variant, 6, 64)["params"])
    plain = jax.tree_util.tree_leaves_with_path(shapes_of("plain18", variant, 6, 64)["params"])
    shortcut = lambda path: any(part in jax.tree_util.keystr(path) for part in ("downsample", "branch1"))
    assert [p for p, _ in residual if not shortcut(p)] == [p for p, _ in plain]
    assert any(shortcut(p) for p, _ in residual) and not any(shortcut(p) for p, _ in plain)


@functools.cache
def tiny_step_outputs(variant, conv_impl):
    """(logits, gradients, BatchNorm updates, inference logits) of a training step of resnet_tiny
    at 32x32, from the same random variables whatever the conv implementation (one layout)."""
    images = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
    labels = jnp.arange(4) % 6
    model = models.create_model("resnet_tiny", num_classes=6, variant=variant, conv_impl=conv_impl)
    variables = random_variables(model, 32)

    def loss(params):
        logits, updates = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels]), (logits, updates)

    grads, (logits, updates) = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    inference = jax.jit(functools.partial(model.apply, train=False))(variables, images)
    return logits, grads, updates, inference


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["torchvision", "preact"])
@pytest.mark.parametrize("conv_impl", ["gemm", "winograd"])
def test_cpu_kernels_compute_every_layout_as_xla_does(variant, conv_impl):
    """Outputs, gradients and BatchNorm statistics of a training step of resnet_tiny at 32x32
    (stride-2 3x3 convs with symmetric padding, maps 8x8 to 2x2), against XLA's convolution."""
    reference, ours = tiny_step_outputs(variant, "xla"), tiny_step_outputs(variant, conv_impl)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(ours), strict=True):
        # Float32 rounding of differently ordered sums (Winograd's a few 1e-6 of the scale).
        scale = float(jnp.max(jnp.abs(a))) + 1e-6
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4 * scale, rtol=0)


def test_unknown_variant_and_dtype_are_user_errors():
    from resnet_flax.errors import UserError

    with pytest.raises(UserError, match="config.variant must be one of"):
        models.create_model("resnet18", num_classes=6, variant="timm")
    with pytest.raises(UserError, match="config.dtype must be one of"):
        models.create_model("resnet18", num_classes=6, dtype="float16")
