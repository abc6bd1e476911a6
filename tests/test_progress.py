"""Progress of a training epoch: a tqdm bar on a terminal, a few plain lines with the loss anywhere else.

Off a terminal (a log file, CI) a line comes only after a step whose values were read
from the device, at most one per tenth of the epoch, and always at the epoch's end; the
streams here are fakes, one that says it is a terminal and one that does not.
"""
import io
import re

from lpjepa import train
from lpjepa.training.runlog import Progress
from test_train import TINY, run_args


class Terminal(io.StringIO):
    def isatty(self):
        return True


def steps(progress, total, read_every, close=True):
    """Run ``total`` steps; the values are read at every ``read_every``-th step and at the last."""
    loss = None
    for step in range(1, total + 1):
        read = step % read_every == 0 or step == total
        if read:
            loss = 1.0 / step
        progress.update({"loss": "-" if loss is None else f"{loss:.4f}", "img/s": "100"}, read=read)
    if close:
        progress.close()


def test_off_a_terminal_a_short_epoch_read_once_gets_one_line_with_its_loss():
    # The CPU demo's epoch: 16 steps, the device read at the last one only (--log-every 50).
    stream = io.StringIO()
    steps(Progress(16, "epoch 1/2", stream=stream), total=16, read_every=50)
    assert stream.getvalue() == "epoch 1/2 16/16 | loss 0.0625 img/s 100\n"


def test_off_a_terminal_a_long_epoch_gets_a_line_per_tenth_each_with_a_fresh_loss():
    stream = io.StringIO()
    steps(Progress(1000, "epoch 3/100", stream=stream), total=1000, read_every=50)
    lines = stream.getvalue().splitlines()
    done = [int(re.match(r"epoch 3/100 (\d+)/1000 \| loss ([0-9.]+)", line).group(1)) for line in lines]
    assert done == list(range(100, 1001, 100))
    assert all(f"loss {1 / step:.4f}" in line for step, line in zip(done, lines))
    assert "\r" not in stream.getvalue()


def test_off_a_terminal_a_resumed_epoch_counts_from_where_it_starts():
    stream = io.StringIO()
    progress = Progress(20, "epoch 2/2", stream=stream, initial=15)
    for step in range(16, 21):
        progress.update({"loss": "0.5000"}, read=True)
    # A line per 2 steps (a tenth of 20) from step 15 on, and the epoch's last.
    assert [line.split(" |")[0] for line in stream.getvalue().splitlines()] == ["epoch 2/2 17/20", "epoch 2/2 19/20", "epoch 2/2 20/20"]


def test_on_a_terminal_the_bar_stays():
    stream = Terminal()
    progress = Progress(16, "epoch 1/2", stream=stream)
    steps(progress, total=16, read_every=50, close=False)
    # tqdm redraws at most every 0.1 s, so the bar's own state says what it shows.
    assert progress.bar is not None and progress.bar.n == 16 and "loss=0.0625" in progress.bar.postfix
    progress.close()
    text = stream.getvalue()
    assert "\r" in text and "epoch 1/2" in text
    assert "epoch 1/2 16/16 |" not in text  # no plain lines beside the bar


def test_a_training_run_in_a_log_prints_one_progress_line_per_short_epoch(tiny_images, tmp_path, capsys):
    # 16 training images, batch 4: 4 steps an epoch, the device read at the last (--log-every 50).
    argv = [a for a in run_args(tiny_images, tmp_path / "run", "--epochs", "2") if a != "--no-progress"]
    assert len(argv) == len(run_args(tiny_images, tmp_path / "run")) + 1 and "--no-progress" in TINY
    train.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert [line.split(" | ")[0] for line in lines] == ["epoch 1/2 4/4", "epoch 2/2 4/4"], err
    assert all(re.search(r"\| loss \d+\.\d{4} zeros", line) for line in lines), lines
