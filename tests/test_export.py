"""ONNX export: the exported model gives flax's probabilities (onnxruntime), for any batch size."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import pytest

from conftest import REPO, random_variables
from resnet_flax import config as config_lib
from resnet_flax import export, input_pipeline, models, pretrained


def onnx_probabilities(proto_bytes, images):
    session = onnxruntime.InferenceSession(proto_bytes, providers=["CPUExecutionProvider"])
    return session.run([export.OUTPUT_NAME], {export.INPUT_NAME: images.astype(np.float32)})[0]


@pytest.fixture(scope="module")
def signs_images(signs_dir):
    return input_pipeline.load_h5_split(signs_dir / "test_signs.h5", "test", 6).images


@pytest.mark.slow
def test_the_export_command_writes_a_model_that_predicts_as_flax(smoke_run, signs_images, tmp_path):
    workdir, _ = smoke_run
    path = tmp_path / "model.onnx"
    result = subprocess.run([sys.executable, "-m", "resnet_flax.export", f"--workdir={workdir}", str(path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "exported" in result.stdout and "max |difference|" in result.stdout
    model = onnx.load(path)
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    assert "divides them by 255" in metadata["preprocessing"] and json.loads(metadata["classes"]) == list(range(6))
    trained = pretrained.load(workdir)
    for batch in (signs_images[:5], signs_images[5:8]):  # the batch dimension is dynamic
        np.testing.assert_allclose(onnx_probabilities(path.read_bytes(), batch), trained.probabilities(batch),
                                   atol=1e-5)


@pytest.mark.slow
def test_resnet50_exports_with_flax_probabilities(signs_images):
    model = models.ResNet50(num_classes=6)
    variables = random_variables(model, 64, bn_scale=(0.3, 0.7))
    proto = export.to_onnx(model, variables, config_lib.default_config(), {"model": "resnet50"})
    images = signs_images[:6]
    expected = jax.jit(export.probabilities_fn(model, variables))(jnp.asarray(images, jnp.float32))
    assert 0.01 < expected.min() and expected.max() < 0.99  # not saturated: the comparison means something
    np.testing.assert_allclose(onnx_probabilities(proto.SerializeToString(), images), expected, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["torchvision", "preact"])
def test_other_layouts_export_with_their_normalisation(variant, signs_images):
    config = config_lib.default_config()
    config.update(model="resnet_tiny", variant=variant, normalization="imagenet")
    model = models.model_from_config(config)
    variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))()
    proto = export.to_onnx(model, variables, config, {"model": "resnet_tiny"})
    images = signs_images[:4]
    expected = jax.jit(export.probabilities_fn(model, variables, "imagenet"))(jnp.asarray(images, jnp.float32))
    np.testing.assert_allclose(onnx_probabilities(proto.SerializeToString(), images), expected, atol=1e-5)
