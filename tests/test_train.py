"""The training and evaluation programs on tiny generated datasets, on the CPU.

Every dataset is built on the fly: an ImageFolder of 16x16 PNGs (2 classes x 8 train,
2 x 4 val) and a CIFAR-100-format folder of pickles. The backbone is timm's resnet10t
with the CIFAR stem; runs are 1-2 epochs of 4 steps.
"""
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

import lpjepa
from lpjepa import eval as lp_eval
from lpjepa import metrics, reference, train
from lpjepa.training import evaluation, loop, optim, plot, runlog
from lpjepa.training.config import build_parser, resolve_config
from lpjepa.training.data import DataNotFound, load_splits
from lpjepa.training.model import LpJEPA
from conftest import free_port

TINY = ["--backbone", "resnet10t", "--image-size", "16", "--batch-size", "4", "--num-workers", "0",
        "--num-projections", "16", "--knn-k", "5", "--no-progress"]


def make_imagefolder(root, n_train=8, n_val=4, size=16, classes=2):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                image = (rng.random((size, size, 3)) * 255).astype(np.uint8)
                image[..., c % 3] = 220  # a class colour, so probes and kNN have something to find
                Image.fromarray(image).save(os.path.join(folder, f"{i}.png"))
    return root


def make_cifar100_folder(root, n_train=16, n_test=8, classes=4):
    """A CIFAR-100 copy in the official pickle format (its md5s differ from the official files)."""
    rng = np.random.default_rng(0)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = [i % classes for i in range(n)]
        data = (rng.random((n, 3072)) * 255).astype(np.uint8)
        entry = {"data": data, "fine_labels": labels, "coarse_labels": [0] * n, "filenames": [f"{i}.png" for i in range(n)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(classes)], "coarse_label_names": ["all"]}, f)
    return root


def run_args(data, out, *extra):
    return ["--dataset", "imagefolder", "--data-dir", data, "--out", str(out), *TINY, *extra]


def config(argv):
    return resolve_config(build_parser().parse_args(argv))


@pytest.fixture(scope="module")
def straight_run(tiny_images, tmp_path_factory):
    """Two epochs without interruption: the reference for every resume test."""
    out = tmp_path_factory.mktemp("straight")
    train.main(run_args(tiny_images, out, "--epochs", "2"))
    return out


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_state(a, b, atol=1e-6):
    for part in ("model", "probes"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], atol=atol, rtol=0, msg=f"{part}.{key}")
    for group_a, group_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in group_a:
            torch.testing.assert_close(group_a[key], group_b[key], atol=atol, rtol=0)


# ----------------------------------------------------------------------------- model


def test_imagenet_stem_is_the_seed_model():
    torch.manual_seed(0)
    seed_model = reference.RectifiedLpJEPA().eval()
    torch.manual_seed(0)
    model = LpJEPA("resnet18", stem="imagenet").eval()
    seed_state, state = seed_model.state_dict(), model.state_dict()
    assert seed_state.keys() == state.keys()
    for key in state:
        assert torch.equal(seed_state[key], state[key]), key
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(seed_model(x), model(x))


@pytest.mark.parametrize("backbone", ["resnet18", "resnet10t"])
def test_cifar_stem_keeps_32px_spatial(backbone):
    model = LpJEPA(backbone, stem="cifar").eval()
    with torch.no_grad():
        fmap = model.backbone.forward_features(torch.randn(1, 3, 32, 32))
        h, z = model.features(torch.randn(2, 3, 32, 32))
    assert fmap.shape[-2:] == (4, 4)  # the ImageNet stem gives 1x1
    assert isinstance(model.backbone.maxpool, torch.nn.Identity)
    assert h.shape == z.shape == (2, model.feature_dim) and (z >= 0).all()


def test_cifar_stem_refuses_a_model_without_resnet_stem():
    with pytest.raises(ValueError, match="--stem imagenet"):
        LpJEPA("vit_tiny_patch16_224", stem="cifar")


# ----------------------------------------------------------------------------- config


def test_defaults_are_the_seed_and_the_paper_preset_overrides_them():
    cfg, _ = config([])
    seed_values = dict(epochs=100, batch_size=256, lr=1e-3, weight_decay=1e-4, lamb_inv=25.0, lamb_reg=125.0, p=1.0,
                       mu=0.0, num_projections=256, optimizer="adamw", schedule="constant", augmentation="seed",
                       dataset="cifar100", backbone="resnet18", stem="cifar", amp=True)
    assert {k: cfg[k] for k in seed_values} == seed_values
    cfg, _ = config(["--preset", "paper", "--epochs", "3"])
    assert (cfg["optimizer"], cfg["lr"], cfg["schedule"], cfg["num_projections"], cfg["lamb_reg"]) == ("lars", 0.03, "cosine", 8192, 250.0)
    assert cfg["epochs"] == 3  # a flag given beats the preset


