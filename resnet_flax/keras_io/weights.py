"""Keras HDF5 weights of the assignment's ResNet-50, read into and written from our variables.

Only the arrays are read, with h5py: a model config stored in a file is never parsed or run, so a
file can't execute code, and the network is always our :mod:`resnet_flax.models` one. Each Keras
layer is found by its name (``conv1``, ``bn2a_branch2a``, ``fc6``, ...), mapped to its module path
with :func:`resnet_flax.models.keras_layer_paths` and checked against the shapes of the model built
for the file's number of classes (the dense layer ``fc{num_classes}`` says how many).

Files :func:`load_keras_weights` reads:

* Keras 2.x full model, ``model.save('x.h5')``: group ``model_weights`` with a ``layer_names``
  attribute; per layer a group with a ``weight_names`` attribute (``conv1/kernel:0``, ...) whose
  datasets sit at ``model_weights/conv1/conv1/kernel:0``. The Coursera notebook's ``ResNet50.h5``
  is of this kind.
* Keras 3 legacy full model, ``model.save('x.h5')``: the same layout, weight names without ``:0``.
* Legacy weights only, Keras 2 ``model.save_weights('x.h5')``: the same layout at the file's root.
  :func:`save_keras_weights` writes this for a ``.h5`` name.
* Keras 3 weights, ``model.save_weights('x.weights.h5')``: ``layers/<class>[_k]/vars/0, 1, ...``
  (``conv2d_3``, ``batch_normalization_7``, ``dense``), the group named after the layer's class
  and position, the layer's own name in the ``vars`` group's ``name`` attribute. Files without
  that attribute (older Keras 3) are matched by class and position in the assignment's layer order.
* Keras 3 archives, ``model.save('x.keras')``: the ``model.weights.h5`` inside, as above.

Keras's weight order and names: Conv2D and Dense ``kernel, bias`` (our ``kernel`` in HWIO or
(in, out) and ``bias``, same layout); BatchNormalization ``gamma, beta, moving_mean,
moving_variance`` (our params ``scale, bias`` and batch_stats ``mean, var``).
"""

import collections
import io
import os
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from resnet_flax import models
from resnet_flax.errors import UserError

PathLike = str | os.PathLike

# Keras weight names of each kind of layer, in Keras's order, with our (collection, name).
KERAS_WEIGHTS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "conv": (("kernel", "params", "kernel"), ("bias", "params", "bias")),
    "dense": (("kernel", "params", "kernel"), ("bias", "params", "bias")),
    "batchnorm": (
        ("gamma", "params", "scale"),
        ("beta", "params", "bias"),
        ("moving_mean", "batch_stats", "mean"),
        ("moving_variance", "batch_stats", "var"),
    ),
}

# Keras 3 names a layer's group in a .weights.h5 file after its class: snake_case(class name).
KERAS3_CLASS_GROUPS = {"conv": "conv2d", "dense": "dense", "batchnorm": "batch_normalization"}

# Header of the legacy files we write. Keras 2 converts kernels only for keras_version '1' (or
# backend 'theano'); the layout is that of Keras 2.x save_weights, which Keras 3 reads as well.
LEGACY_KERAS_VERSION = "2.15.0"
LEGACY_BACKEND = "tensorflow"

# Inside a block, Keras lists the layers in this order (its topological order for the assignment's
# blocks: the main path's last conv precedes the shortcut conv, then the two BatchNorms).
_BLOCK_LAYER_ORDER = ("res2a", "bn2a", "res2b", "bn2b", "res2c", "res1", "bn2c", "bn1")
_BLOCK_LAYER = re.compile(r"(res|bn)(\d+)([a-z])(\d*)_branch(2a|2b|2c|1)")  # block 'b', or 'b12' (ResNet-152)
_DENSE_LAYER = re.compile(r"fc(\d+)")

# One Keras layer read from a file: (weight name or None when only the position is known, array).
StoredWeights = list[tuple[str | None, Any]]


# --- our model's side -------------------------------------------------------------------------


def expected_variables(num_classes: int, model: str = "resnet50") -> dict[str, Any]:
    """Shapes and dtypes of ``model``'s variables (``jax.ShapeDtypeStruct`` leaves), without
    computing them."""
    net = models.create_model(model, num_classes=num_classes)
    return jax.eval_shape(
        lambda: net.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32), train=False)
    )


