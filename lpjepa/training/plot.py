"""Loss, accuracy and sparsity curves of a run, as PNG files (``python -m lpjepa.plot``).

``plot_run`` reads ``RUN_DIR/metrics.csv`` and writes ``loss.png``, ``accuracy.png`` and
``sparsity.png`` into ``RUN_DIR`` (or ``--out``). Columns a run did not log (epochs
without evaluation, columns older runs lack) are skipped. The offline evaluation of
``lpjepa.eval`` (``RUN_DIR/eval.json``), when there is one, is drawn on the accuracy
plot as one marker per result, all at the epoch of the checkpoint it evaluated, told
apart by their shapes. Epochs are whole numbers on every x-axis, and the legends sit
right of the plots, off the data.

On the accuracy plot each source has its colour (backbone probe, projector probe, kNN;
its offline result the same colour), each k its line style and each curve its marker, so
that curves lying on each other stay apart. Top-k with k at least the number of classes
(``config.json``'s ``num_classes``) is always 100% and left out.
"""
import csv
import json
import os
import re

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
        ("probe_projector_top5", "online probe, projector, top-5"),
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
# One colour per source of an accuracy, for its online curves and its offline result alike.
SOURCE_COLOURS = {"backbone": "tab:blue", "projector": "tab:green", "knn": "tab:red", "online": "black"}
# Line style per k of top-k; the marker per curve, so that no two accuracy curves look alike.
TOP_K_STYLES = {1: "-", 5: "--"}
CURVE_MARKERS = {
    "probe_backbone_top1": "o", "probe_backbone_top5": "s", "probe_projector_top1": "D", "probe_projector_top5": "v",
    "knn_top1": "^", "knn_top5": "x", "online_linear_top1": "h",
}
# eval.json's results drawn on the accuracy plot: (key, label, marker, its size, source). Hollow and of
# decreasing sizes, so that equal results, drawn at one point, nest inside each other and all stay visible.
OFFLINE = (
    ("linear_backbone_top1", "offline linear probe, backbone, top-1 (eval.json)", "*", 20, "backbone"),
    ("linear_projector_top1", "offline linear probe, projector, top-1 (eval.json)", "P", 15, "projector"),
    ("knn_top1", "offline kNN, top-1 (eval.json)", "X", 11, "knn"),
)
# Class counts of the datasets that have one, for runs whose config.json predates num_classes.
DATASET_CLASSES = {"cifar10": 10, "cifar100": 100}
# Room left and right of the first and last epoch: half an epoch, or 3% of a long run.
X_MARGIN_EPOCHS, X_MARGIN_SHARE = 0.5, 0.03
# Below this many epochs every point gets a marker (accuracy curves: about this many markers on longer runs).
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


def _read_json(run_dir, name):
    """The JSON file ``run_dir/name``, or None when there is none (``json.JSONDecodeError`` when it is not JSON)."""
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_offline_eval(run_dir):
    """eval.json written by ``lpjepa.eval`` into the run folder, or None when there is none."""
    try:
        return _read_json(run_dir, "eval.json")
    except json.JSONDecodeError as error:
        path = os.path.join(run_dir, "eval.json")
        raise UsageError(f"argument run_dir: {path} is not the JSON lpjepa.eval writes ({error})") from None


def read_num_classes(run_dir):
    """The run's number of classes: ``config.json``'s ``num_classes``, else its dataset's, else None (unknown)."""
    try:
        cfg = _read_json(run_dir, "config.json") or {}
    except json.JSONDecodeError:
        return None  # config.json is not needed for the curves: draw them all
    return cfg.get("num_classes") or DATASET_CLASSES.get(cfg.get("dataset"))


def top_k(key):
    """The k of a top-k column (``knn_top5`` -> 5), or None for another column."""
    match = re.search(r"_top(\d+)$", key)
    return int(match.group(1)) if match else None


def shown_curves(curves, num_classes):
    """The curves worth drawing: top-k with k >= the number of classes is 100% by definition and says nothing."""
    if num_classes is None:
        return curves
    return tuple((key, label) for key, label in curves if top_k(key) is None or top_k(key) < num_classes)


def curve_style(key):
    """Colour, line style and marker of an accuracy curve; {} for the other figures' curves (matplotlib's cycle)."""
    source = next((name for name in SOURCE_COLOURS if f"_{name}_" in f"_{key}_"), None)
    if source is None or top_k(key) is None:
        return {}
    style = {"color": SOURCE_COLOURS[source], "linestyle": TOP_K_STYLES.get(top_k(key), ":"), "marker": CURVE_MARKERS[key]}
    if top_k(key) > 1:  # hollow and larger: top-k curves often lie on each other near 100%, and the markers stay readable
        style.update(markerfacecolor="none", markersize=8)
    return style


def series(rows, key):
    """(epochs, values) where the column has a value."""
    points = [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    return [e for e, _ in points], [v for _, v in points]


def _plot_offline(ax, offline):
    """eval.json's results, all at the epoch of the checkpoint it evaluated (an x-offset would read as another
    epoch): hollow markers of different shapes in their source's colour, so that equal values stay distinct."""
    epoch = offline.get("epoch")
    if epoch is None:
        return
    for key, label, marker, size, source in OFFLINE:
        if isinstance(offline.get(key), (int, float)):
            ax.plot([epoch], [offline[key]], linestyle="none", marker=marker, markersize=size, markerfacecolor="none",
                    markeredgewidth=1.8, color=SOURCE_COLOURS[source], label=label, zorder=3)


def _figure(name, curves, rows, title, offline, num_classes=None):
    """One figure of the run's curves; returns it, with the legend right of the axes.

    ``num_classes``: the run's, to leave out top-k curves with k >= it (None: draw them all).
    """
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    for key, label in shown_curves(curves, num_classes):
        epochs, values = series(rows, key)
        if epochs:
            style = curve_style(key) if name == "accuracy" else {}
            if style:  # accuracy curves keep their markers on long runs too (about MARKERS_BELOW of them): they tell them apart
                style["markevery"] = max(1, len(epochs) // MARKERS_BELOW)
            elif len(epochs) < MARKERS_BELOW:
                style["marker"] = "o"
            ax.plot(epochs, values, label=label, **style)
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
    num_classes = read_num_classes(run_dir)
    out_dir = out_dir or run_dir
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"argument --out: {out_dir} is a file, not a folder")
    os.makedirs(out_dir, exist_ok=True)
    title = os.path.basename(os.path.normpath(run_dir))
    paths = []
    for name, curves in FIGURES.items():
        fig = _figure(name, curves, rows, title, offline, num_classes)
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