def test_paper_optimizer_is_lars_with_warmup_then_cosine():
    cfg, _ = config(["--preset", "paper", "--epochs", "4", "--warmup-epochs", "1"])
    model = torch.nn.Linear(3, 3)
    optimizer = optim.build_optimizer(model, cfg)
    scheduler = optim.build_scheduler(optimizer, cfg, steps_per_epoch=10)
    assert isinstance(optimizer, optim.LARS)
    lrs = [optimizer.param_groups[0]["lr"]]
    for step in range(1, 41):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(3e-5) and lrs[4] < lrs[9] == pytest.approx(0.03)  # linear warm-up over the first epoch
    assert lrs[20] < lrs[10] and lrs[-1] == pytest.approx(0.0, abs=1e-9)  # then cosine to 0


def test_loss_family_flags_reach_the_loss():
    cfg, _ = config(["--target-law", "dense", "--sigma", "unit-rectified", "--directions", "svd", "--target-draw", "per-view"])
    assert (cfg["target_law"], cfg["sigma"], cfg["directions"], cfg["target_draw"]) == ("dense", "unit-rectified", "svd", "per-view")
    assert config(["--sigma", "0.5"])[0]["sigma"] == 0.5
    defaults, _ = config([])
    assert (defaults["target_law"], defaults["sigma"], defaults["directions"], defaults["target_draw"]) == (
        "rectified", "gn", "gaussian", "shared")
    z1, z2 = torch.rand(2, 12, 6).unbind()
    torch.manual_seed(3)
    ours = loop.ssl_loss(z1, z2, cfg)
    torch.manual_seed(3)
    expected = lpjepa.rectified_lpjepa_loss(
        z1, z2, num_projections=cfg["num_projections"], sigma="unit-rectified", rectify=False, directions="svd",
        target_draw="per-view",
    )
    torch.testing.assert_close(ours.loss, expected.loss)
    torch.manual_seed(3)
    assert ours.regularizer != loop.ssl_loss(z1, z2, defaults).regularizer


