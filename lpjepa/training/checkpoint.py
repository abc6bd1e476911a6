"""Checkpoints of a training run: where they live, how they are written and read, and the RNG states they carry.

A training checkpoint (``last.pt``, ``epoch_NNNN.pt``) is one ``torch.save`` dict with
the keys ``config``, ``epoch``, ``batches_done``, ``global_step``, ``epoch_stats``,
``model``, ``probes``, ``optimizer``, ``probe_optimizer``, ``scaler`` and ``rng``;
``training_checkpoint`` builds it and ``restore_training_state`` reads it back.
A final checkpoint (``final.pt``, ``final_checkpoint``) keeps ``config``, ``epoch``,
``global_step``, ``model`` and ``probes`` only, with ``kind`` set to ``"final"``: what
evaluation and export need, a third of the size (no optimizer moments). The format
lives here alone.

Given a run folder, ``--resume`` reads ``checkpoints/last.pt`` (``checkpoint_path``) and
evaluation and export read the finished model, ``checkpoints/final.pt``, falling back
to ``last.pt`` for a run that has not finished (``evaluated_checkpoint_path``).
"""
import csv
import os
import random

import numpy as np
import torch

from . import torchrun
from .cli import UsageError
from .model import LpJEPA

FINAL_KIND = "final"


FINAL_NAME, LAST_NAME = "final.pt", "last.pt"


def checkpoint_path(path):
    """A checkpoint file, or a run folder (its ``checkpoints/last.pt``: where a resume goes on)."""
    return os.path.join(path, "checkpoints", LAST_NAME) if os.path.isdir(path) else path


def evaluated_checkpoint_path(path):
    """What evaluation and export read: a checkpoint file as given; in a run folder the finished model.

    That is ``checkpoints/final.pt``, written when the run ends; a run that has not
    finished (stopped, crashed or still training) has none, and its ``checkpoints/last.pt``,
    the latest state (possibly mid-epoch), is read instead. ``UsageError`` when the folder
    holds neither.
    """
    if not os.path.isdir(path):
        return path
    for name in (FINAL_NAME, LAST_NAME):
        file = os.path.join(path, "checkpoints", name)
        if os.path.isfile(file):
            return file
    raise UsageError(f"no checkpoint in {path} (a run folder holds checkpoints/{FINAL_NAME} once the run has finished, "
                     f"checkpoints/{LAST_NAME} from the end of its first epoch; or pass a .pt file)")


def describe_checkpoint(path, checkpoint):
    """One line saying which checkpoint this is: its path, its epoch, and whether the run had finished.

    ``checkpoint`` is the dict loaded from ``path``. For a run folder's ``final.pt`` whose
    ``metrics.csv`` has gone on past its epoch (the run was resumed for more epochs and has
    not finished them), the line names ``last.pt`` as the way to evaluate the latest state.
    """
    epoch, steps = checkpoint["epoch"], checkpoint.get("batches_done", 0)
    where = f"epoch {epoch}" + (f" and {steps} steps of epoch {epoch + 1}" if steps else "")
    if is_final_checkpoint(checkpoint):
        text = f"{path} ({where}: the finished run)"
        latest = _last_logged_epoch(os.path.dirname(os.path.dirname(os.path.abspath(path))))
        if latest is not None and latest > epoch:
            last = os.path.join(os.path.dirname(path), LAST_NAME)
            text += f"; the run went on to epoch {latest} after it, pass {last} to use that state"
        return text
    if os.path.basename(path) == LAST_NAME and not os.path.isfile(os.path.join(os.path.dirname(path), FINAL_NAME)):
        return f"{path} ({where}: the run has no {FINAL_NAME}, so it was stopped before its end or is still training)"
    return f"{path} ({where})"


def _last_logged_epoch(run_dir):
    """The last epoch in ``run_dir/metrics.csv``, or None when the folder has none."""
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        return None
    with open(path, newline="") as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f) if row.get("epoch")]
    return max(epochs, default=None)


def load_checkpoint(path):
    """The dict a checkpoint file holds; ``UsageError`` when there is none, or the file is not one."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path} (pass a run folder written by lpjepa.train, or a .pt file)")
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
    """(model in eval mode, config with '_epoch', device) from a checkpoint written by ``lpjepa.train``.

    ``checkpoint``: the dict ``load_checkpoint`` returned, or a path (``evaluated_checkpoint_path``'s choice).
    """
    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(evaluated_checkpoint_path(checkpoint))
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
