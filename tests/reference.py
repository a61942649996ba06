"""Float64 NumPy references for the convolution tests, written from the definition."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np


def reference_conv(x, kernel, strides, padding):
    """A loop-over-taps convolution written from the definition, with TF padding computed by hand."""
    n, h, w, cin = x.shape
    kh, kw, _, cout = kernel.shape
    sh, sw = strides
    if padding == "SAME":
        oh, ow = -(-h // sh), -(-w // sw)
        ph, pw = max((oh - 1) * sh + kh - h, 0), max((ow - 1) * sw + kw - w, 0)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    else:
        oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = np.zeros((n, oh, ow, cout), np.float64)
    for i, j in itertools.product(range(kh), range(kw)):
        patch = x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
        out += patch @ kernel[i, j]
    return out


def sin_loss_and_grads(conv_fn):
    """``sum(sin(conv_fn(x, k)))`` and its gradients for ``x`` and ``k``, jitted."""
    return jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(conv_fn(x, k))), argnums=(0, 1)))


def reference_sin_loss_grads(x, kernel):
    """Gradients of sum(sin(conv(x, kernel))), 3x3 'same', in float64 by NumPy: the kernel's from
    the definition, the input's as the adjoint sum over taps."""
    y = reference_conv(x, kernel, (1, 1), "SAME")
    d_out = np.cos(y)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1:3]
    d_kernel = np.zeros_like(kernel)
    d_padded = np.zeros_like(padded)
    for i, j in itertools.product(range(3), range(3)):
        d_kernel[i, j] = np.einsum("nhwc,nhwo->co", padded[:, i:i + h, j:j + w], d_out)
        d_padded[:, i:i + h, j:j + w] += d_out @ kernel[i, j].T
    return y, d_padded[:, 1:-1, 1:-1], d_kernel
