"""Settings: one dataclass per command, each field with its default and a line of help.

Precedence: defaults, then the built-in dataset's own defaults (only when no --data is given), then a
YAML file (--config), then command-line flags. Validation runs before any work starts and names the
setting and what is allowed. The resolved config is saved in every run folder and checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data.transforms import parse_resize
from .errors import ConfigError
from .models import ARCHITECTURES, INIT_SCHEMES, MIN_INPUT_SIZE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The principal components of ImageNet's RGB pixels ([0, 1] scale) as published with fb.resnet.torch and
# used since for the paper's colour augmentation: eigenvalues, and the eigenvectors as the columns of a
# 3 x 3 matrix (given row by row).
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = (-0.5675, 0.7192, 0.4009,
                       -0.5808, -0.0045, -0.8140,
                       -0.5836, -0.6948, 0.4203)
TTA_MODES = ("none", "flip", "10crop")
TTA_VIEWS = {"none": 1, "flip": 2, "10crop": 10}  # crops a test-time augmentation makes of each image


def images_per_eval_batch(batch_size: int, tta: str) -> int:
    """Images in an evaluation batch of at most `batch_size` crops: with test-time views, fewer images,
    so that the memory a batch takes does not grow tenfold with 10crop."""
    return max(1, batch_size // TTA_VIEWS[tta])




def opt(default: Any, help: str, choices: tuple | None = None, flag: bool = True, required: bool = False):
    """A setting: its default, its help, its choices; `required`: a flag the command cannot run without."""
    kw = {"default_factory": (lambda d=default: list(d))} if isinstance(default, (list, tuple)) else {"default": default}
    return field(metadata={"help": help, "choices": choices, "flag": flag, "required": required}, **kw)


def jpeg_decode_opt():
    """--jpeg-decode, the same for alexnet train and alexnet eval."""
    return opt("auto", "JPEG files on a GPU: decoded there a batch at a time with nvJPEG (device) or in the loader "
                       "workers (workers); auto: device where torchvision can, else workers. A JPEG pack on a CPU: "
                       "auto decodes it in the main process a batch at a time where the workers would take cores "
                       "from the model's threads", ("auto", "device", "workers"))


@dataclass(frozen=True)  # resolved once, never changed: derived values live in train.plan
class TrainConfig:
    # data
    data: str | None = opt(None, "ImageFolder root with train/<class>/ and val/<class>/ (or valid/, validation/, "
                                 "test/); none: the built-in generated dataset")
    val_dir: str | None = opt(None, "the validation split's folder under --data (default: the first of val, valid, "
                                    "validation and test that exists)")
    val_fraction: float = opt(0.0, "hold out this share of each class of train/ (or, where --data has no train/, of "
                                   "its class folders) as the validation split, in place of a validation folder; 0: off")
    split_seed: int = opt(0, "which files --val-fraction holds out (apart from --seed, so that a sweep over --seed "
                             "keeps one validation set)")
    pack: str = opt("auto", "an image folder given as --data is packed once, on first use, into the cache folder and "
                            "trained from the pack: raw pixels (raw), JPEG (jpeg: about a tenth of the size), auto (raw "
                            "where it takes at most half the free disk and half the memory, else jpeg where it takes "
                            "at most half the free disk, else no), or no (the files decoded every epoch); not with "
                            "--random-resized-crop or --val-fraction, nor for the built-in dataset",
                    ("auto", "raw", "jpeg", "no"))
    synthetic_seed: int = opt(0, "seed of the built-in generated dataset")
    cache_dir: str | None = opt(None, "where the built-in dataset is generated and image folders packed (default: "
                                      "$ALEXNET_CACHE or ~/.cache/alexnet)")
    on_bad_image: str = opt("skip", "an unreadable image: skip it (counted in metrics.jsonl, with a warning) or stop with an error",
                            ("skip", "error"))
    # model
    arch: str = opt("alexnet", "model: alexnet (torchvision's variant) or alexnet2012 (the paper's)", ARCHITECTURES)
    fc_width: int = opt(4096, "width of the two hidden fully connected layers")
    init: str = opt("auto", "weight initialisation: auto (fan-out for alexnet, paper for alexnet2012), fan-out, "
                    "fan-in, pytorch or paper", ("auto",) + INIT_SCHEMES)
    init_bias: float = opt(1.0, "the paper initialisation's bias of conv2, conv4, conv5 and the hidden fully "
                                "connected layers (the paper's: 1)")
    dropout: float = opt(0.5, "dropout probability before the hidden fully connected layers")
    train_bn: bool = opt(False, "train with a BatchNorm after each convolution, folded into the convolutions "
                                "in every saved model: what is saved, evaluated and exported is the plain "
                                "architecture, with its keys")
    weights: str | None = opt(None, "start from these weights: a checkpoint of ours or a torchvision AlexNet state_dict file")
    # augmentation
    resize: str = opt("256", "resize: N for the shorter side to N (keeping the aspect ratio), or WxH for exactly that size")
    crop: int = opt(224, "crop size: random for training, centre for evaluation")
    val_crop: int = opt(0, "centre crop size for evaluation, if other than --crop (0: --crop); a larger one "
                           "than training's shows objects at the size random-resized crops enlarged them to")
    random_resized_crop: bool = opt(False, "training crop as torchvision's RandomResizedCrop instead of resize + random crop")
    rrc_min_scale: float = opt(0.08, "smallest area fraction for --random-resized-crop")
    progressive_crop: int = opt(0, "progressive resizing: random-resized crops of this size in the first epochs, "
                                   "growing to --crop by --progressive-end (0: off; needs --random-resized-crop)")
    progressive_start: int = opt(1, "progressive resizing: the last epoch at --progressive-crop; the crop then grows "
                                    "linearly, in steps of 32")
    progressive_end: int = opt(0, "progressive resizing: the first epoch at --crop (0: the last epoch)")
    hflip: float = opt(0.5, "probability of a horizontal flip in training")
    brightness: float = opt(0.0, "colour jitter: brightness factor drawn from [1-b, 1+b]")
    contrast: float = opt(0.0, "colour jitter: contrast factor drawn from [1-c, 1+c]")
    saturation: float = opt(0.0, "colour jitter: saturation factor drawn from [1-s, 1+s]")
    hue: float = opt(0.0, "colour jitter: hue shift drawn from [-h, h], at most 0.5")
    rotation: float = opt(0.0, "random rotation in degrees, drawn from [-r, r]")
    mean: list = opt(IMAGENET_MEAN, "normalisation mean per channel (ImageNet's by default; `alexnet data stats` computes a dataset's)")
    std: list = opt(IMAGENET_STD, "normalisation standard deviation per channel")
    pca_lighting: float = opt(0.0, "the paper's PCA colour augmentation: standard deviation of the alphas (paper: 0.1; 0: off)")
    pca_eigval: list = opt(IMAGENET_PCA_EIGVAL, "RGB covariance eigenvalues for --pca-lighting (ImageNet's; `alexnet data stats` computes a dataset's)")
    pca_eigvec: list = opt(IMAGENET_PCA_EIGVEC, "the 3 eigenvectors as the columns of a 3x3 matrix, 9 numbers row by "
                                                "row (write --pca-eigvec=-0.57,... when the first is negative)")
    val_tta: str = opt("none", "test-time augmentation of the validation during training: none, flip or 10crop", TTA_MODES)
    val_every: int = opt(1, "validate every N epochs, and always after the last (a CPU run spends less time on "
                            "validation; the plateau schedule needs 1)")
    # optimisation
    epochs: int = opt(90, "number of training epochs")
    batch_size: int = opt(128, "images per step on each process (see --global-batch-size)")
    lr: float = opt(0.01, "peak learning rate")
    momentum: float = opt(0.9, "SGD momentum")
    nesterov: bool = opt(False, "Nesterov momentum")
    weight_decay: float = opt(5e-4, "SGD weight decay")
    bias_decay: bool = opt(True, "weight decay on biases and BatchNorm parameters too (--no-bias-decay: on the "
                                 "weights of convolutions and linear layers only)")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy loss")
    clip_grad_norm: float = opt(0.0, "scale the gradients down when their global L2 norm exceeds this (0: off); "
                                     "guards a high learning rate against loss spikes")
    mixup: float = opt(0.0, "mixup: each training batch blended with itself in another order, the weight drawn "
                            "from Beta(a, a) (0: off; 0.2 is common)")
    cutmix: float = opt(0.0, "CutMix: a box of another image of the batch pasted into each one, its area drawn "
                             "from Beta(a, a) (0: off; 1 is common); with --mixup too, one of the two per batch")
    schedule: str = opt("step", "learning-rate schedule", ("step", "plateau", "cosine", "constant"))
    step_size: int = opt(30, "step schedule: epochs between divisions")
    gamma: float = opt(0.1, "step and plateau schedules: factor applied to the learning rate")
    patience: int = opt(2, "plateau schedule: epochs without a lower validation loss before dividing")
    warmup_epochs: float = opt(0.0, "linear warm-up from lr/100 over this many epochs")
    # distributed (see also the launch flags: --nproc-per-node, --nnodes, --rdzv-endpoint, ...)
    global_batch_size: int = opt(0, "images per optimizer step over all processes and accumulation steps; "
                                 "the per-process batch is derived from it (0: use --batch-size)")
    accum_steps: int = opt(1, "gradient accumulation: micro-batches per optimizer step (no all-reduce but on the last)")
    lr_scaling: str = opt("none", "linear: multiply --lr by global batch / --lr-reference-batch (Goyal et al.; "
                          "then --warmup-epochs defaults to 5, or --epochs when fewer)",
                          ("none", "linear"))
    lr_reference_batch: int = opt(256, "global batch size at which --lr is meant, for --lr-scaling linear")
    backend: str = opt("auto", "process-group backend: auto (nccl on CUDA, gloo on CPU), nccl or gloo",
                       ("auto", "nccl", "gloo"))
    dist_timeout: float = opt(300.0, "seconds to wait for the other processes when joining and in every collective")
    parallel: str = opt("auto", "how the model is spread over the processes: ddp (every process the whole model, "
                                "gradients all-reduced), hybrid (convolutions data-parallel, fully connected "
                                "layers cut over the processes: activations cross the network instead of their "
                                "gradients) or auto (hybrid while it sends fewer bytes: see README)",
                        ("auto", "ddp", "hybrid"))
    local_sgd_period: int = opt(0, "local SGD: average the weights over the processes every H steps instead of "
                                   "all-reducing every gradient (0: off; under hybrid, the convolutions' weights; under "
                                   "ddp on several nodes of several processes and without --comm-hook, the gradients "
                                   "still all-reduced within each node every step)")
    local_sgd_warmup: int = opt(0, "local SGD: synchronous steps (gradients all-reduced) before the local ones")
    comm_hook: str = opt("none", "gradient compression on the wire: none, bf16, fp16 or powersgd (under hybrid, "
                                 "bf16 and fp16 carry the activations too)",
                         ("none", "bf16", "fp16", "powersgd"))
    powersgd_rank: int = opt(2, "PowerSGD: rank of the low-rank gradient approximation")
    powersgd_start_step: int = opt(1000, "PowerSGD: plain all-reduce for this many steps first (at least 2)")
    bucket_cap_mb: float = opt(25.0, "DDP gradient bucket size in MiB")
    gradient_as_bucket_view: bool = opt(False, "DDP: gradients as views into the buckets (saves a copy)")
    static_graph: bool = opt(False, "DDP: the graph is the same every step (lets DDP skip some work)")
    # running
    out: str | None = opt(None, "run folder (default: runs/<arch>-<date>-<time>)")
    resume: str | None = opt(None, "continue from this checkpoint, or auto: from the newest usable checkpoint in "
                             "--out's checkpoints/ (a fresh start when there is none)")
    checkpoint_every: str = opt("0", "also checkpoint inside epochs: every N steps (500) or minutes (10m); 0: at epoch ends only")
    keep_last: int = opt(3, "step checkpoints kept (best.pt is kept as well)")
    max_nonfinite_steps: int = opt(10, "steps with a non-finite loss are skipped; this many in a row stop the run")
    device: str = opt("auto", "device: auto (cuda when present), cpu, cuda or cuda:N")
    workers: int = opt(2, "data loader worker processes (0: load in the main process)")
    jpeg_decode: str = jpeg_decode_opt()
    data_on_device: str = opt("auto", "packed data held in the device's memory, the loader workers then moving no "
                                      "pixels (yes: on a GPU copied there, on a CPU read from the memory map by the "
                                      "main process), or read by the workers (no); auto: yes on a CPU, and on a GPU "
                                      "when it takes at most half of the free memory", ("auto", "yes", "no"))
    seed: int = opt(0, "seed of weights, shuffling and augmentation")
    deterministic: bool = opt(False, "reproducible to the bit: fp32, deterministic algorithms, a fixed thread count")
    threads: int = opt(0, "CPU threads for the model (0: torch's default; 1 under --deterministic)")
    channels_last: bool = opt(True, "channels-last memory layout (faster convolutions on most hardware)")
    precision: str = opt("auto", "arithmetic of the forward pass: auto (bf16 on GPUs that have it, else fp16; bf16 on "
                                 "CPUs with AMX or AVX512-BF16; fp32 otherwise and under --deterministic), fp32, bf16 "
                                 "or fp16 (with a gradient scaler)", ("auto", "fp32", "bf16", "fp16"))
    compile: bool = opt(False, "torch.compile the training model (the first steps compile it; off by default: on "
                               "CPUs it was measured slower than eager; ALEXNET_COMPILE_BACKEND picks another backend)")
    sgd: str = opt("auto", "SGD implementation: auto (fused where this torch has it), fused, foreach or for-loop",
                   ("auto", "fused", "foreach", "for-loop"))
    log_every: int = opt(20, "steps between progress lines when the output is not a terminal")
    quiet: bool = opt(False, "no progress display; epoch lines only")
    tensorboard: bool = opt(False, "also write TensorBoard event files to RUN/tensorboard "
                                   "(needs pip install 'alexnet[tensorboard]')")
    recipe: str | None = opt(None, "a recipe of settings: paper2012, torchvision, fast (configs/NAME.yaml) or a YAML "
                                   "file; --config and flags override it")
    config: str | None = opt(None, "YAML file of settings; flags override it", flag=True)


# The built-in dataset is small images: these fill in what the user did not set, so that the default
# run is a quick demonstration rather than a 90-epoch ImageNet schedule. BatchNorm while training (folded
# into the convolutions at save, so the saved model is plain AlexNet): without it the run sat on the
# chance-loss plateau for one to five epochs, and how long depended on the CPU's rounding (BENCHMARKS.md).
SYNTHETIC_DEFAULTS = {"resize": "72", "crop": 64, "init": "fan-in", "epochs": 10, "fc_width": 512, "dropout": 0.0, "lr": 0.005,
                      "warmup_epochs": 1.0, "schedule": "cosine", "nesterov": True, "batch_size": 64, "train_bn": True}

# Image folders whose images are small (median shorter side under SMALL_IMAGE_SIDE px) get these sizes
# where the user set none: what the built-in dataset of 72-px images trains at.
SMALL_IMAGE_SIDE = 64
SMALL_IMAGE_DEFAULTS = {"resize": "72", "crop": 64}


@dataclass
class EvalConfig:
    checkpoint: str = opt(None, "checkpoint (.pt) to evaluate", required=True)
    data: str | None = opt(None, "ImageFolder root whose validation split is evaluated (default: the data the model was trained on)")
    val_dir: str | None = opt(None, "the validation split's folder under --data (default: the run's own, else the first "
                                    "of val, valid, validation and test that exists)")
    batch_size: int = opt(128, "crops per batch: images, or with --tta that many views (128 with 10crop: 12 "
                               "images of 10 views)")
    workers: int = opt(2, "data loader worker processes")
    jpeg_decode: str = jpeg_decode_opt()
    device: str = opt("auto", "device: auto, cpu, cuda or cuda:N")
    cache_dir: str | None = opt(None, "cache folder of the built-in dataset (default: the run's, else $ALEXNET_CACHE "
                                      "or ~/.cache/alexnet)")
    json: bool = opt(False, "print the metrics as JSON")
    tta: str = opt("none", "test-time augmentation: none (centre crop), flip (and its mirror) or 10crop (the four "
                           "corners and the centre, and their mirrors), softmax outputs averaged", TTA_MODES)
    resize: str | None = opt(None, "resize before the centre crop: N (shorter side) or WxH; default: the run's "
                                   "(a packed dataset holds images at one size: pack another for another resize)")
    crop: int | None = opt(None, "centre crop size (with --tta, the size of every view); default: the run's")
    confusion: str | None = opt(None, "also draw the confusion matrix, with class names, to this PNG file")
    backend: str = opt("auto", "process-group backend when launched on several processes: auto, nccl or gloo",
                       ("auto", "nccl", "gloo"))
    dist_timeout: float = opt(300.0, "seconds to wait for the other processes when joining and in every collective")


@dataclass
class PredictConfig:
    images: list = opt((), "image files, folders or glob patterns ('photos/**/*.jpg')", flag=False)
    checkpoint: str = opt(None, "model to predict with: a checkpoint (.pt) or a file of alexnet export "
                                "(.onnx, .ts, .pt2, .safetensors)", required=True)
    topk: int = opt(5, "number of classes shown per image")
    batch_size: int = opt(64, "images per batch")
    device: str = opt("auto", "device: auto, cpu, cuda or cuda:N")
    json: bool = opt(False, "print the predictions as JSON")


BENCH_PIPELINES = ("ours", "reference")
BENCH_WHAT = ("data", "model", "end-to-end")


@dataclass
class BenchConfig:
    data: str | None = opt(None, "ImageFolder root (default: the built-in dataset)")
    packed: str | None = opt(None, "its packed form (default: made once in the cache folder)")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    batch_size: int = opt(64, "images per step")
    image_size: int = opt(224, "crop size; images are resized to 256/224 of it")
    steps: int = opt(10, "timed steps per measurement")
    warmup: int = opt(3, "untimed steps before each measurement")
    rounds: int = opt(3, "measurements of each kind; the median is reported")
    workers: int = opt(2, "loader worker processes, for both pipelines")
    jpeg_decode: str = jpeg_decode_opt()
    threads: int = opt(0, "CPU threads for the model (0: torch's default)")
    precision: str = opt("auto", "our pipeline's precision (the reference is fp32)", ("auto", "fp32", "bf16", "fp16"))
    compile: bool = opt(False, "torch.compile our model")
    pipelines: list = opt(BENCH_PIPELINES, "comma-separated: ours, reference")
    what: list = opt(BENCH_WHAT, "comma-separated: data, model, end-to-end")
    json: bool = opt(False, "print the result as one JSON object")
    profile: str | None = opt(None, "also profile our end-to-end steps: DIR/trace.json (Chrome trace) and "
                                    "DIR/top-ops.txt")


def fields(cls) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)  # `<<: *defaults` merged first, as YAML's own loader does
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            name = str(key).replace("-", "_")  # batch-size and batch_size are one setting
            if name in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice", key_node.start_mark)
            seen.add(name)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config: {p} is a folder; give a YAML file of settings, such as those in configs/")
    if not p.is_file():
        raise ConfigError(f"config: file {str(p)!r} does not exist")
    try:
        data = yaml.load(p.read_text(), Loader=_Loader) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config: {p} is not a YAML file (not even text): give a file of settings, one "
                          f"`name: value` a line, such as those in configs/") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)  # where the parser stopped, 0-based; its message spans lines
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"config: {p} is not valid YAML ({where}{problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {p} must hold a mapping of settings, not {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _coerce(f: dataclasses.Field, value: Any, name: str = "") -> Any:
    """Turn a YAML or flag value into the field's type, or raise ConfigError naming the setting (`name`; by
    default as its flag)."""
    name = name or "--" + f.name.replace("_", "-")
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    kind = type(default) if default is not None else None
    if f.type in ("str | None",) or (default is None and f.type.startswith("str")):
        return None if value is None else str(value)
    if f.type == "int | None":  # unset: taken from elsewhere (the checkpoint's run)
        if value is None:
            return None
        kind = int
    if value is None:
        raise ConfigError(f"{name}: a value is required")
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if isinstance(default, list) and not default:  # a list of names (paths)
            return [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        if isinstance(default, list) and isinstance(default[0], str):  # a list of words, comma-separated
            items = value if isinstance(value, (list, tuple)) else str(value).split(",")
            return [str(v).strip() for v in items if str(v).strip()]
        if isinstance(default, list):
            items = value if isinstance(value, (list, tuple)) else re.split(r"[,\s]+", str(value).strip())
            numbers = [float(v) for v in items if v != ""]
            if not all(math.isfinite(v) for v in numbers):
                raise ValueError
            return numbers
        if kind is int:
            if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        return str(value)
    except (TypeError, ValueError, OverflowError):
        what = "a list of finite numbers" if isinstance(default, list) else (
            "true or false" if isinstance(default, bool) else
            {int: "a whole number", float: "a finite number"}.get(kind, "a value"))
        raise ConfigError(f"{name}: {value!r} is not {what}") from None


# Settings that name files or folders: `~` is expanded in them wherever they come from (a flag written
# --out=~/runs, which the shell leaves alone, or a YAML file), and those a run keeps in its saved config
# are made absolute, so that the run's checkpoint means the same from any working directory.
PATHS = ("data", "cache_dir", "weights", "out", "resume", "config", "checkpoint", "confusion", "images", "packed",
         "profile")
ABSOLUTE = ("data", "cache_dir", "weights", "out")


def _path(name: str, value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_path(name, v) for v in value]
    if not isinstance(value, str) or (name == "resume" and value == "auto"):
        return value
    if not value.strip():  # `--data "$DATA"` with DATA unset: never taken for "not given"
        raise ConfigError(f"--{name.replace('_', '-')}: an empty path; give one, or leave the flag out")
    value = os.path.expanduser(value)
    return os.path.abspath(value) if name in ABSOLUTE else value


def check_file(values: dict[str, Any], source: str) -> None:
    """The settings of a YAML file (a --config file or a recipe; `source` names it) each checked on its
    own, so that a mistake is said as the file has it, `FILE: epochs: 'ten' is not a whole number`, not as
    a flag the user never typed; an unknown name gets the closest known one."""
    known = {f.name: f for f in fields(TrainConfig)}
    for k, v in values.items():
        if k not in known:
            from .launch import FLAGS
            if k in FLAGS:
                raise ConfigError(f"{source}: {k} is a setting of the launch, not of the training: give it on the "
                                  f"command line, --{k.replace('_', '-')}")
            close = difflib.get_close_matches(k, known, n=1)
            raise ConfigError(f"{source}: unknown setting {k!r}" + (f" (did you mean {close[0]!r}?)" if close else
                                                                 f"; known settings: {', '.join(sorted(known))}"))
        if k in PATHS and isinstance(v, str) and not v.strip():
            raise ConfigError(f"{source}: {k}: an empty path; give one, or leave the line out")
        _coerce(known[k], v, f"{source}: {k}")


def build(cls, values: dict[str, Any]):
    """Make a config of class `cls` from `values`, refusing unknown keys and badly typed values."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}; known settings: {', '.join(sorted(known))}")
    return cls(**{k: _coerce(known[k], _path(k, v) if k in PATHS else v) for k, v in values.items()})


