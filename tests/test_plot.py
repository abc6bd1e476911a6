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


@pytest.mark.parametrize("num_classes, top5_shown", [(4, False), (5, False), (6, True), (100, True), (None, True)])
def test_top_k_with_k_at_least_the_class_count_is_left_out(tmp_path, num_classes, top5_shown):
    # With 4 classes top-5 is 100% by definition; None (a run that did not record its class count) draws every curve.
    run = write_run(tmp_path)
    if num_classes is not None:
        (run / "config.json").write_text(json.dumps({"dataset": "imagefolder", "num_classes": num_classes}))
    assert plot.read_num_classes(str(run)) == num_classes
    fig = plot._figure("accuracy", plot.FIGURES["accuracy"], plot.read_metrics(str(run)), "run",
                       plot.read_offline_eval(str(run)), plot.read_num_classes(str(run)))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert sum("top-5" in label for label in labels) == (3 if top5_shown else 0)
    top1_curves = sum(plot.top_k(key) == 1 for key, _ in plot.FIGURES["accuracy"])  # the paper's metric among them
    assert sum("top-1" in label for label in labels) == top1_curves + len(plot.OFFLINE)
    plt.close(fig)


def test_the_class_count_of_an_older_run_comes_from_its_dataset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"dataset": "cifar100"}))
    assert plot.read_num_classes(str(tmp_path)) == 100
    (tmp_path / "config.json").write_text(json.dumps({"dataset": "imagefolder"}))
    assert plot.read_num_classes(str(tmp_path)) is None
    assert plot.top_k("knn_top5") == 5 and plot.top_k("probe_backbone_top1") == 1 and plot.top_k("val_l1") is None


def test_every_accuracy_curve_and_offline_result_looks_different_and_the_offline_ones_sit_at_their_epoch(tmp_path):
    run = write_run(tmp_path, epochs=30)  # more epochs than MARKERS_BELOW: the curves keep (fewer) markers
    fig = plot._figure("accuracy", plot.FIGURES["accuracy"], plot.read_metrics(str(run)), "run", plot.read_offline_eval(str(run)), 10)
    ax = fig.axes[0]
    looks = [(line.get_color(), line.get_linestyle(), line.get_marker(), line.get_markersize()) for line in ax.lines]
    curves = len(plot.FIGURES["accuracy"]) + len(plot.OFFLINE)  # 7 online (the paper's metric one of them), 3 offline
    assert len(ax.lines) == curves and len(set(looks)) == curves, looks
    assert all(line.get_marker() not in (None, "None", "") for line in ax.lines)
    offline = [line for line in ax.lines if "(eval.json)" in line.get_label()]
    # One x for all of them: the epoch of the checkpoint eval.json evaluated, not shifted to read as other epochs.
    assert [list(line.get_xdata()) for line in offline] == [[30]] * len(plot.OFFLINE)
    # Each offline result has the colour of the curves of its source.
    colours = {line.get_label(): line.get_color() for line in ax.lines}
    assert colours["offline kNN, top-1 (eval.json)"] == colours["kNN, top-1"] == colours["kNN, top-5"]
    assert colours["offline linear probe, backbone, top-1 (eval.json)"] == colours["online probe, backbone, top-1"]
    plt.close(fig)


def test_plot_run_leaves_out_top_5_of_a_four_class_run(tmp_path):
    run = write_run(tmp_path)
    (run / "config.json").write_text(json.dumps({"dataset": "imagefolder", "num_classes": 4}))
    drawn = []
    figure = plot._figure

    def recording(name, curves, rows, title, offline, num_classes=None):
        fig = figure(name, curves, rows, title, offline, num_classes)
        drawn.extend(line.get_label() for line in fig.axes[0].lines)
        return fig

    plot._figure = recording
    try:
        plot.plot_run(str(run), str(tmp_path / "pngs"))
    finally:
        plot._figure = figure
    assert "kNN, top-1" in drawn and not any("top-5" in label for label in drawn)
