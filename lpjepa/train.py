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
import json
import os
import signal
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .loss import rectified_lpjepa_loss
from .training import torchrun
from .training.checkpoint import rng_states, save_atomic, seed_everything, set_rng_states
from .training.config import build_parser, resolve_config
from .training.data import EpochSampler, TwoViewDataset, eval_loaders, make_loader, num_classes, run_splits, train_transform
from .training.evaluation import OnlineProbes, evaluate_online
from .training.model import LpJEPA
from .training.optim import build_optimizer, build_probe_optimizer, build_scheduler
from .training.runlog import COLUMNS, MetricsCSV, Progress, TensorBoard

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
        train_base, val_base = run_splits(cfg)
    torchrun.barrier(env)
    if not env.is_main:
        train_base, val_base = run_splits(cfg, download=False)
    if len(train_base) < cfg["batch_size"]:
        raise SystemExit(f"the training set has {len(train_base)} images, fewer than one batch (--batch-size {cfg['batch_size']})")
    n_classes = num_classes(train_base)
    views = TwoViewDataset(train_base, train_transform(cfg["augmentation"], cfg["image_size"], cfg["dataset"]), cfg["seed"])
    sampler = EpochSampler(views, num_replicas=env.world_size, rank=env.rank, seed=cfg["seed"])
    pin = device.type == "cuda"
    loader = make_loader(views, local_batch, num_workers=cfg["num_workers"], pin_memory=pin, sampler=sampler, drop_last=True)
    steps_per_epoch = len(sampler) // local_batch
    if env.is_main:
        knn_loader, val_loader = eval_loaders(cfg, train_base, val_base, 2 * local_batch, pin)

    # Model, probes, optimisers.
    model = LpJEPA(cfg["backbone"], cfg["stem"]).to(device)
    probes = OnlineProbes(model.feature_dim, model.feature_dim, n_classes).to(device)
    optimizer = build_optimizer(model, cfg)
    probe_optimizer = build_probe_optimizer(probes, cfg)
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
                row.update(evaluate_online(model, probes, knn_loader, val_loader, n_classes, device, amp, cfg))
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
    cfg, checkpoint = resolve_config(build_parser().parse_args(argv))
    train(cfg, checkpoint)


if __name__ == "__main__":
    main()