def layer_kind(variables: Mapping[str, Any], path: Sequence[str]) -> str:
    """'conv', 'dense' or 'batchnorm' for the layer at ``path`` of ``variables['params']``."""
    leaves = _get(variables["params"], path)
    if "scale" in leaves:
        return "batchnorm"
    return "conv" if len(leaves["kernel"].shape) == 4 else "dense"


def keras_layer_order(names: Iterable[str]) -> list[str]:
    """Our Keras layer names in the order of the Keras model's ``model.layers``.

    Keras's loaders for both ``.h5`` and ``.weights.h5`` files match layers by position in that
    order (per class for ``.weights.h5``), not by name, so the files we write must follow it.
    """

    def key(name: str) -> tuple:
        if name == "conv1":
            return (0,)
        if name == "bn_conv1":
            return (1,)
        if _DENSE_LAYER.fullmatch(name):
            return (3,)
        match = _BLOCK_LAYER.fullmatch(name)
        if match is None:
            raise ValueError(f"{name!r} is not a layer name of the assignment's ResNet")
        kind, stage, block, number, branch = match.groups()
        return (2, int(stage), block, int(number or 0), _BLOCK_LAYER_ORDER.index(kind + branch))

    return sorted(names, key=key)


def _get(tree: Mapping[str, Any], path: Sequence[str]) -> Mapping[str, Any]:
    for name in path:
        tree = tree[name]
    return tree


def _set(tree: dict[str, Any], path: Sequence[str], name: str, value: Any) -> None:
    for key in path:
        tree = tree.setdefault(key, {})
    tree[name] = value


def _names_listed(names: Iterable[str], limit: int = 8, separator: str = ", ") -> str:
    """The first ``limit`` names, and how many more there are, for one-line messages."""
    names = list(names)
    shown = separator.join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _shapes(tree: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{'params/block2a/res2a_branch2a/kernel': shape, ...}`` of a variables tree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(key.key) for key in path): tuple(np.shape(leaf)) for path, leaf in leaves}


# --- reading --------------------------------------------------------------------------------


