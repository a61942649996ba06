"""The run configuration: its fields, defaults and checks. Config files in configs/ start from here."""

import importlib.util
from pathlib import Path

import ml_collections

from resnet_flax.errors import UserError


def default_config() -> ml_collections.ConfigDict:
    """Every field a run reads, with the assignment's values."""
    config = ml_collections.ConfigDict()

    # Data: 'signs' | 'imagefolder' (data_dir/train/<class>/..., data_dir/test/ or val/) |
    # 'tfds:NAME' (prepared in data_dir; resnet_flax/datasets.py). For SIGNS, data_dir '' searches
    # $SIGNS_DATA_DIR -> ./datasets -> ../shared/data/signs, and data_format says which layout.
    config.dataset = "signs"
    config.data_dir = ""
    config.data_format = "auto"  # 'auto' | 'h5' | 'jpg'
    config.image_size = 64
    config.num_classes = 6  # 0: as many as the data has (image folders, TFDS)
    # Image folders and TFDS: decoding threads per process (0: one per CPU core), and what an
    # image that cannot be decoded does: 'fail' (stop, naming it) | 'skip' (left out, counted).
    config.data_threads = 0
    config.bad_images = "fail"
    config.augment = False  # random shifts (4 px) and horizontal flips, on the device
    # Pixels to model inputs: 'unit' = pixels / 255 (the assignment's); 'imagenet' = then ImageNet's
    # mean and standard deviation per channel (what torchvision's weights expect).
    config.normalization = "unit"
    # Images to image_size, on the host: 'resize' = the whole image, stretched (SIGNS-like data);
    # 'imagenet' = training: a random-resized crop and a horizontal flip; evaluation (and predict):
    # the shorter side to image_size / 0.875, then the centre crop (224 <- 256). SIGNS is held at
    # its size, with config.augment's on-device shifts and flips.
    config.preprocessing = "resize"

    # Model: resnet18/34/50/101/152 (and small resnet26/14/_tiny), or plain<depth> for the twin
    # without shortcuts, in a layout: 'assignment' (Keras's: conv biases, stride on the first 1x1,
    # 2x2 average pool and flatten) | 'torchvision' (v1.5) | 'preact' (He et al. 2016); see
    # resnet_flax/models.py. conv 'auto' | 'xla' | 'gemm' | 'winograd'.
    config.model = "resnet50"
    config.variant = "assignment"
    config.conv_impl = "auto"
    # Conv and dense products: 'highest' = float32 on every backend (GPUs would otherwise use
    # TensorFloat-32); 'default' = the backend's fastest. The same on CPU.
    config.matmul_precision = "highest"
    # Compute dtype: 'float32' | 'bfloat16' (convs and matmuls in bfloat16; parameters, BatchNorm
    # statistics and the loss in float32).
    config.dtype = "float32"

    # Optimisation: 'adam' (with Keras's defaults) | 'adamw' | 'sgd' (momentum, Nesterov).
    config.optimizer = "adam"
    config.learning_rate = 1e-3
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.adam_eps = 1e-7
    config.momentum = 0.9  # sgd
    config.nesterov = True  # sgd
    # adamw: decoupled decay; sgd: L2 added to the gradient (PyTorch's SGD weight_decay). On conv
    # and dense kernels only, never on BatchNorm parameters or biases.
    config.weight_decay = 0.0
    config.grad_clip_norm = 0.0  # > 0: clip the gradient to this global norm first
    config.lr_schedule = "constant"  # 'constant' | 'cosine' (with linear warm-up)
    config.warmup_epochs = 0.0
    config.label_smoothing = 0.0
    # > 0: also keep an exponential moving average of the weights (and BatchNorm statistics),
    # checkpointed and evaluated beside them: ema = decay * ema + (1 - decay) * weights per step.
    config.ema_decay = 0.0
    # '' trains everything; 'backbone' trains the output layer alone (a linear probe), the rest
    # frozen, its BatchNorm statistics included.
    config.freeze = ""

    config.batch_size = 32
    config.eval_batch_size = 40
    config.num_epochs = 2
    config.seed = 0
    # Steps per compiled call, at most: an epoch splits into near-equal chunks (34 -> 12, 11, 11),
    # and a run's first epoch starts with one step alone (1, 11, 11, 11). Longer chunks are faster
    # (XLA:CPU spends ~71 ms per call beyond the steps); the progress bar moves between them.
    config.steps_per_chunk = 16

    # Checkpoints in <workdir>/checkpoints: a workdir that has them resumes from the newest.
    config.checkpoint_every_epochs = 1
    config.keep_checkpoints = 3
    # > 0: also a checkpoint every this many steps within an epoch (<workdir>/step_checkpoints, the
    # newest two kept), holding the data's position, so a killed run resumes at the next batch.
    # SIGTERM / SIGINT always save one at the step reached.
    config.checkpoint_every_steps = 0
    # Start a new run from another run's checkpoint (a workdir or its checkpoints/ folder):
    # weights only, or weights and optimizer state (step included) with restore_optimizer. A
    # checkpoint with another number of classes gives all but the output layer (transfer).
    config.restore_from = ""
    config.restore_optimizer = False
    # A workdir that holds checkpoints resumes only with the same config, less the fields that may
    # change (resnet_flax/workdir.py: more epochs, data and cache paths, reporting); True goes on
    # with the new values, and history.jsonl records what changed.
    config.allow_config_change = False

    # > 0: after training, also evaluate with BatchNorm statistics re-estimated over this many
    # training batches (resnet_flax/recalibration.py); both results are reported.
    config.bn_recalibration_batches = 0

    # > 0: a jax.profiler trace of this many steps, the call right after the first step of the
    # run, into <workdir>/profile (TensorBoard's profile plugin or Perfetto; docs/performance.md).
    # At most steps_per_chunk; the weights are those of a run without it, bit for bit (that
    # epoch's mean training loss up to float32 rounding: its steps are summed in other calls).
    config.profile_steps = 0

    # JAX's persistent compilation cache, with the saved traced programs of program_cache.py in
    # its exported_programs/ folder: '' = ~/.cache/resnet_flax/jax_compilation_cache, 'off'.
    config.compilation_cache_dir = ""

    return config


