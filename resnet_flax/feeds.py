"""Batches of a split as global device arrays, a chunk of steps at a time. Each process reads,
decodes and transfers only the rows of each global batch that its own devices hold.

- ``InMemoryFeed`` (SIGNS): the rows gathered from the arrays in memory (``runtime.gather_batches``).
- ``StreamingFeed`` (image folders, TFDS): a grain ``MapDataset`` over this process's rows of the
  plan, read ahead in ``config.data_threads`` threads (``read_ahead``): files decoded and
  preprocessed a couple of batches ahead, nothing else resident; memory does not grow with the
  dataset.

A plan is ``(indices, mask)`` of shape (steps, batch) (``input_pipeline.batch_indices``): for
training, the order of (seed, epoch) alone, so a run resumed at batch k of an epoch feeds exactly
the batches an uninterrupted run would have fed from there.
"""

import collections
import concurrent.futures
import os
import sys
import threading
from collections.abc import Iterator

import grain
import jax
import numpy as np

from resnet_flax import input_pipeline, preprocessing, runtime
from resnet_flax.errors import UserError

def local_columns(mesh, batch_size: int) -> np.ndarray:
    """The positions within a global batch that this process's devices hold, ascending."""
    index_map = runtime.along_batch(mesh).addressable_devices_indices_map((1, batch_size))
    columns = {c for index in index_map.values() for c in range(*index[1].indices(batch_size))}
    return np.asarray(sorted(columns), np.int64)


def to_global(local: dict[str, np.ndarray], columns: np.ndarray, batch_size: int, mesh) -> dict[str, jax.Array]:
    """Arrays of shape (steps, len(columns), ...) holding this process's rows as global arrays of
    shape (steps, batch_size, ...), split along the batch axis."""
    sharding = runtime.along_batch(mesh)
    position = np.full(batch_size, -1, np.int64)
    position[columns] = np.arange(len(columns))

    def build(array):
        def rows(index):
            wanted = position[np.arange(batch_size)[index[1]]]
            if wanted[0] >= 0 and np.array_equal(wanted, np.arange(wanted[0], wanted[0] + len(wanted))):
                return array[index[0], wanted[0]:wanted[0] + len(wanted)]  # contiguous: a view
            return array[index[0]][:, wanted]

        return jax.make_array_from_callback((array.shape[0], batch_size, *array.shape[2:]), sharding, rows)

    return {name: build(array) for name, array in local.items()}


def gather_chunk(split: input_pipeline.Split, indices: np.ndarray, mask: np.ndarray, begin: int,
                 length: int, capacity: int, mesh) -> tuple[dict[str, jax.Array], jax.Array]:
    """The arguments of a training chunk compiled for ``capacity`` batches that runs the ``length``
    batches of ``indices``/``mask`` from ``begin``, from a split in memory: the batches, and the
    number of steps."""
    # A short chunk fills the compiled shape with copies of its first batch that never run.
    rows = np.r_[begin:begin + length, np.full(capacity - length, begin)]
    batches = runtime.gather_batches(split.images, split.labels, indices[rows], mask[rows], mesh)
    return batches, runtime.replicated_scalar(np.int32(length), mesh)


class InMemoryFeed:
    """Chunks of a split held in memory; nothing to decode."""

    def __init__(self, split: input_pipeline.Split, mesh, description: str | None = None):
        self.split, self.mesh = split, mesh
        self.description = description or split.source
        self.decoded = 0  # nothing is decoded

    def __len__(self) -> int:
        return len(self.split)

    def chunks(self, indices, mask, lengths, capacity: int, epoch: int = 0, train: bool = True
               ) -> Iterator[tuple[dict[str, jax.Array], int]]:
        begin = 0
        for length in lengths:
            batches, _ = gather_chunk(self.split, indices, mask, begin, length, capacity or length, self.mesh)
            yield batches, length
            begin += length

    def report_skipped(self, what: str) -> None:
        """Nothing is decoded, so nothing is ever left out."""


