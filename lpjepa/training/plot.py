"""Loss, accuracy and sparsity curves of a run, as PNG files (``python -m lpjepa.plot``).

``plot_run`` reads ``RUN_DIR/metrics.csv`` and writes ``loss.png``, ``accuracy.png`` and
``sparsity.png`` into ``RUN_DIR`` (or ``--out``). Columns a run did not log (epochs
without evaluation, columns older runs lack) are skipped. The offline evaluation of
``lpjepa.eval`` (``RUN_DIR/eval.json``), when there is one, is drawn on the accuracy
plot as one marker per result at the epoch of the checkpoint it evaluated. Epochs are
whole numbers on every x-axis, and the legends sit right of the plots, off the data.
"""
import csv
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, PercentFormatter  # noqa: E402

from .cli import UsageError  # noqa: E402

FIGURES = {
    "loss": (("loss", "total"), ("invariance", "invariance (unweighted)"), ("regularizer", "RDMReg (unweighted)")),
    "accuracy": (
        # --preset paper: the official online classifier (the backbone probe itself), the paper's number.
        ("online_linear_top1", "online linear classifier, top-1 (the paper's Table 2 metric)"),
        ("probe_backbone_top1", "online probe, backbone, top-1"),
        ("probe_backbone_top5", "online probe, backbone, top-5"),
        ("probe_projector_top1", "online probe, projector, top-1"),
        ("knn_top1", "kNN, top-1"),
        ("knn_top5", "kNN, top-5"),
    ),
    "sparsity": (
        ("train_zero_fraction", "zeros (train)"),
        ("val_zero_fraction", "zeros (val)"),
        ("prior_zero_fraction", "zeros (prior)"),
        ("val_l0", "l0 (val): active fraction"),
        ("val_l1", "l1 (val)"),
        ("val_dead_fraction", "dead units (val): fraction never active"),
    ),
}
Y_LABELS = {"loss": "loss (log scale)", "accuracy": "validation accuracy", "sparsity": "fraction"}
# eval.json's results drawn on the accuracy plot: (key, label, marker).
OFFLINE = (
    ("linear_backbone_top1", "offline linear probe, backbone, top-1 (eval.json)", "*"),
    ("linear_projector_top1", "offline linear probe, projector, top-1 (eval.json)", "P"),
    ("knn_top1", "offline kNN, top-1 (eval.json)", "X"),
)
# Horizontal gap, in epochs, between the offline results drawn at one epoch.
OFFLINE_SPREAD = 0.12
# Room left and right of the first and last epoch: half an epoch, or 3% of a long run.
X_MARGIN_EPOCHS, X_MARGIN_SHARE = 0.5, 0.03
# Below this many epochs every point gets a marker.
MARKERS_BELOW = 20
FIGURE_SIZE = (8.5, 4.0)
DPI = 120


def read_metrics(run_dir):
    """metrics.csv's rows as dicts; ``UsageError`` when ``run_dir`` is not a run folder with at least one epoch."""
    if not os.path.isdir(run_dir):
        raise UsageError(f"argument run_dir: {run_dir} does not exist (pass the run folder lpjepa.train wrote, its --out)")
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        raise UsageError(f"argument run_dir: {run_dir} has no metrics.csv (pass the run folder lpjepa.train wrote, its --out)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UsageError(f"argument run_dir: {path} has no epochs yet (it gets a row at the end of each epoch)")
    return rows


def read_offline_eval(run_dir):
    """eval.json written by ``lpjepa.eval`` into the run folder, or None when there is none."""
    path = os.path.join(run_dir, "eval.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise UsageError(f"argument run_dir: {path} is not the JSON lpjepa.eval writes ({error})") from None


def series(rows, key):
    """(epochs, values) where the column has a value."""
    points = [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    return [e for e, _ in points], [v for _, v in points]


def _plot_offline(ax, offline):
    """eval.json's results at the epoch of the checkpoint it evaluated, side by side so that equal values stay apart."""
    epoch = offline.get("epoch")
    if epoch is None:
        return
    for index, (key, label, marker) in enumerate(OFFLINE):
        if isinstance(offline.get(key), (int, float)):
            x = epoch + (index - (len(OFFLINE) - 1) / 2) * OFFLINE_SPREAD
            ax.plot([x], [offline[key]], linestyle="none", marker=marker, markersize=11, label=label)


def _figure(name, curves, rows, title, offline):
    """One figure of the run's curves; returns it, with the legend right of the axes."""
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    for key, label in curves:
        epochs, values = series(rows, key)
        if epochs:
            ax.plot(epochs, values, marker="o" if len(epochs) < MARKERS_BELOW else None, label=label)
    if name == "accuracy" and offline:
        _plot_offline(ax, offline)
    # Whole epochs only, also for a run of one or two (where matplotlib would tick 0.95, 1.0, 1.05).
    epochs = [int(r["epoch"]) for r in rows]
    margin = max(X_MARGIN_EPOCHS, X_MARGIN_SHARE * (max(epochs) - min(epochs)))
    ax.set_xlim(min(epochs) - margin, max(epochs) + margin)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("epoch")
    ax.set_ylabel(Y_LABELS[name])
    ax.set_title(f"{name}: {title}")
    if name == "loss":
        ax.set_yscale("log")
    else:
        ax.set_ylim(-0.02, 1.02)
        if name == "accuracy":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small")
    return fig


def plot_run(run_dir, out_dir=None):
    """Write the three PNGs; returns their paths. ``UsageError`` for a folder that is not a run's."""
    rows = read_metrics(run_dir)
    offline = read_offline_eval(run_dir)
    out_dir = out_dir or run_dir
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"argument --out: {out_dir} is a file, not a folder")
    os.makedirs(out_dir, exist_ok=True)
    title = os.path.basename(os.path.normpath(run_dir))
    paths = []
    for name, curves in FIGURES.items():
        fig = _figure(name, curves, rows, title, offline)
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