def check_crop(resize: str, crop: int, setting: str = "crop") -> None:
    """A crop that AlexNet can take and that fits inside the resized image."""
    size = parse_resize(resize)
    smallest = min(size) if isinstance(size, tuple) else size
    if crop < MIN_INPUT_SIZE:
        raise ConfigError(f"--{setting}: {crop} is below AlexNet's smallest input, {MIN_INPUT_SIZE}")
    if crop > smallest:
        raise ConfigError(f"--{setting}: {crop} is larger than the resized image ({resize}); use a crop of at most {smallest}")


def eval_crop(cfg: dict) -> int:
    """The centre crop a run evaluates with, from its settings as a dict (a saved config, or `to_dict`):
    --val-crop, or --crop when that is 0 or the run predates it."""
    return int(cfg.get("val_crop") or cfg["crop"])


def check_choices(cfg) -> None:
    """Every setting of `cfg` that has a list of choices holds one of them."""
    for f in fields(type(cfg)):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"--{f.name.replace('_', '-')}: {getattr(cfg, f.name)!r} is not one of "
                              f"{', '.join(choices)}")


def check_split(val_fraction: float, val_dir: str | None) -> None:
    """--val-fraction and --val-dir, as alexnet train, data pack and data check take them."""
    if not 0 <= val_fraction < 1:
        raise ConfigError("--val-fraction: must be in [0, 1): the share of each class held out")
    if val_fraction and val_dir:
        raise ConfigError("--val-fraction: and --val-dir: give one (a held-out share of train/, or a validation "
                          "folder)")


