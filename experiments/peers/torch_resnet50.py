"""The assignment's ResNet-50 in PyTorch (CPU), timed the way experiments/throughput.py times the
JAX version: batch 32 of 64x64x3 float32, Adam (lr 1e-3, eps 1e-7), cross-entropy.

The architecture is the Keras model's, layer for layer: zero-pad 3, ``conv1`` 7x7/2, ``bn_conv1``,
ReLU, max-pool 3x3/2 (no padding), stages 2-5 of bottleneck blocks (a convolutional block then
2, 3, 5, 2 identity blocks; the stride sits on the first 1x1 conv and on the shortcut conv),
average pool 2x2, flatten, ``fc6``. Keras defaults: conv bias on, Glorot-uniform kernels, zero
biases, BatchNorm epsilon 1e-3 and momentum 0.99 (0.01 in PyTorch's convention). TensorFlow's
'same' padding of a 3x3 window at stride 1 is one pixel on every side, PyTorch's ``padding=1``.
The softmax of the Keras output layer is folded into ``CrossEntropyLoss`` (same loss, same
gradients), so the model returns logits.

``--model torchvision-resnet50`` / ``torchvision-resnet18`` time torchvision's own models instead
(``torchvision.models.resnet50`` / ``resnet18``, 6 classes), and ``--image-size`` any input size
(the assignment's model then flattens a larger map into ``fc6``, as the JAX model does).

Run on its own: ``python experiments/peers/torch_resnet50.py --steps 20``; with ``--result-file``
it writes its measurements as JSON (what throughput.py reads).
"""

import argparse
import json
import os
import resource
import sys
import time

import numpy as np
import torch
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # PyTorch: new = (1 - m) * old + m * batch; Keras's momentum 0.99 is 1 - m
STAGES = ((3, (64, 64, 256)), (4, (128, 128, 512)), (6, (256, 256, 1024)), (3, (512, 512, 2048)))


def bn(features: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(features, eps=BN_EPS, momentum=BN_MOMENTUM)


class Block(nn.Module):
    """The assignment's identity block (``conv_shortcut=False``, stride 1) or convolutional block."""

    def __init__(self, cin: int, filters, stride: int, conv_shortcut: bool):
        super().__init__()
        f1, f2, f3 = filters
        self.branch2a = nn.Conv2d(cin, f1, 1, stride=stride)  # 'valid'
        self.bn2a = bn(f1)
        self.branch2b = nn.Conv2d(f1, f2, 3, padding=1)  # TF 'same' for 3x3, stride 1
        self.bn2b = bn(f2)
        self.branch2c = nn.Conv2d(f2, f3, 1)  # 'valid'
        self.bn2c = bn(f3)
        self.relu = nn.ReLU(inplace=True)
        if conv_shortcut:
            self.branch1 = nn.Conv2d(cin, f3, 1, stride=stride)
            self.bn1 = bn(f3)
        else:
            self.branch1 = self.bn1 = None

    def forward(self, x):
        shortcut = x
        x = self.relu(self.bn2a(self.branch2a(x)))
        x = self.relu(self.bn2b(self.branch2b(x)))
        x = self.bn2c(self.branch2c(x))
        if self.branch1 is not None:
            shortcut = self.bn1(self.branch1(shortcut))
        return self.relu(x + shortcut)


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 6, image_size: int = 64):
        super().__init__()
        self.pad = nn.ZeroPad2d(3)
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2)
        self.bn_conv1 = bn(64)
        self.relu = nn.ReLU(inplace=True)
        self.max_pool = nn.MaxPool2d(3, stride=2)
        blocks, cin = [], 64
        for index, (num_blocks, filters) in enumerate(STAGES):
            blocks.append(Block(cin, filters, stride=1 if index == 0 else 2, conv_shortcut=True))
            cin = filters[2]
            blocks += [Block(cin, filters, stride=1, conv_shortcut=False) for _ in range(num_blocks - 1)]
        self.blocks = nn.Sequential(*blocks)
        self.avg_pool = nn.AvgPool2d(2, stride=2)
        with torch.no_grad():  # the flattened size: 2048 at 64x64, more on larger images
            features = self.avg_pool(self.blocks(self.max_pool(self.conv1(self.pad(
                torch.zeros(1, 3, image_size, image_size)))))).numel()
        self.fc = nn.Linear(features, num_classes)
        for m in self.modules():  # Keras: Glorot-uniform kernels, zero biases
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.max_pool(self.relu(self.bn_conv1(self.conv1(self.pad(x)))))
        x = self.avg_pool(self.blocks(x))
        # At 64x64 the map is 1x1, where NCHW's and NHWC's flatten agree; elsewhere only the order
        # of fc6's inputs differs, which costs the same.
        return self.fc(torch.flatten(x, 1))