class StreamingFeed:
    """Chunks of a split decoded on the fly (``datasets.ImageFolderSource``, ``TfdsSource``):
    a grain ``MapDataset`` over this process's rows of the plan, mapped through decoding and
    preprocessing to ``image_size``, read ahead by ``threads`` threads (``read_ahead``).

    Training examples are preprocessed with a generator seeded by (seed, epoch, example index)
    (``preprocessing``: 'imagenet' crops, drawn before decoding), evaluation ones (and training
    ones with 'resize') deterministically. A file that cannot be
    decoded stops the run with ``bad_images='fail'``; with 'skip' it is masked out of its batch
    (as padding is) and listed in ``skipped``.
    """

    def __init__(self, source, mesh, image_size: int, preprocessing_name: str, seed: int,
                 threads: int = 0, bad_images: str = "fail"):
        self.source, self.mesh, self.image_size = source, mesh, image_size
        self.preprocessing, self.seed, self.bad_images = preprocessing_name, seed, bad_images
        self.threads = threads or len(os.sched_getaffinity(0))
        self.description = source.description
        self.decoded, self.skipped = 0, []  # counted by this process: the rows it decoded
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.source)

    def _example(self, index: int, valid: bool, epoch: int, train: bool) -> tuple[np.ndarray, int] | None:
        """The example's pixels at ``image_size`` and label; None for padding and left-out files."""
        if not valid:
            return None
        try:
            if train and self.preprocessing == "imagenet":
                pixels, label = self._random_crop(index, np.random.default_rng([self.seed, epoch, index]))
            else:
                image, label = self.source.read(index)
                pixels = preprocessing.eval_image(image, self.image_size, self.preprocessing)
        except UserError as e:
            if self.bad_images == "fail":
                raise UserError(f"{e} (config.bad_images='skip' leaves such files out)") from None
            with self._lock:
                self.skipped.append(str(e))
            return None
        with self._lock:
            self.decoded += 1
        return pixels, label

    def _random_crop(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """``preprocessing.random_resized_crop`` of example ``index``, its box drawn from the image's
        size before it is decoded, so that a JPEG much larger than the crop needs is decoded at
        1/2 to 1/8 of its size (a phone photo: about 10 times faster; pixels of the crop as a
        DCT-scaled decode gives them, not as the full decode resized would)."""
        drawn = {}

        def reduction(width: int, height: int) -> int:
            drawn["box"], drawn["width"] = preprocessing.random_crop_box(height, width, rng), width
            return preprocessing.dct_reduction(drawn["box"], self.image_size)

        image, label = self.source.read(index, reduction=reduction)
        flip = rng.random() < 0.5
        return preprocessing.resized_crop(image, drawn["box"], drawn["width"], self.image_size, flip), label

    def chunks(self, indices, mask, lengths, capacity: int | None, epoch: int = 0, train: bool = True
               ) -> Iterator[tuple[dict[str, jax.Array], int]]:
        """Global arrays of ``lengths[i]`` batches of the plan, one after the other, filled up to
        ``capacity`` batches (None: as long as each call), and each one's length."""
        batch_size = indices.shape[1]
        columns = local_columns(self.mesh, batch_size)
        steps = sum(lengths)
        local_indices = indices[:steps, columns].reshape(-1)
        local_mask = mask[:steps, columns].reshape(-1)
        dataset = grain.MapDataset.range(len(local_indices)).map(
            lambda i: self._example(int(local_indices[i]), bool(local_mask[i]), epoch, train))
        examples = read_ahead(dataset, self.threads, window=max(2 * len(columns), 4 * self.threads))
        size, rows = self.image_size, len(columns)
        for length in lengths:
            chunk = {"image": np.zeros(((capacity or length), rows, size, size, 3), np.uint8),
                     "label": np.zeros(((capacity or length), rows), np.int32),
                     "mask": np.zeros(((capacity or length), rows), bool)}
            for step in range(length):  # each example written once, into the chunk's arrays
                for row in range(rows):
                    example = next(examples)
                    if example is not None:
                        chunk["image"][step, row], chunk["label"][step, row] = example
                        chunk["mask"][step, row] = True
            for name in chunk:  # a short chunk: copies of its first batch, never run
                chunk[name][length:] = chunk[name][0]
            yield to_global(chunk, columns, batch_size, self.mesh), length

    def report_skipped(self, what: str) -> None:
        """One warning line for the files left out since the last report."""
        with self._lock:
            skipped, self.skipped = self.skipped, []
        if skipped:
            print(f"warning: {what}: left out {len(skipped)} undecodable image(s), e.g. {skipped[0]}",
                  file=sys.stderr, flush=True)


def read_ahead(dataset: grain.MapDataset, threads: int, window: int) -> Iterator:
    """``dataset[0]``, ``dataset[1]``, ... in order, read by ``threads`` threads up to ``window``
    elements ahead of the consumer: at most ``window`` elements are resident.

    A grain ``MapDataset`` is random access, so reading ahead needs only a bounded queue of
    futures. On 2 cores grain's own thread prefetch (``to_iter_dataset(ReadOptions(...))``) ran
    about 5% slower than this (medians of 5 alternated rounds) and its worker processes
    (``mp_prefetch``, spawned) at half the rate, their start included (experiments/input_pipeline.md,
    "Reading ahead")."""
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="feed")
    pending = collections.deque()
    try:
        for index in range(len(dataset)):
            pending.append(pool.submit(dataset.__getitem__, index))
            if len(pending) > window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # also when the consumer stops early: what is queued is dropped
        pool.shutdown(wait=False, cancel_futures=True)


def make_feed(source, config, mesh):
    """The feed for a ``datasets`` source: in memory for SIGNS, streaming otherwise."""
    if source.in_memory:
        return InMemoryFeed(source.split, mesh, source.description)
    return StreamingFeed(source, mesh, config.image_size, config.preprocessing, config.seed,
                         threads=config.data_threads, bad_images=config.bad_images)


def chunked(num_batches: int, capacity: int) -> list[int]:
    """``num_batches`` in calls of ``capacity``, the last one shorter."""
    return [min(capacity, num_batches - begin) for begin in range(0, num_batches, capacity)]
