"""The assignment's blocks and ResNet-50: shapes, parameter counts, names and BatchNorm semantics."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax import models
from resnet_flax.ops import conv
from resnet_flax.errors import UserError


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def block_input():
    return jnp.asarray(np.random.default_rng(1).standard_normal((3, 4, 4, 6)), jnp.float32)


@pytest.mark.parametrize(
    "block, expected_shape",
    [
        (models.IdentityBlock(filters=(2, 4, 6), kernel_size=2, stage=1, block="a"), (3, 4, 4, 6)),
        (models.ConvolutionalBlock(filters=(2, 4, 6), kernel_size=2, stage=1, block="a", strides=2),
         (3, 2, 2, 6)),
    ],
    ids=["identity", "convolutional"],
)
@pytest.mark.parametrize("conv_impl", ["xla", "gemm"])
def test_assignment_block_checks(block, expected_shape, conv_impl):
    block = block.clone(conv=models.layer_factories(conv_impl)["conv"])
    x = block_input()
    variables = jax.jit(lambda x: block.init(jax.random.key(0), x, train=False))(x)
    # Not a per-channel constant: in training mode BatchNorm removes one of those exactly (both
    # paths of the convolutional block start with conv -> BatchNorm), so x + 1 would give the same
    # output up to rounding. Each pixel moved on its own changes the output far beyond rounding.
    perturbation = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape), jnp.float32)
    apply = jax.jit(functools.partial(block.apply, mutable=["batch_stats"]), static_argnames="train")
    for train in (False, True):
        out, _ = apply(variables, x, train=train)
        assert out.shape == expected_shape
        assert bool(jnp.all(out >= 0)), "blocks end in a ReLU"
        other, _ = apply(variables, x + perturbation, train=train)
        assert float(jnp.max(jnp.abs(out - other))) > 1e-2, "the output must depend on the input"


def test_identity_block_adds_its_input():
    # With the last BatchNorm's scale and shift at zero the main path contributes nothing, so the
    # block must return relu(input) exactly.
    block = models.IdentityBlock(filters=(2, 4, 6), kernel_size=2, stage=1, block="a")
    x = block_input()
    variables = jax.jit(lambda x: block.init(jax.random.key(0), x, train=False))(x)
    params = jax.tree.map(lambda a: a, variables["params"])
    params["bn1a_branch2c"]["scale"] = jnp.zeros(6)
    out = jax.jit(lambda v, x: block.apply(v, x, train=False))({**variables, "params": params}, x)
    np.testing.assert_array_equal(out, jax.nn.relu(x))


@pytest.fixture(scope="module")
def resnet50_shapes():
    model = models.ResNet50(num_classes=6)
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
    logits, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"], capture_intermediates=True),
        variables, x,
    )
    return variables, logits, state["intermediates"]


def test_resnet50_parameter_counts_match_keras_summary(resnet50_shapes):
    variables, _, _ = resnet50_shapes
    assert set(variables) == {"params", "batch_stats"}
    assert count(variables) == 23_600_006
    assert count(variables["params"]) == 23_546_886
    assert count(variables["batch_stats"]) == 53_120


def test_resnet50_intermediate_shapes(resnet50_shapes):
    _, logits, inter = resnet50_shapes
    conv1_out, conv1_bias = inter["conv1"]["__call__"][0]  # the bias is added inside bn_conv1
    assert conv1_out.shape == (2, 32, 32, 64) and conv1_bias.shape == (64,)
    expected = {
        "stage1": (15, 15, 64),  # after the max-pool
        "stage2": (15, 15, 256),
        "stage3": (8, 8, 512),
        "stage4": (4, 4, 1024),
        "stage5": (2, 2, 2048),
        "avg_pool": (1, 1, 2048),
    }
    for name, shape in expected.items():
        assert inter[name][0].shape == (2, *shape), name
    assert logits.shape == (2, 6)


def test_resnet50_has_every_keras_layer_name(resnet50_shapes):
    variables, _, _ = resnet50_shapes
    paths = models.keras_layer_paths(variables)
    convs = [n for n in paths if n == "conv1" or re.fullmatch(r"res\d[a-f]_branch(1|2[abc])", n)]
    norms = [n for n in paths if n == "bn_conv1" or re.fullmatch(r"bn\d[a-f]_branch(1|2[abc])", n)]
    assert len(convs) == 53 and len(norms) == 53
    assert set(paths) == set(convs) | set(norms) | {"fc6"}
    expected_blocks = {2: "abc", 3: "abcd", 4: "abcdef", 5: "abc"}
    for stage, letters in expected_blocks.items():
        for letter in letters:
            for branch in ("2a", "2b", "2c") + (("1",) if letter == "a" else ()):
                assert f"res{stage}{letter}_branch{branch}" in paths
                assert f"bn{stage}{letter}_branch{branch}" in paths
    # Conv layers carry a bias (Keras default); each BatchNorm path also holds its batch_stats.
    assert set(variables["params"]["block3b"]["res3b_branch2b"]) == {"kernel", "bias"}
    assert variables["params"]["block3b"]["res3b_branch2b"]["kernel"].shape == (3, 3, 128, 128)
    bn_path = paths["bn4a_branch1"]
    assert set(variables["batch_stats"][bn_path[0]][bn_path[1]]) == {"mean", "var"}


def test_unknown_model_name_is_a_user_error():
    with pytest.raises(UserError, match="config.model.*'resnet51'"):
        models.create_model("resnet51", num_classes=6)


def products(jaxpr) -> list:
    """Every conv and matmul equation of ``jaxpr``, nested jaxprs (jit, custom rules) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
            found.append(eqn)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += products(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += products(sub)
    return found


@pytest.mark.parametrize("conv_impl", ["xla", "gemm", "winograd"])
@pytest.mark.parametrize("precision", ["highest", "default"])
def test_every_conv_and_matmul_runs_at_the_model_precision(conv_impl, precision):
    # On a GPU, float32 products default to TensorFloat-32 (about 3 significant digits); the model
    # asks for its precision explicitly in every layer, forward and backward.
    model = models.create_model("resnet_tiny", num_classes=6, conv_impl=conv_impl, precision=precision)
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)  # 15x15 and 8x8 maps: Winograd's size
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)

    def loss(params, batch_stats, x):
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
        return jnp.sum(logits)

    def layers_and_winograd_transforms(jaxpr):
        # Winograd's transforms of kernels and tiles are products with a constant Kronecker matrix
        # of 4, 9, 16 or 36 rows and columns; they always run at 'highest' (they are part of the
        # algorithm, not layers). No layer's product has such a matrix first.
        sizes = {4, 9, 16, 36}
        found = products(jaxpr)
        transforms = [e for e in found if len(shape := e.invars[0].aval.shape) == 2 and set(shape) <= sizes]
        return [e for e in found if e not in transforms], transforms

    forward, forward_transforms = layers_and_winograd_transforms(
        jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x).jaxpr)
    backward, backward_transforms = layers_and_winograd_transforms(
        jax.make_jaxpr(jax.grad(loss))(variables["params"], variables["batch_stats"], x).jaxpr)
    assert len(forward) == 9 + 1  # conv1, two blocks of four convs, fc6
    assert len(backward) > 2 * len(forward)  # forward again, plus input and weight gradients
    # One 3x3 conv per block, at 15x15 and 8x8 pixels: Winograd transforms their kernels, input
    # tiles and output tiles.
    assert len(forward_transforms) == (2 * 3 if conv_impl == "winograd" else 0)
    expected = jax.lax.Precision.HIGHEST if precision == "highest" else jax.lax.Precision.DEFAULT
    for eqn in forward + backward:
        assert eqn.params["precision"] == (expected, expected), eqn
    highest = jax.lax.Precision.HIGHEST
    for eqn in forward_transforms + backward_transforms:
        assert eqn.params["precision"] == (highest, highest), eqn


