"""The pretraining loop: ``train(cfg)`` runs, or continues, the run that ``cfg`` describes.

A ``TrainState`` holds what the steps change and a checkpoint saves: the model, the
online probes, their optimizers, the grad scaler, the schedule and the step counter.
``TrainState.step`` is one optimisation step. A ``Trainer`` runs the state over the
data: ``train_epoch`` is one pass over it, ``end_epoch`` the reduction, evaluation,
metrics row and checkpoint that close an epoch.

Under torchrun every process runs the same loop on its share of the global batch;
rank 0 alone evaluates, logs and saves. A loss that becomes NaN or inf stops the run
(``guard``) before any checkpoint could hold what came after.
"""
import os
import signal
import sys
import time
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel

from .. import distributed, metrics
from ..loss import rectified_lpjepa_loss
from . import torchrun
from .checkpoint import final_checkpoint, restore_training_state, save_atomic, seed_everything, training_checkpoint
from .cli import UsageError
from .data import (EpochSampler, TwoViewDataset, eval_loaders, make_loader, num_classes, run_splits, smallest_class_count,
                   train_transform)
from .device_data import DeviceTwoViewLoader, device_images, holds_images_in_memory
from .evaluation import OnlineProbes, evaluate_online
from .gpu_augment import BatchAugment
from .guard import NON_FINITE_EXIT_CODE, NonFiniteGuard, NonFiniteLoss, describe
from .interrupt import StopRequest
from .model import LpJEPA, synchronised_batchnorm
from .optim import build_optimizer, build_probe_optimizer, build_probe_scheduler, build_scheduler
from .runlog import Progress, RunLog, format_summary, refuse_a_used_folder
from .speed import SpeedSettings, prepare_model

# Smallest duration a rate divides by, so that a step faster than the clock's resolution gives no ZeroDivisionError.
MIN_SECONDS = 1e-9
# Evaluation runs without gradients, so twice the training batch fits in the same memory.
EVAL_BATCH_FACTOR = 2


def train(cfg, checkpoint=None, *, on_step=None):
    """Run (or continue) a pretraining run described by ``cfg``; returns the last metrics row.

    ``checkpoint``: a loaded checkpoint to continue from. ``on_step(epoch, batch)``: called
    after every training step (tests use it to interrupt a run).
    """
    if checkpoint is None:
        # Before the process group exists: rank 0 writes into the folder only after every rank has joined
        # it, so all ranks see the folder as it was and agree.
        refuse_a_used_folder(cfg["out"])
    env = torchrun.setup(cfg["device"])
    try:
        row = Trainer(cfg, env, checkpoint).run(on_step)
    except BaseException:
        torchrun.cleanup(finished=False)
        raise
    torchrun.cleanup()
    return row


def ssl_loss(z1, z2, cfg, process_group=None):
    """The one call of the loss in the training loop.

    Under DDP ``process_group`` is the world: the regularizer then sorts the global
    batch, exactly as one process would, and scales each rank's gradient so that DDP's
    averaging gives the single-process gradient (see lpjepa.distributed).
    """
    return rectified_lpjepa_loss(
        z1, z2, lamb_inv=cfg["lamb_inv"], lamb_reg=cfg["lamb_reg"], p=cfg["p"], mu=cfg["mu"],
        num_projections=cfg["num_projections"], sigma=cfg["sigma"], rectify=cfg["target_law"] == "rectified",
        directions=cfg["directions"], target_draw=cfg["target_draw"], process_group=process_group,
        even_batches=True,  # the training loader drops the last, short batch: every rank steps with local_batch rows
    )


