"""The streaming input pipeline on JPEG folders: its speed against torchvision's DataLoader, and
whether a training run's memory grows with the dataset.

Two measurements, chosen by ``--mode`` (default both):

* ``throughput``: decoded and preprocessed images/s at 224x224 from an ImageFolder of JPEGs.
  This project's ``feeds.StreamingFeed`` (grain threads in one process, 'imagenet' training
  preprocessing: RandomResizedCrop's parameters, a PIL resize and a horizontal flip, chunks of
  ``--chunk`` batches as uint8 jax arrays) against torchvision's ``DataLoader(ImageFolder(...,
  Compose([RandomResizedCrop(224), RandomHorizontalFlip(), PILToTensor()])), shuffle=True,
  persistent_workers=False)`` (worker processes, uint8 tensors), with the same files, workers
  and batch size. Both stop at uint8 pixels: normalisation is the model's side (resnet_flax
  normalises inside the compiled step). After an untimed warm-up pass of ~200 images each, every
  round times one full pass of ours, then one of torchvision's, so that the machine's drift falls
  on both; reported: every round's img/s, the medians and their ratio.
* ``rss``: the peak RSS of a one-epoch training run (``python -m resnet_flax.main``,
  ``configs/smoke.py``'s tiny ResNet at 224x224, 'imagenet' preprocessing, batch 32) on 1,000
  and on 10,000 images, each in a subprocess of its own: polled with psutil (the process and its
  children) every 0.05 s, and the child's ``ru_maxrss``. The feed holds the file list and a few
  batches, not the images, so the two should differ by less than 200 MB.

The images are generated once per size and kept in ``--data-dir``
(``<data-dir>/<images>/train/<class>/<i>.jpg`` and a small ``test/``, torchvision's ImageFolder
layout, 10 classes): 300-500 px a side in mixed aspect ratios, smooth random colour fields with
finer detail and noise, JPEG quality 90, about 90 KB a file, like ImageNet photos.

Writes ``experiments/input_pipeline.md`` (a mode that did not run keeps its section from the file
there) and prints the same tables.

    python experiments/input_pipeline.py                                   # both parts
    python experiments/input_pipeline.py --mode=throughput --workers=2 --batch=64 --rounds=3
    python experiments/input_pipeline.py --mode=rss --rss-sizes=1000,10000
"""

import argparse
import datetime
import importlib.metadata
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from throughput import load_average, machine_info

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

OUT = HERE / "input_pipeline.md"
TITLE = "# The input pipeline: resnet_flax's StreamingFeed against torchvision's DataLoader"
THROUGHPUT_HEADING = "## Throughput: decoded and preprocessed images/s at 224x224"
RSS_HEADING = "## Peak memory of a one-epoch training run"
READ_AHEAD_HEADING = "## Reading ahead: three ways to run the same decoding in parallel"

IMAGE_SIZE = 224
CLASSES = 10
TEST_PER_CLASS = 2  # the training command evaluates on test/; a few images are enough
SEED = 0
DEFAULT_SIDE = (300, 500)  # each side drawn from this range, so aspect ratios mix as in ImageNet
JPEG_QUALITY = 90
WARMUP_IMAGES = 200
WARMUP_EPOCH = 10_000  # an epoch no timed round uses
POLL_S = 0.05
RSS_TARGET_MB = 200
TRAIN_BATCH = 32  # of the training command; every rss size must hold at least one batch
VERSIONS = ("jax", "jaxlib", "grain", "numpy", "torch", "torchvision", "pillow")


# ---------------------------------------------------------------------------------------------
# The images


