"""Rectified LpJEPA pretraining: ``python -m lpjepa.train`` (console script ``lpjepa-train``).

Defaults are the seed notebook's: ResNet-18 (timm) and the 3-layer ReLU projector,
100 epochs, batch 256, AdamW lr 1e-3 / weight decay 1e-4, lamb_inv 25, lamb_reg 125,
p = 1, mu = 0, 256 projections, the seed's augmentation, mixed precision on CUDA; the
one deliberate change is ``--stem cifar``. ``--preset paper`` switches to the
published CIFAR-100 recipe. Every epoch ends with online linear probes, kNN and the
sparsity metrics on the validation split, a row of ``metrics.csv`` and a checkpoint.

Multi-GPU: ``torchrun --nproc_per_node N -m lpjepa.train ...`` (DDP; ``--batch-size``
is the global batch, split over the processes).
"""
import argparse
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .training import torchrun
from .training.data import (
    AUGMENTATIONS,
    DATASETS,
    EpochSampler,
    Transformed,
    TwoViewDataset,
    eval_transform,
    load_splits,
    make_loader,
    num_classes,
    train_transform,
)
from .eval import OnlineProbes, extract_features, knn_accuracy, sparsity_metrics
from .loss import rectified_lpjepa_loss
from .training.model import STEMS, LpJEPA
from .training.runlog import MetricsCSV, Progress, TensorBoard

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
    "out": None,
    "device": "auto",
    "seed": 0,
    "probe_lr": 1e-3,
    "knn_k": 200,
    "knn_t": 0.07,
    "eval_every": 1,
    "save_every": 0,
    "progress": True,
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

LARS_MOMENTUM, LARS_TRUST_COEFF = 0.9, 0.02

# metrics.csv, one row per epoch; the evaluation columns are empty in epochs without evaluation.
COLUMNS = (
    "epoch", "step", "lr", "loss", "invariance", "regularizer", "train_zero_fraction", "probe_loss",
    "probe_backbone_top1", "probe_backbone_top5", "probe_projector_top1", "probe_projector_top5",
    "knn_top1", "knn_top5", "val_zero_fraction", "val_l0", "val_l1", "val_dead_units", "prior_zero_fraction",
    "img_per_s", "data_wait", "epoch_time",
)

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
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, help="fp16 mixed precision on CUDA (default on; never on the CPU)")
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
    return parser


def resolve_config(args):
    """The run's config: defaults, then the preset, then the flags given (with --resume: the checkpoint's, then the flags)."""
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("resume", "preset")}
    if args.resume:
        checkpoint = load_checkpoint(checkpoint_path(args.resume))
        cfg = dict(checkpoint["config"])
        if args.preset is not None and args.preset != cfg["preset"]:
            raise SystemExit(f"--resume: the checkpoint was trained with --preset {cfg['preset']}, not {args.preset}")
        for key in FIXED_ON_RESUME:
            if key in given and given[key] != cfg[key]:
                raise SystemExit(f"--resume: the checkpoint was trained with --{key.replace('_', '-')} {cfg[key]}; it cannot change")
        cfg.update(given)
        return cfg, checkpoint
    preset = args.preset or "seed"
    cfg = {**DEFAULTS, **PRESETS[preset], **given, "preset": preset}
    if cfg["schedule"] == "constant" and cfg["warmup_epochs"]:
        raise SystemExit("--warmup-epochs needs --schedule cosine")
    if cfg["out"] is None:
        cfg["out"] = os.path.join("runs", f"{cfg['dataset']}-{cfg['backbone']}-{time.strftime('%Y%m%d-%H%M%S')}")
    return cfg, None


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_path(path):
    return os.path.join(path, "checkpoints", "last.pt") if os.path.isdir(path) else path


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise SystemExit(f"no checkpoint at {path}")
    # Our own file, holding Python and numpy RNG states, so not weights_only.
    return torch.load(path, map_location="cpu", weights_only=False)


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a reader never sees half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_states(device):
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_states(states, device):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"], device)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_model_for_eval(checkpoint, device="auto"):
    """(model in eval mode, config with '_epoch', device) from a checkpoint written by this program."""
    state = load_checkpoint(checkpoint_path(checkpoint))
    cfg = dict(state["config"], _epoch=state["epoch"])
    dev = torchrun.resolve_device(device)
    model = LpJEPA(cfg["backbone"], cfg["stem"])
    model.load_state_dict(state["model"])
    return model.to(dev).eval(), cfg, dev


