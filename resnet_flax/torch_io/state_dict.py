"""torchvision (and timm) ResNet ``state_dict``s to and from this project's variables.

The torchvision layout's module names are the ``state_dict``'s with ``_`` for the dots before an
index (``resnet_flax.imagenet_layouts``), so every tensor maps by name:

    layer1.0.conv1.weight          (O, I, kh, kw) -> params/layer1_0/conv1/kernel       (kh, kw, I, O)
    layer1.0.bn1.weight / .bias                   -> params/layer1_0/bn1/scale / bias
    layer1.0.bn1.running_mean / running_var       -> batch_stats/layer1_0/bn1/mean / var
    fc.weight                      (O, I)         -> params/fc/kernel                   (I, O)

``num_batches_tracked`` (BatchNorm's step counter) has no counterpart; it is read and ignored,
and written as 0. Nothing here needs PyTorch except reading or writing a ``.pth`` file;
``.safetensors`` files are read and written with ``safetensors.numpy``.
"""

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from resnet_flax.errors import UserError

# Our leaf name -> torch's, per collection.
_PARAM_NAMES = {"kernel": "weight", "bias": "bias", "scale": "weight"}
_STAT_NAMES = {"mean": "running_mean", "var": "running_var"}
IGNORED_SUFFIX = "num_batches_tracked"


def torch_module_name(path: tuple[str, ...]) -> str:
    """``('layer1_0', 'downsample_1')`` -> ``'layer1.0.downsample.1'`` (``post_bn`` stays)."""
    return ".".join(re.sub(r"_(\d+)", r".\1", part) for part in path)


def _leaves(tree: Mapping, prefix: tuple[str, ...] = ()):
    for name, child in tree.items():
        if isinstance(child, Mapping):
            yield from _leaves(child, prefix + (name,))
        else:
            yield prefix + (name,), child


def torch_names(variables: Mapping) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every torch ``state_dict`` key of the model, mapped to its (collection, path) here."""
    names = {}
    for collection, renames in (("params", _PARAM_NAMES), ("batch_stats", _STAT_NAMES)):
        for path, _ in _leaves(variables.get(collection, {})):
            names[f"{torch_module_name(path[:-1])}.{renames[path[-1]]}"] = (collection, path)
    return names


def to_torch_layout(array: np.ndarray) -> np.ndarray:
    """Our kernel layout to PyTorch's: HWIO -> OIHW for a conv, (in, out) -> (out, in) for a dense."""
    if array.ndim == 4:
        return np.ascontiguousarray(np.transpose(array, (3, 2, 0, 1)))
    return np.ascontiguousarray(array.T) if array.ndim == 2 else array


def from_torch_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:
        return np.ascontiguousarray(np.transpose(array, (2, 3, 1, 0)))
    return np.ascontiguousarray(array.T) if array.ndim == 2 else array


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _listed(names, limit: int = 4) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def variables_from_state_dict(state_dict: Mapping[str, np.ndarray], abstract_variables: Mapping,
                              source: str, model_name: str) -> dict:
    """The variables (``params``, ``batch_stats``; float32 numpy) of a model whose abstract variables
    are ``abstract_variables``, from a torchvision ``state_dict``. Stops, naming them, on missing,
    unexpected or mis-shaped tensors."""
    expected = torch_names(abstract_variables)
    given = {key for key in state_dict if not key.endswith(IGNORED_SUFFIX)}
    missing, unexpected = set(expected) - given, given - set(expected)
    if missing or unexpected:
        parts = [f"{len(missing)} missing ({_listed(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({_listed(unexpected)})" if unexpected else ""]
        raise UserError(f"{source}: not a torchvision {model_name} state_dict: tensors "
                        + "; ".join(p for p in parts if p))
    variables: dict = {}
    for key, (collection, path) in expected.items():
        leaf = abstract_variables[collection]
        for name in path:
            leaf = leaf[name]
        value = from_torch_layout(np.asarray(state_dict[key], np.float32))
        if tuple(value.shape) != tuple(leaf.shape):
            raise UserError(f"{source}: tensor {key} has shape {tuple(np.shape(state_dict[key]))}; "
                            f"a {model_name} needs {tuple(to_torch_layout(np.zeros(leaf.shape)).shape)}")
        _set(variables.setdefault(collection, {}), path, value)
    return variables


def state_dict_from_variables(variables: Mapping) -> dict[str, np.ndarray]:
    """The torchvision ``state_dict`` (numpy arrays) of the torchvision-layout ``variables``."""
    state_dict = {}
    for key, (collection, path) in torch_names(variables).items():
        leaf = variables[collection]
        for name in path:
            leaf = leaf[name]
        state_dict[key] = to_torch_layout(np.asarray(leaf, np.float32))
        if key.endswith(".running_var"):
            state_dict[key[: -len("running_var")] + IGNORED_SUFFIX] = np.zeros((), np.int64)
    return state_dict


def _unwrapped(loaded, source: str) -> Mapping:
    """A state_dict, also from inside a training checkpoint (``state_dict``/``model`` entry) and
    without DistributedDataParallel's ``module.`` prefix."""
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not loaded:
        raise UserError(f"{source}: holds no state_dict (a mapping of tensor names to tensors)")
    if all(key.startswith("module.") for key in loaded):
        loaded = {key[len("module."):]: value for key, value in loaded.items()}
    return loaded


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A ``.pth``/``.pt`` (``torch.load(weights_only=True)``) or ``.safetensors`` file's tensors, as numpy."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        try:
            return dict(_unwrapped(load_file(str(path)), str(path)))
        except SafetensorError as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        import torch
    except ImportError:
        raise UserError(f"{path}: reading a PyTorch file needs PyTorch (pip install torch), "
                        "or convert it to .safetensors") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated, foreign or unsafe pickles
        raise UserError(f"{path}: not a PyTorch weights file that loads with weights_only=True "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    state_dict = _unwrapped(loaded, str(path))
    if not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise UserError(f"{path}: holds entries that are not tensors; expected a model's state_dict")
    return {key: value.detach().cpu().numpy() for key, value in state_dict.items()}


def write_state_dict(state_dict: Mapping[str, np.ndarray], path: str | Path) -> None:
    """``.safetensors`` without PyTorch; ``.pth``/``.pt`` with ``torch.save``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file
        save_file(dict(state_dict), str(path))
        return
    if path.suffix not in (".pth", ".pt"):
        raise UserError(f"{path}: write .pth, .pt or .safetensors")
    try:
        import torch
    except ImportError:
        raise UserError(f"{path}: writing a .pth file needs PyTorch (pip install torch); "
                        ".safetensors does not") from None
    torch.save({key: torch.from_numpy(np.array(value)) for key, value in state_dict.items()}, path)
