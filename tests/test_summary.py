"""The Keras-like model summary, and profiles of a few training steps."""

import functools
import json

import jax
import numpy as np
import pytest

from conftest import assert_trees_equal, checkpoint_trees, smoke_config
from resnet_flax import models, summary, train


def test_resnet50_totals_are_keras_model_summary():
    rows, variables = summary.layer_rows(models.ResNet50(num_classes=6), 64)
    assert summary.parameter_totals(variables) == {"total": 23_600_006, "trainable": 23_546_886,
                                                   "non_trainable": 53_120}
    assert len(rows) == 53 + 53 + 1 and sum(r["params"] for r in rows) == 23_600_006
    assert rows[0] == {"name": "conv1", "type": "Conv2D", "output_shape": (None, 32, 32, 64), "params": 9_472}
    assert rows[-1] == {"name": "fc6", "type": "Dense", "output_shape": (None, 6), "params": 12_294}
    text = summary.format_summary("resnet50", rows, variables)
    assert text.splitlines()[-3:] == ["Total params: 23,600,006", "Trainable params: 23,546,886",
                                      "Non-trainable params: 53,120"]


def test_rows_of_a_small_member_are_its_variables():
    model = models.create_model("resnet_tiny", num_classes=6)
    rows, variables = summary.layer_rows(model, 64)
    paths = models.keras_layer_paths(variables)
    assert sorted(r["name"] for r in rows) == sorted(paths)
    for row in rows:
        layer = functools.reduce(lambda tree, key: tree[key], paths[row["name"]], variables["params"])
        stats = (functools.reduce(lambda tree, key: tree[key], paths[row["name"]], variables["batch_stats"])
                 if row["type"] == "BatchNormalization" else {})
        assert row["params"] == summary.count(layer) + summary.count(stats), row
    shapes = {r["name"]: r["output_shape"] for r in rows}
    assert shapes["conv1"] == (None, 32, 32, 8) and shapes["res3a_branch2c"] == (None, 8, 8, 16)
    assert shapes["bn3a_branch1"] == (None, 8, 8, 16) and shapes["fc6"] == (None, 6)


@pytest.mark.parametrize("variant", ["torchvision", "preact"])
def test_other_layouts_list_layers_in_forward_order_by_state_dict_name(variant):
    rows, variables = summary.layer_rows(models.create_model("resnet18", num_classes=1000, variant=variant), 224)
    names = [r["name"] for r in rows]
    assert names[:2] == ["conv1", "bn1"] and names[-1] == "fc"
    first_block = ["layer1.0.conv1", "layer1.0.bn2", "layer1.0.conv2"] if variant == "preact" else [
        "layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2", "layer1.0.bn2"]
    assert names[2:2 + len(first_block)] == first_block
    assert sum(r["params"] for r in rows) == summary.parameter_totals(variables)["total"]
    if variant == "torchvision":
        assert summary.parameter_totals(variables)["trainable"] == 11_689_512
        assert "layer2.0.downsample.0" in names and names[-2] == "layer4.1.bn2"
    else:
        assert names[-2] == "post_bn"


@pytest.mark.slow
def test_a_profiled_run_writes_a_trace_and_trains_as_without(smoke_run, tmp_path, capsys):
    workdir = tmp_path / "profiled"
    profiled = train.train_and_evaluate(smoke_config(profile_steps=2), workdir)
    out = capsys.readouterr().out
    _, variables = summary.layer_rows(models.model_from_config(smoke_config()), 64)
    assert summary.totals_line(variables) in out  # the totals line a run starts with
    assert "profile of 2 steps" in out
    traces = list((workdir / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    assert list((workdir / "profile").rglob("perfetto_trace.json.gz"))
    reference_dir, reference = smoke_run
    timing = {"epoch_seconds", "compile_seconds", "images_per_second"}
    assert {k: v for k, v in profiled.items() if k not in timing} == {
        k: v for k, v in reference.items() if k not in timing}
    # The profiled epoch runs in other calls (1, 2, then the rest), and each call sums its steps'
    # losses in float32: the epoch's mean training loss agrees up to that rounding.
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference_dir / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["train_loss"] for r in records], [r["train_loss"] for r in expected], rtol=1e-6)
    assert [r["test_loss"] for r in records] == [r["test_loss"] for r in expected]
    if jax.default_backend() == "cpu":  # bit for bit where runs are deterministic
        assert_trees_equal(checkpoint_trees(workdir), checkpoint_trees(reference_dir))
    assert np.isfinite(profiled["test_loss"])
