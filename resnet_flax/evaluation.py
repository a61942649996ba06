"""Evaluation: inference-mode loss and accuracy over padded, masked batches, each example counted
once, as one compiled program. ``Evaluator`` is the entry point that training and the
``evaluate`` command share.

The program derives the kernels its layers multiply by once per call, before its loop over
batches (``inference_kernels``), and returns them beside its sums: as outputs they get buffers of
their own, where XLA would otherwise keep them in its per-call scratch buffer, which it maps afresh
each call (one page fault per 4 KiB, ~18 ms a call for ResNet-50 on 2 cores; docs/performance.md).
On CPU it is compiled with XLA options of its own (``runtime.evaluation_compiler_options``).
"""

import functools
import time
from collections.abc import Mapping

import jax
import numpy as np

from resnet_flax import feeds, input_pipeline, program_cache, runtime, steps
from resnet_flax.ops import conv


def inference_kernels(apply_fn, variables: Mapping, images: jax.Array, normalization: str = "unit") -> dict:
    """``{conv.INFERENCE_KERNELS: ...}``: every kernel in the form evaluation multiplies by, where
    that differs from the kernel (``conv.inference_kernel``), derived by applying the model to
    ``images``, one batch, so that each layer sees the shape its kernel is chosen for (the rest of
    that forward pass is dead code, which XLA drops); ``{}`` where no layer has one."""
    _, derived = apply_fn(variables, input_pipeline.normalize(images, normalization), train=False,
                          mutable=[conv.INFERENCE_KERNELS])
    return dict(derived)


def evaluate_batches(apply_fn, num_classes: int, normalization: str = "unit", confusion: bool = False):
    """``(variables, batches) -> (sums, kernels)``: the sums over all of ``batches`` (arrays of
    shape (steps, batch, ...)), to be compiled as one program, and the ``inference_kernels`` it
    derived first; with ``confusion``, the sums hold the confusion matrix too."""
    step = functools.partial(steps.eval_step, apply_fn, num_classes=num_classes, normalization=normalization,
                             confusion=confusion)

    def evaluate(variables, batches):
        kernels = inference_kernels(apply_fn, variables, batches["image"][0], normalization)
        sums = steps.scan_batches(lambda v, b: (v, step(v, b)), {**variables, **kernels}, batches)[1]
        return sums, kernels

    return evaluate


def evaluation_program(apply_fn, num_classes: int, normalization: str = "unit", confusion: bool = False):
    """``evaluate_batches`` jitted with ``runtime.evaluation_compiler_options()`` (so it must not be
    called inside another jit)."""
    return jax.jit(evaluate_batches(apply_fn, num_classes, normalization, confusion),
                   compiler_options=runtime.evaluation_compiler_options())


def split_batches(split: input_pipeline.Split, batch_size: int, mesh, examples: np.ndarray | None = None,
                  num_batches: int | None = None) -> dict[str, jax.Array]:
    """The examples of ``split`` (all, or the indices ``examples``) in batches of ``batch_size``,
    the last padded and masked, as global arrays split along the batch axis; ``num_batches`` pads
    with fully masked batches up to that many (to reuse a compiled shape)."""
    order = np.arange(len(split)) if examples is None else examples
    indices, mask = input_pipeline.batch_indices(order, batch_size, num_batches)
    return runtime.gather_batches(split.images, split.labels, indices, mask, mesh)


class EvaluationBatches:
    """A split's evaluation batches in chunks of at most ``capacity`` batches of ``batch_size``, the
    last padded and masked: built once and kept on the devices for a split in memory (SIGNS: one
    chunk), streamed afresh each pass otherwise (``feeds.StreamingFeed``)."""

    def __init__(self, feed, batch_size: int, capacity: int, mesh):
        self.feed = feed
        self.indices, self.mask = input_pipeline.batch_indices(np.arange(len(feed)), batch_size)
        self.num_batches = len(self.indices)
        self._kept = None
        if isinstance(feed, feeds.InMemoryFeed):
            self._kept = [split_batches(feed.split, batch_size, mesh)]
        self._lengths = feeds.chunked(self.num_batches, capacity)

    def __iter__(self):
        if self._kept is not None:
            return iter(self._kept)
        chunks = self.feed.chunks(self.indices, self.mask, self._lengths, capacity=None, train=False)
        return (batches for batches, _ in chunks)


class Evaluator:
    """``evaluator(variables, batches)``: mean loss, accuracy and example count of a model's
    ``variables`` on ``batches`` (``split_batches``).

    The program is compiled once per shape of its arguments, when first needed, through
    ``programs`` (a run's ``program_cache.ProgramCache``) when given; ``compile_seconds`` adds up
    the time that took. ``confusion``: the sums also hold the confusion matrix (``total_sums``).
    """

    def __init__(self, apply_fn, num_classes: int, programs: program_cache.ProgramCache | None = None,
                 normalization: str = "unit", confusion: bool = False):
        self._apply_fn, self._num_classes, self._normalization = apply_fn, num_classes, normalization
        self._confusion = confusion
        self._programs = programs
        self._compiled: dict[str, jax.stages.Compiled] = {}
        self.compile_seconds = 0.0

    def sums(self, variables: Mapping, batches: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """The summed loss, hits and count (add up exactly across calls)."""
        return self._program(variables, batches)(variables, batches)[0]

    def __call__(self, variables: Mapping, batches: Mapping[str, jax.Array]) -> dict[str, float]:
        return steps.summarize(self.sums(variables, batches))

    def over(self, variables: Mapping, chunks) -> dict[str, float]:
        """Mean loss and accuracy over every chunk of batches in ``chunks`` (``EvaluationBatches``)."""
        return steps.summarize(self.total_sums(variables, chunks))

    def total_sums(self, variables: Mapping, chunks) -> dict[str, np.ndarray]:
        totals = {}
        for batches in chunks:
            for name, value in jax.device_get(self.sums(variables, batches)).items():
                totals[name] = totals.get(name, 0) + np.asarray(value, np.float64)
        return totals

    def _program(self, variables, batches) -> jax.stages.Compiled:
        key = program_cache.describe_args((variables, batches))
        if key not in self._compiled:
            start = time.perf_counter()
            args = runtime.abstract(dict(variables)), runtime.abstract(dict(batches))
            if self._programs is None:
                program = evaluation_program(self._apply_fn, self._num_classes, self._normalization,
                                             self._confusion).lower(*args).compile()
            else:
                name = "evaluate_confusion" if self._confusion else "evaluate"
                program = self._programs.compile(name, evaluate_batches(self._apply_fn, self._num_classes,
                                                                        self._normalization, self._confusion),
                                                 *args, compiler_options=runtime.evaluation_compiler_options())
            self._compiled[key] = program
            self.compile_seconds += time.perf_counter() - start
        return self._compiled[key]
