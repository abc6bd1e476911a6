"""What a run leaves to read: metrics.csv, TensorBoard events (when installed), progress bars."""
import csv
import os
import sys

from tqdm import tqdm

# metrics.csv, one row per epoch; the evaluation columns are empty in epochs without evaluation.
COLUMNS = (
    "epoch", "step", "lr", "loss", "invariance", "regularizer", "train_zero_fraction", "probe_loss",
    "probe_backbone_top1", "probe_backbone_top5", "probe_projector_top1", "probe_projector_top5",
    "knn_top1", "knn_top5", "val_zero_fraction", "val_l0", "val_l1", "val_dead_units", "prior_zero_fraction",
    "img_per_s", "data_wait", "epoch_time",
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


class Progress:
    """A tqdm bar per epoch on a terminal; plain lines (about ten per epoch) otherwise, so logs stay readable."""

    def __init__(self, total, desc, enabled=True, stream=None, initial=0):
        self.stream = stream or sys.stderr
        self.total, self.desc, self.enabled = total, desc, enabled
        self.done = initial
        self.every = max(1, total // 10)
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, file=self.stream)

    def update(self, postfix):
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        elif self.enabled and (self.done % self.every == 0 or self.done == self.total):
            text = " ".join(f"{k} {v}" for k, v in postfix.items())
            print(f"{self.desc} {self.done}/{self.total} | {text}", file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