# ----------------------------------------------------------------------------- pieces


def ssl_loss(z1, z2, cfg, process_group=None):
    """The one call of the loss in the training loop.

    Under DDP ``process_group`` is the world: the regularizer then sorts the global
    batch, exactly as one process would, and scales each rank's gradient so that DDP's
    averaging gives the single-process gradient (see lpjepa.distributed).
    """
    return rectified_lpjepa_loss(
        z1, z2, lamb_inv=cfg["lamb_inv"], lamb_reg=cfg["lamb_reg"], p=cfg["p"], mu=cfg["mu"],
        num_projections=cfg["num_projections"], process_group=process_group,
    )


def build_optimizer(model, cfg):
    """AdamW over every parameter (the seed's), or timm's LARS without weight decay or adaptation on biases and norms."""
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(
        model, opt="lars", lr=cfg["lr"], weight_decay=cfg["weight_decay"], momentum=LARS_MOMENTUM,
        trust_coeff=LARS_TRUST_COEFF, trust_clip=True,
    )


def build_scheduler(optimizer, cfg, steps_per_epoch):
    """timm's per-step cosine schedule after a linear warm-up; None for a constant learning rate."""
    if cfg["schedule"] == "constant":
        return None
    from timm.scheduler import CosineLRScheduler

    warmup = cfg["warmup_epochs"] * steps_per_epoch
    return CosineLRScheduler(
        optimizer, t_initial=max(1, cfg["epochs"] * steps_per_epoch - warmup), warmup_t=warmup,
        warmup_prefix=True, warmup_lr_init=0.0, lr_min=0.0, t_in_epochs=False,
    )


def eval_loaders(cfg, batch_size, device, env=None):
    """(train split without augmentation, validation split, number of classes) for kNN and probes."""
    train, val = load_splits(cfg["dataset"], cfg["data_dir"], cfg["val_dir"], cfg["download"], cfg["skip_data_check"])
    transform = eval_transform(cfg["image_size"], cfg["dataset"])
    kwargs = dict(num_workers=cfg["num_workers"], pin_memory=device.type == "cuda")
    return (
        make_loader(Transformed(train, transform), batch_size, **kwargs),
        make_loader(Transformed(val, transform), batch_size, **kwargs),
        num_classes(train),
    )


class StopRequest:
    """Turns Ctrl-C and SIGTERM into a request to stop after the current step, save, and exit.

    A second Ctrl-C stops at once. The old handlers come back on ``restore()``.
    """

    def __init__(self, enabled=True):
        self.signum = None
        self.previous = {}
        if enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint", file=sys.stderr, flush=True)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class EpochStats:
    """Running sums of one epoch's training quantities (saved in a mid-epoch checkpoint)."""

    KEYS = ("loss", "invariance", "regularizer", "train_zero_fraction", "probe_loss", "steps", "images", "data_time", "step_time")

    def __init__(self, state=None):
        self.sums = dict.fromkeys(self.KEYS, 0.0) if state is None else dict(state)

    def add(self, **values):
        for key, value in values.items():
            self.sums[key] += value

    def reduced(self, env, device):
        """Means over the steps of every process; images/s and data-wait share of the epoch."""
        t = torch.tensor([self.sums[k] for k in self.KEYS], dtype=torch.float64, device=device)
        s = dict(zip(self.KEYS, torchrun.all_reduce(t, env).tolist()))
        steps = max(s["steps"], 1)
        world = env.world_size
        out = {k: s[k] / steps for k in ("loss", "invariance", "regularizer", "train_zero_fraction", "probe_loss")}
        out["img_per_s"] = s["images"] / max(s["step_time"] / world, 1e-9)
        out["data_wait"] = s["data_time"] / max(s["step_time"], 1e-9)
        return out