def _decode(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _string_list_attribute(node: h5py.HLObject, name: str) -> list[str]:
    """A list-of-strings attribute as Keras writes it: bytes or str, and split into ``name0``,
    ``name1``, ... when it would exceed HDF5's 64 KiB attribute limit."""
    if name in node.attrs:
        return [_decode(v) for v in np.atleast_1d(node.attrs[name])]
    values, chunk = [], 0
    while f"{name}{chunk}" in node.attrs:
        values.extend(_decode(v) for v in np.atleast_1d(node.attrs[f"{name}{chunk}"]))
        chunk += 1
    return values


def _check_legacy_header(group: h5py.Group, source: str) -> None:
    """Refuses the files whose arrays Keras itself converts on loading (Theano kernels, Keras 1),
    rather than reading them wrongly."""
    backend = _decode(group.attrs.get("backend", ""))
    version = _decode(group.attrs.get("keras_version", ""))
    if backend == "theano" or version.startswith("1."):
        raise UserError(
            f"{source}: written by Keras {version or '?'} with the {backend or '?'} backend; expected "
            "Keras 2 or 3 with TensorFlow, JAX or PyTorch (re-save it with Keras 2 to convert)"
        )


def _read_legacy(group: h5py.Group, source: str) -> dict[str, StoredWeights]:
    """Layers with weights of a ``layer_names``/``weight_names`` group (Keras 2 and legacy h5)."""
    _check_legacy_header(group, source)
    layers: dict[str, StoredWeights] = {}
    for layer in _string_list_attribute(group, "layer_names"):
        if layer not in group:
            continue  # listed without its arrays: reported with the missing layers
        weights = []
        for weight in _string_list_attribute(group[layer], "weight_names"):
            if weight not in group[layer]:
                raise UserError(f"{source}: layer {layer!r} lists weight {weight!r} but holds no such array")
            # 'conv1/kernel:0' (Keras 2) or 'conv1/kernel' (Keras 3) -> 'kernel'
            weights.append((weight.rsplit("/", 1)[-1].split(":", 1)[0], group[layer][weight]))
        if weights:
            layers[layer] = weights
    return layers


def _read_keras3(group: h5py.Group, source: str, model: str) -> dict[str, StoredWeights]:
    """Layers with weights of a Keras 3 ``.weights.h5`` file, keyed by layer name."""
    named: dict[str, StoredWeights] = {}
    unnamed: dict[str, StoredWeights] = {}
    for key, layer in group["layers"].items():
        variables = layer.get("vars")
        if not isinstance(variables, h5py.Group) or len(variables) == 0:
            continue
        count = len(variables)
        if sorted(variables) != sorted(str(i) for i in range(count)):
            raise UserError(
                f"{source}: layers/{key}/vars holds {sorted(variables)}; expected arrays 0..{count - 1}"
            )
        weights = [(None, variables[str(i)]) for i in range(count)]
        if "name" in variables.attrs:
            name = _decode(variables.attrs["name"])
            if name in named:
                raise UserError(f"{source}: two layers are named {name!r}")
            named[name] = weights
        else:
            unnamed[key] = weights
    if unnamed and named:
        raise UserError(
            f"{source}: layer groups {_names_listed(unnamed)} lack the 'name' attribute that the others have"
        )
    return named or _name_by_position(unnamed, source, model)


def _name_by_position(
    groups: dict[str, StoredWeights], source: str, model: str
) -> dict[str, StoredWeights]:
    """Names Keras 3 groups (``conv2d_3``, ...) that lack the ``name`` attribute by Keras's own rule:
    the k-th layer of a class in the model's layer order."""
    dense = groups.get("dense")
    if dense is None or len(dense) != 2:
        raise UserError(f"{source}: no dense layer (layers/dense/vars) to tell the number of classes from")
    expected = expected_variables(int(dense[0][1].shape[-1]), model)
    paths = models.keras_layer_paths(expected)
    expected_groups: dict[str, str] = {}
    counts: collections.Counter[str] = collections.Counter()
    for name in keras_layer_order(paths):
        cls = KERAS3_CLASS_GROUPS[layer_kind(expected, paths[name])]
        expected_groups[_class_group(cls, counts)] = name
    unexpected = sorted(set(groups) - set(expected_groups))
    if unexpected:
        raise UserError(
            f"{source}: unexpected layer groups {_names_listed(unexpected)} for the assignment's "
            f"{model} (a file without layer names is matched by class and position)"
        )
    return {expected_groups[key]: weights for key, weights in groups.items()}


def _class_group(cls: str, counts: collections.Counter) -> str:
    """Keras 3's group name for the next layer of class ``cls``: ``conv2d``, ``conv2d_1``, ..."""
    index = counts[cls]
    counts[cls] += 1
    return cls if index == 0 else f"{cls}_{index}"


def _read_layers(file: h5py.File, source: str, model: str) -> dict[str, StoredWeights]:
    """Every layer with weights in ``file``, whatever its Keras layout."""
    if "layer_names" in file.attrs or any(k.startswith("layer_names") for k in file.attrs):
        return _read_legacy(file, source)
    if isinstance(file.get("model_weights"), h5py.Group):
        return _read_legacy(file["model_weights"], source)
    if isinstance(file.get("layers"), h5py.Group):
        return _read_keras3(file, source, model)
    raise UserError(
        f"{source}: no Keras weights found; expected a 'model_weights' group or 'layer_names' "
        "attribute (Keras .h5) or a 'layers' group (Keras 3 .weights.h5)"
    )


def _open(path: PathLike) -> h5py.File:
    """Opens a Keras HDF5 file, or the weights inside a ``.keras`` archive, for reading."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise UserError(f"{source}: no such file; expected Keras weights (.h5, .weights.h5 or .keras)")
    if zipfile.is_zipfile(source):
        # A Keras 3 .keras archive: config.json (never read) and model.weights.h5.
        with zipfile.ZipFile(source) as archive:
            if "model.weights.h5" not in archive.namelist():
                raise UserError(f"{source}: a zip archive without model.weights.h5; expected a .keras file")
            data = archive.read("model.weights.h5")
        return h5py.File(io.BytesIO(data), "r")
    if not h5py.is_hdf5(source):
        raise UserError(f"{source}: not an HDF5 file; expected Keras weights (.h5, .weights.h5 or .keras)")
    try:
        return h5py.File(source, "r")
    except OSError as error:
        raise UserError(f"{source}: could not be read as HDF5 ({error})") from error


def _num_classes(layers: Mapping[str, StoredWeights], source: str) -> int:
    dense = sorted(name for name in layers if _DENSE_LAYER.fullmatch(name))
    if len(dense) != 1:
        found = _names_listed(dense) if dense else "none"
        raise UserError(f"{source}: expected exactly one dense layer named fc<classes>, found {found}")
    return int(_DENSE_LAYER.fullmatch(dense[0]).group(1))


def _to_variables(
    layers: Mapping[str, StoredWeights], source: str, model: str
) -> tuple[dict[str, Any], int]:
    """Our variables from the file's layers, every layer and shape checked against ``model``."""
    num_classes = _num_classes(layers, source)
    expected = expected_variables(num_classes, model)
    paths = models.keras_layer_paths(expected)
    missing = [name for name in keras_layer_order(paths) if name not in layers]
    unexpected = sorted(name for name in layers if name not in paths)
    if missing or unexpected:
        parts = [f"missing layers {_names_listed(missing)}"] if missing else []
        parts += [f"unexpected layers {_names_listed(unexpected)}"] if unexpected else []
        raise UserError(
            f"{source}: {' and '.join(parts)} for the assignment's {model} with fc{num_classes}"
        )

    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    problems = []
    for name, path in paths.items():
        spec = KERAS_WEIGHTS[layer_kind(expected, path)]
        stored = layers[name]
        keras_names = [keras_name for keras_name, _, _ in spec]
        if len(stored) != len(spec):
            problems.append(f"{name} holds {len(stored)} arrays, expected {', '.join(keras_names)}")
            continue
        if all(weight is not None for weight, _ in stored):
            by_name = dict(stored)
            if sorted(by_name) != sorted(keras_names):
                problems.append(f"{name} holds {', '.join(by_name)}, expected {', '.join(keras_names)}")
                continue
            arrays = [by_name[keras_name] for keras_name in keras_names]
        else:
            arrays = [array for _, array in stored]
        for (keras_name, collection, ours), array in zip(spec, arrays):
            want = tuple(_get(expected[collection], path)[ours].shape)
            if tuple(array.shape) != want:
                problems.append(f"{name}/{keras_name} has shape {tuple(array.shape)}, expected {want}")
            elif not np.issubdtype(array.dtype, np.floating):
                problems.append(f"{name}/{keras_name} has dtype {array.dtype}, expected floating point")
            else:
                _set(variables[collection], path, ours, jnp.asarray(np.asarray(array, dtype=np.float32)))
    if problems:
        raise UserError(f"{source}: {_names_listed(problems, limit=5, separator='; ')}")
    return variables, num_classes


def load_keras_weights(path: PathLike, *, model: str = "resnet50") -> tuple[dict[str, Any], int]:
    """Reads the weights of the assignment's Keras ResNet-50 from a Keras file.

    Args:
      path: a Keras 2 or 3 ``model.save('x.h5')`` file, a legacy ``save_weights('x.h5')`` file, a
        Keras 3 ``save_weights('x.weights.h5')`` file or a Keras 3 ``.keras`` archive.
      model: the :data:`resnet_flax.models.MODELS` entry the weights are for.

    Returns:
      ``({'params': ..., 'batch_stats': ...}, num_classes)``: variables for
      ``models.create_model(model, num_classes=num_classes)``, float32.

    Raises:
      UserError: the file is missing, not HDF5, not Keras weights, or its layers or shapes don't
        match the model (missing and unexpected layers are named).
    """
    source = os.fspath(path)
    with _open(path) as file:
        return _to_variables(_read_layers(file, source, model), source, model)


# --- writing --------------------------------------------------------------------------------


def _keras_arrays(
    variables: Mapping[str, Any], model: str, destination: str
) -> dict[str, tuple[str, list[np.ndarray]]]:
    """Per Keras layer name, its kind and its arrays in Keras order, after checking ``variables``
    against ``model``."""
    if not isinstance(variables, Mapping) or not {"params", "batch_stats"} <= set(variables):
        raise UserError(f"{destination}: expected variables with 'params' and 'batch_stats' to write")
    paths = models.keras_layer_paths(variables)
    num_classes = _num_classes(paths, destination)
    expected = expected_variables(num_classes, model)
    want = _shapes({k: expected[k] for k in ("params", "batch_stats")})
    have = _shapes({k: variables[k] for k in ("params", "batch_stats")})
    if have != want:
        differ = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        raise UserError(
            f"{destination}: the variables are not those of {model} with fc{num_classes}; "
            f"{_names_listed(differ, limit=3)} differ"
        )
    layers = {}
    for name, path in paths.items():
        kind = layer_kind(variables, path)
        arrays = [
            np.asarray(jax.device_get(_get(variables[collection], path)[ours]), dtype=np.float32)
            for _, collection, ours in KERAS_WEIGHTS[kind]
        ]
        layers[name] = (kind, arrays)
    return layers


def _write_keras3(file: h5py.File, layers: Mapping[str, tuple[str, list]]) -> None:
    """Keras 3 ``save_weights`` layout: ``layers/<class>[_k]/vars/<i>``, class groups numbered in
    the model's layer order, the layer's name in each ``vars`` group's ``name`` attribute."""
    # The model's own (empty) variables: older Keras 3 loaders look the root 'vars' group up.
    file.create_group("vars").attrs["name"] = "ResNet50"
    root = file.create_group("layers")
    counts: collections.Counter[str] = collections.Counter()
    for name in keras_layer_order(layers):
        kind, arrays = layers[name]
        cls = KERAS3_CLASS_GROUPS[kind]
        group = root.create_group(_class_group(cls, counts)).create_group("vars")
        group.attrs["name"] = name
        for index, array in enumerate(arrays):
            group.create_dataset(str(index), data=array)


def _write_legacy(file: h5py.File, layers: Mapping[str, tuple[str, list]]) -> None:
    """Keras 2 ``save_weights('x.h5')`` layout: ``layer_names`` on the root, a group per layer
    with ``weight_names`` (``conv1/kernel:0``, ...) and the datasets under those names."""
    # Fixed-length bytes, as Keras 2 wrote them: every Keras 2 and 3 reader decodes these.
    file.attrs["layer_names"] = np.array([n.encode("utf8") for n in keras_layer_order(layers)])
    file.attrs["backend"] = LEGACY_BACKEND.encode("utf8")
    file.attrs["keras_version"] = LEGACY_KERAS_VERSION.encode("utf8")
    for name in sorted(layers):  # Keras creates the groups sorted by name, too
        kind, arrays = layers[name]
        group = file.create_group(name)
        weight_names = [f"{name}/{keras_name}:0" for keras_name, _, _ in KERAS_WEIGHTS[kind]]
        group.attrs["weight_names"] = np.array([n.encode("utf8") for n in weight_names])
        for weight_name, array in zip(weight_names, arrays):
            group.create_dataset(weight_name, data=array)


def save_keras_weights(
    variables: Mapping[str, Any], path: PathLike, *, model: str = "resnet50"
) -> None:
    """Writes our variables as a Keras weights file for the assignment's Keras ResNet-50.

    The file name picks the format, as it picks the reader in Keras's ``model.load_weights``:

    * ``*.weights.h5``: Keras 3's native weights layout (``model.save_weights`` of Keras 3).
    * any other ``*.h5`` / ``*.hdf5``: the layout of Keras 2's ``model.save_weights('x.h5')``,
      which Keras 3 loads as well, also with ``by_name=True`` (Keras 2's reader takes the same).

    Weights only, no model: build the assignment's model in Keras and call
    ``model.load_weights(path)``. The layers are written in the Keras model's layer order because
    Keras matches them by position (by name only with ``by_name=True``). The file is written under
    a temporary name first, then moved over ``path``.

    Raises:
      UserError: ``variables`` are not ``model``'s, or the name has another suffix.
    """
    destination = os.fspath(path)
    if destination.endswith(".weights.h5"):
        write = _write_keras3
    elif destination.endswith((".h5", ".hdf5")):
        write = _write_legacy
    else:
        raise UserError(
            f"{destination}: expected a name ending in .weights.h5 (Keras 3 weights) or .h5 "
            "(legacy Keras weights), the suffixes Keras's load_weights reads"
        )
    layers = _keras_arrays(variables, model, destination)
    temporary = destination + ".tmp"
    try:
        with h5py.File(temporary, "w") as file:
            write(file, layers)
        os.replace(temporary, destination)
    except OSError as error:
        raise UserError(f"{destination}: could not be written ({error})") from error
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
