"""Checkpoints of a training run: where they live, how they are written and read, and the RNG states they carry.

A training checkpoint (``last.pt``, ``epoch_NNNN.pt``) is one ``torch.save`` dict with
the keys ``config``, ``epoch``, ``batches_done``, ``global_step``, ``epoch_stats``,
``model``, ``probes``, ``optimizer``, ``probe_optimizer``, ``scaler`` and ``rng``;
``training_checkpoint`` builds it and ``restore_training_state`` reads it back.
A final checkpoint (``final.pt``, ``final_checkpoint``) keeps ``config``, ``epoch``,
``global_step``, ``model`` and ``probes`` only, with ``kind`` set to ``"final"``: what
evaluation and export need, a third of the size (no optimizer moments). The format
lives here alone.
"""
import os
import random

import numpy as np
import torch

from . import torchrun
from .cli import UsageError
from .model import LpJEPA

FINAL_KIND = "final"


def checkpoint_path(path):
    """A checkpoint file, or a run folder (its ``checkpoints/last.pt``)."""
    return os.path.join(path, "checkpoints", "last.pt") if os.path.isdir(path) else path


def load_checkpoint(path):
    """The dict a checkpoint file holds; ``UsageError`` when there is none, or the file is not one."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path} (pass a run folder holding checkpoints/last.pt, or a .pt file)")
    try:
        # Our own file, holding Python and numpy RNG states, so not weights_only.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated file, another program's pickle: say so in one line
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise UsageError(f"{path} is not a checkpoint written by lpjepa.train ({type(error).__name__}: {first_line})") from None
    if not isinstance(checkpoint, dict) or not {"config", "model", "epoch"} <= checkpoint.keys():
        raise UsageError(f"{path} is not a checkpoint written by lpjepa.train (no config, model and epoch in it)")
    return checkpoint


def is_final_checkpoint(checkpoint):
    """Whether a loaded checkpoint is a lean final one (no optimizer state: evaluation and export only)."""
    return checkpoint.get("kind") == FINAL_KIND or "optimizer" not in checkpoint


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


# Config keys renamed since older checkpoints were written: old key -> new key (read when resuming or evaluating).
RENAMED_KEYS = {"target": "target_law", "targets": "target_draw"}


def upgrade_config(saved):
    """A checkpoint's config with its keys under today's names (``RENAMED_KEYS``)."""
    return {RENAMED_KEYS.get(key, key): value for key, value in saved.items()}


def load_model_for_eval(checkpoint, device="auto"):
    """(model in eval mode, config with '_epoch', device) from a checkpoint written by ``lpjepa.train``."""
    state = load_checkpoint(checkpoint_path(checkpoint))
    cfg = dict(upgrade_config(state["config"]), _epoch=state["epoch"])
    dev = torchrun.resolve_device(device)
    model = LpJEPA(cfg["backbone"], cfg["stem"], cfg.get("stem_padding", 1))
    model.load_state_dict(state["model"])
    return model.to(dev).eval(), cfg, dev


def training_checkpoint(cfg, state, epoch, batches_done, epoch_stats, device):
    """The checkpoint of a run that has finished ``epoch`` epochs and ``batches_done`` batches of the next.

    ``state`` holds the model, the probes, their optimizers, the grad scaler and
    ``global_step`` (a ``loop.TrainState``); ``epoch_stats`` the running sums of the
    unfinished epoch, or None at an epoch's end. The RNG states are taken now.
    """
    return {
        "config": cfg, "epoch": epoch, "batches_done": batches_done, "global_step": state.global_step,
        "epoch_stats": epoch_stats,
        "model": state.model.state_dict(), "probes": state.probes.state_dict(),
        "optimizer": state.optimizer.state_dict(), "probe_optimizer": state.probe_optimizer.state_dict(),
        "scaler": state.scaler.state_dict(),
        "rng": rng_states(device),
    }


def final_checkpoint(cfg, state, epoch):
    """The lean checkpoint of a finished run (``final.pt``): config, epoch, step, model and probes, no optimizer state."""
    return {
        "kind": FINAL_KIND, "config": cfg, "epoch": epoch, "batches_done": 0, "global_step": state.global_step,
        "model": state.model.state_dict(), "probes": state.probes.state_dict(),
    }


def _load_optimizer_state(optimizer, saved):
    """The saved moments and step counts into ``optimizer``, keeping its own hyperparameters.

    ``optimizer`` was just built from the resumed run's config, so a flag given with
    ``--resume`` (``--lr``, ``--weight-decay``, ``--probe-lr``) takes effect; a plain
    ``load_state_dict`` would bring the saved values back.
    """
    hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, values in zip(optimizer.param_groups, hyperparameters):
        group.update(values)


def restore_training_state(state, checkpoint, device):
    """Load what ``training_checkpoint`` saved back into ``state`` and the RNGs.

    Returns ``(epoch, batches_done, epoch_stats)``: where the run goes on. A run saved
    without a grad scaler (bf16 or no AMP) resumed with one starts the scaler afresh.
    """
    state.model.load_state_dict(checkpoint["model"])
    state.probes.load_state_dict(checkpoint["probes"])
    _load_optimizer_state(state.optimizer, checkpoint["optimizer"])
    _load_optimizer_state(state.probe_optimizer, checkpoint["probe_optimizer"])
    if checkpoint["scaler"]:
        state.scaler.load_state_dict(checkpoint["scaler"])
    state.global_step = checkpoint["global_step"]
    set_rng_states(checkpoint["rng"], device)
    return checkpoint["epoch"], checkpoint["batches_done"], checkpoint["epoch_stats"]