WEEK = 7 * 24 * 3600  # the longest --dist-timeout: longer ones overflow torch's timers


def validate_train(cfg: TrainConfig, check_data: bool = True) -> None:
    """Refuse settings that cannot work, before any work. `check_data` False: a missing --data is left to
    the workers of a multi-node job, which agree on it with their peers (train.open_data), so that every
    node stops at once rather than the others waiting for this one until the timeout."""
    def need(ok: bool, setting: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"--{setting}: {msg}")

    check_choices(cfg)
    # Evaluation always resizes then centre-crops, so the crop must fit the resize even with
    # --random-resized-crop.
    check_crop(cfg.resize, cfg.crop)
    need(cfg.val_crop >= 0, "val-crop", "must be 0 (the --crop) or a crop size")
    check_split(cfg.val_fraction, cfg.val_dir)
    need(math.isfinite(cfg.init_bias), "init-bias", "must be a finite number")
    if cfg.val_crop:
        check_crop(cfg.resize, cfg.val_crop, "val-crop")
    need(0 < cfg.rrc_min_scale <= 1, "rrc-min-scale", "must be in (0, 1]")
    if cfg.progressive_crop:
        need(cfg.random_resized_crop, "progressive-crop", "needs --random-resized-crop (a smaller plain crop would "
             "show less of the image, not the image at a lower resolution)")
        need(MIN_INPUT_SIZE <= cfg.progressive_crop < cfg.crop, "progressive-crop",
             f"must be 0 (off) or from AlexNet's smallest input, {MIN_INPUT_SIZE}, to less than --crop {cfg.crop}")
        need(cfg.progressive_end >= 0, "progressive-end", "must be 0 (the last epoch) or an epoch")
        end = cfg.progressive_end or cfg.epochs
        need(1 <= cfg.progressive_start < end, "progressive-start",
             f"must be at least 1 and before --progressive-end (epoch {end})")
        need(end <= cfg.epochs, "progressive-end", f"must be at most --epochs {cfg.epochs} (0: the last epoch)")
    need(0 <= cfg.hflip <= 1, "hflip", "must be a probability in [0, 1]")
    for name in ("brightness", "contrast", "saturation"):
        need(getattr(cfg, name) >= 0, name, "must be 0 or more")
    need(0 <= cfg.hue <= 0.5, "hue", "must be in [0, 0.5]")
    need(0 <= cfg.rotation <= 180, "rotation", "must be in [0, 180] degrees")
    need(len(cfg.mean) == 3, "mean", "needs 3 numbers, one per RGB channel")
    need(len(cfg.std) == 3 and all(s > 0 for s in cfg.std), "std", "needs 3 positive numbers, one per RGB channel")
    need(cfg.pca_lighting >= 0, "pca-lighting", "must be 0 (off) or a positive standard deviation")
    need(len(cfg.pca_eigval) == 3 and all(v >= 0 for v in cfg.pca_eigval), "pca-eigval",
         "needs 3 eigenvalues, 0 or more")
    need(len(cfg.pca_eigvec) == 9, "pca-eigvec", "needs 9 numbers: the 3x3 matrix of eigenvectors (columns), row by row")
    e = [cfg.pca_eigvec[i:i + 3] for i in (0, 3, 6)]
    gram = [[sum(e[k][i] * e[k][j] for k in range(3)) for j in range(3)] for i in range(3)]
    need(all(abs(gram[i][j] - (i == j)) < 0.01 for i in range(3) for j in range(3)), "pca-eigvec",
         "the columns must be orthonormal eigenvectors (as `alexnet data stats` prints them)")
    need(cfg.fc_width >= 1, "fc-width", "must be at least 1")
    need(0 <= cfg.dropout < 1, "dropout", "must be in [0, 1)")
    need(1 <= cfg.epochs <= 1_000_000, "epochs", "must be at least 1 (and at most 1,000,000)")
    for name in ("seed", "split_seed", "synthetic_seed"):
        need(0 <= getattr(cfg, name) < 2**32, name.replace("_", "-"), "must be a whole number in [0, 4294967295]")
    need(cfg.val_every >= 1, "val-every", "must be at least 1 (validate every N epochs)")
    need(cfg.val_every == 1 or cfg.schedule != "plateau", "val-every",
         "the plateau schedule divides the learning rate on the validation loss of every epoch; use --val-every 1")
    need(cfg.batch_size >= 1, "batch-size", "must be at least 1")
    need(cfg.lr > 0, "lr", "must be positive")
    need(0 <= cfg.momentum < 1, "momentum", "must be in [0, 1)")
    need(not cfg.nesterov or cfg.momentum > 0, "nesterov", "needs a positive --momentum")
    need(cfg.weight_decay >= 0, "weight-decay", "must be 0 or more")
    need(0 <= cfg.label_smoothing < 1, "label-smoothing", "must be in [0, 1)")
    need(math.isfinite(cfg.clip_grad_norm) and cfg.clip_grad_norm >= 0, "clip-grad-norm",
         "must be 0 (off) or a positive number")
    need(math.isfinite(cfg.mixup) and cfg.mixup >= 0, "mixup", "must be 0 (off) or a positive number")
    need(math.isfinite(cfg.cutmix) and cfg.cutmix >= 0, "cutmix", "must be 0 (off) or a positive number")
    need(cfg.step_size >= 1, "step-size", "must be at least 1")
    need(0 < cfg.gamma <= 1, "gamma", "must be in (0, 1]")
    need(cfg.patience >= 0, "patience", "must be 0 or more")
    need(0 <= cfg.warmup_epochs <= cfg.epochs, "warmup-epochs", f"must be in [0, epochs={cfg.epochs}]")
    need(cfg.workers >= 0, "workers", "must be 0 or more")
    if cfg.data_on_device == "yes":  # what can be told before any work; the data's kind and size later
        need(not (cfg.random_resized_crop or cfg.rotation), "data-on-device",
             "yes crops the held images as windows (on the GPU, or in the main process on a CPU), which "
             "cannot rotate them or take random-resized crops; use --data-on-device no")
    need(cfg.threads >= 0, "threads", "must be 0 or more")
    need(cfg.log_every >= 1, "log-every", "must be at least 1")
    need(cfg.global_batch_size >= 0, "global-batch-size", "must be 0 (unset) or positive")
    need(cfg.accum_steps >= 1, "accum-steps", "must be at least 1")
    need(cfg.lr_reference_batch >= 1, "lr-reference-batch", "must be at least 1")
    need(0 < cfg.dist_timeout <= WEEK, "dist-timeout", f"must be a positive number of seconds, at most {WEEK:,} "
                                                       f"(a week)")
    need(cfg.powersgd_rank >= 1, "powersgd-rank", "must be at least 1")
    need(cfg.powersgd_start_step >= 2, "powersgd-start-step", "must be at least 2 (PowerSGD needs a plain step first)")
    need(cfg.bucket_cap_mb > 0, "bucket-cap-mb", "must be positive")
    need(cfg.local_sgd_period == 0 or cfg.local_sgd_period >= 2, "local-sgd-period",
         "must be 0 (off) or at least 2 steps between averagings")
    need(cfg.local_sgd_warmup >= 0, "local-sgd-warmup", "must be 0 or more steps")
    need(not (cfg.parallel == "hybrid" and cfg.compile), "parallel",
         "hybrid cannot be compiled: drop --compile, or use --parallel ddp")
    need(not (cfg.parallel == "hybrid" and cfg.comm_hook == "powersgd"), "parallel",
         "hybrid sends activations, which PowerSGD cannot compress: use --comm-hook none or bf16")
    _check_device(cfg.device)
    parse_every(cfg.checkpoint_every)
    need(cfg.keep_last >= 1, "keep-last", "must be at least 1")
    need(cfg.max_nonfinite_steps >= 1, "max-nonfinite-steps", "must be at least 1")
    if cfg.tensorboard:
        from .logs import tensorboard_missing
        missing = tensorboard_missing()
        if missing:
            raise ConfigError(missing)
    need(cfg.resume != "auto" or cfg.out is not None, "resume",
         "auto needs --out: the run folder whose checkpoints to continue from")
    if cfg.out is not None:  # the run folder, or the first of the folders to make for it, must not be a file
        there = next(p for p in (Path(cfg.out), *Path(cfg.out).absolute().parents) if p.exists() or p == p.parent)
        need(there.is_dir(), "out", f"{there} is a file; give a folder for the run (it is made if missing)")
        need(os.access(there, os.W_OK | os.X_OK), "out", f"no permission to write in {there}; give a folder you "
                                                           f"can write in")
    _paths_exist(cfg, ("data", "weights", "resume") if check_data else ("weights", "resume"))