def format_summary(epoch, epochs, row, seconds):
    text = (
        f"epoch {epoch}/{epochs} | loss {row['loss']:.4f} (inv {row['invariance']:.4f}, reg {row['regularizer']:.5f})"
        f" | zeros {row['train_zero_fraction']:.1%}"
    )
    if "val_zero_fraction" in row:
        text += (
            f" (val {row['val_zero_fraction']:.1%}, prior {row['prior_zero_fraction']:.1%}, l1 {row['val_l1']:.3f},"
            f" dead {row['val_dead_units']})"
            f" | probe top-1 backbone {row['probe_backbone_top1']:.1%} projector {row['probe_projector_top1']:.1%}"
            f" | kNN top-1 {row['knn_top1']:.1%}"
        )
    return text + f" | {row['img_per_s']:.0f} img/s, data wait {row['data_wait']:.0%} | {seconds:.1f} s"


# ----------------------------------------------------------------------------- the program


def train(cfg, checkpoint=None, *, on_step=None):
    """Run (or continue) a pretraining run described by ``cfg``; returns the last metrics row.

    ``checkpoint``: a loaded checkpoint to continue from. ``on_step(epoch, batch)``: called
    after every training step (tests use it to interrupt a run).
    """
    env = torchrun.setup(cfg["device"])
    device = env.device
    try:
        return _train(cfg, checkpoint, env, device, on_step)
    finally:
        torchrun.cleanup()


