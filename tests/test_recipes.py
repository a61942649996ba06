"""Training recipes: optimizers and weight decay, gradient clipping, the weights' moving average,
frozen backbones and transfer to another number of classes, bfloat16 compute."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_trees_equal, batch_of, smoke_config
from resnet_flax import checkpoints, models, pretrained, steps, train
from resnet_flax.config import default_config, validate
from resnet_flax.errors import UserError

PARAMS = {"conv": {"kernel": jnp.full((3, 3, 2, 4), 2.0), "bias": jnp.full((4,), 2.0)},
          "bn": {"scale": jnp.full((4,), 2.0), "bias": jnp.full((4,), 2.0)},
          "fc": {"kernel": jnp.full((4, 6), 2.0), "bias": jnp.full((6,), 2.0)}}


def one_update(config, grads):
    tx = steps.make_optimizer(config, steps_per_epoch=10, head_name="fc")
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    return optax.apply_updates(PARAMS, updates)


def recipe(**fields):
    config = default_config()
    config.update(fields)
    return config


def test_weight_decay_reaches_kernels_only():
    zero = jax.tree.map(jnp.zeros_like, PARAMS)
    lr, wd, momentum = 0.1, 0.01, 0.9
    # AdamW: a zero gradient moves nothing but the decoupled decay, p <- p - lr * wd * p.
    adamw = one_update(recipe(optimizer="adamw", learning_rate=lr, weight_decay=wd), zero)
    # SGD: L2 in the gradient, then Nesterov momentum (PyTorch's first step: (1 + momentum) * g).
    sgd = one_update(recipe(optimizer="sgd", learning_rate=lr, weight_decay=wd, momentum=momentum), zero)
    for updated, shrink in ((adamw, lr * wd), (sgd, lr * (1 + momentum) * wd)):
        for path, value in jax.tree_util.tree_leaves_with_path(updated):
            kernel = path[-1].key == "kernel"
            np.testing.assert_allclose(value, 2.0 - (2.0 * shrink if kernel else 0.0), rtol=1e-6,
                                       err_msg=jax.tree_util.keystr(path))


def test_a_frozen_backbone_gets_no_update_and_no_decay():
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    for optimizer in ("adamw", "sgd"):
        updated = one_update(recipe(optimizer=optimizer, weight_decay=0.1, grad_clip_norm=1.0,
                                    freeze="backbone"), grads)
        for name in ("conv", "bn"):
            assert_trees_equal(updated[name], PARAMS[name])
        assert np.all(np.asarray(updated["fc"]["kernel"]) < 2.0), optimizer


def test_gradient_clipping_scales_to_the_global_norm():
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    norm = float(optax.tree.norm(grads))
    clipped = one_update(recipe(optimizer="sgd", momentum=0.0, learning_rate=1.0, grad_clip_norm=0.5), grads)
    for value in jax.tree.leaves(clipped):
        np.testing.assert_allclose(value, 2.0 - 0.5 / norm, rtol=1e-6)
    unclipped = one_update(recipe(optimizer="sgd", momentum=0.0, learning_rate=1.0, grad_clip_norm=100.0), grads)
    for value in jax.tree.leaves(unclipped):
        np.testing.assert_allclose(value, 1.0, rtol=1e-6)


@pytest.mark.parametrize("fields, message", [
    ({"optimizer": "rmsprop"}, r"config.optimizer must be one of \('adam', 'adamw', 'sgd'\), got 'rmsprop'"),
    ({"weight_decay": 1e-4}, r"config.weight_decay applies to optimizer 'adamw' .* set config.optimizer='adamw'"),
    ({"ema_decay": 1.0}, r"config.ema_decay must be in \[0, 1\), got 1.0"),
    ({"freeze": "all"}, r"config.freeze must be one of \('', 'backbone'\), got 'all'"),
    ({"normalization": "minus_one"}, r"config.normalization must be one of"),
    ({"grad_clip_norm": -1.0}, r"config.grad_clip_norm must be >= 0"),
])
def test_impossible_recipes_are_named(fields, message):
    with pytest.raises(UserError, match=message):
        validate(recipe(**fields), num_train=100)


def run_steps(config, model, images, labels, count: int):
    """``count`` training steps on fixed batches; the states after each (host copies)."""
    state = steps.create_train_state(config, model, steps_per_epoch=10)
    step = jax.jit(functools.partial(
        steps.train_step, num_classes=6, ema_decay=config.ema_decay,
        frozen_backbone=config.freeze == "backbone"))
    history = [jax.device_get(state)]
    for i in range(count):
        state, _ = step(state, batch_of(images, labels, np.arange(8 * i, 8 * i + 8)), jax.random.key(0))
        history.append(jax.device_get(state))
    return history


@pytest.mark.slow
def test_moving_average_equals_its_hand_computation(tiny_setup):
    config, _, images, labels = tiny_setup
    config = smoke_config(ema_decay=0.75)
    model = models.create_model(config.model, num_classes=6, conv_impl="xla")
    history = run_steps(config, model, images, labels, 3)
    weights = [{"params": s.params, "batch_stats": s.batch_stats} for s in history]
    expected = weights[0]
    for current in weights[1:]:
        expected = jax.tree.map(lambda e, w: 0.75 * np.float32(e) + 0.25 * np.float32(w), expected, current)
    for a, b in zip(jax.tree.leaves(history[-1].ema), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.allclose(history[-1].ema["params"]["fc6"]["kernel"], history[-1].params["fc6"]["kernel"])


@pytest.mark.slow
def test_a_frozen_backbone_stays_frozen(tiny_setup):
    _, _, images, labels = tiny_setup
    config = smoke_config(freeze="backbone")
    model = models.create_model(config.model, num_classes=6, conv_impl="xla")
    first, *_, last = run_steps(config, model, images, labels, 3)
    head = model.head_name
    assert_trees_equal({k: v for k, v in first.params.items() if k != head},
                       {k: v for k, v in last.params.items() if k != head})
    assert_trees_equal(first.batch_stats, last.batch_stats)
    assert not np.array_equal(first.params[head]["kernel"], last.params[head]["kernel"])


@pytest.mark.slow
def test_transfer_to_another_number_of_classes_and_a_linear_probe(tmp_path, capsys):
    # A 1000-class "pretrained" torchvision-layout model, as torch_io would import it.
    source_config = smoke_config(variant="torchvision", num_classes=1000)
    source_model = models.model_from_config(source_config)
    source = steps.create_train_state(source_config, source_model, steps_per_epoch=1)
    stats = jax.tree.map(lambda s: s + 0.25, source.batch_stats)  # not the initial 0 and 1
    pretrained.save_imported(tmp_path / "source", {"params": source.params, "batch_stats": stats}, source_config)

    config = smoke_config(variant="torchvision", restore_from=str(tmp_path / "source"), freeze="backbone",
                          num_epochs=1, bn_recalibration_batches=0)
    train.train_and_evaluate(config, tmp_path / "probe")
    assert re.search(r"Starting from the weights of .*source/checkpoints/0 but its output layer "
                     r"\(fc, 1000 classes\): fc starts fresh for 6 classes", capsys.readouterr().out)
    trained = pretrained.load(tmp_path / "probe")
    params = jax.device_get(trained.variables["params"])
    assert params["fc"]["kernel"].shape == (16, 6)
    assert_trees_equal({k: v for k, v in params.items() if k != "fc"},
                       jax.device_get({k: v for k, v in source.params.items() if k != "fc"}))
    assert_trees_equal(jax.device_get(trained.variables["batch_stats"]), jax.device_get(stats))

    with pytest.raises(UserError, match=r"its output layer fc differs .* set config.restore_optimizer=False"):
        train.train_and_evaluate(smoke_config(variant="torchvision", restore_from=str(tmp_path / "source"),
                                              restore_optimizer=True, num_epochs=1), tmp_path / "other")
    assert checkpoints.saved_epochs(tmp_path / "source") == [0]


def test_bfloat16_computes_convolutions_in_bfloat16_and_keeps_float32_state(tiny_setup):
    _, _, images, labels = tiny_setup
    config = smoke_config(dtype="bfloat16")
    model = models.model_from_config(config)
    state = steps.create_train_state(config, model, steps_per_epoch=10)
    assert {leaf.dtype for leaf in jax.tree.leaves((state.params, state.batch_stats, state.opt_state))} <= {
        jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
    step = jax.jit(functools.partial(steps.train_step, num_classes=6))
    batch = batch_of(images, labels, np.arange(8))
    hlo = step.lower(state, batch, jax.random.key(0)).as_text()
    convolutions = re.findall(r"stablehlo.convolution.*", hlo)
    assert convolutions and all(re.search(r"-> tensor<[0-9x]+xbf16>", c) for c in convolutions)
    new_state, _ = step(state, batch, jax.random.key(0))
    assert jax.tree.map(lambda a: a.dtype, new_state.params) == jax.tree.map(lambda a: a.dtype, state.params)


def test_bfloat16_training_lowers_the_loss(tiny_setup):
    _, _, images, labels = tiny_setup
    config = smoke_config(dtype="bfloat16", learning_rate=3e-3)
    model = models.model_from_config(config)
    state = steps.create_train_state(config, model, steps_per_epoch=10)
    step = jax.jit(functools.partial(steps.train_step, num_classes=6))
    batch = batch_of(images, labels, np.arange(16))
    losses = []
    for _ in range(15):
        state, sums = step(state, batch, jax.random.key(0))
        losses.append(float(sums["loss_sum"] / sums["count"]))
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
def test_moving_average_is_checkpointed_evaluated_and_resumed(tmp_path):
    from conftest import checkpoint_trees
    from resnet_flax import evaluate

    config = smoke_config(ema_decay=0.9, num_epochs=2, bn_recalibration_batches=0)
    summary = train.train_and_evaluate(config, tmp_path / "straight")
    assert summary["ema_test_accuracy"] == evaluate.evaluate_checkpoint(tmp_path / "straight", ema=True)[
        "test_accuracy"]
    assert summary["test_accuracy"] == evaluate.evaluate_checkpoint(tmp_path / "straight")["test_accuracy"]

    train.train_and_evaluate(smoke_config(ema_decay=0.9, num_epochs=1, bn_recalibration_batches=0),
                             tmp_path / "resumed")
    train.train_and_evaluate(config, tmp_path / "resumed")
    straight, resumed = (pretrained.load(tmp_path / name, ema=True).variables for name in ("straight", "resumed"))
    assert_trees_equal(jax.device_get(straight), jax.device_get(resumed))
    assert_trees_equal(checkpoint_trees(tmp_path / "straight"), checkpoint_trees(tmp_path / "resumed"))


def test_a_run_without_moving_average_has_none_to_load(smoke_run):
    with pytest.raises(UserError, match=r"checkpoints/2: holds no moving average of the weights"):
        pretrained.load(smoke_run[0], ema=True)


@pytest.mark.slow
def test_signs_transfer_config_fine_tunes_imported_weights(tmp_path, capsys):
    """configs/signs_transfer.py as documented, from random 1000-class weights (nothing is
    downloaded here), with ResNet-18, one epoch and 64 SIGNS-layout images to keep it short."""
    from conftest import REPO, random_variables, write_signs_h5
    from resnet_flax.config import load_config_file
    from resnet_flax.torch_io.__main__ import imported_config

    source_config = imported_config("resnet18", 1000)
    source = random_variables(models.model_from_config(source_config), 64)
    pretrained.save_imported(tmp_path / "tv_resnet18", source, source_config)
    config = load_config_file(REPO / "configs" / "signs_transfer.py")
    config.update(model="resnet18", restore_from=str(tmp_path / "tv_resnet18"), num_epochs=1,
                  bn_recalibration_batches=0, data_dir=str(write_signs_h5(tmp_path / "data", num_train=64)))
    summary = train.train_and_evaluate(config, tmp_path / "run")
    assert "fc starts fresh for 6 classes" in capsys.readouterr().out
    assert summary["epochs"] == 1 and np.isfinite(summary["test_loss"])
    trained = pretrained.load(tmp_path / "run")
    assert trained.config.normalization == "imagenet" and trained.variables["params"]["fc"]["kernel"].shape == (512, 6)