@pytest.mark.parametrize("flag,value,message", [
    ("--sigma", "-1", "argument --sigma: must be gn, unit-rectified or a number > 0; got '-1'"),
    ("--sigma", "sigma_RGN", "argument --sigma: must be gn, unit-rectified or a number > 0"),
    ("--directions", "random", "argument --directions: invalid choice: 'random'"),
    ("--target-law", "relu", "argument --target-law: invalid choice: 'relu'"),
    ("--target-draw", "each", "argument --target-draw: invalid choice: 'each'"),
])
def test_bad_loss_family_flag_is_one_line(flag, value, message, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([flag, value])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and error.startswith("python -m lpjepa.train: error:")


def test_vicreg_statistics_are_device_tensors_of_both_views():
    z1, z2 = torch.rand(2, 16, 8, generator=torch.Generator().manual_seed(1)).unbind()
    stats = loop.vicreg_statistics(z1, z2)
    assert isinstance(stats, torch.Tensor) and stats.shape == (2,)
    expected = [metrics.vicreg_variance(z1) + metrics.vicreg_variance(z2),
                metrics.vicreg_covariance(z1) + metrics.vicreg_covariance(z2)]
    torch.testing.assert_close(stats, torch.stack(expected))


# ----------------------------------------------------------------------------- runs


def test_run_folder_eval_and_plot(straight_run, tiny_images, capsys):
    cfg = json.load(open(straight_run / "config.json"))
    assert cfg["epochs"] == 2 and cfg["backbone"] == "resnet10t" and cfg["world_size"] == 1
    rows = runlog.MetricsCSV(straight_run / "metrics.csv", runlog.COLUMNS).read()
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        for key in runlog.COLUMNS:
            if key == evaluation.OFFICIAL_TOP1:  # the paper's metric is the official classifier's: not this AdamW probe's
                assert row[key] == "", key
                continue
            assert math.isfinite(float(row[key])), key
        assert 0 <= float(row["probe_backbone_top1"]) <= 1 and float(row["prior_zero_fraction"]) == 0.5
    last, final = (load(straight_run / "checkpoints" / name) for name in ("last.pt", "final.pt"))
    assert last["epoch"] == final["epoch"] == 2 and last["batches_done"] == final["batches_done"] == 0
    # final.pt is lean: the model, probes and config, the same weights as last.pt, no optimizer state.
    assert set(final) == {"kind", "config", "epoch", "batches_done", "global_step", "model", "probes"}
    assert {"optimizer", "probe_optimizer", "scaler", "rng"} <= set(last)
    for part in ("model", "probes"):
        assert all(torch.equal(last[part][k], final[part][k]) for k in last[part])
    assert not [f for f in os.listdir(straight_run / "checkpoints") if ".tmp" in f]

    final = str(straight_run / "checkpoints" / "final.pt")
    lp_eval.main(["--checkpoint", final, "--probe-epochs", "5", "--num-workers", "0", "--knn-k", "50"])
    results = json.load(open(straight_run / "eval.json"))
    assert results["epoch"] == 2 and "linear_projector_top1" in results
    assert 0 <= results["linear_backbone_top1"] <= 1 and 0 <= results["knn_top1"] <= 1
    # k is capped at the smallest class's 8 training images, and the capping is said.
    assert results["knn_k"] == 8
    out = capsys.readouterr().out
    assert "knn_top1" in out and "--knn-k 50 is more than the 8 training images of the smallest class" in out
    paths = plot.plot_run(str(straight_run))
    assert [os.path.basename(p) for p in paths] == ["loss.png", "accuracy.png", "sparsity.png"]
    assert all(os.path.getsize(p) > 1000 for p in paths)


def test_dense_per_view_svd_run_logs_its_family(tiny_images, tmp_path):
    out = tmp_path / "family"
    train.main(run_args(tiny_images, out, "--epochs", "1", "--target-law", "dense", "--sigma", "unit-rectified",
                        "--directions", "svd-bottom-half", "--target-draw", "per-view"))
    cfg = json.load(open(out / "config.json"))
    assert (cfg["target_law"], cfg["sigma"], cfg["directions"], cfg["target_draw"]) == (
        "dense", "unit-rectified", "svd-bottom-half", "per-view")
    row, = runlog.MetricsCSV(out / "metrics.csv", runlog.COLUMNS).read()
    assert float(row["prior_zero_fraction"]) == 0.0  # a dense target has no zeros
    assert float(row["vicreg_variance"]) >= 0 and math.isfinite(float(row["vicreg_covariance"]))


def test_resume_continues_exactly(straight_run, tiny_images, tmp_path):
    out = tmp_path / "resumed"
    train.main(run_args(tiny_images, out, "--epochs", "1"))
    assert load(out / "checkpoints" / "last.pt")["epoch"] == 1
    train.main(["--resume", str(out), "--epochs", "2", "--no-progress"])
    assert_same_state(load(straight_run / "checkpoints" / "last.pt"), load(out / "checkpoints" / "last.pt"))
    straight = runlog.MetricsCSV(straight_run / "metrics.csv", runlog.COLUMNS).read()
    resumed = runlog.MetricsCSV(out / "metrics.csv", runlog.COLUMNS).read()
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]


def test_resume_with_more_epochs_follows_the_longer_cosine(tiny_images, tmp_path):
    out = tmp_path / "extended"
    train.main(run_args(tiny_images, out, "--epochs", "1", "--schedule", "cosine"))
    train.main(["--resume", str(out), "--epochs", "3", "--no-progress"])
    rows = runlog.MetricsCSV(out / "metrics.csv", runlog.COLUMNS).read()
    assert [int(r["step"]) for r in rows] == [4, 8, 12]
    cfg, _ = config(run_args(tiny_images, out, "--epochs", "3", "--schedule", "cosine"))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg["lr"])
    three_epochs = optim.build_scheduler(optimizer, cfg, steps_per_epoch=4)
    three_epochs.step_update(8)
    # The 1-epoch cosine had reached 0 at step 4; the run now follows the 3-epoch one.
    assert float(rows[0]["lr"]) == pytest.approx(0.0, abs=1e-12)
    assert float(rows[1]["lr"]) == pytest.approx(optimizer.param_groups[0]["lr"]) == pytest.approx(0.25 * cfg["lr"])