def _train(cfg, checkpoint, env, device, on_step):
    out = cfg["out"]
    amp = bool(cfg["amp"]) and device.type == "cuda"
    if cfg["batch_size"] % env.world_size:
        raise SystemExit(f"--batch-size {cfg['batch_size']} must divide over {env.world_size} processes")
    local_batch = cfg["batch_size"] // env.world_size
    seed_everything(cfg["seed"])

    # Data (rank 0 fetches a missing CIFAR first, so the processes do not download it together).
    if env.is_main:
        train_base, val_base = load_splits(cfg["dataset"], cfg["data_dir"], cfg["val_dir"], cfg["download"], cfg["skip_data_check"])
    torchrun.barrier(env)
    if not env.is_main:
        train_base, val_base = load_splits(cfg["dataset"], cfg["data_dir"], cfg["val_dir"], False, cfg["skip_data_check"])
    if len(train_base) < cfg["batch_size"]:
        raise SystemExit(f"the training set has {len(train_base)} images, fewer than one batch (--batch-size {cfg['batch_size']})")
    n_classes = num_classes(train_base)
    views = TwoViewDataset(train_base, train_transform(cfg["augmentation"], cfg["image_size"], cfg["dataset"]), cfg["seed"])
    sampler = EpochSampler(views, num_replicas=env.world_size, rank=env.rank, seed=cfg["seed"])
    pin = device.type == "cuda"
    loader = make_loader(views, local_batch, num_workers=cfg["num_workers"], pin_memory=pin, sampler=sampler, drop_last=True)
    steps_per_epoch = len(sampler) // local_batch
    if env.is_main:
        transform = eval_transform(cfg["image_size"], cfg["dataset"])
        kw = dict(num_workers=cfg["num_workers"], pin_memory=pin)
        knn_loader = make_loader(Transformed(train_base, transform), 2 * local_batch, **kw)
        val_loader = make_loader(Transformed(val_base, transform), 2 * local_batch, **kw)

    # Model, probes, optimisers.
    model = LpJEPA(cfg["backbone"], cfg["stem"]).to(device)
    probes = OnlineProbes(model.feature_dim, model.feature_dim, n_classes).to(device)
    optimizer = build_optimizer(model, cfg)
    probe_optimizer = torch.optim.AdamW(probes.parameters(), lr=cfg["probe_lr"], weight_decay=0.0)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    start_epoch, batches_done, global_step, stats_state = 0, 0, 0, None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        probes.load_state_dict(checkpoint["probes"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        probe_optimizer.load_state_dict(checkpoint["probe_optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, batches_done = checkpoint["epoch"], checkpoint["batches_done"]
        global_step, stats_state = checkpoint["global_step"], checkpoint["epoch_stats"]
        set_rng_states(checkpoint["rng"], device)
        if scheduler is not None:
            # Not from a saved state: timm's cosine is a function of the step and the config
            # alone, and a saved state would bring back the old length when --resume changes
            # --epochs. The new length applies from the current step on.
            scheduler.step_update(global_step)
    train_model, train_probes = model, probes
    if env.distributed:
        ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=ids)
        train_probes = DistributedDataParallel(probes, device_ids=ids)
    process_group = torch.distributed.group.WORLD if env.distributed else None
    if process_group is not None:
        # The global loss draws targets and directions from one seed stream, one draw per
        # step. Tying it to the run's seed and step makes a resumed run draw what the
        # uninterrupted one would have (single-process runs restore the RNG state instead).
        stream = distributed.default_seed_stream(process_group)
        stream.seed, stream.step = cfg["seed"], global_step

    # The run folder.
    csv_log = MetricsCSV(os.path.join(out, "metrics.csv"), COLUMNS)
    tb = None
    if env.is_main:
        os.makedirs(out, exist_ok=True)
        resolved = dict(cfg, world_size=env.world_size, device=str(device), amp_active=amp, steps_per_epoch=steps_per_epoch)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(resolved, f, indent=2, sort_keys=True)
        csv_log.truncate(start_epoch if checkpoint is not None else 0)  # a resume repeats the epochs after its checkpoint
        tb = TensorBoard(os.path.join(out, "tensorboard"))
        where = f"resuming at epoch {start_epoch + 1}, step {batches_done}" if checkpoint is not None else "starting"
        print(
            f"{where}: {cfg['dataset']} ({len(train_base)} train / {len(val_base)} val images, {n_classes} classes), "
            f"{cfg['backbone']} ({cfg['stem']} stem), {env.world_size} process(es) on {device}, "
            f"batch {cfg['batch_size']}, {steps_per_epoch} steps/epoch, run folder {out}",
            flush=True,
        )

    def save(epoch, batches, stats, name="last.pt"):
        if not env.is_main:
            return
        state = {
            "config": cfg, "epoch": epoch, "batches_done": batches, "global_step": global_step,
            "epoch_stats": None if stats is None else stats.sums,
            "model": model.state_dict(), "probes": probes.state_dict(),
            "optimizer": optimizer.state_dict(), "probe_optimizer": probe_optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng_states(device),
        }
        save_atomic(state, os.path.join(out, "checkpoints", name))

    stop = StopRequest(enabled=_in_main_thread())
    row = None
    try:
        for epoch in range(start_epoch, cfg["epochs"]):
            skip = batches_done if epoch == start_epoch else 0
            sampler.set_epoch(epoch, skip=skip * local_batch)
            stats = EpochStats(stats_state if skip else None)
            model.train()
            probes.train()
            progress = Progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg['epochs']}", env.is_main and cfg["progress"], initial=skip)
            batch = skip
            epoch_start = time.perf_counter()
            tick = time.perf_counter()
            for x1, x2, y in loader:
                data_time = time.perf_counter() - tick
                x1, x2, y = (t.to(device, non_blocking=True) for t in (x1, x2, y))
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    h1, z1 = train_model(x1, with_features=True)
                    h2, z2 = train_model(x2, with_features=True)
                    parts = ssl_loss(z1, z2, cfg, process_group)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(parts.loss).backward()
                scaler.step(optimizer)
                scaler.update()
                global_step += 1
                if scheduler is not None:
                    scheduler.step_update(global_step)
                probe_loss = train_probes(torch.cat([h1, h2]), torch.cat([z1, z2]), torch.cat([y, y]))
                probe_optimizer.zero_grad(set_to_none=True)
                probe_loss.backward()
                probe_optimizer.step()

                loss = parts.loss.item()
                zeros = (z1 == 0).float().mean().item()
                step_time = time.perf_counter() - tick
                stats.add(
                    loss=loss, invariance=parts.invariance.item(), regularizer=parts.regularizer.item(),
                    train_zero_fraction=zeros, probe_loss=probe_loss.item(), steps=1, images=x1.shape[0],
                    data_time=data_time, step_time=step_time,
                )
                batch += 1
                progress.update({
                    "loss": f"{loss:.4f}", "zeros": f"{zeros:.1%}",
                    "img/s": f"{x1.shape[0] * env.world_size / max(step_time, 1e-9):.0f}",
                    "data": f"{data_time / max(step_time, 1e-9):.0%}",
                })
                if tb is not None and global_step % 50 == 0:
                    tb.scalars({"loss": loss, "zero_fraction": zeros, "lr": optimizer.param_groups[0]["lr"]}, global_step, "step/")
                if on_step is not None:
                    on_step(epoch, batch)
                if _stop_requested(stop, env, device):
                    progress.close()
                    save(epoch, batch, stats)  # a resume skips the batches done and ends the epoch as usual
                    if env.is_main:
                        print(f"stopped by {signal.Signals(stop.signum or signal.SIGTERM).name}; saved {out}/checkpoints/last.pt; "
                              f"continue with: python -m lpjepa.train --resume {out}", flush=True)
                    raise SystemExit(128 + (stop.signum or signal.SIGTERM))
                tick = time.perf_counter()
            progress.close()
            seconds = time.perf_counter() - epoch_start

            row = {"epoch": epoch + 1, "step": global_step, "lr": optimizer.param_groups[0]["lr"]}
            row.update(stats.reduced(env, device))
            last = epoch + 1 == cfg["epochs"]
            if env.is_main and ((epoch + 1) % cfg["eval_every"] == 0 or last):
                row.update(evaluate(model, probes, knn_loader, val_loader, n_classes, device, amp, cfg))
            row["epoch_time"] = seconds
            if env.is_main:
                csv_log.append(row)
                tb.scalars(row, epoch + 1, "epoch/")
                print(format_summary(epoch + 1, cfg["epochs"], row, seconds), flush=True)
            save(epoch + 1, 0, None)
            if env.is_main and cfg["save_every"] and (epoch + 1) % cfg["save_every"] == 0:
                save(epoch + 1, 0, None, name=f"epoch_{epoch + 1:04d}.pt")
            torchrun.barrier(env)
        if env.is_main and start_epoch >= cfg["epochs"]:
            print(f"nothing to do: the checkpoint has finished {start_epoch} epochs; pass --epochs N to train longer", flush=True)
        elif env.is_main:
            save(cfg["epochs"], 0, None, name="final.pt")
            print(f"done: {out}/checkpoints/final.pt, metrics in {out}/metrics.csv; plot with: python -m lpjepa.plot {out}", flush=True)
    finally:
        stop.restore()
        if tb is not None:
            tb.close()
    return row


def evaluate(model, probes, knn_loader, val_loader, n_classes, device, amp, cfg):
    """Online probe accuracy, kNN on backbone features and sparsity of the projector output, on the validation split."""
    train_h, _, train_y = (t.to(device) for t in extract_features(model, knn_loader, device, amp))
    val_h, val_z, val_y = extract_features(model, val_loader, device, amp)
    probes.eval()
    result = probes.accuracy(val_h, val_z, val_y)
    probes.train()
    result["knn_top1"], result["knn_top5"] = knn_accuracy(
        train_h, train_y, val_h.to(device), val_y.to(device), n_classes, cfg["knn_k"], cfg["knn_t"]
    )
    result.update(sparsity_metrics(val_z, cfg["p"], cfg["mu"]))
    return result


def _in_main_thread():
    import threading

    return threading.current_thread() is threading.main_thread()


def _stop_requested(stop, env, device):
    """Whether any process got Ctrl-C / SIGTERM (all processes then stop at the same step)."""
    if not env.distributed:
        return stop.signum is not None
    flag = torch.tensor([0.0 if stop.signum is None else float(stop.signum)], device=device)
    torchrun.all_reduce(flag, env, op="max")
    if stop.signum is None and flag.item() > 0:
        stop.signum = int(flag.item())
    return flag.item() > 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg, checkpoint = resolve_config(args)
    if not math.isfinite(cfg["lr"]) or cfg["lr"] <= 0:
        raise SystemExit(f"--lr must be a positive number; got {cfg['lr']}")
    train(cfg, checkpoint)


if __name__ == "__main__":
    main()