def _paths_exist(cfg, names) -> None:
    """The paths given as these settings exist (--resume's "auto" aside)."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not (name == "resume" and value == "auto") and not Path(value).exists():
            raise ConfigError(f"--{name}: {value!r} does not exist")


def parse_every(text: str) -> tuple[int, float]:
    """'500' -> (500 steps, 0 minutes); '10m' -> (0, 10.0); '0' -> (0, 0)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(m|min)?\s*", str(text))
    if not m or (not m.group(2) and "." in m.group(1)):
        raise ConfigError(f"--checkpoint-every: {text!r} is not a number of steps (500) or minutes (10m)")
    return (0, float(m.group(1))) if m.group(2) else (int(m.group(1)), 0.0)


def _check_device(device: str) -> None:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", device) is None:
        raise ConfigError(f"--device: {device!r} is not auto, cpu, cuda or cuda:N")


def _check_inference(cfg) -> None:
    """Checks shared by eval and predict."""
    if not cfg.checkpoint:
        raise ConfigError("--checkpoint: required (a .pt file written by alexnet train)")
    if cfg.batch_size < 1:
        raise ConfigError("--batch-size: must be at least 1")
    _check_device(cfg.device)


def validate_eval(cfg: EvalConfig) -> None:
    _check_inference(cfg)
    if cfg.resize is not None:
        parse_resize(cfg.resize)
    if cfg.crop is not None and cfg.crop < MIN_INPUT_SIZE:
        raise ConfigError(f"--crop: {cfg.crop} is below AlexNet's smallest input, {MIN_INPUT_SIZE}")
    if cfg.workers < 0:
        raise ConfigError("--workers: must be 0 or more")
    if not 0 < cfg.dist_timeout <= WEEK:
        raise ConfigError(f"--dist-timeout: must be a positive number of seconds, at most {WEEK:,} (a week)")
    _paths_exist(cfg, ("data",))
    if cfg.confusion is not None:
        from .plots import matplotlib_missing, png_target_problem
        problem = matplotlib_missing() or png_target_problem(cfg.confusion)
        if problem:
            raise ConfigError(f"--confusion: {problem}")