def vicreg_statistics(z1, z2, process_group=None):
    """VICReg's variance and covariance terms of the projector outputs, summed over the two views (logged, never optimised).

    As the official code logs them: on the global batch under DDP (the local batches,
    equal under drop_last, all-gathered detached), each view's term as VICReg defines
    it (``lpjepa.metrics``). Returns a (2,) tensor on the outputs' device: no host sync.
    """
    views = torch.stack([z1.detach(), z2.detach()])
    if process_group is not None:
        sizes = [z1.shape[0]] * torch.distributed.get_world_size(process_group)
        views = distributed.gather_batch(views, sizes, process_group, dim=1)
    variance = metrics.vicreg_variance(views[0]) + metrics.vicreg_variance(views[1])
    covariance = metrics.vicreg_covariance(views[0]) + metrics.vicreg_covariance(views[1])
    return torch.stack([variance, covariance])


class TrainingData(NamedTuple):
    """A run's data as one process sees it; the evaluation loaders only on rank 0 (None elsewhere)."""

    train_set: object
    val_set: object
    num_classes: int
    sampler: EpochSampler
    loader: object
    steps_per_epoch: int
    knn_loader: object
    val_loader: object
    on_device: bool


def device_data_active(cfg, device, train_set):
    """Whether the training split goes to the device (``--device-data``; by default on CUDA for in-memory datasets)."""
    if cfg["device_data"] is None:
        return device.type == "cuda" and holds_images_in_memory(train_set)
    return bool(cfg["device_data"])  # check_config has refused --device-data for a dataset not held in memory


def training_loader(cfg, env, train_set, local_batch):
    """(sampler, loader of two-view batches): on the device (``device_data``) or through PIL workers (``data``)."""
    if device_data_active(cfg, env.device, train_set):
        sampler = EpochSampler(train_set, num_replicas=env.world_size, rank=env.rank, seed=cfg["seed"])
        augment = BatchAugment(cfg["augmentation"], cfg["image_size"], cfg["dataset"])
        images, labels = device_images(train_set, env.device)
        loader = DeviceTwoViewLoader(images, labels, sampler, local_batch, augment, cfg["seed"], env.rank,
                                     num_workers=cfg["num_workers"])
        return sampler, loader
    views = TwoViewDataset(train_set, train_transform(cfg["augmentation"], cfg["image_size"], cfg["dataset"]), cfg["seed"])
    sampler = EpochSampler(views, num_replicas=env.world_size, rank=env.rank, seed=cfg["seed"])
    pin = env.device.type == "cuda"
    loader = make_loader(views, local_batch, num_workers=cfg["num_workers"], pin_memory=pin, sampler=sampler, drop_last=True)
    return sampler, loader


def load_training_data(cfg, env, local_batch):
    """The splits, this process's loader of two-view batches, and rank 0's evaluation loaders."""
    # Rank 0 fetches a missing CIFAR first, so that the processes do not download it together.
    if env.is_main:
        train_set, val_set = run_splits(cfg)
    torchrun.barrier(env)
    if not env.is_main:
        train_set, val_set = run_splits(cfg, download=False)
    if len(train_set) < cfg["batch_size"]:
        raise UsageError(f"argument --batch-size: invalid value {cfg['batch_size']}: the training set has only "
                         f"{len(train_set)} images; use at most {len(train_set)}")
    sampler, loader = training_loader(cfg, env, train_set, local_batch)
    knn_loader = val_loader = None
    if env.is_main:
        pin = env.device.type == "cuda"
        knn_loader, val_loader = eval_loaders(cfg, train_set, val_set, EVAL_BATCH_FACTOR * local_batch, pin)
    return TrainingData(
        train_set, val_set, num_classes(train_set), sampler, loader, len(sampler) // local_batch, knn_loader, val_loader,
        isinstance(loader, DeviceTwoViewLoader),
    )


