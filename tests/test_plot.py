"""``lpjepa.plot``'s figures: whole epochs on the x-axis, legends off the data, dead units and eval.json drawn."""
import json

import matplotlib.pyplot as plt
import pytest

from lpjepa.training import plot, runlog


def write_run(folder, epochs=4, with_eval=True):
    values = [0.1 * (i + 1) for i in range(epochs)]
    metrics = runlog.MetricsCSV(folder / "metrics.csv", runlog.COLUMNS)
    for epoch, value in enumerate(values, start=1):
        metrics.append({key: value for key in runlog.COLUMNS} | {"epoch": epoch, "loss": 10 * value})
    if with_eval:
        results = {"epoch": epochs, "linear_backbone_top1": 0.5, "linear_projector_top1": 0.4, "knn_top1": 0.45}
        (folder / "eval.json").write_text(json.dumps(results))
    return folder


@pytest.mark.parametrize("epochs", [1, 3, 7])
def test_figures_read_at_a_glance(tmp_path, epochs):
    run = write_run(tmp_path, epochs)
    rows, offline = plot.read_metrics(str(run)), plot.read_offline_eval(str(run))
    for name, curves in plot.FIGURES.items():
        fig = plot._figure(name, curves, rows, "run", offline)
        ax = fig.axes[0]
        fig.canvas.draw()
        shown = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert shown and all(float(t).is_integer() for t in shown), (name, shown)
        legend = ax.get_legend().get_window_extent()
        assert legend.x0 >= ax.get_window_extent().x1, name  # right of the axes: it covers no data
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        if name == "sparsity":
            assert any("dead units" in label for label in labels)
        if name == "accuracy":
            assert sum("(eval.json)" in label for label in labels) == len(plot.OFFLINE)
        plt.close(fig)


def test_plot_run_writes_three_pngs_without_eval_json(tmp_path):
    run = write_run(tmp_path, with_eval=False)
    paths = plot.plot_run(str(run), str(tmp_path / "pngs"))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["loss.png", "accuracy.png", "sparsity.png"]
