"""Where a training step's time goes, op by op, from XLA:CPU's own trace.

Each worker compiles the workload's training step into a loop of ``--steps`` steps (the way a
chunk runs), times three calls, then traces one with ``jax.profiler`` and sums the time of every
compiled op by kind:

* products: the fusions and dots that compute a matrix product, with their FLOPs (from the
  compiled HLO), so each gets its rate in GFLOP/s inside the step;
* reductions: YNNPACK fusions without a product (BatchNorm's sums);
* other fusions: XLA's elementwise and data-movement loops;
* idle: wall time of the call in which no op runs.

The same worker then times the step's largest products alone, each in a loop of its own. Two
workers run: one on every core, one pinned to a single core (``os.sched_setaffinity`` before JAX
starts, so XLA sizes its thread pool to it). A product that takes as long in the step on two
cores as on one ran on one thread.

    python experiments/step_profile.py --model resnet50 --image-size 224   # ~4 minutes
    # writes experiments/step_profile_MODEL_SIZEpx_bBATCH.md
"""

import argparse
import collections
import datetime
import functools
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import throughput  # noqa: E402  (the workloads and the machine's description)
from step_inputs import best_and_median  # noqa: E402

TOP = 12  # products listed (and timed alone)
_DOT = re.compile(r"= (f32\[[\d,]*\])\S* dot\(%([\w.\-]+)[^)]*\)(.*)")


def _dims(shape_text: str) -> list[int]:
    return [int(d) for d in re.match(r"f32\[([\d,]*)\]", shape_text).group(1).split(",") if d]