class TrainState:
    """What the steps change and a checkpoint saves: model, probes, their optimizers, grad scaler, schedule, step count.

    Built in a fixed order (model, then probes) so that the same seed gives the same
    weights. ``step`` is one optimisation step; ``distribute`` readies it for DDP.
    """

    def __init__(self, cfg, device, n_classes, steps_per_epoch):
        self.cfg, self.device = cfg, device
        self.speed = SpeedSettings.resolve(cfg, device)
        self.amp = self.speed.amp
        self.model = prepare_model(LpJEPA(cfg["backbone"], cfg["stem"], cfg["stem_padding"], cfg["zero_init_last"]).to(device), self.speed)
        self.probes = OnlineProbes(self.model.feature_dim, self.model.feature_dim, n_classes).to(device)
        self.optimizer = build_optimizer(self.model, cfg, fused=self.speed.fused_optimizer)
        self.probe_optimizer = build_probe_optimizer(self.probes, cfg, fused=self.speed.fused_optimizer)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.speed.grad_scaling)
        self.scheduler = build_scheduler(self.optimizer, cfg, steps_per_epoch)
        self.probe_scheduler = build_probe_scheduler(self.probe_optimizer, cfg, steps_per_epoch)
        self.global_step = 0
        self.guard = NonFiniteGuard(device, self.scaler)
        # What a step calls: the modules themselves, or their DDP wrappers after ``distribute``.
        self.train_model, self.train_probes, self.process_group = self.model, self.probes, None

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def restore(self, checkpoint):
        """Continue from a loaded checkpoint; returns ``(epoch, batches_done, epoch_stats)``, where the run goes on."""
        position = restore_training_state(self, checkpoint, self.device)
        # Not from a saved state: the schedule is a function of the step and the config
        # alone, and a saved state would bring back the old length when --resume changes
        # --epochs. The new length applies from the current step on.
        self._schedule()
        return position

    def _schedule(self):
        """Set the learning rates of the step about to run (``global_step``), when they follow a schedule."""
        for scheduler in (self.scheduler, self.probe_scheduler):
            if scheduler is not None:
                scheduler.step_update(self.global_step)

    def distribute(self, env):
        """Under DDP: wrappers that average the gradients over the processes, and the loss over the global batch."""
        if not env.distributed:
            return
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = synchronised_batchnorm(self.model, self.cfg["sync_batchnorm"], self.device)
        self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        self.train_probes = DistributedDataParallel(self.probes, device_ids=ids)
        self.process_group = torch.distributed.group.WORLD
        # The global loss draws targets and directions from one seed stream, one draw per
        # step. Tying it to the run's seed and step makes a resumed run draw what the
        # uninterrupted one would have (single-process runs restore the RNG state instead).
        stream = distributed.default_seed_stream(self.process_group)
        stream.seed, stream.step = self.cfg["seed"], self.global_step

    def step(self, x1, x2, y):
        """One optimisation step of the model on a batch of two views, then one of the probes on its detached outputs.

        Returns ``(values, images)``: the step's numbers in the order of ``EpochStats.MEANS``,
        a float32 tensor left on the device (reading it would make the host wait for the
        step), and the number of images. The guard records the step on the device.
        """
        x1, x2 = (t.to(self.device, non_blocking=True, memory_format=self.speed.memory_format) for t in (x1, x2))
        y = y.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.speed.amp_dtype or torch.float16, enabled=self.amp):
            h1, z1 = self.train_model(x1, with_features=True)
            h2, z2 = self.train_model(x2, with_features=True)
            parts = ssl_loss(z1, z2, self.cfg, self.process_group)
        vicreg = vicreg_statistics(z1, z2, self.process_group)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(parts.loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.global_step += 1
        self.guard.observe(self.global_step, parts)
        # A step the grad scaler skips leaves the model as it was; its non-finite features
        # must not reach the probes either (identity on finite values).
        h, z = (torch.nan_to_num(torch.cat(pair).detach(), nan=0.0, posinf=0.0, neginf=0.0) for pair in ((h1, h2), (z1, z2)))
        probe_loss = self.train_probes(h, z, torch.cat([y, y]))
        self.probe_optimizer.zero_grad(set_to_none=True)
        probe_loss.backward()
        self.probe_optimizer.step()
        self._schedule()  # after both steps: the probes' step ran at the same step's learning rate as the model's
        values = [parts.loss, parts.invariance, parts.regularizer, (z1 == 0).float().mean(), probe_loss, *vicreg]
        return torch.stack([v.detach().float() for v in values]), x1.shape[0]


class EpochStats:
    """Running sums of one epoch's training quantities (saved in a mid-epoch checkpoint).

    The sums of the step values (``MEANS``) stay on the device, in float64, so that adding
    a step never waits for it; counts and times are the host's. ``sums`` reads them all.
    """

    MEANS = ("loss", "invariance", "regularizer", "train_zero_fraction", "probe_loss", "vicreg_variance",
             "vicreg_covariance")
    HOST = ("steps", "images", "data_time", "step_time")
    KEYS = MEANS + HOST

    def __init__(self, device, state=None):
        state = {**dict.fromkeys(self.KEYS, 0.0), **(state or {})}  # a checkpoint from before a key existed lacks it
        self.device_sums = torch.tensor([float(state[k]) for k in self.MEANS], dtype=torch.float64).to(device)
        self.host = {k: state[k] for k in self.HOST}

    def add(self, values, images, data_time, step_time):
        """One step: ``values`` a device tensor in the order of ``MEANS``, the rest host numbers."""
        self.device_sums += values
        for key, value in zip(self.HOST, (1, images, data_time, step_time)):
            self.host[key] += value

    @property
    def sums(self):
        """Every sum as a float, keyed as ``KEYS`` (reads the device)."""
        return {**dict(zip(self.MEANS, self.device_sums.tolist())), **self.host}

    def reduced(self, env, device):
        """Means over the steps of every process; images/s and data-wait share of the epoch."""
        host = torch.tensor([float(self.host[k]) for k in self.HOST], dtype=torch.float64).to(device)
        t = torch.cat([self.device_sums, host])
        s = dict(zip(self.MEANS + self.HOST, torchrun.all_reduce(t, env).tolist()))
        steps = max(s["steps"], 1)
        out = {k: s[k] / steps for k in self.MEANS}
        # The processes step in parallel: the epoch's wall time is their summed step time over their number.
        out["img_per_s"] = s["images"] / max(s["step_time"] / env.world_size, MIN_SECONDS)
        out["data_wait"] = s["data_time"] / max(s["step_time"], MIN_SECONDS)
        return out


class Trainer:
    """One process's part of a run: its data, the ``TrainState``, the run folder, and where a resume starts.

    ``train_epoch`` is one pass over the data, ``end_epoch`` what closes an epoch.
    """

    def __init__(self, cfg, env, checkpoint=None):
        self.cfg, self.env, self.device = cfg, env, env.device
        if cfg["batch_size"] % env.world_size:
            raise SystemExit(f"--batch-size {cfg['batch_size']} must divide over {env.world_size} processes")
        self.local_batch = cfg["batch_size"] // env.world_size
        seed_everything(cfg["seed"])
        self.data = load_training_data(cfg, env, self.local_batch)
        self.state = TrainState(cfg, self.device, self.data.num_classes, self.data.steps_per_epoch)
        self.resumed = checkpoint is not None
        self.start_epoch, self.batches_done, self.epoch_stats = 0, 0, None
        if self.resumed:
            self.start_epoch, self.batches_done, self.epoch_stats = self.state.restore(checkpoint)
        self.state.distribute(env)
        self.log = RunLog(cfg["out"], enabled=env.is_main)
        self.last_good = (f"the checkpoint this run resumed from (epoch {self.start_epoch}, step {self.state.global_step})"
                          if self.resumed else "none (no checkpoint is written before the end of the first epoch)")

    def run(self, on_step=None):
        """Train from where the run stands to ``cfg['epochs']``; returns the last metrics row (None if none ran)."""
        self._open_run_folder()
        stop = StopRequest()
        row = None
        try:
            for epoch in range(self.start_epoch, self.cfg["epochs"]):
                stats, seconds = self.train_epoch(epoch, stop, on_step)
                row = self.end_epoch(epoch, stats, seconds)
            self._finish()
        except NonFiniteLoss as error:
            self._stop_non_finite(error)
        finally:
            stop.restore()
            self.log.close()
        return row

    def _open_run_folder(self):
        if not self.env.is_main:
            return
        cfg, env, data = self.cfg, self.env, self.data
        resolved = dict(cfg, world_size=env.world_size, device=str(self.device), steps_per_epoch=data.steps_per_epoch,
                        device_data_active=data.on_device, num_classes=data.num_classes, **self.state.speed.as_config())
        where = f"resuming at epoch {self.start_epoch + 1}, step {self.batches_done}" if self.resumed else "starting"
        print(
            f"{where}: {cfg['dataset']} ({len(data.train_set)} train / {len(data.val_set)} val images, {data.num_classes} classes), "
            f"{cfg['backbone']} ({cfg['stem']} stem), {env.world_size} process(es) on {self.device}, "
            f"batch {cfg['batch_size']}, {data.steps_per_epoch} steps/epoch, run folder {cfg['out']}",
            flush=True,
        )
        smallest = smallest_class_count(data.train_set.targets)
        if cfg["knn_k"] > smallest:
            print(f"note: --knn-k {cfg['knn_k']} is more than the {smallest} training images of the smallest class; "
                  f"the kNN monitor uses k = {smallest}", flush=True)
        self.log.open(resolved, keep_epochs=self.start_epoch)

    def train_epoch(self, epoch, stop, on_step=None):
        """One pass over this process's share of the data (the rest of it, in the epoch a resume starts in).

        Returns the epoch's ``EpochStats`` and its duration in seconds.
        """
        skip = self.batches_done if epoch == self.start_epoch else 0
        self.data.sampler.set_epoch(epoch, skip=skip * self.local_batch)
        stats = EpochStats(self.device, self.epoch_stats if skip else None)
        self.state.model.train()
        self.state.probes.train()
        show = self.env.is_main and self.cfg["progress"]
        progress = Progress(self.data.steps_per_epoch, f"epoch {epoch + 1}/{self.cfg['epochs']}", show, initial=skip)
        batch, latest = skip, None
        epoch_start = tick = time.perf_counter()
        for x1, x2, y in self.data.loader:
            data_time = time.perf_counter() - tick
            values, images = self.state.step(x1, x2, y)
            batch += 1
            due = self.sync_due(batch)
            if due:  # one read: the step's values and the non-finite guard's flags
                read = torch.cat([values.double(), self.state.guard.flags()]).tolist()
                self.state.guard.raise_if_failed(read[len(EpochStats.MEANS):])
                latest = dict(zip(EpochStats.MEANS, read))
                step_values = {"loss": latest["loss"], "zero_fraction": latest["train_zero_fraction"], "lr": self.state.lr}
                self.log.step(step_values, self.state.global_step)
            # Timed after the read: the queued steps' device time is spent waiting there, and the
            # step times must add up to the epoch's wall time for images/s to hold.
            now = time.perf_counter()
            step_time, tick = now - tick, now
            stats.add(values, images, data_time, step_time)
            progress.update(self._progress_postfix(latest, images, data_time, step_time), read=due)
            if on_step is not None:
                on_step(epoch, batch)
            # One process alone knows of its signal; under DDP asking the others is a collective, so only when due.
            if (due or not self.env.distributed) and stop.requested(self.env, self.device):
                progress.close()
                self._save_and_exit(epoch, batch, stats, stop.signum or signal.SIGTERM)
        progress.close()
        return stats, time.perf_counter() - epoch_start

    def sync_due(self, batch):
        """Whether the step that ended batch ``batch`` of the epoch reads the device.

        The step loop reads the device at these steps alone: every ``--log-every`` steps and
        at the epoch's last batch (the non-finite guard's flag, the step values for progress
        and TensorBoard; under DDP the stop request). Between them the host only queues work.
        """
        return self.state.global_step % self.cfg["log_every"] == 0 or batch == self.data.steps_per_epoch

    def _progress_postfix(self, latest, images, data_time, step_time):
        """The bar's numbers: the last values read from the device (None before the first read), this step's rate."""
        images_per_s = images * self.env.world_size / max(step_time, MIN_SECONDS)
        read = {} if latest is None else {"loss": f"{latest['loss']:.4f}", "zeros": f"{latest['train_zero_fraction']:.1%}"}
        return {**read, "img/s": f"{images_per_s:.0f}", "data": f"{data_time / max(step_time, MIN_SECONDS):.0%}"}

    def _save_and_exit(self, epoch, batch, stats, signum):
        """After a stop request: a mid-epoch checkpoint (a resume skips the batches done and ends the epoch as usual)."""
        self.save(epoch, batch, stats)
        out = self.cfg["out"]
        if self.env.is_main:
            print(f"stopped by {signal.Signals(signum).name}; saved {out}/checkpoints/last.pt; "
                  f"continue with: python -m lpjepa.train --resume {out}", flush=True)
        raise SystemExit(128 + signum)

    def end_epoch(self, epoch, stats, seconds):
        """Reduce the epoch's sums over the processes, evaluate when due, log the row, save; returns the row.

        An epoch whose loss became non-finite gets no row: the guard stops the run first.
        """
        self.state.guard.check()
        cfg, env, done = self.cfg, self.env, epoch + 1
        row = {"epoch": done, "step": self.state.global_step, "lr": self.state.lr}
        row.update(stats.reduced(env, self.device))
        if env.is_main and (done % cfg["eval_every"] == 0 or done == cfg["epochs"]):
            row.update(self.evaluate())
        row["epoch_time"] = seconds
        if env.is_main:
            self.log.epoch(row, done)
            print(format_summary(done, cfg["epochs"], row, seconds), flush=True)
        self.save(done, 0, None)
        if env.is_main and cfg["save_every"] and done % cfg["save_every"] == 0:
            self.save(done, 0, None, name=f"epoch_{done:04d}.pt")
        torchrun.barrier(env)
        return row

    def evaluate(self):
        data = self.data
        return evaluate_online(
            self.state.model, self.state.probes, data.knn_loader, data.val_loader, data.num_classes, self.device,
            self.state.amp, self.cfg,
        )

    def save(self, epoch, batches_done, stats, name="last.pt"):
        """Rank 0 writes ``checkpoints/NAME`` atomically; ``stats`` is the unfinished epoch's, or None.

        ``final.pt`` is the lean final checkpoint. Every process first checks the guard,
        so no checkpoint holds weights from after a non-finite step.
        """
        self.state.guard.check(self.state.model)
        if not self.env.is_main:
            return
        if name == "final.pt":
            state = final_checkpoint(self.cfg, self.state, epoch)
        else:
            sums = None if stats is None else stats.sums
            state = training_checkpoint(self.cfg, self.state, epoch, batches_done, sums, self.device)
        path = os.path.join(self.cfg["out"], "checkpoints", name)
        save_atomic(state, path)
        if name == "last.pt":
            self.last_good = f"{path} (epoch {epoch}, step {self.state.global_step})"

    def _stop_non_finite(self, error):
        """Rank 0 says where the loss broke and what to try; every process exits with ``NON_FINITE_EXIT_CODE``."""
        if self.env.is_main:
            message = describe(error, steps_per_epoch=self.data.steps_per_epoch, current_step=self.state.global_step,
                               lr=self.cfg["lr"], amp=self.state.amp, last_good=self.last_good)
            print(message, file=sys.stderr, flush=True)
        raise SystemExit(NON_FINITE_EXIT_CODE)

    def _finish(self):
        if not self.env.is_main:
            return
        epochs, out = self.cfg["epochs"], self.cfg["out"]
        if self.start_epoch >= epochs:
            print(f"nothing to do: the checkpoint has finished {self.start_epoch} epochs; pass --epochs N to train longer", flush=True)
        else:
            self.save(epochs, 0, None, name="final.pt")
            print(f"done: {out}/checkpoints/final.pt, metrics in {out}/metrics.csv; plot with: python -m lpjepa.plot {out}", flush=True)