def test_model_from_config_fills_fields_an_older_config_lacks():
    old = {"model": "resnet_tiny", "num_classes": 6}  # saved before conv_impl / matmul_precision
    model = models.model_from_config(old)
    conv_options = model.conv.keywords
    assert (conv_options["impl"], conv_options["precision"], model.num_classes) == (
        conv.resolve_impl("auto"), "highest", 6)
    assert models.model_from_config({**old, "matmul_precision": "default"}, num_classes=3).dense.keywords == {
        "precision": "default", "dtype": None}
    with pytest.raises(UserError, match="config.matmul_precision.*'fp32'"):
        models.model_from_config({**old, "matmul_precision": "fp32"})


@pytest.fixture(scope="module")
def tiny():
    model = models.create_model("resnet_tiny", num_classes=6)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 16, 16, 3)), jnp.float32)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
    return model, variables, x


def test_train_mode_updates_batch_stats_by_the_momentum_rule(tiny):
    model, variables, x = tiny
    # Non-trivial running statistics so that the rule is checked on both terms.
    stats = jax.tree.map(lambda a: a + 0.5, variables["batch_stats"])
    # ...and a conv bias, which BatchNorm takes in: the running mean must count it.
    params = {**variables["params"], "conv1": {**variables["params"]["conv1"],
                                               "bias": variables["params"]["conv1"]["bias"] + 0.25}}
    variables = {"params": params, "batch_stats": stats}
    _, updated = jax.jit(lambda v, x: model.apply(
        v, x, train=True, mutable=["batch_stats", "intermediates"],
        capture_intermediates=lambda mdl, _: mdl.name == "conv1"))(variables, x)
    conv_out, conv_bias = updated["intermediates"]["conv1"]["__call__"][0]
    conv1_out = conv_out + conv_bias
    batch_mean = conv1_out.mean(axis=(0, 1, 2))
    batch_var = conv1_out.var(axis=(0, 1, 2))
    new = updated["batch_stats"]["bn_conv1"]
    np.testing.assert_allclose(new["mean"], 0.99 * stats["bn_conv1"]["mean"] + 0.01 * batch_mean,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.99 * stats["bn_conv1"]["var"] + 0.01 * batch_var,
                               rtol=1e-5, atol=1e-6)
    for before, after in zip(jax.tree.leaves(stats), jax.tree.leaves(updated["batch_stats"])):
        assert not np.allclose(before, after)


