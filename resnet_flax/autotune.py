"""Convolution kernels chosen by measurement, per layer shape and per machine, as cuDNN chooses its
algorithms: ``python -m resnet_flax.autotune --config=configs/signs.py``.

For each convolution shape of the config's model (training at ``batch_size``, forward and
backward; evaluation at ``eval_batch_size``, forward from kernels derived once per call), every
kernel that can compute it (``ops.conv.kernel_candidates``: XLA's convolution, im2col, Winograd
F(2x2)/F(4x4), per-tap products) runs in a compiled loop, as a training chunk runs its steps, and
the fastest is proposed; the proposals are kept only if the whole training step (or evaluation)
runs faster with them (``confirm``), since a kernel fastest alone is not always fastest in the
model. The choices go to ``conv_kernels.json`` in the compilation cache folder,
keyed by the machine (CPU model and instruction sets, cores, jax and jaxlib versions, XLA_FLAGS)
and the shape. A run with ``conv_impl='auto'`` on CPU takes the choices found there for its shapes
and the static rule ('winograd') for the rest, so a machine that was never tuned runs as before.

A run writes the kernels it uses into ``<workdir>/conv_kernels.json`` before its first
checkpoint, and a resumed run takes them from there rather than from the cache, so a resume is
bit-identical even after the machine was tuned again. A corrupt or foreign cache is ignored with a
warning; an entry that names a kernel its shape cannot run is never used.
"""

import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from resnet_flax import checkpoints, layers, metrics, models, runtime
from resnet_flax import workdir as workdir_lib
from resnet_flax.errors import UserError
from resnet_flax.ops import conv
from resnet_flax.ops.conv_plan import ConvPlan, ConvSpec, layer_spec

CACHE_FILE = "conv_kernels.json"  # in the compilation cache folder, and in a run's workdir
CACHE_FORMAT = "resnet_flax conv kernels 1"
_ISA_PREFIXES = ("avx", "amx", "fma")
_TARGET_SECONDS = 0.1  # each of a candidate's three timed runs lasts about this long
_PRUNE_FACTOR = 3.0  # a candidate this many times slower than the best after one call stops there
# A kernel replaces the static rule's only when it is faster by more than the timings' noise:
# alone, and then in the whole training step or evaluation (paired medians, steadier).
MIN_GAIN = 1.05
WHOLE_PROGRAM_GAIN = 1.03  # two compilations of one program measured 2% apart


def applies(config: Mapping[str, Any]) -> bool:
    """Whether ``config``'s model takes measured kernels: 'auto' convolutions in float32 on CPU."""
    return (config.get("conv_impl", "auto") == "auto" and config.get("dtype", "float32") == "float32"
            and jax.default_backend() == "cpu")


# ---------------------------------------------------------------------------------------------
# The machine a measurement holds for


def _cpu_description() -> str:
    fields, flags = {}, []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = (part.strip() for part in line.partition(":"))
            if name == "flags":
                flags = sorted(f for f in value.split() if f.startswith(_ISA_PREFIXES))
                break
            fields.setdefault(name, value)
    except OSError:
        import platform
        return platform.processor() or platform.machine()
    # The model name alone is not enough: "AMD EPYC" names CPUs with and without AVX-512.
    return (f"{fields.get('model name', '?')} ({fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} "
            f"model {fields.get('model', '?')}; {' '.join(flags)})")


@functools.cache
def machine_key() -> str:
    """What a measured choice depends on besides the shape."""
    import jaxlib
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{_cpu_description()}, {cores} cores; jax {jax.__version__}, jaxlib {jaxlib.__version__}; "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; {jax.local_device_count()} {jax.default_backend()} device(s)")


# ---------------------------------------------------------------------------------------------
# The convolutions of a model


def model_conv_specs(model: nn.Module, batch_size: int, image_size: int, mode: str,
                     distinct: bool = True) -> list[ConvSpec]:
    """Every distinct convolution shape of ``model`` on batches of ``batch_size`` images (every
    layer's, repeats included, without ``distinct``), in the order the layers run (an abstract
    trace: nothing is computed)."""
    specs = []

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, layers.Conv2D) and context.method_name == "__call__":
            x = args[0]
            kernel_shape = (*module.kernel_size, x.shape[-1], module.features)
            pads = conv.explicit_padding(x.shape[1:3], module.kernel_size, module.strides, module.padding)
            dtype = module.dtype if module.dtype is not None else jnp.float32
            spec = layer_spec(mode, x.shape, kernel_shape, module.strides, pads, jnp.dtype(dtype))
            if not distinct or spec not in specs:
                specs.append(spec)
        return next_fun(*args, **kwargs)

    images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    return specs


