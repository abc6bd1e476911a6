"""The run's configuration: the defaults, the presets, the command line, and how they combine.

A config is a plain dict (saved in ``config.json`` and in every checkpoint); its keys
are the flags' names with underscores, plus ``preset``.
"""
import argparse
import math
import os
import time
from typing import NamedTuple

from ..loss import DIRECTION_SCHEMES, SIGMA_CONVENTIONS, TARGET_DRAWS
from .checkpoint import checkpoint_path, is_final_checkpoint, load_checkpoint, upgrade_config
from .cli import (DEVICE_ALLOWED, ArgumentParser, Rule, UsageError, at_least, check_rules, finite, finite_above, finite_at_least,
                  flag, valid_device)
from .data import AUGMENTATIONS, DATASETS, augmentation_recipe, check_data_paths
from .model import STEMS, check_backbone, cifar_stem_layout, feature_width, projector_layout
from .optim import LARS_EPS, effective_lr, lr_scale

DEFAULTS = {
    "epochs": 100,
    "batch_size": 256,
    "batch_per_device": None,
    "lr": 1e-3,
    "lr_scaling": "none",
    "weight_decay": 1e-4,
    "optimizer": "adamw",
    "momentum": 0.9,
    "lars_eta": 0.02,
    "lars_clip": True,
    "lars_exclude_bias_norm": True,
    "schedule": "constant",
    "warmup_epochs": 0,
    "warmup_start_lr": 0.0,
    "min_lr": 0.0,
    "lamb_inv": 25.0,
    "lamb_reg": 125.0,
    "p": 1.0,
    "mu": 0.0,
    "num_projections": 256,
    "target_law": "rectified",
    "sigma": "gn",
    "directions": "gaussian",
    "target_draw": "shared",
    "augmentation": "seed",
    "dataset": "cifar100",
    "data_dir": "./data",
    "val_dir": None,
    "image_size": 32,
    "download": True,
    "skip_data_check": False,
    "backbone": "resnet18",
    "stem": "cifar",
    "stem_padding": 1,
    "zero_init_last": True,
    "sync_batchnorm": False,
    "num_workers": min(8, os.cpu_count() or 1),
    "amp": True,
    "amp_dtype": "fp16",
    "out": None,
    "device": "auto",
    "seed": 0,
    "probe_lr": 1e-3,
    "probe_optimizer": "adamw",
    "knn_k": 200,
    "knn_t": 0.07,
    "eval_every": 1,
    "save_every": 0,
    "progress": True,
    # Speed switches (see training/speed.py); each applies on CUDA only. device_data None: CIFAR on CUDA.
    "device_data": None,
    "channels_last": True,
    "compile": False,
    "fused_optimizer": True,
    "cudnn_benchmark": True,
    "log_every": 50,
}

# The official CIFAR-100 run: YilunKuang/rectified-lp-jepa@5ae61ab, scripts/pretrain/cifar/rectified_lpjepa_cifar100.yaml,
# with the defaults solo-learn fills in (solo/methods/base.py, solo/args/pretrain.py, solo/utils/lars.py in the same
# repository). docs/training.md tabulates each value with its file; tests/test_train_recipe.py pins them.
PRESETS = {
    "seed": {},
    "paper": {
        "epochs": 1000,  # max_epochs
        "batch_per_device": 256,  # optimizer.batch_size is per device (pretrain.py scales the lr by it x devices)
        "optimizer": "lars",
        "lr": 0.03,  # optimizer.lr, x (batch per device x devices) / 256 (solo/args/pretrain.py)
        "lr_scaling": "linear",
        "weight_decay": 1e-4,
        "momentum": 0.9,  # solo/args/pretrain.py's default for lars
        "lars_eta": 0.02,
        "lars_clip": True,
        "lars_exclude_bias_norm": True,
        "schedule": "cosine",  # scheduler.name warmup_cosine, per step (base.py's default interval)
        "warmup_epochs": 10,  # base.py's default
        "warmup_start_lr": 3e-5,  # base.py's default
        "min_lr": 0.0,  # base.py's default
        "lamb_inv": 25.0,
        "lamb_reg": 250.0,
        "p": 1.0,
        "mu": 0.0,
        "num_projections": 8192,
        "target_law": "rectified",
        "sigma": "gn",  # mode_of_sigma sigma_GN
        "directions": "gaussian",  # projection_vectors_type random
        "target_draw": "per-view",  # the official loss draws a target inside each view's call
        "augmentation": "paper",
        "stem": "cifar",
        "stem_padding": 2,  # base.py: Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False), no max-pool
        "zero_init_last": False,  # solo/backbones/resnet: torchvision's resnet18 (zero_init_residual False)
        "sync_batchnorm": True,
        "probe_optimizer": "lars",  # the online classifiers sit in the model's LARS optimizer (base.py learnable_params)
        "probe_lr": 0.01,  # optimizer.classifier_lr, scaled like the lr
        "amp": True,
        "amp_dtype": "fp16",  # precision 16-mixed
    },
}