def synthetic_photo(rng: np.random.Generator, side: tuple[int, int] = DEFAULT_SIDE) -> Image.Image:
    """An RGB image that compresses like a photo: smooth colour fields at a few scales (small
    random arrays upsampled), plus pixel noise."""
    width, height = (int(v) for v in rng.integers(side[0], side[1] + 1, size=2))

    def field(cell: int, amplitude: float) -> np.ndarray:
        small = rng.uniform(0, 255, (max(2, height // cell), max(2, width // cell), 3)).astype(np.uint8)
        smooth = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
        return (np.asarray(smooth, np.float32) - 128) * amplitude

    # Large shapes, then texture; the amplitudes put the files at ~60-120 KB (quality 90).
    pixels = 128 + field(120, 1.0) + field(24, 0.4) + field(6, 0.4) + field(3, 0.4)
    pixels += rng.normal(0, 12, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_split(folder: Path, count: int, split_number: int, side: tuple[int, int] = DEFAULT_SIDE) -> None:
    """``count`` images in ``folder/<class>/``, image i of class i % CLASSES. Each image has a
    generator of its own, so a folder of 1,000 holds the first 1,000 of a folder of 10,000."""
    for c in range(CLASSES):
        (folder / str(c)).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = synthetic_photo(np.random.default_rng([SEED, split_number, i]), side)
        image.save(folder / str(i % CLASSES) / f"{i:05d}.jpg", quality=JPEG_QUALITY)


def image_folder(data_dir: str, images: int, side: tuple[int, int] = DEFAULT_SIDE) -> Path:
    """``<data_dir>/<images>`` (``<images>_<min>-<max>`` for another ``side``) with ``train/`` and
    ``test/``, generated unless already complete."""
    root = Path(data_dir) / (str(images) if side == DEFAULT_SIDE else f"{images}_{side[0]}-{side[1]}")
    marker = root / ".complete"  # written last: an interrupted generation starts again
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        print(f"generating {images} training images in {root} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        write_split(root / "train", images, split_number=0, side=side)
        write_split(root / "test", CLASSES * TEST_PER_CLASS, split_number=1, side=side)
        marker.touch()
        print(f"  {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return root


def read_all(root: Path) -> float:
    """Reads every training file once, so that both pipelines find them in the page cache;
    returns the average file size in bytes."""
    sizes = [len(path.read_bytes()) for path in sorted((root / "train").rglob("*.jpg"))]
    return sum(sizes) / len(sizes)


# ---------------------------------------------------------------------------------------------
# The two pipelines: ``run(epoch, limit)`` feeds one pass (the first ``limit`` images of the
# epoch's order, or all) and returns how many images it decoded.


class OurFeed:
    name = "resnet_flax"

    def __init__(self, root: Path, workers: int, batch: int, chunk: int):
        # Imported here: the rss mode needs neither JAX nor torch in this process.
        from resnet_flax import datasets, feeds, runtime

        sources = datasets.open_image_folder(str(root))
        self.feed = feeds.StreamingFeed(sources.train, runtime.make_mesh(), image_size=IMAGE_SIZE,
                                        preprocessing_name="imagenet", seed=SEED, threads=workers)
        self.batch, self.chunk = batch, chunk

    def run(self, epoch: int, limit: int | None = None) -> int:
        import jax
        from resnet_flax import feeds, input_pipeline

        order = input_pipeline.epoch_order(SEED, epoch, len(self.feed))[:limit]
        indices, mask = input_pipeline.batch_indices(order, self.batch)
        lengths = feeds.chunked(len(indices), self.chunk)
        before = self.feed.decoded
        for batches, _ in self.feed.chunks(indices, mask, lengths, self.chunk, epoch=epoch, train=True):
            jax.block_until_ready(batches["image"])  # uint8 (chunk, batch, 224, 224, 3)
        return self.feed.decoded - before


class TorchvisionLoader:
    name = "torchvision"

    def __init__(self, root: Path, workers: int, batch: int):
        from torchvision import datasets, transforms

        self.dataset = datasets.ImageFolder(str(root / "train"), transform=transforms.Compose([
            transforms.RandomResizedCrop(IMAGE_SIZE), transforms.RandomHorizontalFlip(), transforms.PILToTensor()]))
        self.workers, self.batch = workers, batch

    def run(self, epoch: int, limit: int | None = None) -> int:
        import torch
        from torch.utils.data import DataLoader, Subset

        dataset = self.dataset if limit is None else Subset(self.dataset, range(limit))
        # A new loader per pass, as every epoch of a loader without persistent workers starts
        # its worker processes afresh.
        loader = DataLoader(dataset, batch_size=self.batch, shuffle=True, num_workers=self.workers,
                            persistent_workers=False, generator=torch.Generator().manual_seed(epoch))
        return sum(len(images) for images, _ in loader)  # uint8 (batch, 3, 224, 224)


def images_per_second(pipeline, epoch: int) -> float:
    start = time.perf_counter()
    images = pipeline.run(epoch)
    return images / (time.perf_counter() - start)


def measure_throughput(args) -> str:
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = load_average()
    root = image_folder(args.data_dir, args.images, args.side)
    average_bytes = read_all(root)
    print(f"{args.images} images in {root}/train, {average_bytes / 1e3:.0f} KB on average", file=sys.stderr)
    pipelines = [OurFeed(root, args.workers, args.batch, args.chunk),
                 TorchvisionLoader(root, args.workers, args.batch)]
    warmup = min(WARMUP_IMAGES, args.images)
    for pipeline in pipelines:
        pipeline.run(WARMUP_EPOCH, limit=warmup)
    rates = {pipeline.name: [] for pipeline in pipelines}
    for round_index in range(args.rounds):
        for pipeline in pipelines:  # ours, then theirs, every round
            rates[pipeline.name].append(images_per_second(pipeline, epoch=round_index))
        print(f"round {round_index + 1}: " + ", ".join(f"{name} {r[-1]:.1f} img/s" for name, r in rates.items()),
              file=sys.stderr, flush=True)
    return throughput_section(args, started, load_before, average_bytes, warmup, rates)


def throughput_heading(side: tuple[int, int]) -> str:
    return f"{THROUGHPUT_HEADING}, {side[0]}-{side[1]} px JPEGs"


def throughput_section(args, started, load_before: str, average_bytes: float, warmup: int,
                       rates: dict[str, list[float]]) -> str:
    import multiprocessing

    ours, theirs = rates["resnet_flax"], rates["torchvision"]
    median_ours, median_theirs = statistics.median(ours), statistics.median(theirs)
    lines = [
        throughput_heading(args.side), "",
        f"{command_line()}, {started:%Y-%m-%d %H:%M} - {datetime.datetime.now(datetime.timezone.utc):%H:%M} UTC. "
        f"{args.images} JPEGs in 10 classes ({args.side[0]}-{args.side[1]} px a side, quality {JPEG_QUALITY}, "
        f"{average_bytes / 1e3:.0f} KB on average), read once before the rounds so that both sides read "
        f"them from the page cache; {args.workers} workers, batch {args.batch}. An untimed warm-up pass "
        f"of {warmup} images each, then per round one full pass of resnet_flax, then one of torchvision. "
        "A pass is timed from its start (threads or worker processes starting included) to its last "
        f"batch. Load average before {load_before}, after {load_average()}.", "",
        f"- resnet_flax: `feeds.StreamingFeed`, a grain `MapDataset` read ahead by {args.workers} threads in this "
        "process (`feeds.read_ahead`), "
        "'imagenet' training preprocessing (RandomResizedCrop's parameters, a PIL bilinear resize, a "
        "horizontal flip; the crop drawn before decoding, so that a JPEG at least twice the crop's size "
        f"each way is decoded at 1/2-1/8 scale); chunks of {args.chunk} batches as uint8 jax arrays "
        f"({args.chunk}, {args.batch}, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), waited for with `jax.block_until_ready`.",
        f"- torchvision: `DataLoader(ImageFolder(train, Compose([RandomResizedCrop({IMAGE_SIZE}), "
        f"RandomHorizontalFlip(), PILToTensor()])), batch_size={args.batch}, shuffle=True, "
        f"num_workers={args.workers}, persistent_workers=False)`, workers started by "
        f"'{multiprocessing.get_start_method()}'; uint8 tensors ({args.batch}, 3, {IMAGE_SIZE}, {IMAGE_SIZE}).",
        "- Both stop at uint8 pixels (PILToTensor, not ToTensor): normalisation is left to the model "
        "side, where resnet_flax does it inside the compiled step.", "",
        "| round | resnet_flax (img/s) | torchvision (img/s) | ratio |",
        "|---|---|---|---|",
        *(f"| {i} | {a:.1f} | {b:.1f} | {a / b:.2f}x |" for i, (a, b) in enumerate(zip(ours, theirs), 1)),
        f"| median | {median_ours:.1f} | {median_theirs:.1f} | {median_ours / median_theirs:.2f}x |", "",
        f"resnet_flax / torchvision, the medians: **{median_ours / median_theirs:.2f}x**.", "",
        machine_line(),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Peak memory of training


def train_command(root: Path, workdir: str) -> list[str]:
    return [sys.executable, "-m", "resnet_flax.main", "--config=configs/smoke.py", f"--workdir={workdir}",
            "--config.dataset=imagefolder", f"--config.data_dir={root}", "--config.num_classes=0",
            f"--config.image_size={IMAGE_SIZE}", "--config.preprocessing=imagenet", "--config.num_epochs=1",
            f"--config.batch_size={TRAIN_BATCH}", f"--config.eval_batch_size={TRAIN_BATCH}",
            "--config.steps_per_chunk=8", "--config.bn_recalibration_batches=0", "--config.compilation_cache_dir=off"]


def tree_rss(process: psutil.Process) -> int:
    """The RSS of ``process`` and all its descendants, summed (0 once it is gone)."""
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:  # ended between the listing and the reading
            pass
    return total


def run_and_watch(command: list[str], log: Path) -> dict:
    """Runs ``command`` in the repository, polling its RSS; returns the wall time, the polled
    peak, the child's ru_maxrss (bytes) and its exit status."""
    start = time.perf_counter()
    with log.open("wb") as out:
        child = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    watched, peak = psutil.Process(child.pid), 0
    while True:
        # os.wait4 gives this child's own ru_maxrss (and its descendants'). RUSAGE_CHILDREN,
        # the same counter, is the maximum over every child reaped so far (earlier sizes,
        # DataLoader workers), so it would not separate the sizes.
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, tree_rss(watched))
        time.sleep(POLL_S)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return {"wall_s": time.perf_counter() - start, "polled": peak, "ru_maxrss": usage.ru_maxrss * 1024,
            "returncode": child.returncode}


class TrainingCrop:
    """Example i of a source as the feed's training path makes it (a crop drawn before decoding,
    resized, flipped); a class at module level, so that grain can send it to worker processes."""

    def __init__(self, source):
        self.source = source

    def __call__(self, index: int):
        from resnet_flax import preprocessing

        rng = np.random.default_rng([SEED, 1, index])
        drawn = {}

        def reduction(width, height):
            drawn["box"], drawn["width"] = preprocessing.random_crop_box(height, width, rng), width
            return preprocessing.dct_reduction(drawn["box"], IMAGE_SIZE)

        image, label = self.source.read(int(index), reduction=reduction)
        return preprocessing.resized_crop(image, drawn["box"], drawn["width"], IMAGE_SIZE, rng.random() < 0.5), label


def measure_read_ahead(args) -> str:
    """The same decoding of the first ``--images`` examples, read ahead three ways, alternated
    round by round: ``feeds.read_ahead`` (a bounded queue of thread-pool futures), grain's thread
    prefetch (``to_iter_dataset(ReadOptions(num_threads, prefetch_buffer_size))``) and grain's
    worker processes (``mp_prefetch``); each timed from its start to its last element."""
    import grain
    from absl import flags
    from resnet_flax import datasets, feeds

    flags.FLAGS.mark_as_parsed()  # grain reads its absl flags; this script parses none
    started, load_before = datetime.datetime.now(datetime.timezone.utc), load_average()
    root = image_folder(args.data_dir, args.images, args.side)
    read_all(root)
    dataset = grain.MapDataset.range(args.images).map(TrainingCrop(datasets.open_image_folder(str(root)).train))
    window = 2 * args.batch
    ways = {
        "feeds.read_ahead (threads)": lambda: feeds.read_ahead(dataset, args.workers, window),
        "grain ReadOptions (threads)": lambda: dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=args.workers, prefetch_buffer_size=window)),
        "grain mp_prefetch (processes)": lambda: dataset.to_iter_dataset().mp_prefetch(
            grain.MultiprocessingOptions(num_workers=args.workers, per_worker_buffer_size=window // args.workers)),
    }
    rates = {name: [] for name in ways}
    for round_index in range(args.rounds):
        for name, start in ways.items():
            begin = time.perf_counter()
            count = sum(1 for _ in start())
            rates[name].append(count / (time.perf_counter() - begin))
        print(f"round {round_index + 1}: " + ", ".join(f"{n} {r[-1]:.0f} img/s" for n, r in rates.items()),
              file=sys.stderr, flush=True)
    lines = [
        READ_AHEAD_HEADING, "",
        f"{command_line()}, {started:%Y-%m-%d %H:%M} - {datetime.datetime.now(datetime.timezone.utc):%H:%M} UTC. "
        f"{args.images} JPEGs generated as for the throughput ({args.side[0]}-{args.side[1]} px), each decoded "
        f"and cropped as the feed's training path does, {args.workers} workers, {window} elements ahead; the "
        f"three ways alternated, {args.rounds} rounds. Load average before {load_before}, after {load_average()}.", "",
        "| way | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " | median (img/s) |",
        "|---|" + "---|" * (args.rounds + 1),
        *(f"| {name} | " + " | ".join(f"{r:.0f}" for r in values) + f" | {statistics.median(values):.0f} |"
          for name, values in rates.items()), "",
        machine_line(),
    ]
    return "\n".join(lines)


def measure_rss(args) -> str:
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = load_average()
    results = {}
    for size in args.rss_sizes:
        root = image_folder(args.data_dir, size)
        with tempfile.TemporaryDirectory(prefix="input_pipeline_rss_") as workdir:
            log = Path(workdir) / "train.log"
            result = run_and_watch(train_command(root, str(Path(workdir) / "run")), log)
            if result["returncode"] != 0:
                sys.exit(f"training on {root} failed (exit status {result['returncode']}):\n"
                         + "\n".join(log.read_text(errors="replace").splitlines()[-20:]))
        results[size] = result
        print(f"{size} images: {result['wall_s']:.1f} s, peak RSS {result['polled'] / 1e6:.0f} MB polled, "
              f"{result['ru_maxrss'] / 1e6:.0f} MB ru_maxrss", file=sys.stderr, flush=True)
    return rss_section(started, load_before, results)


def rss_section(started, load_before: str, results: dict[int, dict]) -> str:
    shown = " ".join(["python", *train_command(Path("<folder>"), "<tmp>")[1:]])
    lines = [
        RSS_HEADING, "",
        f"{command_line()}, {started:%Y-%m-%d %H:%M} - {datetime.datetime.now(datetime.timezone.utc):%H:%M} UTC. "
        "For each size a folder of its own, generated alike (test/ holds "
        f"{CLASSES * TEST_PER_CLASS}), one subprocess: `{shown}` "
        "(the tiny ResNet of `configs/smoke.py`, one epoch, then evaluation of test/). Peak RSS polled "
        f"every {POLL_S} s with psutil (the process and its children, summed), and the child's own "
        "`ru_maxrss` (`os.wait4`: the counter `getrusage(RUSAGE_CHILDREN)` keeps, for this child "
        f"alone); MB = 10^6 bytes. Load average before {load_before}, after {load_average()}.", "",
        "| images | wall (s) | peak RSS, polled (MB) | ru_maxrss (MB) |",
        "|---|---|---|---|",
        *(f"| {size} | {r['wall_s']:.1f} | {r['polled'] / 1e6:.0f} | {r['ru_maxrss'] / 1e6:.0f} |"
          for size, r in results.items()),
    ]
    if len(results) > 1:
        small, large = results[min(results)], results[max(results)]
        polled, maxrss = (large[key] - small[key] for key in ("polled", "ru_maxrss"))
        met = max(abs(polled), abs(maxrss)) < RSS_TARGET_MB * 1e6
        lines += ["", f"{max(results)} against {min(results)} images: {polled / 1e6:+.0f} MB polled, "
                      f"{maxrss / 1e6:+.0f} MB ru_maxrss; the target, under {RSS_TARGET_MB} MB apart, "
                      f"is **{'met' if met else 'not met'}**."]
    lines += ["", machine_line()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The report


def command_line() -> str:
    return "`" + shlex.join(["python", "experiments/input_pipeline.py", *sys.argv[1:]]) + "`"


def machine_line() -> str:
    info = machine_info()
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    versions = []
    for name in VERSIONS:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} not installed")
    xla_flags = f"; XLA_FLAGS={info['xla_flags']}" if info["xla_flags"] else ""
    return (f"Machine: {info['cpu']}, {info['cores']} cores, AVX-512F {'yes' if ' avx512f' in flags else 'no'}, "
            f"{info['memory_gib']:.0f} GiB; Python {info['python']}, {', '.join(versions)}{xla_flags}.")


def sections_of(text: str) -> dict[str, str]:
    """The ``## `` sections of a report, by heading line."""
    sections, heading = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line
            sections[heading] = []
        elif heading is not None:
            sections[heading].append(line)
    return {h: "\n".join([h, *body]).strip() for h, body in sections.items()}


def write_report(new: dict[str, str]) -> None:
    """``OUT`` with the sections just measured, and those of the other mode kept from before."""
    old = sections_of(OUT.read_text()) if OUT.exists() else {}
    parts = [TITLE, "", "Written by `experiments/input_pipeline.py`; see its docstring for what is measured."]
    sections = {**old, **new}
    throughput = sorted((h for h in sections if h.startswith(THROUGHPUT_HEADING)),
                        key=lambda h: int(h.split("x224, ")[1].split("-")[0]) if "x224, " in h else 0)
    for heading in (*throughput, READ_AHEAD_HEADING, RSS_HEADING):
        if sections.get(heading):
            parts += ["", sections[heading]]
    OUT.write_text("\n".join(parts) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("both", "throughput", "rss", "read_ahead"), default="both",
                        help="both = throughput and rss; read_ahead compares ways of reading ahead")
    parser.add_argument("--data-dir", default="/tmp/resnet_flax_bench_images",
                        help="where the generated image folders are kept, one per size")
    parser.add_argument("--images", type=int, default=3000, help="training images of the throughput mode")
    parser.add_argument("--workers", type=int, default=2, help="grain threads / DataLoader worker processes")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=8, help="batches per chunk of our feed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rss-sizes", default="1000,10000", help="training images per rss run, comma-separated")
    parser.add_argument("--side", default=f"{DEFAULT_SIDE[0]},{DEFAULT_SIDE[1]}",
                        help="the throughput images' sides are drawn from MIN,MAX px (phone photos: 2400,3200)")
    args = parser.parse_args()
    args.side = tuple(int(v) for v in args.side.split(","))
    args.rss_sizes = [int(s) for s in args.rss_sizes.split(",") if s.strip()]
    if min(args.images, args.workers, args.batch, args.chunk, args.rounds, *args.rss_sizes) < 1:
        parser.error("--images, --workers, --batch, --chunk, --rounds and --rss-sizes must be >= 1")
    if min(args.rss_sizes) < TRAIN_BATCH:
        parser.error(f"--rss-sizes must be >= {TRAIN_BATCH}, the training batch")

    # JAX warns at every fork; the DataLoader's workers run only PIL and torch, never JAX.
    warnings.filterwarnings("ignore", message="os.fork\\(\\) was called")
    sections = {}
    if args.mode in ("both", "throughput"):
        sections[throughput_heading(args.side)] = measure_throughput(args)
    if args.mode == "read_ahead":
        sections[READ_AHEAD_HEADING] = measure_read_ahead(args)
    if args.mode in ("both", "rss"):
        sections[RSS_HEADING] = measure_rss(args)
    write_report(sections)
    print("\n\n".join(sections.values()))
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
