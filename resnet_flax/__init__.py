"""resnet_flax: the "Residual Networks" assignment's ResNet-50 in JAX/Flax."""

__version__ = "0.1.0"