def test_inference_mode_is_per_example_and_leaves_batch_stats_alone(tiny):
    model, variables, x = tiny
    infer = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["batch_stats"]))
    train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0])
    logits, state = infer(variables, x)
    for before, after in zip(jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(state["batch_stats"])):
        np.testing.assert_array_equal(before, after)
    one_at_a_time = jnp.concatenate([infer(variables, x[i:i + 1])[0] for i in range(4)])
    np.testing.assert_allclose(logits, one_at_a_time, rtol=1e-5, atol=1e-6)
    # In training mode the batch statistics couple the examples.
    assert not np.allclose(train(variables, x)[:2], train(variables, x[:2]), atol=1e-4)


def test_mode_keyword_is_required(tiny):
    model, variables, x = tiny
    with pytest.raises(TypeError):
        model.apply(variables, x)


def test_plain_twin_has_no_shortcut_layers():
    plain = models.create_model("plain50", num_classes=6)
    variables = jax.eval_shape(lambda: plain.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    names = models.keras_layer_paths(variables)
    assert not any(n.endswith("_branch1") for n in names)
    assert len(names) == 53 - 4 + 53 - 4 + 1


def test_conv_biases_get_exactly_zero_gradients_in_training(tiny):
    """Each BatchNorm takes its conv's bias in and its batch mean takes it out again: the true
    gradient is zero, and that is what training computes (op by op it would be rounding noise)."""
    model, variables, x = tiny

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(logits))

    grads = jax.jit(jax.grad(loss))(variables["params"])
    paths = models.keras_layer_paths(variables)
    conv_names = [name for name in paths if name.startswith(("res", "conv1"))]
    assert len(conv_names) == 9  # resnet_tiny: the stem and two convolutional blocks
    for name in conv_names:
        layer = functools.reduce(lambda tree, key: tree[key], paths[name], grads)
        np.testing.assert_array_equal(layer["bias"], 0.0, err_msg=name)
        assert np.abs(layer["kernel"]).max() > 0, name
