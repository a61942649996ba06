"""torchvision's own ResNets (built here with random weights, nothing downloaded) imported into
the torchvision layout and exported back."""

import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import REPO
from resnet_flax import input_pipeline, predict, pretrained
from resnet_flax.errors import UserError
from resnet_flax.torch_io import __main__ as torch_io
from resnet_flax.torch_io import state_dict as torch_state_dict


def random_torchvision(name: str, num_classes: int = 1000, seed: int = 0) -> torch.nn.Module:
    """torchvision's ``name`` with random weights and random BatchNorm statistics, in eval mode.
    Each block's last BatchNorm scale is small (as trained ResNets' are), so that activations
    stay in range through the depth and the probabilities are not all 0 or 1."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, name)(num_classes=num_classes)
    resnet = torchvision.models.resnet
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        for block in net.modules():
            if isinstance(block, (resnet.BasicBlock, resnet.Bottleneck)):
                last = block.bn3 if isinstance(block, resnet.Bottleneck) else block.bn2
                last.weight.uniform_(0.05, 0.2)
        net.fc.weight.mul_(10.0)  # logits of a few units: probabilities neither uniform nor one-hot
    return net.eval()


def save_pth(net: torch.nn.Module, path):
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def photos(signs_dir):
    """Four SIGNS photos enlarged to 300x260 (not square: the crop matters) as PIL images."""
    split = input_pipeline.load_h5_split(signs_dir / "test_signs.h5", "test", 6)
    return [Image.fromarray(image).resize((300, 260), Image.Resampling.BICUBIC) for image in split.images[:4]]


def torchvision_preprocess(photos) -> torch.Tensor:
    """torchvision's ImageNet evaluation transforms (its weights' ``transforms()``)."""
    from torchvision import transforms

    pipeline = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                   transforms.Normalize(input_pipeline.IMAGENET_MEAN, input_pipeline.IMAGENET_STD)])
    return torch.stack([pipeline(photo) for photo in photos])


def test_imagenet_resize_gives_torchvisions_pixels(photos):
    from torchvision import transforms

    pipeline = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    for photo in photos + [photos[0].resize((260, 300))]:
        ours = input_pipeline.resize_image(np.asarray(photo), 224, "imagenet")
        np.testing.assert_array_equal(ours, np.asarray(pipeline(photo)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_imported_torchvision_model_gives_torchvisions_probabilities(name, photos, tmp_path):
    net = random_torchvision(name)
    saved = torch_io.import_weights(save_pth(net, tmp_path / f"{name}.pth"), name, tmp_path / "run")[0]
    assert saved == tmp_path / "run" / "checkpoints" / "0"
    trained = pretrained.load(tmp_path / "run")
    assert (trained.config.variant, trained.config.normalization, trained.config.image_size) == (
        "torchvision", "imagenet", 224)

    with torch.no_grad():
        expected = torch.softmax(net(torchvision_preprocess(photos)), -1).numpy()
    assert 0.01 < expected.max() < 0.99  # not saturated: the comparison means something
    # The same pixels through this project's preprocessing (predict's) and normalisation.
    images = np.stack([input_pipeline.resize_image(np.asarray(photo), 224, "imagenet") for photo in photos])
    np.testing.assert_allclose(trained.probabilities(images), expected, atol=1e-5, rtol=0)
    # predict reads the files and applies the checkpoint's preprocessing itself (all four in one
    # batch: the program above, not another compiled for one image).
    files = [tmp_path / f"photo{i}.png" for i in range(len(photos))]
    for photo, file in zip(photos, files):
        photo.save(file)
    results = predict.classify(trained, files)
    np.testing.assert_allclose([r["probabilities"] for r in results], expected, atol=1e-5, rtol=0)

    # Back to torchvision: exactly the same tensors, so exactly the same outputs.
    for suffix in (".pth", ".safetensors"):
        out = tmp_path / f"exported{suffix}"
        torch_io.export_weights(tmp_path / "run", out)
        twin = getattr(torchvision.models, name)(num_classes=1000).eval()
        loaded = (torch.load(out, weights_only=True) if suffix == ".pth"
                  else {k: torch.from_numpy(v) for k, v in torch_state_dict.read_state_dict(out).items()})
        twin.load_state_dict(loaded, strict=True)
        probe = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(twin(probe), net(probe))


def test_wrong_model_and_wrong_shapes_are_named(tmp_path):
    net = random_torchvision("resnet18", num_classes=10)
    path = save_pth(net, tmp_path / "resnet18.pth")
    with pytest.raises(UserError, match=r"not a torchvision resnet34 state_dict: tensors 80 missing "
                                         r"\(layer1\.2\.bn1\.bias, "):
        torch_io.import_weights(path, "resnet34", tmp_path / "a")
    resnet50 = save_pth(torchvision.models.resnet50(num_classes=10), tmp_path / "resnet50.pth")
    with pytest.raises(UserError, match=r"not a torchvision resnet18 state_dict: tensors \d+ unexpected "
                                         r"\(layer1\.0\.bn3\.bias, "):
        torch_io.import_weights(resnet50, "resnet18", tmp_path / "b")
    state = net.state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(128, 32, 3, 3)
    torch.save(state, tmp_path / "misshaped.pth")
    with pytest.raises(UserError, match=r"tensor layer2\.0\.conv1\.weight has shape \(128, 32, 3, 3\); "
                                         r"a resnet18 needs \(128, 64, 3, 3\)"):
        torch_io.import_weights(tmp_path / "misshaped.pth", "resnet18", tmp_path / "c")
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_training_checkpoints_and_ddp_prefixes_are_unwrapped(tmp_path):
    net = random_torchvision("resnet18", num_classes=3)
    wrapped = {"epoch": 7, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}
    torch.save(wrapped, tmp_path / "checkpoint.pth")
    torch_io.import_weights(tmp_path / "checkpoint.pth", "resnet18", tmp_path / "run")
    assert pretrained.load(tmp_path / "run").config.num_classes == 3


@pytest.mark.slow
def test_import_command_reports_one_line(tmp_path):
    (tmp_path / "broken.pth").write_bytes(b"not a pickle")
    command = [sys.executable, "-m", "resnet_flax.torch_io", "import", str(tmp_path / "broken.pth"),
               "--model=resnet18", f"--workdir={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'broken.pth'}: not a PyTorch weights file that loads with weights_only=True "
        + result.stderr.split("weights_only=True ", 1)[1].strip()]

    net = random_torchvision("resnet18", num_classes=4)
    save_pth(net, tmp_path / "good.pth")
    result = subprocess.run(command[:4] + [str(tmp_path / "good.pth")] + command[5:], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"(resnet18, 4 classes) into {tmp_path / 'run' / 'checkpoints' / '0'}" in result.stdout
    export = [sys.executable, "-m", "resnet_flax.torch_io", "export", f"--workdir={tmp_path / 'run'}",
              str(tmp_path / "out.safetensors")]
    result = subprocess.run(export, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    exported = torch_state_dict.read_state_dict(tmp_path / "out.safetensors")
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)


@pytest.mark.slow
def test_imported_weights_evaluate_on_signs_at_their_own_size(tmp_path):
    from resnet_flax import evaluate

    save_pth(random_torchvision("resnet18", num_classes=6), tmp_path / "six.pth")
    torch_io.import_weights(tmp_path / "six.pth", "resnet18", tmp_path / "run")
    result = evaluate.evaluate_checkpoint(tmp_path / "run")
    assert result["examples"] == 120 and result["data"].endswith("(imagenet to 224x224)")
    assert 0.0 <= result["test_accuracy"] <= 1.0 and np.isfinite(result["test_loss"])


@pytest.mark.slow
def test_timm_resnet_from_safetensors_gives_timms_probabilities(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    net = timm.create_model("resnet18", pretrained=False, num_classes=5)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        net.fc.weight.mul_(20.0)
    net.eval()
    save_file(net.state_dict(), str(tmp_path / "model.safetensors"))
    torch_io.import_weights(tmp_path / "model.safetensors", "resnet18", tmp_path / "run")
    trained = pretrained.load(tmp_path / "run")
    images = np.random.default_rng(0).integers(0, 256, (3, 160, 160, 3), dtype=np.uint8)
    normalized = (images / 255.0 - np.asarray(input_pipeline.IMAGENET_MEAN)) / np.asarray(input_pipeline.IMAGENET_STD)
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(normalized.transpose(0, 3, 1, 2)).float()), -1).numpy()
    assert 0.05 < expected.max() < 0.99
    np.testing.assert_allclose(trained.probabilities(images), expected, atol=1e-5, rtol=0)


def test_export_of_the_assignment_layout_is_refused(smoke_run, tmp_path):
    with pytest.raises(UserError, match=r"in the 'assignment' layout; only the torchvision layout"):
        torch_io.export_weights(smoke_run[0], tmp_path / "out.pth")


def test_keras_export_of_an_imported_torchvision_model_is_refused(tmp_path):
    from resnet_flax.keras_io.__main__ import export_weights as keras_export

    torch_io.import_weights(save_pth(random_torchvision("resnet18", num_classes=6), tmp_path / "a.pth"),
                            "resnet18", tmp_path / "run")
    with pytest.raises(UserError, match=r"holds a resnet18 in the 'torchvision' layout; only the assignment's"):
        keras_export(tmp_path / "run", tmp_path / "out.weights.h5")
    assert not (tmp_path / "out.weights.h5").exists()


@pytest.mark.slow
def test_state_dict_names_follow_torchvision_for_every_depth():
    for name in ("resnet34", "resnet101", "resnet152"):
        from resnet_flax import models

        model = models.create_model(name, num_classes=1000, variant="torchvision")
        ours = set(torch_state_dict.torch_names(pretrained.abstract_variables(model, 64)))
        theirs = {k for k in getattr(torchvision.models, name)().state_dict() if not k.endswith("num_batches_tracked")}
        assert ours == theirs, name
    jax.clear_caches()