def validate_bench(cfg: BenchConfig) -> None:
    if cfg.image_size < MIN_INPUT_SIZE:
        raise ConfigError(f"--image-size: {cfg.image_size} is below AlexNet's smallest input, {MIN_INPUT_SIZE}")
    for name in ("batch_size", "steps", "rounds"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be 1 or more")
    for name in ("warmup", "workers", "threads"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name}: must be 0 or more")
    check_choices(cfg)
    _check_device(cfg.device)
    for flag, given, known in (("pipelines", cfg.pipelines, BENCH_PIPELINES), ("what", cfg.what, BENCH_WHAT)):
        for item in given:
            if item not in known:
                raise ConfigError(f"--{flag}: {item!r} is not one of {', '.join(known)}")
        if not given or len(set(given)) < len(given):
            raise ConfigError(f"--{flag}: give each of {', '.join(known)} at most once, and at least one")
    _paths_exist(cfg, ("data", "packed"))
    if cfg.packed and not cfg.data:
        raise ConfigError("--packed goes with --data SRC, the image folder it was packed from (the reference reads "
                          "its files; ours is checked against it)")
    if cfg.profile is not None:
        target = Path(cfg.profile)
        if target.exists() and not target.is_dir():
            raise ConfigError(f"--profile: {target} is a file; give a folder (it gets trace.json and top-ops.txt)")
        if not target.parent.is_dir():
            raise ConfigError(f"--profile: the folder {target.parent} does not exist")
        if not os.access(target if target.is_dir() else target.parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--profile: no permission to write in {target if target.is_dir() else target.parent}")


def validate_predict(cfg: PredictConfig) -> None:
    _check_inference(cfg)
    if cfg.topk < 1:
        raise ConfigError("--topk: must be at least 1")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_yaml(cfg, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


RECIPES = Path(__file__).resolve().parent / "configs"  # installed with the package; configs/ in the repository


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def load_recipe(name: str) -> dict:
    """configs/NAME.yaml, or a YAML file named by its path; its keys are checked against the settings."""
    path = Path(name) if name.endswith((".yaml", ".yml")) or "/" in name else RECIPES / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"--recipe: {name!r} is neither a recipe ({', '.join(recipe_names()) or 'none found'} "
                          f"in {RECIPES}) nor a YAML file")
    values = load_yaml(path)
    check_file(values, f"--recipe {name}" if path == Path(name) else f"--recipe {name} ({path})")
    if values.get("recipe") or values.get("config"):
        raise ConfigError(f"--recipe {name}: a recipe cannot name another recipe or config file")
    values.pop("recipe", None)
    values.pop("config", None)
    if values.get("global_batch_size") and values.get("batch_size"):
        raise ConfigError(f"--recipe {name}: {path} sets both batch_size and global_batch_size; give one")
    return values


def _small_image_defaults(data: Path, values: dict) -> None:
    """An image folder of small images (median shorter side under SMALL_IMAGE_SIDE px, as CIFAR's 32 px)
    gets the built-in dataset's sizes, --resize 72 --crop 64, where the user set neither: upscaled to 256
    for crops of 224 they would be far slower to train, for no detail gained."""
    from .data import packed
    from .data.folder import median_short_side, pool_dir
    if not data.is_dir() or packed.is_packed(data):
        return
    side = median_short_side(data)
    if side is None or side >= SMALL_IMAGE_SIDE:
        return
    filled = {k: v for k, v in SMALL_IMAGE_DEFAULTS.items() if k not in values}
    values.update(filled)
    if os.environ.get("RANK", "0") == "0":
        logging.getLogger("alexnet").info(
            f"{data} holds small images (median shorter side {side} px in a sample of "
            f"{'train/' if pool_dir(data) == 'train' else 'its class folders'}): "
            + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in filled.items()) + " (set them to choose others)")


def resolve_train(flags: dict[str, Any], checkpoint_config=None, check_data: bool = True) -> tuple[TrainConfig, set[str]]:
    """Layer the settings: defaults < built-in dataset defaults < resumed run < recipe < YAML < flags.

    `checkpoint_config(resume, out)` returns the saved config of the checkpoint that --resume names (for
    auto: the newest in `out`; an empty dict when there is none). Returns the validated config and the
    names of the settings the user gave."""
    given = {k: _path(k, v) if k in PATHS else v for k, v in flags.items()}
    from_file = load_yaml(given["config"]) if given.get("config") else {}
    check_file({k: v for k, v in from_file.items() if k != "config"}, f"config {given.get('config')}")
    from_file = {k: _path(k, v) if k in PATHS else v for k, v in from_file.items()}
    if (other := from_file.pop("config", None)) is not None:
        raise ConfigError(f"config: {given['config']} names another config file ({other}); one file "
                          f"holds the settings: copy them into it (a recipe may be named with `recipe:`)")
    if given.get("recipe") == "":
        raise ConfigError(f"--recipe: an empty name; give one of {', '.join(recipe_names())}, or leave the flag out")
    recipe = given.get("recipe") or from_file.get("recipe")
    explicit = {**(load_recipe(recipe) if recipe else {}), **from_file, **given}
    values: dict[str, Any] = {}
    resume = explicit.get("resume")
    if resume and checkpoint_config is not None:
        if resume == "auto" and not explicit.get("out"):
            raise ConfigError("--resume: auto needs --out: the run folder whose checkpoints to continue from")
        if resume != "auto" and not Path(str(resume)).exists():
            raise ConfigError(f"--resume: {resume!r} does not exist")
        saved = checkpoint_config(resume, explicit.get("out"))
        if saved:
            saved.setdefault("precision", "fp32")  # runs from before --precision were fp32: they stay so
            saved.setdefault("pack", "no")  # and runs from before --pack read their files: so they go on
        values.update(saved)
        folder = Path(str(resume)).absolute().parent
        if resume != "auto" and "out" not in explicit and folder.name == "checkpoints":
            values["out"] = str(folder.parent)  # the run's folder as it is now: moved or copied, it goes on there
        # The run's own weights are in the checkpoint: the starting weights are not needed again.
        values.pop("config", None)
        values.pop("weights", None)
    for level, source in ((given, "--batch-size and --global-batch-size"),
                          (from_file, f"config {given.get('config')}: batch_size and global_batch_size")):
        if level.get("global_batch_size") and "batch_size" in level:
            raise ConfigError(f"{source}: give one, not both (the batch is per process; the global batch is split "
                              f"over processes and accumulation steps)")
    values.update(explicit)
    # The batch given last wins: flags over the config file, over a recipe or the resumed run.
    batch = next((level for level in (given, from_file) if "batch_size" in level or "global_batch_size" in level), {})
    if "batch_size" in batch or "global_batch_size" in batch and not batch["global_batch_size"]:
        values["global_batch_size"] = 0  # a per-process batch given now wins over a resumed or recipe's global one
    if values.get("global_batch_size"):
        values.pop("batch_size", None)  # derived from the global batch at start, once the world size is known
    data = values.get("data")
    if data is not None and "data" not in explicit and check_data and not Path(str(data)).exists():
        relative = "" if os.path.isabs(str(data)) else ", a path relative to the folder the run was started in"
        raise ConfigError(f"--data: the run's data folder, {str(data)!r} (from its checkpoint{relative}), does not "
                          f"exist here: give the data's folder with --data")
    if data is None:
        for k, v in SYNTHETIC_DEFAULTS.items():
            if k not in values:
                values[k] = v
    elif not ("resize" in values and "crop" in values):
        _small_image_defaults(Path(str(data)), values)
    if values.get("lr_scaling") == "linear" and "warmup_epochs" not in values:
        # Goyal et al.: a linearly scaled learning rate needs a gradual warm-up (theirs: 5 epochs).
        values["warmup_epochs"] = min(5.0, float(values.get("epochs", 90)))
    cfg = build(TrainConfig, values)
    validate_train(cfg, check_data)
    return cfg, set(explicit)
