"""Which checkpoint ``lpjepa.eval`` and ``lpjepa.export`` read from a run folder, and that they say so.

A finished run's ``final.pt`` (the finished model); a run without one (stopped, or still
training) its ``last.pt``, said to be unfinished; a ``final.pt`` whose run went on past it
names ``last.pt`` as the way to the later state. ``--resume`` keeps reading ``last.pt``.
"""
import json
import os
import shutil

import pytest

from lpjepa import eval as lp_eval
from lpjepa import export as lp_export
from lpjepa.training import runlog
from lpjepa.training.checkpoint import checkpoint_path, describe_checkpoint, evaluated_checkpoint_path
from lpjepa.training.cli import UsageError

FINAL = {"kind": "final", "epoch": 3, "batches_done": 0}
LAST = {"epoch": 3, "batches_done": 0, "optimizer": {}}


def run_folder(root, names, logged_epochs=0):
    """A run folder holding empty checkpoint files ``names`` and a metrics.csv of ``logged_epochs`` rows."""
    (root / "checkpoints").mkdir(parents=True)
    for name in names:
        (root / "checkpoints" / name).write_bytes(b"")
    metrics = runlog.MetricsCSV(root / "metrics.csv", runlog.COLUMNS)
    for epoch in range(1, logged_epochs + 1):
        metrics.append({"epoch": epoch, "loss": 1.0 / epoch})
    return root


def test_a_run_folder_gives_final_pt_when_the_run_finished_and_last_pt_otherwise(tmp_path):
    finished = run_folder(tmp_path / "finished", ["last.pt", "final.pt"])
    stopped = run_folder(tmp_path / "stopped", ["last.pt"])
    assert evaluated_checkpoint_path(str(finished)) == str(finished / "checkpoints" / "final.pt")
    assert evaluated_checkpoint_path(str(stopped)) == str(stopped / "checkpoints" / "last.pt")
    assert checkpoint_path(str(finished)) == str(finished / "checkpoints" / "last.pt")  # a resume goes on from last.pt
    given = str(finished / "checkpoints" / "last.pt")
    assert evaluated_checkpoint_path(given) == given  # a file is taken as given
    with pytest.raises(UsageError, match="no checkpoint in .*final.pt once the run has finished"):
        evaluated_checkpoint_path(str(run_folder(tmp_path / "empty", [])))


def test_the_line_says_which_file_which_epoch_and_whether_the_run_finished(tmp_path):
    finished = run_folder(tmp_path / "finished", ["last.pt", "final.pt"], logged_epochs=3)
    final = str(finished / "checkpoints" / "final.pt")
    assert describe_checkpoint(final, FINAL) == f"{final} (epoch 3: the finished run)"

    stopped = run_folder(tmp_path / "stopped", ["last.pt"], logged_epochs=3)
    last = str(stopped / "checkpoints" / "last.pt")
    line = describe_checkpoint(last, dict(LAST, batches_done=5))
    assert line == f"{last} (epoch 3 and 5 steps of epoch 4: the run has no final.pt, so it was stopped before its end or is still training)"
    assert describe_checkpoint(str(finished / "checkpoints" / "last.pt"), LAST) == f"{finished / 'checkpoints' / 'last.pt'} (epoch 3)"

    # Finished at 3, resumed with --epochs 8 and stopped at 5: final.pt is the 3-epoch model, and the line says so.
    continued = run_folder(tmp_path / "continued", ["last.pt", "final.pt"], logged_epochs=5)
    final = str(continued / "checkpoints" / "final.pt")
    line = describe_checkpoint(final, FINAL)
    assert line == (f"{final} (epoch 3: the finished run); the run went on to epoch 5 after it, "
                    f"pass {continued / 'checkpoints' / 'last.pt'} to use that state")


@pytest.fixture(scope="module")
def stopped_run(one_epoch_run, tmp_path_factory):
    """The one-epoch run as a run stopped before its end leaves it: no final.pt."""
    folder = tmp_path_factory.mktemp("stopped_run")
    shutil.copytree(one_epoch_run / "checkpoints", folder / "checkpoints", ignore=shutil.ignore_patterns("final.pt"))
    shutil.copy(one_epoch_run / "metrics.csv", folder / "metrics.csv")
    return folder


@pytest.mark.parametrize("stopped", [False, True], ids=["finished", "stopped"])
def test_eval_of_a_run_folder_reads_final_pt_or_last_pt_and_says_which(one_epoch_run, stopped_run, stopped, capsys, tmp_path):
    run = stopped_run if stopped else one_epoch_run
    out = tmp_path / "eval.json"
    lp_eval.main(["--checkpoint", str(run), "--probe-epochs", "1", "--num-workers", "0", "--out", str(out)])
    printed = capsys.readouterr().out
    name = "last.pt" if stopped else "final.pt"
    file = run / "checkpoints" / name
    state = "the run has no final.pt, so it was stopped before its end or is still training" if stopped else "the finished run"
    assert printed.startswith(f"evaluating {file} (epoch 1: {state})\n"), printed
    results = json.loads(out.read_text())
    assert results["checkpoint"] == os.path.abspath(file) and results["epoch"] == 1
    # 2 classes: top-5 would be 100% by definition, so there is none.
    assert results["num_classes"] == 2 and "linear_backbone_top1" in results and not any("top5" in key for key in results)
    assert f"checkpoint: {os.path.abspath(file)}" in printed and "epoch: 1" in printed


def test_export_of_a_stopped_run_reads_last_pt_and_says_so(stopped_run, capsys, tmp_path):
    lp_export.main([str(stopped_run), "--out", str(tmp_path / "b.safetensors")])
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"from {stopped_run / 'checkpoints' / 'last.pt'} (epoch 1: the run has no final.pt, so it was stopped before its end or is still training)"