def run_specs(config: Mapping[str, Any], model: nn.Module) -> list[ConvSpec]:
    """The shapes a run of ``config`` trains and evaluates on: its batches as the layers see them."""
    return (model_conv_specs(model, config["batch_size"], config["image_size"], "train")
            + model_conv_specs(model, config["eval_batch_size"], config["image_size"], "eval"))


# ---------------------------------------------------------------------------------------------
# Measuring


def _loop_program(spec: ConvSpec, kernel: str, precision: str):
    """A compiled loop of ``reps`` (a traced count) of the layer's work with ``kernel``: forward and
    both gradients in training, the forward pass from the derived kernel in evaluation. Each
    iteration feeds the next (a tiny step of the gradient, or ``0 x`` an output), so XLA can hoist
    nothing out of it, as in a training chunk."""
    strides, pads = spec.strides, spec.pads

    def convolve(x, k):
        return conv.conv2d(x, k, strides, pads, kernel, precision)

    if spec.mode == "train":
        def run(x, k, dy, reps):
            def body(_, carry):
                x, k, total = carry
                y, backward = jax.vjp(convolve, x, k)
                dx, dk = backward(dy)
                return x - 1e-6 * dx, k - 1e-6 * dk, total + y[0, 0, 0, 0]
            return lax.fori_loop(0, reps, body, (x, k, jnp.float32(0)))[2]
        return jax.jit(run)

    def run(x, k, reps):
        derived = conv.inference_kernel(k, x.shape[1:3], strides, pads, kernel)

        def body(_, carry):
            x, total = carry
            y = convolve(x, k) if derived is None else conv.conv2d_inference(x, derived, precision)
            return x + 0.0 * y[0, 0, 0, 0], total + y[0, 0, 0, 0]
        return lax.fori_loop(0, reps, body, (x, jnp.float32(0)))[1]
    return jax.jit(run, compiler_options=runtime.evaluation_compiler_options())


def _timed(compiled, args, reps: int) -> float:
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args, jnp.int32(reps)))
    return (time.perf_counter() - start) / reps


def measure(spec: ConvSpec, devices: int = 1, precision: str = "highest") -> dict[str, float]:
    """Seconds per call of each candidate kernel for ``spec`` (its batch split over ``devices``),
    the static rule's kernel first; a candidate far slower than the best after one call is timed
    no further (its one call is its time)."""
    n, h, w, cin = spec.input_shape
    batch = max(1, n // devices)
    kh, kw, _, _ = spec.kernel_shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, h, w, cin), np.float32))
    k = jnp.asarray(rng.standard_normal(spec.kernel_shape, np.float32) / np.sqrt(kh * kw * cin))
    args = (x, k)
    if spec.mode == "train":
        out = jax.eval_shape(lambda x, k: conv.conv_xla(x, k, spec.strides, spec.pads), x, k)
        args += (jnp.asarray(rng.standard_normal(out.shape, np.float32)),)
    order = list(spec.candidates)
    order.sort(key=lambda name: name != spec.static_kernel())
    seconds = {}
    for name in order:
        compiled = _loop_program(spec, name, precision).lower(*args, jnp.int32(1)).compile()
        _timed(compiled, args, 1)  # warm-up
        once = _timed(compiled, args, 1)
        if seconds and once > _PRUNE_FACTOR * min(seconds.values()):
            seconds[name] = once
            continue
        reps = int(np.clip(_TARGET_SECONDS / max(once, 1e-6), 1, 50))
        seconds[name] = min(_timed(compiled, args, reps) for _ in range(3))
    return seconds


def fastest(spec: ConvSpec, seconds: Mapping[str, float]) -> str:
    """The kernel to use: the fastest, where it beats the static rule's by more than ``MIN_GAIN``."""
    static, best = spec.static_kernel(), min(seconds, key=seconds.get)
    return best if static not in seconds or seconds[static] > MIN_GAIN * seconds[best] else static