def validate(config: ml_collections.ConfigDict, num_train: int) -> None:
    """Stops on config values that cannot work, naming the field."""
    if config.batch_size <= 0 or config.batch_size > num_train:
        raise UserError(f"config.batch_size must be in [1, {num_train}] (the training set size), "
                        f"got {config.batch_size}")
    if config.eval_batch_size <= 0:
        raise UserError(f"config.eval_batch_size must be >= 1, got {config.eval_batch_size}")
    if config.num_epochs < 0:
        raise UserError(f"config.num_epochs must be >= 0, got {config.num_epochs}")
    if not config.learning_rate > 0:
        raise UserError(f"config.learning_rate must be > 0, got {config.learning_rate}")
    if config.steps_per_chunk < 1:
        raise UserError(f"config.steps_per_chunk must be >= 1, got {config.steps_per_chunk}")
    if config.lr_schedule not in ("constant", "cosine"):
        raise UserError(f"config.lr_schedule must be 'constant' or 'cosine', got {config.lr_schedule!r}")
    if config.bn_recalibration_batches < 0:
        raise UserError(f"config.bn_recalibration_batches must be >= 0, got {config.bn_recalibration_batches}")
    if config.checkpoint_every_steps < 0:
        raise UserError(f"config.checkpoint_every_steps must be >= 0 (0 = after epochs only), "
                        f"got {config.checkpoint_every_steps}")
    if config.data_threads < 0:
        raise UserError(f"config.data_threads must be >= 0 (0 = one per CPU core), got {config.data_threads}")
    if config.num_classes < 1:
        raise UserError(f"config.num_classes must be >= 1 (0 only for data that names its classes), "
                        f"got {config.num_classes}")
    if config.checkpoint_every_epochs < 1:
        raise UserError(f"config.checkpoint_every_epochs must be >= 1, got {config.checkpoint_every_epochs}")
    if not 0 <= config.profile_steps <= config.steps_per_chunk:
        raise UserError(f"config.profile_steps must be in [0, config.steps_per_chunk={config.steps_per_chunk}], "
                        f"got {config.profile_steps}")
    choices = {"optimizer": ("adam", "adamw", "sgd"), "normalization": ("unit", "imagenet"),
               "preprocessing": ("resize", "imagenet"), "freeze": ("", "backbone"), "bad_images": ("fail", "skip")}
    for field, allowed in choices.items():
        if config[field] not in allowed:
            raise UserError(f"config.{field} must be one of {allowed}, got {config[field]!r}")
    if config.weight_decay < 0:
        raise UserError(f"config.weight_decay must be >= 0, got {config.weight_decay}")
    if config.weight_decay and config.optimizer == "adam":
        raise UserError("config.weight_decay applies to optimizer 'adamw' (decoupled) or 'sgd' (L2); "
                        "with 'adam' set config.optimizer='adamw'")
    if not 0 <= config.ema_decay < 1:
        raise UserError(f"config.ema_decay must be in [0, 1), got {config.ema_decay}")
    if config.grad_clip_norm < 0:
        raise UserError(f"config.grad_clip_norm must be >= 0 (0 = off), got {config.grad_clip_norm}")
    if not 0 <= config.momentum < 1:
        raise UserError(f"config.momentum must be in [0, 1), got {config.momentum}")
    if config.keep_checkpoints < 1:
        raise UserError(f"config.keep_checkpoints must be >= 1, got {config.keep_checkpoints}")


def load_config_module(path: str | Path, *functions: str):
    """A config file as a module that defines ``functions`` (default ``get_config``; sweeps also
    ``get_sweep``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise UserError(f"{path}: not a Python config file (line {e.lineno}: {e.msg})") from None
    except Exception as e:
        raise UserError(f"{path}: the config file fails to run ({type(e).__name__}: {e})") from None
    for name in functions or ("get_config",):
        if not callable(getattr(module, name, None)):
            raise UserError(f"{path}: a config file must define {name}()")
    return module


def load_config_file(path: str | Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config([arg])`` of a config file, as ``--config=path[:arg]`` would load it."""
    module = load_config_module(path)
    try:
        return module.get_config(arg) if arg is not None else module.get_config()
    except Exception as e:
        raise UserError(f"{path}: get_config() fails ({type(e).__name__}: {e})") from None
