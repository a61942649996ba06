"""Transfer learning: torchvision's ImageNet ResNet-50 fine-tuned on SIGNS.

Weights:  this machine downloads nothing; where torchvision can, save them once, e.g.
          python -c "import torch, torchvision; torch.save(torchvision.models.resnet50(
              weights='IMAGENET1K_V2').state_dict(), 'resnet50.pth')"
Import:   python -m resnet_flax.torch_io import resnet50.pth --model=resnet50 --workdir=runs/tv_resnet50
Run it:   python -m resnet_flax.main --config=configs/signs_transfer.py --workdir=runs/signs_transfer
          (the weights of another workdir: --config.restore_from=DIR; a linear probe, the
          backbone and its BatchNorm statistics frozen: --config.freeze=backbone)
What happens: every weight but the 1000-class output layer is loaded ("fc starts fresh for 6
          classes"); SIGNS's 64x64 images are normalised with ImageNet's mean and std, as the
          weights expect; SGD with Nesterov momentum, a short warm-up and cosine decay, weight
          decay on the kernels, 10 epochs.
"""

from resnet_flax.config import default_config


def get_config():
    config = default_config()
    config.model = "resnet50"
    config.variant = "torchvision"
    config.restore_from = "runs/tv_resnet50"
    config.normalization = "imagenet"
    config.optimizer = "sgd"
    config.learning_rate = 0.01
    config.momentum = 0.9
    config.nesterov = True
    config.weight_decay = 1e-4
    config.lr_schedule = "cosine"
    config.warmup_epochs = 1.0
    config.augment = True
    config.num_epochs = 10
    config.bn_recalibration_batches = 34
    return config