def hlo_products(hlo: str) -> dict[str, dict]:
    """For every op of the compiled program that computes a product (a dot, or a fusion calling
    one): its FLOPs, (M, K, N), the layer it belongs to and whether it is in the backward pass."""
    computations = {m.group(1): m.group(0) for m in re.finditer(r"^%([\w.\-]+) \(.*?^}", hlo, re.S | re.M)}
    products = {}
    for line in hlo.splitlines():
        op = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \S+ (fusion|dot)\(", line)
        if not op:
            continue
        body = line
        if op.group(2) == "fusion":
            called = re.search(r"calls=%([\w.\-]+)", line)
            body = computations.get(called.group(1), "") if called else ""
        dot = _DOT.search(body)
        if not dot:
            continue
        out = _dims(dot.group(1))
        scope = body if op.group(2) == "fusion" else hlo
        lhs_decl = re.search(r"%" + re.escape(dot.group(2)) + r" = (f32\[[\d,]*\])", scope)
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", dot.group(3))
        if not lhs_decl or not contracting:
            continue
        lhs = _dims(lhs_decl.group(1))
        k = 1
        for d in contracting.group(1).split(","):
            k *= lhs[int(d)]
        n_out = 1
        for d in out:
            n_out *= d
        path = re.search(r'op_name="([^"]*)"', dot.group(3))
        parts = path.group(1).split("/") if path else []
        products[op.group(1)] = {
            "gflop": 2 * n_out * k / 1e9, "m": n_out // out[-1], "k": k, "n": out[-1],
            "layer": parts[-2] if len(parts) >= 2 else "?",
            "pass": "backward" if any(p.startswith("transpose(") for p in parts) else "forward",
        }
    return products


def trace_durations(trace_dir: str) -> tuple[dict[str, float], float, float]:
    """Milliseconds per op name over the traced call, the call's wall time and the time within
    it during which no op ran."""
    trace_file = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
    events = [e for e in json.load(gzip.open(trace_file))["traceEvents"] if e.get("ph") == "X"]
    call = max((e for e in events if e["name"].startswith("ThunkExecutor::Execute (wait")),
               key=lambda e: e["dur"])
    ops = [e for e in events if not e["name"].startswith(("ThunkExecutor", "Threadpool", "Slinky", "end:", "$"))
           and e["tid"] != call["tid"] and call["ts"] <= e["ts"] <= call["ts"] + call["dur"]]
    durations = collections.Counter()
    for e in ops:
        durations[e["name"]] += e["dur"] / 1e3
    busy, end = 0.0, call["ts"]
    for e in sorted(ops, key=lambda e: e["ts"]):  # the union of the ops' intervals
        start, stop = max(e["ts"], end), e["ts"] + e["dur"]
        if stop > start:
            busy += stop - start
            end = stop
    return dict(durations), call["dur"] / 1e3, (call["dur"] - busy) / 1e3


def product_alone(m: int, k: int, n: int) -> float:
    """GFLOP/s of (m, k) @ (k, n) in a loop of 8 in one call, as a chunk runs, best of 3."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.random(s, dtype=np.float32)) for s in ((m, k), (k, n)))

    @jax.jit
    def loop(a, b):  # a new right-hand side each turn, so no product is hoisted out
        body = lambda i, acc: acc + jnp.matmul(a, b * i.astype(jnp.float32), precision="highest")[0, 0]
        return jax.lax.fori_loop(0, 8, body, 0.0)

    loop(a, b).block_until_ready()
    best, _ = best_and_median(lambda: loop(a, b).block_until_ready(), reps=3)
    return 8 * 2 * m * k * n / best / 1e9


def worker(args) -> dict:
    if args.one_core:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import jax
    import jax.numpy as jnp
    import numpy as np

    from resnet_flax import models, runtime, steps
    throughput.set_workload(args.model, args.image_size, args.batch)
    config = throughput.workload_config("winograd")
    model = models.model_from_config(config)
    state = steps.create_train_state(config, model, throughput.STEPS_PER_EPOCH, runtime.make_mesh())
    rng = np.random.default_rng(0)
    size = args.image_size
    batch = {"image": jnp.asarray(rng.integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)),
             "label": jnp.asarray(rng.integers(0, config.num_classes, args.batch).astype(np.int32)),
             "mask": jnp.ones((args.batch,), bool)}
    step = functools.partial(steps.train_step, num_classes=config.num_classes)
    key = jax.random.key(0)

    def chunk(state):
        return jax.lax.fori_loop(0, args.steps, lambda i, s: step(s, batch, key)[0], state)

    compiled = jax.jit(chunk, donate_argnums=0).lower(state).compile()
    state = compiled(state)
    jax.block_until_ready(state)
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        state = jax.block_until_ready(compiled(state))
        seconds.append((time.perf_counter() - start) / args.steps)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        state = jax.block_until_ready(compiled(state))
        jax.profiler.stop_trace()
        durations, call_ms, idle_ms = trace_durations(trace_dir)
    products = hlo_products(compiled.as_text())
    per_step = {name: ms / args.steps for name, ms in durations.items()}
    return {"cores": len(os.sched_getaffinity(0)), "step_s": seconds, "traced_step_ms": call_ms / args.steps,
            "idle_ms": idle_ms / args.steps, "op_ms": per_step,
            "products": {name: info for name, info in products.items() if name in per_step}}


def kinds(result: dict) -> dict[str, float]:
    """Milliseconds per step by kind of op."""
    totals = collections.Counter()
    for name, ms in result["op_ms"].items():
        kind = ("products" if name in result["products"] else
                "reductions (YNNPACK)" if name.startswith("ynn_fusion") else "other fusions and copies")
        totals[kind] += ms
    totals["idle (no op running)"] = result["idle_ms"]
    return dict(totals)


def alone_rates(shapes: list[tuple[int, int, int]], one_core: bool) -> list[float]:
    code = ("import json, os, sys; sys.path.insert(0, %r)\n" % str(HERE) +
            ("os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n" if one_core else "") +
            "import step_profile\n"
            f"print(json.dumps([step_profile.product_alone(*s) for s in {shapes!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=throughput.worker_env())
    return json.loads(out.stdout.strip().splitlines()[-1])


def render(results: dict, args, alone: dict) -> str:
    both, one = results["all cores"], results["one core"]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = throughput.machine_info()
    lines = [f"# Where a training step's time goes: {throughput.MODEL_DESCRIPTIONS[args.model]}, "
             f"{args.image_size}x{args.image_size}, batch {args.batch}", "",
             f"`python experiments/step_profile.py --model {args.model} --image-size {args.image_size} "
             f"--batch {args.batch} --steps {args.steps}`, {stamp}. Static kernel rule ('winograd'), float32, "
             f"{args.steps} steps per traced call; op times from XLA:CPU's trace, per step.", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, jax {machine['versions'].get('jax')}, "
             f"XLA_FLAGS={machine['xla_flags'] or '(none)'}.", "",
             "| | all cores | one core |", "|---|---|---|",
             f"| cores XLA used | {both['cores']} | {one['cores']} |",
             f"| s per step (best of 3 calls) | {min(both['step_s']):.3f} | {min(one['step_s']):.3f} |",
             f"| ms per step in the traced call | {both['traced_step_ms']:.0f} | {one['traced_step_ms']:.0f} |"]
    kinds_both, kinds_one = kinds(both), kinds(one)
    for kind in kinds_both:
        lines.append(f"| {kind}, ms | {kinds_both[kind]:.0f} | {kinds_one.get(kind, 0):.0f} |")
    flop = sum(p["gflop"] for p in both["products"].values())
    def concurrency(result):
        busy = result["traced_step_ms"] - result["idle_ms"]
        return sum(result["op_ms"].values()) / busy
    lines.append(f"| ops running at once, on average while any runs | {concurrency(both):.2f} | {concurrency(one):.2f} |")
    serial = [name for name in both["products"] if both["op_ms"][name] >= 0.8 * one["op_ms"].get(name, float("inf"))]
    serial_ms = sum(both["op_ms"][name] for name in serial)
    lines.append(f"| products no faster on all cores than on one (within 20%) | {len(serial)} of {len(both['products'])}, "
                 f"{serial_ms:.0f} ms | |")
    lines += [f"| products' GFLOP per step, rate | {flop:.1f}, {flop / kinds_both['products'] * 1e3:.0f} GFLOP/s | "
              f"{flop / kinds_one['products'] * 1e3:.0f} GFLOP/s |", "",
              f"The {TOP} products that take longest in the step (an op's time in the trace sums the "
              "threads that ran it, if more than one did):", "",
              "| op | layer | pass | M x K x N | GFLOP | ms in step, all cores | ms in step, one core | "
              "GFLOP/s in step | GFLOP/s alone, all cores | alone, one core |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for (name, info), rate_all, rate_one in zip(top_products(both), alone["all"], alone["one"]):
        ms_both, ms_one = both["op_ms"][name], one["op_ms"].get(name, float("nan"))
        lines.append(f"| {name} | {info['layer']} | {info['pass']} | {info['m']} x {info['k']} x {info['n']} | "
                     f"{info['gflop']:.2f} | {ms_both:.1f} | {ms_one:.1f} | {info['gflop'] / ms_both * 1e3:.0f} | "
                     f"{rate_all:.0f} | {rate_one:.0f} |")
    return "\n".join(lines) + "\n"


def top_products(result: dict) -> list[tuple[str, dict]]:
    ranked = sorted(result["products"].items(), key=lambda item: -result["op_ms"][item[0]])
    return ranked[:TOP]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", choices=throughput.MODELS)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--one-core", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        Path(args.result_file).write_text(json.dumps(worker(args)))
        return 0
    results = {}
    for label, flag in (("all cores", []), ("one core", ["--one-core"])):
        with tempfile.TemporaryDirectory() as tmp:
            result_file = Path(tmp) / "result.json"
            subprocess.run([sys.executable, __file__, "--worker", *flag, "--model", args.model,
                            "--image-size", str(args.image_size), "--batch", str(args.batch),
                            "--steps", str(args.steps), "--result-file", str(result_file)],
                           check=True, env=throughput.worker_env())
            results[label] = json.loads(result_file.read_text())
        print(f"{label}: {min(results[label]['step_s']):.3f} s per step", flush=True)
    shapes = [(p["m"], p["k"], p["n"]) for _, p in top_products(results["all cores"])]
    alone = {"all": alone_rates(shapes, one_core=False), "one": alone_rates(shapes, one_core=True)}
    throughput.set_workload(args.model, args.image_size, args.batch)
    report = render(results, args, alone)
    out = HERE / f"step_profile_{args.model}_{args.image_size}px_b{args.batch}.md"
    out.write_text(report)
    print(report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