MODELS = ("resnet50", "torchvision-resnet50", "torchvision-resnet18")


def build_model(name: str, image_size: int) -> nn.Module:
    """The assignment's ResNet-50 (``resnet50``) or torchvision's ResNet-50 / ResNet-18, 6 classes."""
    if name == "resnet50":
        return ResNet50(6, image_size)
    import torchvision
    return getattr(torchvision.models, name.removeprefix("torchvision-"))(num_classes=6)


def to_input(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW view in channels_last memory, pixels / 255."""
    x = images_u8.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    return x.contiguous(memory_format=torch.channels_last)


def gemm_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="measured training steps")
    parser.add_argument("--warmup", type=int, default=3, help="training steps before timing")
    parser.add_argument("--eval-batches", type=int, default=10, help="measured eval batches per size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="resnet50", choices=MODELS)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--t0", type=float, default=None, help="time.time() at process launch")
    parser.add_argument("--result-file", default=None)
    args = parser.parse_args(argv)
    t0 = args.t0 if args.t0 is not None else time.time()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    num_train, batch = 1080, args.batch_size
    size = args.image_size
    images = torch.from_numpy(rng.integers(0, 256, (num_train, size, size, 3), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 6, num_train).astype(np.int64))
    steps_per_epoch = -(-num_train // batch)
    order = torch.from_numpy(rng.permutation(steps_per_epoch * batch) % num_train)

    model = build_model(args.model, size).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-7)
    loss_fn = nn.CrossEntropyLoss()

    def train_step(step: int) -> float:
        idx = order[(step % steps_per_epoch) * batch:][:batch]
        x, y = to_input(images[idx]), labels[idx]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    model.train()
    start = time.perf_counter()
    train_step(0)
    first_step_s = time.perf_counter() - start
    time_to_first_step_s = time.time() - t0
    for step in range(1, args.warmup):
        train_step(step)
    step_times = []
    for step in range(args.warmup, args.warmup + args.steps):
        start = time.perf_counter()
        loss = train_step(step)
        step_times.append(time.perf_counter() - start)
    train_seconds = sum(step_times)

    model.eval()
    eval_results = {}
    with torch.no_grad():
        for eval_batch in (32, 40):
            x = to_input(images[:eval_batch])
            model(x)  # warm-up
            times = []
            for _ in range(args.eval_batches):
                start = time.perf_counter()
                model(x).sum().item()
                times.append(time.perf_counter() - start)
            eval_results[eval_batch] = {"images_per_second": eval_batch * len(times) / sum(times),
                                        "batches": len(times), "seconds": sum(times)}

    # FLOPs of one training step as PyTorch's counter sees them (convs, matmuls; fwd + bwd).
    flops = None
    try:
        from torch.utils.flop_counter import FlopCounterMode
        model.train()
        with FlopCounterMode(display=False) as counter:
            train_step(0)
        flops = int(counter.get_total_flops())
    except Exception as e:  # the counter is a convenience, not part of the measurement
        print(f"torch flop counter failed: {e}", file=sys.stderr)

    result = {
        "config": "pytorch (eager, CPU)",
        "model": args.model,
        "image_size": size,
        "framework": "torch",
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "device": "cpu",
        "batch_size": batch,
        "train_steps": len(step_times),
        "train_seconds": train_seconds,
        "train_images_per_second": batch * len(step_times) / train_seconds,
        "train_step_seconds": step_times,
        "last_loss": loss,
        "eval": eval_results,
        "eval_images_per_second": eval_results[32]["images_per_second"],
        "eval40_images_per_second": eval_results[40]["images_per_second"],
        "compile_seconds": None,
        "first_step_seconds": first_step_s,
        "time_to_first_step_seconds": time_to_first_step_s,
        "flops_per_train_step_torch_counter": flops,
        "gemm_gflops": gemm_gflops(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(result, f, indent=1)
    print(f"pytorch: train {result['train_images_per_second']:.1f} img/s, eval(b32) "
          f"{result['eval_images_per_second']:.1f} img/s, peak RSS "
          f"{result['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