# ---------------------------------------------------------------------------------------------
# The cache


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_choices(path: Path, machine: str | None = None) -> dict[str, dict]:
    """The measured choices for ``machine`` (default: this one) in a kernel file, by shape key:
    ``{"kernel": name, "seconds": {...}}``. A missing file is empty; one that is not a kernel
    file, or holds only other machines' choices, is ignored with a warning, and so is each entry
    whose kernel cannot compute its shape."""
    machine = machine or machine_key()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("machines"), dict):
            raise ValueError("not a resnet_flax conv kernel file")
    except (OSError, ValueError) as error:
        _warn(f"ignoring the conv kernel cache {path} ({error}); the static rule applies")
        return {}
    machines = data["machines"]
    if machine not in machines:
        if machines:
            _warn(f"the conv kernel cache {path} holds choices for other machines only ({len(machines)}), "
                  "none for this one; the static rule applies until python -m resnet_flax.autotune measures it")
        return {}
    entries = machines[machine] if isinstance(machines[machine], dict) else {}
    good, bad = {}, []
    for key, entry in entries.items():
        try:
            spec = ConvSpec.from_key(key)
            if not isinstance(entry, dict) or entry.get("kernel") not in spec.candidates:
                raise ValueError(key)
            good[key] = entry
        except ValueError:
            bad.append(key)
    if bad or not isinstance(machines[machine], dict):
        _warn(f"the conv kernel cache {path}: ignoring {len(bad) or 'all'} entries that do not name a kernel "
              f"their shape can run (e.g. {bad[0] if bad else machines[machine]!r})")
    return good


