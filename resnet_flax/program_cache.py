"""Traced programs kept on disk with ``jax.export``, so a second run skips Python tracing.

JAX's persistent compilation cache skips XLA's compilation, but every run still traces the
model in Python and lowers it to StableHLO first: for ResNet-50 about 3 s of a warm start
(experiments/where_time_goes.md). This cache stores those lowered programs (``Exported``) and
calls them back through ``jax.jit``, whose compilation then hits the persistent cache.

A program is found again only when everything that shapes it is the same: the config, the extra
values the caller passes (such as steps per epoch), the source of this package, the versions of
jax, jaxlib, flax and optax, the JAX flags that change tracing, the devices, and the shapes,
dtypes and shardings of the arguments. Anything else -- a changed file, a new jax -- is a miss,
and the program is traced as usual. A file that cannot be read back is replaced, with a warning.

Exported programs take and return only lists, tuples, dicts and arrays; callers flatten their
own pytree classes (``TrainState``) around them.
"""

import hashlib
import importlib.metadata
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
from jax import export

_PACKAGE_DIR = Path(__file__).resolve().parent
_VERSIONED = ("jax", "jaxlib", "flax", "optax")
_TRACING_FLAGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
                  "jax_threefry_partitionable")


def _source_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(_PACKAGE_DIR)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _environment() -> dict[str, Any]:
    return {
        "source": _source_digest(),
        "versions": {name: importlib.metadata.version(name) for name in _VERSIONED},
        "flags": {name: str(getattr(jax.config, name)) for name in _TRACING_FLAGS},
        "devices": [jax.default_backend(), jax.device_count(), jax.process_count(),
                    sorted({d.device_kind for d in jax.devices()})],
    }


def describe_args(args: Iterable[Any]) -> str:
    """Shapes, dtypes and shardings of ``args`` (arrays or ``ShapeDtypeStruct``s), tree included."""
    def leaf(x):
        return f"{x.dtype}{list(x.shape)}@{getattr(x, 'sharding', None)}"
    return str(jax.tree.map(leaf, tuple(args)))


class ProgramCache:
    """Exported programs in ``directory`` (None: traced every time, nothing kept)."""

    def __init__(self, directory: str | Path | None, config_json: str):
        self.directory = Path(directory) if directory is not None else None
        self._config_json = config_json
        self._fingerprint = None  # computed on first use: it reads the package's source
        self._memo: dict[tuple, export.Exported] = {}  # this process's programs, loaded once

    def key(self, name: str, args: Iterable[Any], extra: Any = None) -> str:
        if self._fingerprint is None:
            self._fingerprint = json.dumps({"config": self._config_json, **_environment()}, sort_keys=True)
        text = json.dumps([self._fingerprint, name, describe_args(args), repr(extra)])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def exported(self, name: str, fn: Callable, *args: Any, extra: Any = None,
                 out_shardings: Any = None) -> export.Exported:
        """``jax.export`` of ``jax.jit(fn, out_shardings=...)`` at ``args`` (arrays or
        ``ShapeDtypeStruct``s), loaded from the cache when it is there.

        ``extra``: values ``fn`` depends on that the config does not hold (its repr is keyed).
        """
        extra = (extra, repr(out_shardings))
        memo_key = (name, describe_args(args), repr(extra))
        if memo_key not in self._memo:
            self._memo[memo_key] = self._load_or_export(name, fn, args, extra, out_shardings)
        return self._memo[memo_key]

    def _load_or_export(self, name, fn, args, extra, out_shardings) -> export.Exported:
        path = None
        if self.directory is not None:
            path = self.directory / f"{name}-{self.key(name, args, extra)}.jaxexport"
            if path.exists():
                try:
                    return export.deserialize(bytearray(path.read_bytes()))
                except Exception as error:  # a truncated or foreign file: trace instead
                    print(f"warning: cannot read the saved program {path} ({type(error).__name__}: "
                          f"{error}); tracing it again", file=sys.stderr)
        exported = export.export(jax.jit(fn, out_shardings=out_shardings))(*args)
        if path is not None:
            self._write(path, exported.serialize())
        return exported

    def compile(self, name: str, fn: Callable, *args: Any, extra: Any = None, out_shardings: Any = None,
                donate_argnums: tuple[int, ...] = (), compiler_options: dict | None = None) -> jax.stages.Compiled:
        """``fn`` compiled for ``args`` from its exported form (XLA's own cache then applies), with
        XLA ``compiler_options`` (an export keeps none of ``fn``'s own)."""
        exported = self.exported(name, fn, *args, extra=extra, out_shardings=out_shardings)
        return jax.jit(exported.call, out_shardings=out_shardings, donate_argnums=donate_argnums,
                       compiler_options=compiler_options).lower(*args).compile()

    def _write(self, path: Path, data: bytes) -> None:
        # Written whole under a unique name, then renamed: a killed run or another process (of
        # a multi-host run on a shared disk, say) never leaves half a file.
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as file:
                file.write(data)
            os.replace(file.name, path)
        except OSError as error:  # a read-only or full disk costs the next run its head start only
            print(f"warning: cannot save the program {path} ({error})", file=sys.stderr)


# Config fields that steer only the host (where data and checkpoints are, what to report): runs
# that differ only in these share their programs. Every other field is part of the key.
HOST_ONLY_FIELDS = ("dataset", "data_dir", "data_format", "data_threads", "bad_images",
                    "checkpoint_every_epochs", "checkpoint_every_steps", "keep_checkpoints",
                    "restore_from", "restore_optimizer", "bn_recalibration_batches",
                    "compilation_cache_dir", "allow_config_change", "profile_steps", "preprocessing")


def for_config(config, compilation_cache: Path | None, conv_plan=None) -> ProgramCache:
    """The run's program cache: beside XLA's persistent cache, off when that is off. The kernels of
    ``conv_plan`` (``resnet_flax.autotune``) are part of the key, as the config is."""
    directory = compilation_cache / "exported_programs" if compilation_cache is not None else None
    fields = {k: v for k, v in config.to_dict().items() if k not in HOST_ONLY_FIELDS}
    if conv_plan:
        fields["conv_plan"] = conv_plan.choices
    return ProgramCache(directory, json.dumps(fields, sort_keys=True, default=repr))
