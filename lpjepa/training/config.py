"""The run's configuration: the defaults, the presets, the command line, and how they combine.

A config is a plain dict (saved in ``config.json`` and in every checkpoint); its keys
are the flags' names with underscores, plus ``preset``.
"""
import argparse
import math
import os
import time

from .checkpoint import checkpoint_path, load_checkpoint
from .data import AUGMENTATIONS, DATASETS
from .model import STEMS

DEFAULTS = {
    "epochs": 100,
    "batch_size": 256,
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "optimizer": "adamw",
    "schedule": "constant",
    "warmup_epochs": 0,
    "lamb_inv": 25.0,
    "lamb_reg": 125.0,
    "p": 1.0,
    "mu": 0.0,
    "num_projections": 256,
    "augmentation": "seed",
    "dataset": "cifar100",
    "data_dir": "./data",
    "val_dir": None,
    "image_size": 32,
    "download": True,
    "skip_data_check": False,
    "backbone": "resnet18",
    "stem": "cifar",
    "num_workers": min(8, os.cpu_count() or 1),
    "amp": True,
    "amp_dtype": "fp16",
    "out": None,
    "device": "auto",
    "seed": 0,
    "probe_lr": 1e-3,
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

# The published CIFAR-100 recipe (the paper's solo-learn configuration).
PRESETS = {
    "seed": {},
    "paper": {
        "optimizer": "lars",
        "lr": 0.03,
        "schedule": "cosine",
        "warmup_epochs": 10,
        "epochs": 1000,
        "num_projections": 8192,
        "augmentation": "paper",
        "lamb_reg": 250.0,
    },
}

# Keys that define the model or the data a checkpoint was trained on; --resume refuses to change them.
FIXED_ON_RESUME = ("backbone", "stem", "dataset", "image_size")


def build_parser():
    d = DEFAULTS
    parser = argparse.ArgumentParser(
        prog="python -m lpjepa.train",
        description="Rectified LpJEPA pretraining with online linear probes, kNN and sparsity metrics every epoch.",
        epilog="Flags left out take the --preset's value, then the default shown. "
        "Multi-GPU: torchrun --nproc_per_node N -m lpjepa.train ...",
    )
    # Every default is None here so that a flag given explicitly can be told from a default (for presets and --resume).
    add = parser.add_argument
    add("--preset", choices=sorted(PRESETS), default=None, help="seed (default: the notebook's recipe) or paper (LARS, cosine, 1000 epochs, 8192 projections, strong augmentation, lamb_reg 250)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"(default {d['epochs']})")
    g.add_argument("--batch-size", type=int, help=f"global batch, split over the processes (default {d['batch_size']})")
    g.add_argument("--lr", type=float, help=f"(default {d['lr']})")
    g.add_argument("--weight-decay", type=float, help=f"(default {d['weight_decay']})")
    g.add_argument("--optimizer", choices=("adamw", "lars"), help=f"(default {d['optimizer']}; LARS is timm's)")
    g.add_argument("--schedule", choices=("constant", "cosine"), help=f"learning rate per step (default {d['schedule']}; cosine is timm's)")
    g.add_argument("--warmup-epochs", type=int, help="linear warm-up before the cosine (default 0)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, help="mixed precision on CUDA (default on; never on the CPU)")
    g.add_argument("--amp-dtype", choices=("fp16", "bf16"), help="autocast dtype of --amp: fp16 with a GradScaler (default) or bf16 without one")
    g = parser.add_argument_group("loss")
    g.add_argument("--lamb-inv", type=float, help=f"invariance weight (default {d['lamb_inv']})")
    g.add_argument("--lamb-reg", type=float, help=f"RDMReg weight (default {d['lamb_reg']})")
    g.add_argument("--p", type=float, help=f"shape of the Generalized Gaussian prior (default {d['p']})")
    g.add_argument("--mu", type=float, help=f"mean shift of the prior; lower gives more zeros (default {d['mu']})")
    g.add_argument("--num-projections", type=int, help=f"random directions of the sliced Wasserstein loss (default {d['num_projections']})")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, help=f"(default {d['dataset']})")
    g.add_argument("--data-dir", help="folder holding cifar-100-python/ (or cifar-10-batches-py/), or the training image folder (default ./data)")
    g.add_argument("--val-dir", help="validation image folder for --dataset imagefolder")
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
    g = parser.add_argument_group("evaluation")
    g.add_argument("--probe-lr", type=float, help="AdamW lr of the online linear probes (default 1e-3)")
    g.add_argument("--knn-k", type=int, help="neighbours of the kNN classifier (default 200)")
    g.add_argument("--knn-t", type=float, help="temperature of the kNN vote weights (default 0.07)")
    g.add_argument("--eval-every", type=int, help="evaluate every N epochs, and after the last (default 1)")
    g = parser.add_argument_group("run")
    g.add_argument("--out", help="run folder (default runs/DATASET-BACKBONE-TIME; with --resume, the checkpoint's)")
    g.add_argument("--resume", help="checkpoint to continue from, or a run folder (uses checkpoints/last.pt)")
    g.add_argument("--save-every", type=int, help="also keep checkpoints/epoch_NNNN.pt every N epochs (default 0: only last.pt)")
    g.add_argument("--device", help="auto (default: cuda if available), cpu, cuda, cuda:1")
    g.add_argument("--seed", type=int, help="seeds the model, the data order and the augmentations (default 0)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, help="per-step progress (default on)")
    g.add_argument("--log-every", type=int, help=f"read the step statistics from the device every N steps, for progress and TensorBoard (default {d['log_every']})")
    return parser


def resolve_config(args):
    """(config, the loaded checkpoint or None) from parsed arguments.

    A new run: the defaults, then the preset, then the flags given. With ``--resume``:
    the checkpoint's config, then the flags given, except those in ``FIXED_ON_RESUME``.
    """
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("resume", "preset")}
    if args.resume:
        cfg, checkpoint = _resumed_config(args.resume, args.preset, given)
    else:
        cfg, checkpoint = _new_config(args.preset or "seed", given), None
    if not math.isfinite(cfg["lr"]) or cfg["lr"] <= 0:
        raise SystemExit(f"--lr must be a positive number; got {cfg['lr']}")
    if cfg["log_every"] < 1:
        raise SystemExit(f"--log-every must be a positive number of steps; got {cfg['log_every']}")
    if cfg["device_data"] and cfg["dataset"] == "imagefolder":
        raise SystemExit("--device-data holds CIFAR in device memory; --dataset imagefolder reads files with PIL workers: drop --device-data")
    return cfg, checkpoint


def _new_config(preset, given):
    cfg = {**DEFAULTS, **PRESETS[preset], **given, "preset": preset}
    if cfg["schedule"] == "constant" and cfg["warmup_epochs"]:
        raise SystemExit("--warmup-epochs needs --schedule cosine")
    if cfg["out"] is None:
        cfg["out"] = os.path.join("runs", f"{cfg['dataset']}-{cfg['backbone']}-{time.strftime('%Y%m%d-%H%M%S')}")
    return cfg


def _resumed_config(path, preset, given):
    checkpoint = load_checkpoint(checkpoint_path(path))
    cfg = {**DEFAULTS, **checkpoint["config"]}  # keys added since the checkpoint was written take their defaults
    if preset is not None and preset != cfg["preset"]:
        raise SystemExit(f"--resume: the checkpoint was trained with --preset {cfg['preset']}, not {preset}")
    for key in FIXED_ON_RESUME:
        if key in given and given[key] != cfg[key]:
            raise SystemExit(f"--resume: the checkpoint was trained with --{key.replace('_', '-')} {cfg[key]}; it cannot change")
    cfg.update(given)
    return cfg, checkpoint