# --target-law: the prior's samples rectified (the seed's) or dense (the LpJEPA baseline).
TARGET_LAWS = ("rectified", "dense")
# --lr-scaling: the learning rates as given, or times the global batch / 256 (solo-learn's linear scaling).
LR_SCALINGS = ("none", "linear")


def sigma_flag(text):
    """--sigma: a convention ('gn', 'unit-rectified') or a number > 0."""
    if text in SIGMA_CONVENTIONS:
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be {', '.join(SIGMA_CONVENTIONS)} or a number > 0; got {text!r}")
    return value


# Keys that define the model, the data or the optimizer's state a checkpoint holds; --resume refuses to change them.
FIXED_ON_RESUME = ("backbone", "stem", "stem_padding", "dataset", "image_size", "optimizer", "probe_optimizer")

# BatchNorm (the projector's, the backbone's) needs two images per process to compute a variance.
MIN_BATCH_PER_PROCESS = 2
# Below this the backbones' downsampling leaves nothing of an image (a ResNet halves it five times).
MIN_IMAGE_SIZE = 8
# torch.manual_seed takes seeds in [0, 2**64); the per-sample seeds stay int64 (data.SAMPLE_SEED_RANGE).
SEED_LIMIT = 2**63


class RuleContext(NamedTuple):
    """What the flag rules may look at besides the value: the whole config, the process count, the epochs done."""

    cfg: dict
    world_size: int
    epochs_done: int


def _batch_ok(value, c):
    return isinstance(value, int) and value % c.world_size == 0 and value // c.world_size >= MIN_BATCH_PER_PROCESS


def _batch_allowed(c):
    if c.world_size == 1:
        return f"at least {MIN_BATCH_PER_PROCESS} (BatchNorm needs {MIN_BATCH_PER_PROCESS} images per process)"
    return (f"a multiple of the {c.world_size} processes with at least {MIN_BATCH_PER_PROCESS} images per process "
            f"(BatchNorm), so {MIN_BATCH_PER_PROCESS * c.world_size}, {MIN_BATCH_PER_PROCESS * c.world_size + c.world_size}, ...")


def _epochs_allowed(c):
    if c.epochs_done:
        return f"more than the {c.epochs_done} epochs the checkpoint has finished"
    return "a whole number of epochs >= 1"


def _warmup_ok(value, c):
    # A warm-up longer than the run is allowed: a short trial of --preset paper (10 warm-up epochs) stays in its ramp.
    return isinstance(value, int) and (value == 0 or (value > 0 and c.cfg["schedule"] == "cosine"))


def _warmup_allowed(c):
    if c.cfg["schedule"] != "cosine":
        return "0 with --schedule constant; a warm-up needs --schedule cosine"
    return "a whole number of epochs >= 0"


