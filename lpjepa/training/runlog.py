"""What a run leaves to read: config.json, metrics.csv, TensorBoard events (when installed), progress bars, the epoch lines."""
import csv
import json
import math
import os
import sys

from tqdm import tqdm

from .cli import UsageError

# metrics.csv, one row per epoch; the evaluation columns are empty in epochs without evaluation.
COLUMNS = (
    "epoch", "step", "lr", "loss", "invariance", "regularizer", "train_zero_fraction", "probe_loss",
    "vicreg_variance", "vicreg_covariance",
    "online_linear_top1", "probe_backbone_top1", "probe_backbone_top5", "probe_projector_top1", "probe_projector_top5",
    "knn_top1", "knn_top5", "val_zero_fraction", "val_l0", "val_l1", "val_dead_units", "val_dead_fraction", "prior_zero_fraction",
    "img_per_s", "data_wait", "epoch_time",
)


# What a run writes into its folder; a new run refuses a folder that holds any of them.
RUN_FILES = ("config.json", "metrics.csv", os.path.join("checkpoints", "last.pt"), os.path.join("checkpoints", "final.pt"))


def refuse_a_used_folder(out):
    """``UsageError`` when ``out`` holds another run, whose checkpoints a new run would overwrite and whose
    metrics.csv it would cut; the message names both ways on (--resume, or another --out)."""
    found = [name for name in RUN_FILES if os.path.isfile(os.path.join(out, name))]
    if found:
        raise UsageError(
            f"argument --out: {out} already holds a run ({', '.join(found)}); continue it with --resume {out}, "
            f"or give a new --out (or delete the folder) to start another"
        )


class MetricsCSV:
    """``metrics.csv``, one row per epoch, appended and flushed as each epoch ends.

    ``truncate(epoch)`` keeps only the rows of epochs <= epoch (for a resume, which
    repeats the epochs after its checkpoint).
    """

    def __init__(self, path, columns):
        self.path = path
        self.columns = list(columns)

    def read(self):
        if not os.path.isfile(self.path):
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def truncate(self, epoch):
        rows = [r for r in self.read() if int(r["epoch"]) <= epoch]
        if os.path.isfile(self.path) and not rows:
            os.remove(self.path)  # a new run in an old folder starts a new file, with today's columns
        elif rows:
            fields = self._header()
            with open(self.path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)

    def _header(self):
        with open(self.path, newline="") as f:
            return next(csv.reader(f), None)

    def append(self, row):
        """Write one row; columns it lacks (an epoch without evaluation) stay empty."""
        exists = os.path.isfile(self.path) and os.path.getsize(self.path) > 0
        fields = self._header() if exists else self.columns
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if not exists:
                writer.writeheader()
            writer.writerow(row)


class TensorBoard:
    """Scalars to TensorBoard when ``tensorboard`` is importable; otherwise does nothing."""

    def __init__(self, log_dir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
        else:
            self.writer = SummaryWriter(log_dir)

    @property
    def enabled(self):
        return self.writer is not None

    def scalars(self, values, step, prefix=""):
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(prefix + key, value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


class RunLog:
    """The run folder as rank 0 writes it while training: config.json, metrics.csv and TensorBoard events.

    On the other processes (``enabled=False``) every method does nothing.
    """

    def __init__(self, out, enabled=True):
        self.out, self.enabled = out, enabled
        self.metrics = MetricsCSV(os.path.join(out, "metrics.csv"), COLUMNS)
        self.tensorboard = None

    def open(self, resolved_config, keep_epochs):
        """Write config.json, keep the metrics rows of the first ``keep_epochs`` epochs, start TensorBoard.

        A resume repeats the epochs after its checkpoint, so their old rows go.
        """
        if not self.enabled:
            return
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, "config.json"), "w") as f:
            json.dump(resolved_config, f, indent=2, sort_keys=True)
        self.metrics.truncate(keep_epochs)
        self.tensorboard = TensorBoard(os.path.join(self.out, "tensorboard"))
        if not self.tensorboard.enabled:
            print("note: tensorboard is not installed, so the run writes no tensorboard/ events (metrics.csv has every "
                  "epoch); pip install tensorboard, or the package's [tensorboard] extra, adds them", flush=True)

    def step(self, values, step):
        if self.tensorboard is not None:
            self.tensorboard.scalars(values, step, "step/")

    def epoch(self, row, epoch):
        if self.enabled:
            self.metrics.append(row)
            self.tensorboard.scalars(row, epoch, "epoch/")

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()


class Progress:
    """A tqdm bar per epoch on a terminal; elsewhere (a log file, CI) a few plain lines, so logs stay readable.

    Off a terminal a line is printed only after a step whose values were read from the device
    (``update(..., read=True)``), so that every line has the loss, and at most one per tenth of
    the epoch; the epoch's last step is always read, so an epoch gets at least one line.
    """

    PLAIN_LINES_PER_EPOCH = 10

    def __init__(self, total, desc, enabled=True, stream=None, initial=0):
        self.stream = stream or sys.stderr
        self.total, self.desc, self.enabled = total, desc, enabled
        self.done = self.printed = initial
        self.every = max(1, math.ceil(total / self.PLAIN_LINES_PER_EPOCH))
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, file=self.stream)

    def update(self, postfix, read=True):
        """One step done; ``postfix``: the numbers to show; ``read``: whether they are fresh from the device."""
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        elif self.enabled and read and (self.done - self.printed >= self.every or self.done == self.total):
            self.printed = self.done
            text = " ".join(f"{k} {v}" for k, v in postfix.items())
            print(f"{self.desc} {self.done}/{self.total} | {text}", file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _probe_summary(row):
    """The probes' part of the epoch line; the backbone one named as the paper's metric when it is the official classifier."""
    if "online_linear_top1" in row:
        return (f" | online linear top-1 {row['online_linear_top1']:.1%} (the paper's Table 2 metric),"
                f" projector probe {row['probe_projector_top1']:.1%}")
    return f" | probe top-1 backbone {row['probe_backbone_top1']:.1%} projector {row['probe_projector_top1']:.1%}"


def format_summary(epoch, epochs, row, seconds):
    """The line printed at the end of an epoch; the evaluation part only when the row has it."""
    text = (
        f"epoch {epoch}/{epochs} | loss {row['loss']:.4f} (inv {row['invariance']:.4f}, reg {row['regularizer']:.5f})"
        f" | zeros {row['train_zero_fraction']:.1%}"
    )
    if "val_zero_fraction" in row:
        text += (
            f" (val {row['val_zero_fraction']:.1%}, prior {row['prior_zero_fraction']:.1%}, l1 {row['val_l1']:.3f},"
            f" dead {row['val_dead_units']})"
            + _probe_summary(row)
            + f" | kNN top-1 {row['knn_top1']:.1%}"
        )
    return text + f" | {row['img_per_s']:.0f} img/s, data wait {row['data_wait']:.0%} | {seconds:.1f} s"