def test_flags_given_with_resume_reach_the_optimizers(tiny_images, tmp_path):
    out = tmp_path / "retuned"
    train.main(run_args(tiny_images, out, "--epochs", "1"))
    train.main(["--resume", str(out), "--epochs", "2", "--lr", "2e-4", "--weight-decay", "0.05", "--probe-lr", "5e-4",
                "--no-progress"])
    last = load(out / "checkpoints" / "last.pt")
    assert {(g["lr"], g["weight_decay"]) for g in last["optimizer"]["param_groups"]} == {(2e-4, 0.05)}
    assert {g["lr"] for g in last["probe_optimizer"]["param_groups"]} == {5e-4}
    rows = runlog.MetricsCSV(out / "metrics.csv", runlog.COLUMNS).read()
    assert float(rows[1]["lr"]) == pytest.approx(2e-4)


def test_sigterm_mid_epoch_saves_and_resumes_exactly(straight_run, tiny_images, tmp_path):
    out = tmp_path / "interrupted"
    cfg, _ = config(run_args(tiny_images, out, "--epochs", "2"))

    def terminate_at_step_two(epoch, batch):
        if (epoch, batch) == (0, 2):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as stopped:
        loop.train(cfg, on_step=terminate_at_step_two)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    state = load(out / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batches_done"], state["global_step"]) == (0, 2, 2)
    assert not (out / "checkpoints" / "final.pt").exists()
    # The batch size can change only where an epoch ends: the images already seen are counted in batches.
    with pytest.raises(SystemExit) as refused:
        train.main(["--resume", str(out), "--batch-size", "2", "--no-progress"])
    assert refused.value.code == 2
    train.main(["--resume", str(out / "checkpoints" / "last.pt"), "--no-progress"])
    assert_same_state(load(straight_run / "checkpoints" / "last.pt"), load(out / "checkpoints" / "last.pt"))


def test_cifar_format_folder_trains_with_skip_data_check(tmp_path, capsys):
    data = make_cifar100_folder(str(tmp_path / "data"))
    with pytest.raises(DataNotFound, match="--skip-data-check"):
        load_splits("cifar100", data, download=False)
    # --data-dir may also name the cifar-100-python folder itself.
    train_set, val_set = load_splits("cifar100", os.path.join(data, "cifar-100-python"), skip_data_check=True)
    assert (len(train_set), len(val_set), len(train_set.classes)) == (16, 8, 4)
    args = ["--data-dir", data, "--skip-data-check", "--no-download", "--out", str(tmp_path / "run"), "--epochs", "1", *TINY]
    args[args.index("--image-size") + 1] = "32"
    train.main(args)
    assert "epoch 1/1 | loss" in capsys.readouterr().out
    assert len(runlog.MetricsCSV(tmp_path / "run" / "metrics.csv", runlog.COLUMNS).read()) == 1


def test_failed_download_says_why_removes_what_it_made_and_offers_no_download(tmp_path, patch):
    from torchvision import datasets

    def no_network(self):
        raise urllib.error.URLError("no network")

    patch.setattr(datasets.CIFAR100, "download", no_network)
    with pytest.raises(DataNotFound, match="(?s)downloading it failed \\(URLError.*download=True") as failed:
        load_splits("cifar100", str(tmp_path / "data"))
    assert "drop --no-download" not in str(failed.value)  # the download is what just failed
    assert not (tmp_path / "data").exists()  # no empty ./data left behind


# ----------------------------------------------------------------------------- evaluation helpers


def test_knn_and_topk_on_separable_clusters():
    torch.manual_seed(0)
    centers = torch.eye(3, 8) * 10
    train_y = torch.arange(3).repeat(10)
    test_y = torch.arange(3).repeat(4)
    train_x = centers[train_y] + torch.randn(30, 8)
    test_x = centers[test_y] + torch.randn(12, 8)
    assert evaluation.knn_accuracy(train_x, train_y, test_x, test_y, 3, k=200) == [1.0, 1.0]
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    assert evaluation.topk_accuracy(scores, torch.tensor([0, 0])) == [0.5, 1.0]  # top-5 capped at 2 classes


# ----------------------------------------------------------------------------- DDP


def _torchrun_two_cpu_processes(*train_args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "lpjepa.train", *train_args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_torchrun_two_cpu_processes_and_exact_resume(tiny_images, tmp_path):
    out = tmp_path / "ddp"
    result = _torchrun_two_cpu_processes(*run_args(tiny_images, out, "--epochs", "1"))
    assert result.stdout.count("epoch 1/1 | loss") == 1  # rank 0 alone logs
    cfg = json.load(open(out / "config.json"))
    assert cfg["world_size"] == 2
    assert len(runlog.MetricsCSV(out / "metrics.csv", runlog.COLUMNS).read()) == 1
    assert load(out / "checkpoints" / "final.pt")["epoch"] == 1

    # Resumed for a second epoch, it ends where two uninterrupted epochs end: the global
    # loss's seed stream picks up at the checkpoint's step.
    _torchrun_two_cpu_processes("--resume", str(out), "--epochs", "2", "--no-progress")
    straight = tmp_path / "ddp_straight"
    _torchrun_two_cpu_processes(*run_args(tiny_images, straight, "--epochs", "2"))
    assert_same_state(load(straight / "checkpoints" / "last.pt"), load(out / "checkpoints" / "last.pt"))
    shutil.rmtree(out)
    shutil.rmtree(straight)


def test_progress_off_a_terminal_prints_about_ten_plain_lines():
    import io

    from lpjepa.training.runlog import Progress

    stream = io.StringIO()
    progress = Progress(40, "epoch 1/3", stream=stream)
    for _ in range(40):
        progress.update({"loss": "1.0000", "zeros": "50.0%"})
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in stream.getvalue()
    assert lines[-1] == "epoch 1/3 40/40 | loss 1.0000 zeros 50.0%"


# ----------------------------------------------------------------------------- --preset paper


def paper_args(data, out, *extra):
    """A tiny --preset paper run on the CIFAR-format folder: 4 images per process, 1 warm-up epoch of 4 steps."""
    tiny = [a for a in TINY]
    del tiny[tiny.index("--batch-size"):tiny.index("--batch-size") + 2]
    return ["--preset", "paper", "--data-dir", data, "--skip-data-check", "--no-download", "--out", str(out),
            "--epochs", "2", "--warmup-epochs", "1", "--batch-per-device", "4", *tiny, *extra]


@pytest.mark.parametrize("data_path", ["--no-device-data", "--device-data"])
def test_paper_preset_runs_the_official_recipe_on_both_data_paths(data_path, tmp_path, capsys):
    data = make_cifar100_folder(str(tmp_path / "data"))
    out = tmp_path / "paper"
    train.main(paper_args(data, out, data_path))
    cfg = json.load(open(out / "config.json"))
    assert cfg["device_data_active"] == (data_path == "--device-data") and cfg["batch_size"] == 4
    assert (cfg["stem_padding"], cfg["target_draw"], cfg["probe_optimizer"]) == (2, "per-view", "lars")
    rows = runlog.MetricsCSV(out / "metrics.csv", runlog.COLUMNS).read()
    scale = 4 / 256  # --lr-scaling linear: the global batch of 4 / 256
    # After 8 steps of 2 epochs: warm-up over the first 4, cosine over the next 4, which ends at 0.
    assert float(rows[0]["lr"]) == pytest.approx(0.03 * scale) and float(rows[1]["lr"]) == pytest.approx(0.0, abs=1e-12)
    for row in rows:  # the paper's metric is the backbone probe, the official classifier
        assert row[evaluation.OFFICIAL_TOP1] == row["probe_backbone_top1"] != ""
    assert "online linear top-1" in capsys.readouterr().out
    last = load(out / "checkpoints" / "last.pt")
    model_group, = last["optimizer"]["param_groups"]
    assert (model_group["eta"], model_group["clip_lr"], model_group["exclude_bias_n_norm"], model_group["weight_decay"]) == (
        0.02, True, True, 1e-4)
    probe_group, = last["probe_optimizer"]["param_groups"]
    assert (probe_group["weight_decay"], probe_group["eta"]) == (0.0, 0.02) and probe_group["lr"] == pytest.approx(0.0, abs=1e-12)


def test_paper_preset_under_torchrun_scales_by_the_processes(tmp_path):
    data = make_cifar100_folder(str(tmp_path / "data"))
    out = tmp_path / "paper-ddp"
    _torchrun_two_cpu_processes(*paper_args(data, out, "--batch-per-device", "2", "--epochs", "1"))
    cfg = json.load(open(out / "config.json"))
    assert (cfg["world_size"], cfg["batch_size"], cfg["batch_per_device"]) == (2, 4, 2)
    row, = runlog.MetricsCSV(out / "metrics.csv", runlog.COLUMNS).read()
    assert float(row["lr"]) == pytest.approx(0.0, abs=1e-12) and row[evaluation.OFFICIAL_TOP1] != ""