def write_choices(path: Path, choices: Mapping[str, dict], machine: str | None = None) -> None:
    """Adds ``choices`` for ``machine`` to the kernel file at ``path`` (written whole, then renamed)."""
    machine = machine or machine_key()
    data = {"format": CACHE_FORMAT, "machines": {}}
    if path.is_file():
        try:
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict) and loaded.get("format") == CACHE_FORMAT and isinstance(
                    loaded.get("machines"), dict):
                data = loaded
        except (OSError, ValueError):
            pass  # replaced: read_choices has warned about it
    data["machines"].setdefault(machine, {})
    if not isinstance(data["machines"][machine], dict):
        data["machines"][machine] = {}
    data["machines"][machine].update(choices)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own (not metrics.write_json's fixed one): two tuning commands may share the cache.
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as file:
        json.dump(data, file, indent=1, sort_keys=True)
    os.replace(file.name, path)


def cache_path(compilation_cache: Path | None) -> Path | None:
    return compilation_cache / CACHE_FILE if compilation_cache is not None else None


# ---------------------------------------------------------------------------------------------
# A run's plan


def plan_for_run(config: Mapping[str, Any], model: nn.Module, workdir: Path, resuming: bool,
                 compilation_cache: Path | None, list_kernels: bool = False) -> tuple[ConvPlan | None, dict[str, Any]]:
    """The kernels a run of ``model`` uses and a record of them for its summary: a resumed run's own
    (from ``<workdir>/conv_kernels.json``), else the cache's choices for its shapes, else the
    static rule; in a multi-process run, process 0's. Process 0 writes the workdir's file.

    The record lists every shape's kernel where any was measured, or with ``list_kernels``; a run
    on the static rule alone skips listing its shapes (an abstract trace of the model, ~0.8 s of
    a start for ResNet-50)."""
    if not applies(config):
        return None, {"source": f"conv_impl {models.resolved_conv_impl(config)!r} (not measured)"}
    saved_path = workdir / CACHE_FILE
    saved = _read_run_file(saved_path) if resuming and saved_path.is_file() else None
    found = {}
    if saved is not None:
        source = f"the run's own, {saved_path}"
    elif resuming:  # a run from before it kept its kernels ran the static rule
        source = "static rule (the run being resumed kept no kernels of its own)"
    else:
        found = read_choices(cache_path(compilation_cache)) if compilation_cache is not None else {}
        source = "static rule (none measured on this machine: python -m resnet_flax.autotune --config=...)"
    multi_process = jax.process_count() > 1
    specs = run_specs(config, model) if saved or found or list_kernels or multi_process else []
    if found:
        choices = {s.key: found[s.key]["kernel"] for s in specs if s.key in found}
        if choices:
            source = f"measured ({len(choices)} of {len(specs)} shapes), {cache_path(compilation_cache)}"
    else:
        choices = saved or {}
    choices = {s.key: choices[s.key] for s in specs if choices.get(s.key) in s.candidates}
    if multi_process:
        choices = _from_process_0(choices, specs)
    kernels = {s.key: choices.get(s.key, s.static_kernel()) for s in specs}
    if jax.process_index() == 0 and saved is None:
        _write_run_file(saved_path, kernels)
    return ConvPlan.from_mapping(choices), {"source": source, "kernels": kernels}


def has_saved_state(workdir: Path) -> bool:
    """Whether ``workdir`` holds a checkpoint to resume from (after an epoch or within one)."""
    steps = Path(workdir) / checkpoints.STEP_CHECKPOINT_DIR
    return workdir_lib.has_checkpoints(workdir) or (steps.is_dir() and any(p.name.isdigit() for p in steps.iterdir()))


def saved_plan(workdir: Path) -> ConvPlan | None:
    """The kernels a finished or stopped run used (its ``conv_kernels.json``), for commands that
    evaluate its checkpoints exactly as it did; None without that file."""
    path = Path(workdir) / CACHE_FILE
    kernels = _read_run_file(path) if path.is_file() else None
    return ConvPlan.from_mapping(kernels) if kernels else None


def _read_run_file(path: Path) -> dict[str, str] | None:
    try:
        kernels = json.loads(path.read_text())["kernels"]
        return {ConvSpec.from_key(key).key: name for key, name in kernels.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        _warn(f"cannot read the run's conv kernels {path} ({type(error).__name__}: {error}); the static rule "
              "applies, so the resumed run may differ from an uninterrupted one in float32 rounding")
        return None


def _write_run_file(path: Path, kernels: Mapping[str, str]) -> None:
    metrics.write_json(path, {"machine": machine_key(), "kernels": dict(kernels)})


def _from_process_0(choices: Mapping[str, str], specs: list[ConvSpec]) -> dict[str, str]:
    """Process 0's choices on every process: one program needs one plan."""
    from jax.experimental import multihost_utils
    codes = np.array([conv.KERNELS.index(choices[s.key]) if s.key in choices else -1 for s in specs], np.int32)
    codes = np.asarray(multihost_utils.broadcast_one_to_all(codes))
    return {s.key: conv.KERNELS[c] for s, c in zip(specs, codes) if c >= 0}


def describe_plan(record: Mapping[str, Any]) -> str:
    """Lines for ``--verbose``: each shape and its kernel."""
    lines = [f"conv kernels: {record['source']}"]
    for key, name in record.get("kernels", {}).items():
        spec = ConvSpec.from_key(key)
        lines.append(f"  {spec.mode:5s} {spec.describe():36s} {name}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command


def whole_program_seconds(config, plans: Mapping[str, ConvPlan], mode: str, rounds: int = 8,
                          steps_per_call: int = 2) -> dict[str, float]:
    """Median seconds per training step (``mode`` 'train', in calls of ``steps_per_call`` steps) or
    per evaluation batch ('eval') of the config's whole model under each plan, on random images,
    the plans' calls alternated round by round in this process (the machine's speed drifts)."""
    from resnet_flax import checkpoints, evaluation, feeds, input_pipeline, program_cache, train

    mesh = runtime.make_mesh()
    batch = config.batch_size if mode == "train" else config.eval_batch_size
    rng = np.random.default_rng(0)
    count = batch * steps_per_call
    split = input_pipeline.Split(
        rng.integers(0, 256, (count, config.image_size, config.image_size, 3), dtype=np.uint8),
        rng.integers(0, config.num_classes, count).astype(np.int32), "random uint8")
    calls = {}
    for name, plan in plans.items():
        model = models.model_from_config(config, conv_plan=plan.in_mode("train"))
        programs = program_cache.for_config(config, None)
        state, chunk, _ = train.start_training(config, model, steps_per_call, steps_per_call, mesh, programs)
        if mode == "train":
            indices, mask = input_pipeline.batch_indices(np.arange(count), batch)
            args = feeds.gather_chunk(split, indices, mask, 0, steps_per_call, steps_per_call, mesh)
            box = {"state": state}

            def call(chunk=chunk, args=args, box=box):
                box["state"], sums = chunk(box["state"], *args)
                jax.block_until_ready(sums)
        else:
            eval_model = models.model_from_config(config, conv_plan=plan.in_mode("eval"))
            program = evaluation.evaluation_program(eval_model.apply, config.num_classes, config.normalization)
            args = (checkpoints.split_state(state)[0], evaluation.split_batches(split, batch, mesh))
            compiled = program.lower(*args).compile()

            def call(compiled=compiled, args=args):
                jax.block_until_ready(compiled(*args))
        call()  # warm-up
        calls[name] = call
    times = {name: [] for name in calls}
    for index in range(rounds):
        for name in (list(calls) if index % 2 == 0 else list(reversed(calls))):
            start = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - start) / steps_per_call)
    return {name: float(np.median(values)) for name, values in times.items()}


def confirm(config, specs: list[ConvSpec], proposed: Mapping[str, str], log=print) -> dict[str, str]:
    """The proposed kernels (by key) if they make the whole model faster, mode by mode.

    A kernel fastest alone is not always fastest in the model: what surrounds a layer (BatchNorm
    fused with it, buffers XLA copies or reuses) changes its cost. So the whole training step and
    the whole evaluation are timed with the static rule and with every proposed change, and the
    changes are kept where that is faster by more than ``WHOLE_PROGRAM_GAIN``. (Changes are not
    tried one by one: one layer's worth is below the noise of a whole program's time.)"""
    kept = {}
    for mode in ("train", "eval"):
        changes = {s.key: proposed[s.key] for s in specs
                   if s.mode == mode and proposed.get(s.key, s.static_kernel()) != s.static_kernel()}
        if not changes:
            continue
        seconds = whole_program_seconds(config, {"static": ConvPlan(), "measured": ConvPlan.from_mapping(changes)},
                                        mode)
        if seconds["static"] > WHOLE_PROGRAM_GAIN * seconds["measured"]:
            kept.update(changes)
        log(f"  whole {mode} {'step' if mode == 'train' else 'batch'}: static rule {1e3 * seconds['static']:.1f} ms, "
            f"with the {len(changes)} changes {1e3 * seconds['measured']:.1f} ms -> "
            + ("kept" if any(key in kept for key in changes) else "the static rule stays"))
    return kept


def tune(config, retune: bool = False, log=print) -> dict[str, dict]:
    """Measures the config's shapes that the cache lacks (all with ``retune``): each layer alone,
    then the changes it proposes in the whole model (``confirm``). Writes the cache and returns
    this machine's choices for the config's shapes."""
    if not applies(config):
        raise UserError(f"measured kernels are for conv_impl 'auto' in float32 on CPU; this config runs "
                        f"conv_impl={config.conv_impl!r}, dtype={config.dtype!r} on {jax.default_backend()}")
    compilation_cache = runtime.enable_compilation_cache(config.compilation_cache_dir)
    path = cache_path(compilation_cache)
    if path is None:
        raise UserError("config.compilation_cache_dir is 'off': there is no cache to keep measured kernels in")
    model = models.model_from_config(config)
    runtime.check_divisible(config.batch_size, runtime.make_mesh(), "batch_size")
    specs = run_specs(config, model)
    known = {} if retune else read_choices(path)
    missing = [s for s in specs if s.key not in known]
    log(f"machine: {machine_key()}\n{len(specs)} convolution shapes of {config.model} ({config.variant} layout), "
        f"training batch {config.batch_size}, evaluation batch {config.eval_batch_size}, {config.image_size}x"
        f"{config.image_size}; {len(specs) - len(missing)} measured before")
    if not missing:
        return {s.key: known[s.key] for s in specs}
    start = time.perf_counter()
    seconds = {}
    for spec in missing:
        seconds[spec.key] = measure(spec, jax.device_count(), config.matmul_precision)
        best = fastest(spec, seconds[spec.key])
        log(f"  {spec.mode:5s} {spec.describe():36s} "
            + " ".join(f"{name} {1e3 * t:.2f}" for name, t in seconds[spec.key].items())
            + f" ms -> {best}" + (f" (static rule: {spec.static_kernel()})" if best != spec.static_kernel() else ""))
    proposed = {key: fastest(ConvSpec.from_key(key), times) for key, times in seconds.items()}
    kept = confirm(config, missing, proposed, log)
    for spec in missing:
        known[spec.key] = {"kernel": kept.get(spec.key, spec.static_kernel()), "seconds": seconds[spec.key]}
    write_choices(path, {s.key: known[s.key] for s in missing})
    log(f"{time.perf_counter() - start:.0f} s; choices in {path}")
    return {s.key: known[s.key] for s in specs}


def main(argv):
    from absl import flags
    if len(argv) > 1:
        from absl import app
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    flags_ = flags.FLAGS
    tune(flags_.config, retune=flags_.retune)


def define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    flags.DEFINE_bool("retune", False, "Measure every shape again, also those the cache has.")
    flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
    from resnet_flax import cli
    cli.run(main, define_flags)
