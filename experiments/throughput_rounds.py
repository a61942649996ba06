"""Paired rounds: this project's ResNet-50 (the CPU default 'winograd', or ``--impl``) against
PyTorch, alternated, to read the ratios on a shared machine whose speed drifts from minute to
minute.

One ``experiments/throughput.py`` run measures each configuration once, about a minute apart, so a
drift of the machine between the two shows up as a change of the ratio (the same code gave 91.4
and 100.7 img/s in two runs five minutes apart). This script runs ``throughput.py``'s own workers
-- the JAX training path of config 'jax winograd' (or 'jax gemm') and the PyTorch peer -- one
after the other, for ``--rounds`` rounds, and reports every round's images/s and ratios and their medians. The
cold/warm start and memory columns stay ``throughput.py``'s job.

    python experiments/throughput_rounds.py              # 5 rounds, ~6 minutes on 2 cores
    python experiments/throughput_rounds.py --rounds 3 --out /tmp/rounds
    python experiments/throughput_rounds.py --rounds 3 --model resnet50 --image-size 128
        # another workload (batch 32): writes experiments/throughput_rounds_resnet50_128px.md
"""

import argparse
import datetime
import os
import statistics
import sys
import tempfile
from pathlib import Path

import throughput
from throughput import HERE, jax_worker_argv, load_average, machine_info, peer_worker_argv, run_worker


def jax_round(impl: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        return run_worker(f"jax-{impl}", jax_worker_argv(impl, "highest", cache, steps))


def torch_round(steps: int) -> dict:
    return run_worker("pytorch", peer_worker_argv("torch_resnet50.py", steps))


METRICS = (("train", "train_images_per_second"), ("eval b32", "eval_images_per_second"),
           ("eval b40", "eval40_images_per_second"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--impl", choices=("winograd", "gemm"), default="winograd", help="conv_impl of our side")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per worker")
    parser.add_argument("--model", default=throughput.DEFAULT_WORKLOAD["model"], choices=throughput.MODELS)
    parser.add_argument("--image-size", type=int, default=throughput.DEFAULT_WORKLOAD["image_size"])
    parser.add_argument("--out", default=None, help="output path without suffix (default experiments/"
                        "throughput_rounds, or throughput_rounds_MODEL_SIZEpx for another workload)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    throughput.set_workload(args.model, args.image_size, throughput.DEFAULT_WORKLOAD["batch"])
    if args.out is None:
        args.out = str(HERE / ("throughput_rounds" if throughput.is_default_workload()
                               else f"throughput_rounds_{args.model}_{args.image_size}px"))

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = load_average()
    rounds = []
    for index in range(args.rounds):
        ours, peer = jax_round(args.impl, args.steps), torch_round(args.steps)
        if "error" in ours or "error" in peer:
            print(f"round {index + 1} failed: {ours.get('error') or peer.get('error')}", file=sys.stderr)
            return 1
        rounds.append({name: (ours[key], peer[key]) for name, key in METRICS})

    lines = [
        f"# Paired rounds: resnet_flax '{args.impl}' vs PyTorch, alternated",
        "",
        f"`python experiments/throughput_rounds.py --rounds {args.rounds} --steps {args.steps} --impl {args.impl}"
        + ("" if throughput.is_default_workload() else f" --model {args.model} --image-size {args.image_size}")
        + f"`, {started:%Y-%m-%d %H:%M} - {datetime.datetime.now(datetime.timezone.utc):%H:%M} UTC. "
        f"{throughput.MODEL_DESCRIPTIONS[args.model]}, {args.image_size}x{args.image_size}, batch 32, float32; "
        f"each round runs `throughput.py`'s 'jax {args.impl}' worker, then its "
        f"PyTorch worker (images/s, steady state). Load average before {load_before}, after {load_average()}.",
        "",
        "| round | " + " | ".join(f"{name} ours | {name} PyTorch | {name} ratio" for name, _ in METRICS) + " |",
        "|---|" + "---|---|---|" * len(METRICS),
    ]
    for index, result in enumerate(rounds, 1):
        cells = [f"{ours:.1f} | {peer:.1f} | {ours / peer:.2f}x" for ours, peer in result.values()]
        lines.append(f"| {index} | " + " | ".join(cells) + " |")
    medians = []
    for name, _ in METRICS:
        ours = statistics.median(r[name][0] for r in rounds)
        peer = statistics.median(r[name][1] for r in rounds)
        ratio = statistics.median(r[name][0] / r[name][1] for r in rounds)
        medians.append(f"{ours:.1f} | {peer:.1f} | {ratio:.2f}x")
    lines.append("| median | " + " | ".join(medians) + " |")
    info = machine_info()
    lines += ["", f"Machine: {info.get('cpu', '?')}, {info.get('cores', '?')} cores; "
              f"{', '.join(f'{k} {v}' for k, v in info.get('versions', {}).items())}; "
              f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
              f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '')!r}."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).with_suffix(".md").write_text(text)
    print(f"wrote {Path(args.out).with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