def _device_allowed(c=None):
    import torch

    gpus = torch.cuda.device_count()
    return f"{DEVICE_ALLOWED}; this machine has {gpus} CUDA GPU(s)" + ("" if gpus else ", so use --device cpu")


def _device_ok(value, c=None):
    import torch

    if not valid_device(value):
        return False
    if value == "auto" or torch.device(value).type != "cuda":
        return True
    index = torch.device(value).index
    return torch.cuda.is_available() and (index is None or index < torch.cuda.device_count())


# The flags lpjepa.eval shares with training, one rule each for both programs.
EVALUATION_RULES = (
    Rule("num_workers", at_least(0), "0 (load in the main process) or more worker processes"),
    Rule("probe_lr", finite_above(0), "a finite learning rate > 0"),
    Rule("knn_k", at_least(1), "a whole number of neighbours >= 1"),
    Rule("knn_t", finite_above(0), "a finite temperature > 0"),
    Rule("device", _device_ok, _device_allowed),
)

# One row per flag: what a value must be, and how the error says it. check_config runs them in this order.
FLAG_RULES = (
    Rule("epochs", lambda v, c: isinstance(v, int) and v >= 1 and v > c.epochs_done, _epochs_allowed),
    Rule("batch_size", _batch_ok, _batch_allowed),
    Rule("batch_per_device", at_least(MIN_BATCH_PER_PROCESS),
         f"a whole number of images >= {MIN_BATCH_PER_PROCESS} per process (BatchNorm)"),
    Rule("lr", finite_above(0), "a finite learning rate > 0"),
    Rule("weight_decay", finite_at_least(0), "a finite number >= 0"),
    Rule("momentum", lambda v, c: finite(v) and 0 <= v < 1, "a finite number in [0, 1)"),
    Rule("lars_eta", finite_above(0), "a finite trust coefficient > 0"),
    Rule("warmup_epochs", _warmup_ok, _warmup_allowed),
    Rule("warmup_start_lr", finite_at_least(0), "a finite learning rate >= 0"),
    Rule("min_lr", finite_at_least(0), "a finite learning rate >= 0"),
    Rule("stem_padding", at_least(0), "a whole number of pixels >= 0"),
    Rule("lamb_inv", finite_at_least(0), "a finite weight >= 0"),
    Rule("lamb_reg", finite_at_least(0), "a finite weight >= 0"),
    Rule("p", finite_above(0), "a finite shape > 0 (1: Laplace, 2: Gaussian)"),
    Rule("mu", finite, "a finite number (lower gives more zeros)"),
    Rule("num_projections", at_least(1), "a whole number of directions >= 1"),
    Rule("image_size", at_least(MIN_IMAGE_SIZE), f"a whole number of pixels >= {MIN_IMAGE_SIZE}"),
    *EVALUATION_RULES,
    Rule("eval_every", at_least(1), "a whole number of epochs >= 1"),
    Rule("save_every", at_least(0), "0 (only last.pt) or a whole number of epochs >= 1"),
    Rule("seed", lambda v, c: isinstance(v, int) and 0 <= v < SEED_LIMIT, "a whole number from 0 to 2**63 - 1"),
    Rule("log_every", at_least(1), "a whole number of steps >= 1"),
    Rule("device_data", lambda v, c: not (v and c.cfg["dataset"] == "imagefolder"),
         "not with --dataset imagefolder: the device path holds CIFAR in device memory, an image folder is read by "
         "PIL workers; drop --device-data"),
)


