"""Training and evaluation throughput by image size and model, this project against PyTorch.

Runs ``experiments/throughput.py`` once per workload (model, image size; batch 32), each with
this project's static rule (``jax-winograd``), the kernels measured for this machine
(``jax-tuned``: ``python -m resnet_flax.autotune`` first, then ``conv_impl='auto'``) and PyTorch's
same model, one after the other, and collects the rows into one table: img/s, the ratios to
PyTorch, and how far each row is from the matmul floor (the direct convolutions' FLOPs at the
machine's best 2048^3 ``jnp.dot`` rate).

    python experiments/throughput_by_size.py                      # all workloads, ~1 hour on 2 cores
    python experiments/throughput_by_size.py --workloads resnet50:64,torchvision-resnet18:128
    XLA_FLAGS=--xla_cpu_max_isa=AVX2 ATEN_CPU_CAPABILITY=avx2 python experiments/throughput_by_size.py \\
        --workloads resnet50:64 --out experiments/throughput_by_size_avx2

Each workload's own report stays beside this one (``throughput_MODEL_SIZEpx_b32.md``, with
``_avx2`` under ``XLA_FLAGS=--xla_cpu_max_isa=AVX2``); this script writes ``throughput_by_size.md``.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVAL = "eval40_images_per_second"  # the config's eval_batch_size, which the tuning measures for
WORKLOADS = ("resnet50:64", "resnet50:128", "torchvision-resnet50:128", "torchvision-resnet18:128",
             "resnet50:224", "torchvision-resnet50:224", "torchvision-resnet18:224")


def report_path(model: str, size: int, batch: int, suffix: str = "") -> Path:
    return HERE / f"throughput_{model}_{size}px_b{batch}{suffix}.json"


def row(payload: dict) -> str:
    workload, machine = payload["workload"], payload["machine"]
    by_config = {r["config"]: r for r in payload["results"] if "error" not in r}
    static, tuned, torch = by_config.get("jax winograd"), by_config.get("jax tuned"), by_config.get(
        "pytorch (eager, CPU)")
    flops = machine.get("conv_flops_train")
    gemm = payload.get("gemm_floor_gflops")
    floor = gemm * 1e9 / flops * workload["batch"] if flops and gemm else None  # img/s at the matmul rate

    def ips(r, key):
        return r[key] if r else None

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "n/a"

    def num(v, spec=".1f"):
        return format(v, spec) if v is not None else "n/a"

    return (f"| {workload['model']} | {workload['image_size']} "
            f"| {num(ips(static, 'train_images_per_second'))} | {num(ips(tuned, 'train_images_per_second'))} "
            f"| {num(ips(torch, 'train_images_per_second'))} "
            f"| {ratio(ips(static, 'train_images_per_second'), ips(torch, 'train_images_per_second'))} "
            f"| {num(ips(static, EVAL))} | {num(ips(tuned, EVAL))} | {num(ips(torch, EVAL))} "
            f"| {ratio(ips(static, EVAL), ips(torch, EVAL))} "
            f"| {num(floor)} | {ratio(ips(static, 'train_images_per_second'), floor) if floor else 'n/a'} "
            f"| {num((tuned or {}).get('tuning_seconds'), '.0f')} | {changed(tuned)} |")


def changed(tuned: dict | None) -> str:
    """How many layers the tuned run computes with another kernel than the static rule's."""
    if not tuned:
        return "n/a (not tuned)"
    if "kernels_changed" not in tuned:
        return "not recorded (see the tuning log)"
    return str(tuned["kernels_changed"]) if tuned["kernels_changed"] else "none (the same programs)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="MODEL:SIZE,... (batch 32)")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per config")
    parser.add_argument("--configs", default="jax-winograd,jax-tuned,torch",
                        help="throughput.py --only for each workload; without jax-tuned nothing is tuned")
    parser.add_argument("--out", default=str(HERE / "throughput_by_size"), help="output path without suffix")
    parser.add_argument("--render", action="store_true", help="only rebuild the table from the workloads' JSON")
    args = parser.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)
    suffix = "" if not os.environ.get("XLA_FLAGS") else "_" + os.environ["XLA_FLAGS"].split("=")[-1].lower()
    payloads = []
    for workload in args.workloads.split(","):
        model, size = workload.split(":")
        out = report_path(model, int(size), 32, suffix).with_suffix("")
        if not args.render:
            subprocess.run([sys.executable, "experiments/throughput.py", "--model", model, "--image-size", size,
                            f"--only={args.configs}", "--steps", str(args.steps),
                            "--out", str(out.relative_to(HERE.parent))], cwd=HERE.parent, check=False)
        if out.with_suffix(".json").is_file():
            payloads.append(json.loads(out.with_suffix(".json").read_text()))
    machine = payloads[0]["machine"] if payloads else {}
    measuring_args = [a for a in sys.argv[1:] if a != "--render"]
    first = min((datetime.datetime.fromisoformat(p["started"]) for p in payloads), default=started)
    last = max((datetime.datetime.fromisoformat(p["finished"]) for p in payloads), default=started)
    lines = [
        "# Throughput by image size and model: this project against PyTorch",
        "",
        f"Batch 32, float32. `python {' '.join(['experiments/throughput_by_size.py', *measuring_args])}`"
        f" ({first:%Y-%m-%d %H:%M} - {last:%H:%M} UTC), on {machine.get('cpu', '?')} ({machine.get('cores', '?')} cores), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, ATEN_CPU_CAPABILITY="
        f"{os.environ.get('ATEN_CPU_CAPABILITY', '')!r}; "
        + ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items() if v and k in ("jax", "torch")) + ".",
        "",
        "| model | size | train img/s: static rule | tuned | PyTorch | static vs PyTorch | eval img/s (b40): static "
        "| tuned | PyTorch | static vs PyTorch | matmul floor, train img/s | static train of floor | tuning s "
        "| layers tuned away from the static rule |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(row(p) for p in payloads),
        "",
        "- static rule: `conv_impl='winograd'` (what 'auto' runs without measured kernels); tuned: 'auto' after "
        "`python -m resnet_flax.autotune` (tuning s: its wall time, once per machine and shape).",
        "- matmul floor: the direct convolutions' training FLOPs (forward, input and kernel gradients, every tap) "
        "at the run's best 2048^3 `jnp.dot` rate, as img/s: what a step would reach if it were nothing but "
        "those products at that rate (Winograd does fewer multiplications, so it can beat it in principle).",
        "- Each workload's own report, with compile times, RSS and the per-process matmul rates: "
        + ", ".join(f"[{report_path(p['workload']['model'], p['workload']['image_size'], 32, suffix).with_suffix('.md').name}]"
                    f"({report_path(p['workload']['model'], p['workload']['image_size'], 32, suffix).with_suffix('.md').name})"
                    for p in payloads) + ".",
        "- Rows were measured one after the other, each configuration in its own process: ratios within a row "
        "are minutes apart on a machine whose speed drifts. Where the tuning kept the static rule, 'static' and "
        "'tuned' ran the same programs, so their difference is this noise: up to 20% here. The ratios are "
        "the static rule's, the program 'auto' runs; `throughput_rounds.py` alternates rounds for steadier ones.",
    ]
    if any(r["config"] == "jax tuned" for p in payloads for r in p["results"]):
        lines.append(f"- The tuning runs' output (each layer alone, then the whole-program check): "
                     f"[throughput_by_size_tuning{suffix}.txt](throughput_by_size_tuning{suffix}.txt).")
    else:
        lines.append("- Nothing was tuned in this run (no `jax-tuned` in `--configs`): the tuned columns are empty.")
    lines.append("")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
