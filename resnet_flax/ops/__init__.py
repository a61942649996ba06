"""The fast CPU kernels the layers are built from: plain JAX functions, most with hand-written
gradients (``jax.custom_vjp``), none of them flax modules.

* ``conv``: 2-D convolution by XLA, as matrix products (im2col) or by Winograd, one parameter
  layout; evaluation's derived kernels.
* ``winograd``: 3x3 stride-1 'same' convolution by F(2x2, 3x3) / F(4x4, 3x3).
* ``batchnorm``: batch normalisation in training mode with a closed-form gradient.
* ``pooling``: max-pool whose gradient is strided slices.
* ``taps``: the strided window slices they share.

docs/performance.md says why each exists and what it saves.
"""