def world_size_from_env():
    """The number of processes torchrun starts (1 without torchrun), known before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_config(cfg, epochs_done=0, check_data=True):
    """Refuse, before any work, a config the run cannot use: every flag's rule, then the backbone, then the data paths.

    Raises ``UsageError`` naming the flag, the value and what is allowed. ``check_data``
    False leaves the data paths alone (``--print-config`` reads no data).
    """
    check_rules(cfg, FLAG_RULES, RuleContext(cfg, world_size_from_env(), epochs_done))
    check_backbone(cfg["backbone"], cfg["stem"], cfg["image_size"], cfg["stem_padding"], cfg["zero_init_last"])
    if check_data:
        check_data_paths(cfg)


def build_parser():
    d = DEFAULTS
    parser = ArgumentParser(
        prog="python -m lpjepa.train",
        description="Rectified LpJEPA pretraining with online linear probes, kNN and sparsity metrics every epoch.",
        epilog="Flags left out take the --preset's value, then the default shown. "
        "Multi-GPU: torchrun --nproc_per_node N -m lpjepa.train ...",
    )
    # Every default is None here so that a flag given explicitly can be told from a default (for presets and --resume).
    add = parser.add_argument
    add("--preset", choices=sorted(PRESETS), default=None, help="seed (default: the notebook's recipe) or paper (the official CIFAR-100 run: LARS, warm-up and cosine, 1000 epochs, 8192 projections, per-view targets, the official augmentation and online classifier; docs/training.md)")
    add("--print-config", action="store_true", help="print the resolved configuration (every hyper-parameter the run would use) as JSON and exit, without reading data")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"(default {d['epochs']})")
    g.add_argument("--batch-size", type=int, help=f"global batch, split over the processes (default {d['batch_size']})")
    g.add_argument("--batch-per-device", type=int, help="images per process instead: the global batch is this times the processes (--preset paper: 256)")
    g.add_argument("--lr", type=float, help=f"base learning rate (default {d['lr']})")
    g.add_argument("--lr-scaling", choices=LR_SCALINGS, help="none (default): --lr and --probe-lr as given; linear: both times the global batch / 256 (solo-learn's, --preset paper)")
    g.add_argument("--weight-decay", type=float, help=f"(default {d['weight_decay']})")
    g.add_argument("--optimizer", choices=("adamw", "lars"), help=f"(default {d['optimizer']}; LARS is solo-learn's: --momentum, --lars-eta, --lars-clip, --lars-exclude-bias-norm)")
    g.add_argument("--momentum", type=float, help=f"LARS momentum (default {d['momentum']})")
    g.add_argument("--lars-eta", type=float, help=f"LARS trust coefficient (default {d['lars_eta']})")
    g.add_argument("--lars-clip", action=argparse.BooleanOptionalAction, help="clip LARS's layer-wise rate at the learning rate (default on)")
    g.add_argument("--lars-exclude-bias-norm", action=argparse.BooleanOptionalAction, help="no LARS adaptation and no weight decay on biases and norms (1-d parameters; default on)")
    g.add_argument("--schedule", choices=("constant", "cosine"), help=f"learning rate per step (default {d['schedule']}; cosine: linear warm-up from --warmup-start-lr, then cosine to --min-lr, solo-learn's)")
    g.add_argument("--warmup-epochs", type=int, help="linear warm-up before the cosine (default 0)")
    g.add_argument("--warmup-start-lr", type=float, help="learning rate of the warm-up's first step (default 0; --preset paper 3e-5)")
    g.add_argument("--min-lr", type=float, help="learning rate the cosine ends at (default 0)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, help="mixed precision on CUDA (default on; never on the CPU)")
    g.add_argument("--amp-dtype", choices=("fp16", "bf16"), help="autocast dtype of --amp: fp16 with a GradScaler (default) or bf16 without one")
    g = parser.add_argument_group("loss")
    g.add_argument("--lamb-inv", type=float, help=f"invariance weight (default {d['lamb_inv']})")
    g.add_argument("--lamb-reg", type=float, help=f"RDMReg weight (default {d['lamb_reg']})")
    g.add_argument("--p", type=float, help=f"shape of the Generalized Gaussian prior (default {d['p']})")
    g.add_argument("--mu", type=float, help=f"mean shift of the prior; lower gives more zeros (default {d['mu']})")
    g.add_argument("--num-projections", type=int, help=f"random directions of the sliced Wasserstein loss (default {d['num_projections']})")
    g.add_argument("--target-law", choices=TARGET_LAWS, help="the prior's samples: rectified (default, the seed's) or dense (mu + sigma GN_p, the LpJEPA baseline)")
    g.add_argument("--sigma", type=sigma_flag, metavar="{gn,unit-rectified,NUMBER}", help="the prior's scale: unit variance before the ReLU (gn, default), after it (unit-rectified), or a number")
    g.add_argument("--directions", choices=DIRECTION_SCHEMES, help="how the directions are drawn (default gaussian, the seed's; svd and svd-bottom-half are the official code's)")
    g.add_argument("--target-draw", choices=TARGET_DRAWS, help="one target batch for both views (shared, default) or a fresh one per view (per-view, the official code's)")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, help=f"(default {d['dataset']})")
    g.add_argument("--data-dir", help="CIFAR: the folder holding cifar-100-python/ (or cifar-10-batches-py/); "
                   "imagefolder: a folder holding train/CLASS/IMAGE and val/CLASS/IMAGE (default ./data)")
    g.add_argument("--val-dir", help="imagefolder, the other layout: --data-dir is the training folder "
                   "(CLASS/IMAGE) and --val-dir the validation one")
    g.add_argument("--image-size", type=int, help="crop size of the views (default 32)")
    g.add_argument("--augmentation", choices=AUGMENTATIONS, help="seed (default) or paper (stronger crop/jitter/grayscale/solarize)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, help="download CIFAR when it is not in --data-dir (default on)")
    g.add_argument("--skip-data-check", action="store_const", const=True, help="use a local CIFAR copy whose files do not match torchvision's md5 checksums")
    g.add_argument("--num-workers", type=int, help=f"data loader processes (default {d['num_workers']} here)")
    g.add_argument("--device-data", action=argparse.BooleanOptionalAction, help="hold the training split on --device as uint8 and augment both views in batches there (CIFAR only; default: on CUDA)")
    g = parser.add_argument_group("speed (CUDA only; no effect on the CPU)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="NHWC weights and images (default on)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the backbone and the projector (default off)")
    g.add_argument("--fused-optimizer", action=argparse.BooleanOptionalAction, help="AdamW's fused CUDA step, also for the probes (default on; LARS has none)")
    g.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, help="let cuDNN time its convolution algorithms (default on)")
    g = parser.add_argument_group("model")
    g.add_argument("--backbone", help="any timm model name (default resnet18)")
    g.add_argument("--stem", choices=STEMS, help="cifar (default: 3x3 stride-1 conv, no max-pool) or imagenet (the seed's model exactly)")
    g.add_argument("--stem-padding", type=int, help="padding of the cifar stem's 3x3 convolution (default 1; --preset paper 2, solo-learn's; a deep stem, as resnet10t's, keeps its own)")
    g.add_argument("--zero-init-last", action=argparse.BooleanOptionalAction, help="timm's ResNet initialisation, the last BatchNorm of each residual block at 0 (default on, the seed's); --no-zero-init-last: at 1, torchvision's, as the official run (--preset paper)")
    g.add_argument("--sync-batchnorm", action=argparse.BooleanOptionalAction, help="synchronise BatchNorm statistics over the processes under torchrun on CUDA (default off; --preset paper on)")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--probe-lr", type=float, help="learning rate of the online linear probes (default 1e-3; --preset paper 0.01, scaled like --lr)")
    g.add_argument("--probe-optimizer", choices=("adamw", "lars"), help="adamw (default, constant lr) or lars (solo-learn's online classifier: the model's LARS settings and schedule, no weight decay)")
    g.add_argument("--knn-k", type=int, help="neighbours of the kNN classifier (default 200; capped at the smallest class's number of training images, said once at the start)")
    g.add_argument("--knn-t", type=float, help="temperature of the kNN vote weights (default 0.07)")
    g.add_argument("--eval-every", type=int, help="evaluate every N epochs, and after the last (default 1)")
    g = parser.add_argument_group("run")
    g.add_argument("--out", help="run folder (default runs/DATASET-BACKBONE-TIME; with --resume, the checkpoint's)")
    g.add_argument("--resume", help="checkpoint to continue from, or a run folder (uses checkpoints/last.pt)")
    g.add_argument("--save-every", type=int, help="also keep checkpoints/epoch_NNNN.pt every N epochs (default 0: only last.pt)")
    g.add_argument("--device", help="auto (default: cuda if available), cpu, cuda, cuda:1")
    g.add_argument("--seed", type=int, help="seeds the model, the data order and the augmentations (default 0; 0 to 2**63 - 1)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, help="per-step progress (default on)")
    g.add_argument("--log-every", type=int, help=f"read the step statistics from the device every N steps, for progress and TensorBoard (default {d['log_every']})")
    return parser


def resolve_config(args):
    """(config, the loaded checkpoint or None) from parsed arguments, checked before any work (``UsageError`` if not).

    A new run: the defaults, then the preset, then the flags given. With ``--resume``:
    the checkpoint's config, then the flags given, except those in ``FIXED_ON_RESUME``.
    """
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("resume", "preset", "print_config")}
    if args.resume:
        cfg, checkpoint = _resumed_config(args.resume, args.preset, given)
        epochs_done = checkpoint["epoch"]
    else:
        cfg, checkpoint, epochs_done = _new_config(args.preset or "seed", given), None, 0
    check_config(cfg, epochs_done, check_data=not getattr(args, "print_config", False))
    return cfg, checkpoint


def resolved_recipe(cfg, world_size=None):
    """Every hyper-parameter a run of ``cfg`` uses, as JSON-ready values (what ``--print-config`` prints).

    ``config``: the run's config itself (what ``config.json`` holds); ``resolved``: what the
    run derives from it: the processes and the batch per process, the learning rates after
    ``--lr-scaling``, the optimizers' and the schedule's settings, the augmentation's numbers
    and normalisation, the model's stem and the online probes. ``world_size``: the number
    of processes (default: torchrun's ``WORLD_SIZE``, 1 without torchrun).
    """
    world_size = world_size_from_env() if world_size is None else world_size
    recipe = augmentation_recipe(cfg["augmentation"], cfg["dataset"])
    lars = {"momentum": cfg["momentum"], "eta": cfg["lars_eta"], "clip_lr": cfg["lars_clip"],
            "exclude_bias_n_norm": cfg["lars_exclude_bias_norm"], "eps": LARS_EPS}
    optimizer = {"name": cfg["optimizer"], "lr": effective_lr(cfg, "lr"), "weight_decay": cfg["weight_decay"],
                 **(lars if cfg["optimizer"] == "lars" else {})}
    probes = {"on": ["backbone features (detached)", "projector outputs (detached)"], "optimizer": cfg["probe_optimizer"],
              "lr": effective_lr(cfg, "probe_lr"), "weight_decay": 0.0,
              "schedule": cfg["schedule"] if cfg["probe_optimizer"] == "lars" else "constant",
              **(lars if cfg["probe_optimizer"] == "lars" else {})}
    schedule = {"name": cfg["schedule"], "interval": "step"}
    if cfg["schedule"] == "cosine":
        schedule.update(warmup_epochs=cfg["warmup_epochs"], warmup_start_lr=cfg["warmup_start_lr"], min_lr=cfg["min_lr"])
    resolved = {
        "world_size": world_size,
        "batch_size": cfg["batch_size"],
        "batch_per_device": cfg["batch_size"] // world_size,
        "lr_scale": lr_scale(cfg),
        "optimizer": optimizer,
        "schedule": schedule,
        "probes": probes,
        "augmentation": {**recipe, "crop_size": cfg["image_size"], "blur_p": 0.0},
        "stem": {"name": cfg["stem"], **(cifar_stem_layout(cfg["stem_padding"]) if cfg["stem"] == "cifar" else {})},
        "projector": projector_layout(feature_width(cfg["backbone"])),
        "residual_bn_init": "zero (timm)" if cfg["zero_init_last"] else "one (torchvision)",
        # SyncBatchNorm acts under torchrun (more than one process) on CUDA; one process has nothing to synchronise.
        "sync_batchnorm": {"on": cfg["sync_batchnorm"], "active": bool(cfg["sync_batchnorm"] and world_size > 1)},
        "precision": f"{cfg['amp_dtype']} mixed on CUDA" if cfg["amp"] else "fp32",
        "loss": {"lamb_inv": cfg["lamb_inv"], "lamb_reg": cfg["lamb_reg"], "p": cfg["p"], "mu": cfg["mu"],
                 "sigma": cfg["sigma"], "num_projections": cfg["num_projections"], "target_law": cfg["target_law"],
                 "target_draw": cfg["target_draw"], "directions": cfg["directions"]},
    }
    return {"config": cfg, "resolved": resolved}


def _new_config(preset, given):
    cfg = {**DEFAULTS, **PRESETS[preset], **given, "preset": preset}
    if "batch_size" in given and "batch_per_device" not in given:
        cfg["batch_per_device"] = None  # a global --batch-size given beats a preset's batch per device
    if cfg["batch_per_device"] is not None:
        cfg["batch_size"] = cfg["batch_per_device"] * world_size_from_env()
    if cfg["out"] is None:
        cfg["out"] = os.path.join("runs", f"{cfg['dataset']}-{cfg['backbone']}-{time.strftime('%Y%m%d-%H%M%S')}")
    return cfg


def _resumed_config(path, preset, given):
    """The checkpoint's config with the given flags on top; refuses what a resume cannot do, in one line."""
    file = checkpoint_path(path)
    if not os.path.isfile(file):
        raise UsageError(f"argument --resume: no checkpoint at {file} (pass a run folder holding checkpoints/last.pt, or a .pt file)")
    checkpoint = load_checkpoint(file)
    if is_final_checkpoint(checkpoint):
        raise UsageError(
            f"argument --resume: {file} is a final checkpoint (model, probes and config, no optimizer state), so "
            f"training cannot continue from it exactly; resume from the run folder (its checkpoints/last.pt), "
            f"or use this file with python -m lpjepa.eval or python -m lpjepa.export"
        )
    # Keys added since the checkpoint was written take their defaults; renamed ones their new names.
    cfg = {**DEFAULTS, **upgrade_config(checkpoint["config"])}
    if preset is not None and preset != cfg["preset"]:
        raise UsageError(f"argument --preset: the checkpoint was trained with --preset {cfg['preset']}, not {preset}")
    for key in FIXED_ON_RESUME:
        if key in given and given[key] != cfg[key]:
            raise UsageError(f"argument {flag(key)}: the checkpoint was trained with {cfg[key]}; --resume cannot change it")
    if "batch_size" in given:
        given.setdefault("batch_per_device", None)
    elif "batch_per_device" in given:
        given["batch_size"] = given["batch_per_device"] * world_size_from_env()
    done = checkpoint["epoch"]
    batches = checkpoint["batches_done"]
    if batches and "batch_size" in given and given["batch_size"] != cfg["batch_size"]:
        raise UsageError(
            f"argument --batch-size: {file} stopped in the middle of epoch {done + 1} (after {batches} batches of "
            f"{cfg['batch_size']}); the batch size can change only where an epoch ends: resume without --batch-size, "
            f"then change it in a later --resume"
        )
    if "epochs" not in given and done >= cfg["epochs"]:
        raise UsageError(
            f"argument --resume: {file} has finished all {done} epochs of its run; pass --epochs N with N > {done} to train longer"
        )
    cfg.update(given)
    return cfg, checkpoint
