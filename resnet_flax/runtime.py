"""Process-level set-up: multi-host initialisation, the persistent compilation cache, XLA options
for the evaluation programs, the device mesh, and turning host data into sharded global arrays.

Data parallelism is JAX's own: one 1-D mesh axis ``'data'`` over every device of every process,
batches split along it with ``NamedSharding``, the train state replicated, one ``jax.jit`` step.
Under jit, BatchNorm's batch statistics are those of the global batch. One device is the same
code path with a mesh of one.
"""

import functools
import os
from pathlib import Path

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_flax.errors import UserError

DATA_AXIS = "data"
# Launchers that set these start one process per task; JAX detects the rest from them.
_CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def _cluster_size() -> int:
    sizes = [int(os.environ[v]) for v in _CLUSTER_SIZE_VARIABLES if os.environ.get(v, "").isdigit()]
    return max(sizes, default=1)


def initialize_distributed(mode: str = "auto", coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Calls ``jax.distributed.initialize`` when asked ('on'), or in 'auto' mode when a
    coordinator is given (flag or ``JAX_COORDINATOR_ADDRESS``) or a cluster launcher started
    several tasks (Slurm, Open MPI). Returns whether it did. Must run before any JAX computation.
    """
    if mode not in ("auto", "on", "off"):
        raise UserError(f"--distributed must be auto, on or off, got {mode!r}")
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    wanted = mode == "on" or (mode == "auto" and (coordinator_address or _cluster_size() > 1))
    if not wanted:
        return False
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "resnet_flax" / "jax_compilation_cache"


def enable_compilation_cache(directory: str | None) -> Path | None:
    """JAX's persistent compilation cache, so a second run of the same program skips XLA.

    ``directory``: '' for the default (``$XDG_CACHE_HOME/resnet_flax/...``), 'off' to disable.
    """
    if directory == "off":
        return None
    path = Path(directory).expanduser() if directory else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


# XLA:CPU runs matrix products as YNNPACK fusions by default. The evaluation program ran 2-6%
# faster with them on XLA's own (Eigen) path, while the training step ran 2.7x slower that way
# (its BatchNorm sums need YNNPACK's reductions), so only evaluation asks for it (in-process A/B,
# experiments/ab_chunk.md: `no-ynn`, `ynn-reduce-only`).
_CPU_EVALUATION_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def evaluation_compiler_options() -> dict | None:
    """XLA compiler options for forward-only evaluation programs (``jax.jit(compiler_options=)``):
    on CPU the ones above if this jaxlib accepts them (the option is experimental and may go),
    otherwise none."""
    if jax.default_backend() != "cpu":
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU_EVALUATION_OPTIONS).lower(np.float32(0)).compile()
    except jax.errors.JaxRuntimeError:  # "No such compile option" or an unknown value
        return None
    return dict(_CPU_EVALUATION_OPTIONS)


def make_mesh(devices=None) -> Mesh:
    """A 1-D ``'data'`` mesh over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicated_scalar(value: np.generic, mesh: Mesh) -> jax.Array:
    """``value`` (a NumPy scalar, the same in every process) on every device of ``mesh``."""
    return jax.make_array_from_callback((), replicated(mesh), lambda _: np.asarray(value))


def abstract(tree, sharding: jax.sharding.Sharding | None = None):
    """Shapes and dtypes of ``tree``'s arrays (or ``ShapeDtypeStruct``s), with ``sharding`` or
    else each leaf's own: what a program is compiled for, or a checkpoint restored into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=getattr(x, "sharding", None) if sharding is None else sharding), tree)


def along_batch(mesh: Mesh) -> NamedSharding:
    """For (steps, batch, ...) arrays: the batch axis split across the mesh."""
    return NamedSharding(mesh, P(None, DATA_AXIS))


def check_divisible(batch_size: int, mesh: Mesh, field: str) -> None:
    if batch_size % mesh.size:
        raise UserError(f"config.{field}={batch_size} is not divisible by the {mesh.size} devices "
                        f"it is split across; use a multiple of {mesh.size}")


def gather_batches(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, mask: np.ndarray,
                   mesh: Mesh) -> dict[str, jax.Array]:
    """The batches ``indices`` (steps, batch) of a host dataset as global arrays split along the
    batch axis. Each process gathers only the rows that its own devices hold."""
    sharding = along_batch(mesh)

    def build(shape, rows_for):
        return jax.make_array_from_callback(shape, sharding, rows_for)

    return {
        "image": build(indices.shape + images.shape[1:], lambda index: images[indices[index[:2]]]),
        "label": build(indices.shape, lambda index: labels[indices[index]]),
        "mask": build(indices.shape, lambda index: mask[index]),
    }
