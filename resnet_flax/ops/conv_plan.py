"""Which kernel computes each convolution of a model: a ``ConvPlan`` maps a layer's shape to one of
``conv.KERNELS``; ``resnet_flax.autotune`` fills it by measurement, ``layers.Conv2D`` reads it.

A shape is a ``ConvSpec``: whether the layer trains (forward and backward) or evaluates (forward,
from kernels derived once per call), the input's and the kernel's shapes, strides, padding and
dtype. Its ``key`` is plain text, so plans and the tuning cache are JSON.
"""

import dataclasses
import re
from collections.abc import Mapping, Sequence

import numpy as np

from resnet_flax.ops import conv

MODES = ("train", "eval")
_KEY = re.compile(r"(train|eval) x(\d+(?:,\d+){3}) k(\d+(?:,\d+){3}) s(\d+),(\d+) p(\d+(?:,\d+){3}) (\w+)")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    mode: str  # 'train' | 'eval'
    input_shape: tuple[int, int, int, int]  # NHWC, as the layer is traced (the global batch)
    kernel_shape: tuple[int, int, int, int]  # HWIO
    strides: tuple[int, int]
    pads: conv.Padding
    dtype: str = "float32"

    @property
    def key(self) -> str:
        """``train x32,15,15,64 k3,3,64,64 s1,1 p1,1,1,1 float32``."""
        def join(values):
            return ",".join(str(v) for v in values)
        return (f"{self.mode} x{join(self.input_shape)} k{join(self.kernel_shape)} s{join(self.strides)} "
                f"p{join(p for pair in self.pads for p in pair)} {self.dtype}")

    @classmethod
    def from_key(cls, key: str) -> "ConvSpec":
        """The spec a ``key`` names; ValueError for text that is not one."""
        match = _KEY.fullmatch(key) if isinstance(key, str) else None
        if match is None:
            raise ValueError(f"not a convolution shape key: {key!r}")
        mode, x, k, sh, sw, p, dtype = match.groups()
        pads = _ints(p)
        return cls(mode, _ints(x), _ints(k), (int(sh), int(sw)), ((pads[0], pads[1]), (pads[2], pads[3])), dtype)

    @property
    def candidates(self) -> tuple[str, ...]:
        return conv.kernel_candidates(self.kernel_shape, self.strides, self.pads)

    def static_kernel(self, impl: str = "winograd") -> str:
        """What ``impl``'s static rule runs for this layer."""
        return conv.static_kernel(impl, self.kernel_shape, self.strides, self.pads, self.input_shape[1:3],
                                  inference=self.mode == "eval")

    def describe(self) -> str:
        """``3x3/1 64->64 on 15x15, batch 32``."""
        kh, kw, cin, cout = self.kernel_shape
        n, h, w, _ = self.input_shape
        return f"{kh}x{kw}/{self.strides[0]} {cin}->{cout} on {h}x{w}, batch {n}"


def layer_spec(mode: str, input_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
               pads: conv.Padding, dtype) -> ConvSpec:
    return ConvSpec(mode, tuple(int(v) for v in input_shape), tuple(int(v) for v in kernel_shape),
                    tuple(int(v) for v in strides), tuple(tuple(int(p) for p in pair) for pair in pads),
                    np.dtype(dtype).name)


@dataclasses.dataclass(frozen=True)
class ConvPlan:
    """Chosen kernels by ``ConvSpec.key``, for a model that runs in ``mode``: training's model and
    evaluation's are built apart (``in_mode``), with the same parameters. A layer whose key is
    absent runs the static rule."""

    choices: tuple[tuple[str, str], ...] = ()
    mode: str = "train"

    @classmethod
    def from_mapping(cls, choices: Mapping[str, str], mode: str = "train") -> "ConvPlan":
        return cls(tuple(sorted(choices.items())), mode)

    def in_mode(self, mode: str) -> "ConvPlan":
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return dataclasses.replace(self, mode=mode)

    def as_dict(self) -> dict[str, str]:
        return dict(self.choices)

    def get(self, key: str) -> str | None:
        return self.as_dict().get(key)  # read while tracing only, a few dozen entries

    def __len__(self) -> int:
        return len(self.choices)
