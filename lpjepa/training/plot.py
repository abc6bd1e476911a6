"""Loss, accuracy and sparsity curves of a run, as PNG files (``python -m lpjepa.plot``).

``plot_run`` reads ``RUN_DIR/metrics.csv`` and writes ``loss.png``, ``accuracy.png`` and
``sparsity.png`` into ``RUN_DIR`` (or ``--out``). Columns a run did not log (epochs
without evaluation) are skipped.
"""
import csv
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FIGURES = {
    "loss": (("loss", "total"), ("invariance", "invariance (unweighted)"), ("regularizer", "RDMReg (unweighted)")),
    "accuracy": (
        ("probe_backbone_top1", "probe backbone top-1"),
        ("probe_backbone_top5", "probe backbone top-5"),
        ("probe_projector_top1", "probe projector top-1"),
        ("knn_top1", "kNN top-1"),
        ("knn_top5", "kNN top-5"),
    ),
    "sparsity": (
        ("train_zero_fraction", "zeros (train)"),
        ("val_zero_fraction", "zeros (val)"),
        ("prior_zero_fraction", "zeros (prior)"),
        ("val_l0", "l0 (val)"),
        ("val_l1", "l1 (val)"),
    ),
}


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        raise SystemExit(f"no metrics.csv in {run_dir}: pass the run folder that lpjepa.train wrote (its --out)")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def series(rows, key):
    """(epochs, values) where the column has a value."""
    points = [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    return [e for e, _ in points], [v for _, v in points]


def plot_run(run_dir, out_dir=None):
    """Write the three PNGs; returns their paths."""
    rows = read_metrics(run_dir)
    out_dir = out_dir or run_dir
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, curves in FIGURES.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in curves:
            epochs, values = series(rows, key)
            if epochs:
                ax.plot(epochs, values, marker="o" if len(epochs) < 20 else None, label=label)
        ax.set_xlabel("epoch")
        ax.set_title(f"{name} — {os.path.basename(os.path.normpath(run_dir))}")
        if name == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        path = os.path.join(out_dir, f"{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
