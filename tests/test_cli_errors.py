"""Every bad flag value of the programs ends in one line, argparse's ``PROG: error: ...``, with exit code 2.

One test per case: the exit code, the message (the flag, the value, what is allowed),
no traceback, and, for the training program, no run folder (refused before any work).
The programs run in-process (a traceback there would be an exception other than
SystemExit(2)); ``test_a_bad_flag_prints_no_traceback_in_a_real_process`` checks the
same of a real process once.
"""
import os
import subprocess
import sys

import pytest
import torch

from lpjepa import eval as lp_eval
from lpjepa import export as lp_export
from lpjepa import plot as lp_plot
from lpjepa import train
from test_train import TINY, make_cifar100_folder, run_args

TRAIN = "python -m lpjepa.train: error: "


def refused(main, argv, capsys):
    """Run a program's main on argv; assert exit code 2 and one error line; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def assert_train_refuses(argv, expected, capsys, tmp_path):
    out = tmp_path / "run"
    line = refused(train.main, [*argv, "--out", str(out)], capsys)
    assert line.startswith(TRAIN), line
    for text in expected:
        assert text in line, line
    assert not out.exists()  # refused before any work: no run folder, no config.json
    return line


# (flags, texts the one line must hold): the flag, the value, what is allowed.
VALUE_CASES = {
    "p-zero": (["--p", "0"], ["argument --p: invalid value 0.0", "finite shape > 0"]),
    "p-nan": (["--p", "nan"], ["argument --p: invalid value nan"]),
    "mu-inf": (["--mu", "inf"], ["argument --mu: invalid value inf", "finite number"]),
    "num-projections": (["--num-projections", "0"], ["argument --num-projections: invalid value 0", ">= 1"]),
    "epochs-negative": (["--epochs", "-1"], ["argument --epochs: invalid value -1", ">= 1"]),
    "epochs-zero": (["--epochs", "0"], ["argument --epochs: invalid value 0"]),
    "batch-size-zero": (["--batch-size", "0"], ["argument --batch-size: invalid value 0", "at least 2"]),
    "batch-size-one": (["--batch-size", "1"], ["argument --batch-size: invalid value 1", "BatchNorm needs 2 images"]),
    "lr-zero": (["--lr", "0"], ["argument --lr: invalid value 0.0", "> 0"]),
    "lr-negative": (["--lr", "-0.1"], ["argument --lr: invalid value -0.1"]),
    "weight-decay": (["--weight-decay", "-1"], ["argument --weight-decay: invalid value -1.0", ">= 0"]),
    "lamb-inv": (["--lamb-inv", "-1"], ["argument --lamb-inv: invalid value -1.0", ">= 0"]),
    "lamb-reg": (["--lamb-reg", "nan"], ["argument --lamb-reg: invalid value nan"]),
    "warmup-negative": (["--schedule", "cosine", "--warmup-epochs", "-1"], ["argument --warmup-epochs: invalid value -1"]),
    "warmup-constant": (["--warmup-epochs", "2"], ["argument --warmup-epochs: invalid value 2", "--schedule cosine"]),
    "image-size": (["--image-size", "4"], ["argument --image-size: invalid value 4", ">= 8"]),
    "num-workers": (["--num-workers", "-1"], ["argument --num-workers: invalid value -1"]),
    "knn-k": (["--knn-k", "0"], ["argument --knn-k: invalid value 0", ">= 1"]),
    "knn-t": (["--knn-t", "0"], ["argument --knn-t: invalid value 0.0", "> 0"]),
    "probe-lr": (["--probe-lr", "-1"], ["argument --probe-lr: invalid value -1.0"]),
    "eval-every": (["--eval-every", "0"], ["argument --eval-every: invalid value 0", ">= 1"]),
    "save-every": (["--save-every", "-1"], ["argument --save-every: invalid value -1"]),
    "seed": (["--seed", "-1"], ["argument --seed: invalid value -1", "0 to 2**63 - 1"]),
    "device-name": (["--device", "banana"], ["argument --device: invalid value banana", "cpu, cuda or cuda:N"]),
    "log-every": (["--log-every", "0"], ["argument --log-every: invalid value 0", ">= 1"]),
    "device-data-of-an-image-folder": (["--device-data"], ["argument --device-data: invalid value True", "drop --device-data"]),
    "sigma": (["--sigma", "-1"], ["argument --sigma: must be gn, unit-rectified or a number > 0"]),
    "directions": (["--directions", "random"], ["argument --directions: invalid choice: 'random'"]),
    "not-an-int": (["--epochs", "abc"], ["argument --epochs: invalid int value: 'abc'"]),
    "not-a-choice": (["--optimizer", "sgd"], ["argument --optimizer: invalid choice: 'sgd'"]),
    "unknown-backbone": (["--backbone", "resnet999"], ["argument --backbone: invalid value resnet999", "closest timm names: resnet"]),
    "stem-the-backbone-lacks": (["--backbone", "vit_tiny_patch16_224"], ["argument --stem: invalid value cifar", "--stem imagenet"]),
    "image-size-the-backbone-cannot-take": (
        ["--backbone", "vit_tiny_patch16_224", "--stem", "imagenet"],
        ["argument --image-size: invalid value 16", "vit_tiny_patch16_224", "cannot take 16x16 images"],
    ),
}


@pytest.mark.parametrize("argv,expected", list(VALUE_CASES.values()), ids=list(VALUE_CASES))
def test_train_refuses_a_bad_value(argv, expected, tiny_images, capsys, tmp_path):
    assert_train_refuses([*run_args(tiny_images, tmp_path / "unused"), *argv], expected, capsys, tmp_path)


def test_train_refuses_a_gpu_this_machine_lacks(tiny_images, capsys, tmp_path):
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: cuda:0 on a machine without any
    assert_train_refuses([*run_args(tiny_images, tmp_path), "--device", missing],
                         [f"argument --device: invalid value {missing}", f"this machine has {torch.cuda.device_count()} CUDA GPU(s)"],
                         capsys, tmp_path)


def test_train_refuses_a_batch_that_does_not_divide_over_the_processes(tiny_images, capsys, tmp_path, patch):
    patch.setenv("WORLD_SIZE", "4")  # as torchrun --nproc_per_node 4 sets it, before any process group exists
    line = assert_train_refuses([*run_args(tiny_images, tmp_path), "--batch-size", "6"], ["argument --batch-size: invalid value 6"], capsys, tmp_path)
    assert "multiple of the 4 processes" in line and "8, 12" in line


def test_train_refuses_a_batch_larger_than_the_training_set(tiny_images, capsys, tmp_path):
    assert_train_refuses([*run_args(tiny_images, tmp_path), "--batch-size", "64"],
                         ["argument --batch-size: invalid value 64", "only 16 images"], capsys, tmp_path)


def test_train_names_a_missing_image_folder(capsys, tmp_path):
    line = assert_train_refuses(["--dataset", "imagefolder", "--data-dir", "/nope", *TINY],
                                ["argument --data-dir: /nope does not exist", "train/CLASS/IMAGE and val/CLASS/IMAGE"], capsys, tmp_path)
    assert "--val-dir" not in line  # the missing folder is the problem, not a missing --val-dir


def test_train_names_an_image_folder_without_train_and_val(tiny_images, capsys, tmp_path):
    flat = os.path.join(tiny_images, "train")  # class folders, no train/ and val/ inside
    assert_train_refuses(["--dataset", "imagefolder", "--data-dir", flat, *TINY],
                         [f"argument --data-dir: {flat} holds no train/ and val/ folders", "--val-dir VAL_DIR"], capsys, tmp_path)


def test_train_names_a_missing_val_dir(tiny_images, capsys, tmp_path):
    assert_train_refuses(["--dataset", "imagefolder", "--data-dir", os.path.join(tiny_images, "train"), "--val-dir", "/nope/val", *TINY],
                         ["argument --val-dir: /nope/val does not exist"], capsys, tmp_path)


def test_train_names_missing_cifar_and_how_to_get_it(capsys, tmp_path):
    out = tmp_path / "run"
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        train.main(["--data-dir", str(tmp_path / "nowhere"), "--no-download", "--out", str(out), *TINY])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err
    first, *hint = err.strip().splitlines()
    assert first.startswith(TRAIN + "argument --data-dir: cifar100 is not in") and "--no-download is set" in first
    hint = "\n".join(hint)  # how to get it, after the one error line
    assert "download=True" in hint and "--dataset imagefolder" in hint
    assert not out.exists()


def test_train_refuses_a_cifar_copy_that_fails_the_checksums(capsys, tmp_path):
    data = make_cifar100_folder(str(tmp_path / "data"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        train.main(["--data-dir", data, "--no-download", "--out", str(tmp_path / "run"), *TINY])
    first = capsys.readouterr().err.splitlines()[0]
    assert stopped.value.code == 2 and "do not match torchvision's checksums" in first


def test_train_refuses_a_resume_without_checkpoint(capsys, tmp_path):
    assert_train_refuses(["--resume", str(tmp_path / "nope")], ["argument --resume: no checkpoint at", "checkpoints/last.pt"], capsys, tmp_path)


def test_train_refuses_a_resume_from_a_file_that_is_no_checkpoint(capsys, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    assert_train_refuses(["--resume", str(bad)], [f"{bad} is not a checkpoint written by lpjepa.train"], capsys, tmp_path)


def test_train_says_what_a_resume_from_final_pt_cannot_do(one_epoch_run, capsys, tmp_path):
    final = one_epoch_run / "checkpoints" / "final.pt"
    assert_train_refuses(["--resume", str(final), "--epochs", "2"],
                         ["argument --resume:", "final checkpoint", "no optimizer state", "resume from the run folder", "lpjepa.eval"],
                         capsys, tmp_path)


def test_train_says_a_finished_run_needs_more_epochs(one_epoch_run, capsys, tmp_path):
    assert_train_refuses(["--resume", str(one_epoch_run)], ["has finished all 1 epochs", "pass --epochs N with N > 1"], capsys, tmp_path)
    assert_train_refuses(["--resume", str(one_epoch_run), "--epochs", "1"],
                         ["argument --epochs: invalid value 1", "more than the 1 epochs the checkpoint has finished"], capsys, tmp_path)


def test_train_refuses_to_change_the_model_on_resume(one_epoch_run, capsys, tmp_path):
    assert_train_refuses(["--resume", str(one_epoch_run), "--epochs", "2", "--backbone", "resnet18"],
                         ["argument --backbone: the checkpoint was trained with resnet10t", "cannot change"], capsys, tmp_path)


def test_train_refuses_a_new_run_in_a_folder_that_holds_one(one_epoch_run, tiny_images, capsys, tmp_path):
    kept = {name: (one_epoch_run / name).read_bytes() for name in ("metrics.csv", "config.json", "checkpoints/last.pt")}
    line = refused(train.main, run_args(tiny_images, one_epoch_run, "--epochs", "1"), capsys)
    for text in (TRAIN, f"argument --out: {one_epoch_run} already holds a run", "checkpoints/last.pt",
                 f"continue it with --resume {one_epoch_run}", "give a new --out"):
        assert text in line, line
    assert {name: (one_epoch_run / name).read_bytes() for name in kept} == kept  # nothing of the old run touched
    started_only = tmp_path / "started"  # a run stopped before its first checkpoint still has a config.json
    started_only.mkdir()
    (started_only / "config.json").write_text("{}")
    assert "(config.json)" in refused(train.main, run_args(tiny_images, started_only, "--epochs", "1"), capsys)


def test_a_bad_flag_prints_no_traceback_in_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lpjepa.train", "--batch-size", "1", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == TRAIN + "argument --batch-size: invalid value 1: at least 2 (BatchNorm needs 2 images per process)\n"


# ----------------------------------------------------------------------------- lpjepa.eval

EVAL_CASES = {
    "batch-size": (["--batch-size", "0"], "argument --batch-size: invalid value 0"),
    "probe-epochs": (["--probe-epochs", "0"], "argument --probe-epochs: invalid value 0"),
    "probe-lr": (["--probe-lr", "0"], "argument --probe-lr: invalid value 0.0"),
    "knn-k": (["--knn-k", "0"], "argument --knn-k: invalid value 0"),
    "knn-t": (["--knn-t", "-1"], "argument --knn-t: invalid value -1.0"),
    "num-workers": (["--num-workers", "-2"], "argument --num-workers: invalid value -2"),
    "device": (["--device", "banana"], "argument --device: invalid value banana"),
    "out-folder": (["--out", "/nope/eval.json"], "argument --out: the folder of /nope/eval.json does not exist"),
    "data-dir": (["--data-dir", "/nope"], "argument --data-dir: /nope does not exist"),
}


@pytest.mark.parametrize("argv,expected", list(EVAL_CASES.values()), ids=list(EVAL_CASES))
def test_eval_refuses_a_bad_value(argv, expected, one_epoch_run, capsys):
    line = refused(lp_eval.main, ["--checkpoint", str(one_epoch_run), "--num-workers", "0", *argv], capsys)
    assert line.startswith("python -m lpjepa.eval: error: " + expected), line


def test_eval_refuses_a_missing_checkpoint(capsys, tmp_path):
    line = refused(lp_eval.main, ["--checkpoint", str(tmp_path / "nope")], capsys)
    assert "no checkpoint at" in line and str(tmp_path / "nope") in line


def test_eval_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        lp_eval.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default 100)", "(default 0.001)", "(default 512)", "(default auto)", "the run's, 200", "the run's, 0.07"):
        assert default in text, default


# ----------------------------------------------------------------------------- lpjepa.plot and lpjepa.export


def test_plot_refuses_a_folder_that_is_not_a_run(capsys, tmp_path):
    line = refused(lp_plot.main, [str(tmp_path / "nope")], capsys)
    assert line == f"python -m lpjepa.plot: error: argument run_dir: {tmp_path / 'nope'} does not exist (pass the run folder lpjepa.train wrote, its --out)"
    line = refused(lp_plot.main, [str(tmp_path)], capsys)
    assert "has no metrics.csv" in line


def test_plot_refuses_an_out_that_is_a_file(one_epoch_run, capsys, tmp_path):
    target = tmp_path / "file.png"
    target.write_text("")
    assert "argument --out: " in refused(lp_plot.main, [str(one_epoch_run), "--out", str(target)], capsys)


def test_export_refuses_bad_arguments(one_epoch_run, capsys, tmp_path):
    line = refused(lp_export.main, [str(tmp_path / "nope"), "--out", str(tmp_path / "b.safetensors")], capsys)
    assert line.startswith("python -m lpjepa.export: error: no checkpoint at")
    line = refused(lp_export.main, [str(one_epoch_run), "--out", str(tmp_path / "b.pt")], capsys)
    assert "argument --out: invalid value" in line and "must end in .safetensors" in line
    same = str(tmp_path / "b.safetensors")
    assert "must differ from --out" in refused(lp_export.main, [str(one_epoch_run), "--out", same, "--projector-out", same], capsys)
    # A folder that does not exist is refused, not made: a typo would leave folders behind.
    for flag in ("--out", "--projector-out"):
        missing = tmp_path / "nonexistent" / "dir"
        argv = [str(one_epoch_run), "--out", same, flag, str(missing / "x.safetensors")]
        line = refused(lp_export.main, argv, capsys)
        assert line == (f"python -m lpjepa.export: error: argument {flag}: the folder of {missing / 'x.safetensors'} does not "
                        f"exist; create it first (mkdir -p {missing}) or name a file in an existing folder")
        assert not (tmp_path / "nonexistent").exists() and not (tmp_path / "b.safetensors").exists()


def test_train_refuses_another_optimizer_on_resume(one_epoch_run, capsys, tmp_path):
    # Its saved state has other parameter groups and moments: it cannot continue exactly.
    assert_train_refuses(["--resume", str(one_epoch_run), "--epochs", "2", "--optimizer", "lars"],
                         ["argument --optimizer: the checkpoint was trained with adamw", "cannot change"], capsys, tmp_path)
